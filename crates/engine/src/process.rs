//! Starting worker processes, learning of their exits, and signalling them.
//!
//! Workers are started with a hand-written fork/exec rather than
//! `std::process::Command`, because the launcher reaps every child itself
//! (it is a child subreaper, so orphaned grandchildren come back to it) and
//! std's spawn may `waitpid` a child behind our back. Between fork and exec the
//! child calls only async-signal-safe functions: it starts its own session,
//! asks for SIGKILL when the launcher dies, restores default signal handling
//! and an empty signal mask, wires its stdio, and execs.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use std::sync::Mutex;

use tokio::sync::mpsc;

/// Where one of a worker's output streams goes.
#[derive(Debug)]
pub enum Stdio {
    /// The launcher's own stream (console, no prefix).
    Inherit,
    /// A file or pipe opened by the launcher.
    Fd(OwnedFd),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
    /// torch's convention: exit code, or minus the signal number.
    pub fn torch_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => -s,
        }
    }
    /// A shell's convention: exit code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// A child's exit, as reported by the reaper.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub pid: i32,
    pub status: ExitStatus,
}

/// Finds `program` like `execvp` would: a name with a `/` is used as is,
/// otherwise the first executable match on `PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn cstring(s: &[u8]) -> io::Result<CString> {
    CString::new(s)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte"))
}

/// Everything a worker needs, prepared before forking.
pub struct SpawnSpec<'a> {
    pub program: &'a Path,
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

/// Starts a worker in its own session (pgid = pid). Returns its pid.
pub fn spawn(spec: SpawnSpec<'_>) -> io::Result<i32> {
    ensure_reaper();
    let prog = cstring(spec.program.as_os_str().as_bytes())?;
    let mut argv_c = vec![prog.clone()];
    for a in spec.args {
        argv_c.push(cstring(a.as_bytes())?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let env_c: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<_>>()?;
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let out_fd: RawFd = match &spec.stdout {
        Stdio::Inherit => 1,
        Stdio::Fd(f) => f.as_raw_fd(),
    };
    let err_fd: RawFd = match &spec.stderr {
        Stdio::Inherit => 2,
        Stdio::Fd(f) => f.as_raw_fd(),
    };
    // Reports an exec failure (errno) from the child; closed on exec.
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (err_r, err_w) = (fds[0], fds[1]);
    let parent = std::process::id() as libc::pid_t;

    // SAFETY: the child runs only async-signal-safe calls until execve or
    // _exit; everything it touches was allocated above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = io::Error::last_os_error();
        unsafe {
            libc::close(err_r);
            libc::close(err_w);
        }
        return Err(e);
    }
    if pid == 0 {
        unsafe {
            libc::close(err_r);
            child_after_fork(
                parent,
                out_fd,
                err_fd,
                prog.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                err_w,
            );
        }
    }
    // Parent.
    unsafe { libc::close(err_w) };
    let mut buf = [0u8; 4];
    let n = loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(err_r, buf.as_mut_ptr().cast(), 4) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    unsafe { libc::close(err_r) };
    drop(spec.stdout);
    drop(spec.stderr);
    if n == 4 {
        // exec failed; the reaper collects the child, which nobody knows of.
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    Ok(pid)
}

/// The child's side of [`spawn`]. Never returns.
unsafe fn child_after_fork(
    parent: libc::pid_t,
    out_fd: RawFd,
    err_fd: RawFd,
    prog: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    err_w: RawFd,
) -> ! {
    let fail = |err_w: RawFd| -> ! {
        let e = *libc::__errno_location();
        let b = e.to_ne_bytes();
        libc::write(err_w, b.as_ptr().cast(), 4);
        libc::_exit(127);
    };
    // Own session and process group: terminal signals reach the launcher
    // only, and the launcher signals the whole worker tree with killpg.
    if libc::setsid() < 0 {
        fail(err_w);
    }
    // Die with the launcher, even when it is SIGKILLed. This follows the
    // forking thread, which is the launcher's main thread.
    libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    );
    if libc::getppid() != parent {
        libc::_exit(137);
    }
    // Handlers do not survive exec, but ignored signals and the blocked
    // mask do: restore defaults.
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    if out_fd != 1 && libc::dup2(out_fd, 1) < 0 {
        fail(err_w);
    }
    if err_fd != 2 && libc::dup2(err_fd, 2) < 0 {
        fail(err_w);
    }
    libc::execve(prog, argv, envp);
    fail(err_w)
}

/// Sends `sig` to a worker's whole process group. A group that is already
/// gone is not an error.
pub fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: plain syscall.
    unsafe {
        libc::killpg(pgid, sig);
    }
}

/// Where the reaper delivers exits: the current subscriber, if any.
static EXITS: Mutex<Option<mpsc::UnboundedSender<Exit>>> = Mutex::new(None);
static REAPER: OnceLock<()> = OnceLock::new();

/// Subscribes to child exits, replacing any earlier subscriber (one agent
/// runs per process at a time). Subscribe before spawning, so no exit is
/// missed; the channel is unbounded, so no exit is ever dropped.
pub fn exits() -> mpsc::UnboundedReceiver<Exit> {
    ensure_reaper();
    let (tx, rx) = mpsc::unbounded_channel();
    *EXITS.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    rx
}

/// Starts (once) the thread that reaps every child of this process —
/// workers, and orphaned descendants handed to us as subreaper — and
/// reports each exit the moment it happens.
fn ensure_reaper() {
    REAPER.get_or_init(|| {
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_forever)
            .expect("start reaper thread");
    });
}

fn reap_forever() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the local status.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ECHILD) {
                // No children right now; new ones appear only via spawn.
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            continue;
        }
        let st = if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        };
        if let Some(tx) = EXITS.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(Exit { pid, status: st });
        }
    }
}

/// Makes this process a child subreaper: descendants orphaned by a worker
/// (double forks) are re-parented here instead of to init, so they can be
/// found and stopped.
pub fn become_subreaper() {
    // SAFETY: plain prctl.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Opens `path` for writing (truncating), close-on-exec.
pub fn create_file(path: &Path) -> io::Result<OwnedFd> {
    let f = std::fs::File::create(path)?;
    Ok(f.into())
}
