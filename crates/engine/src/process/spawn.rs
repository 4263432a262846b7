//! Starting worker processes, learning of their exits, and signalling them.
//! Every other child the launcher waits for (the node check, the
//! fingerprint's probe, py-spy) is started here too: in a launcher the
//! reaper collects every child it does not hold, so a child waited for in
//! any other way could find its status already taken (`ECHILD`).
//!
//! Workers are started with a hand-written fork/exec rather than
//! `std::process::Command`, because the launcher reaps every child itself
//! (it is a child subreaper, so orphaned grandchildren come back to it) and
//! std's spawn may `waitpid` a child behind our back. Between fork and exec the
//! child calls only async-signal-safe functions: it starts its own session,
//! asks for SIGKILL when the launcher dies, restores default signal handling
//! and an empty signal mask, wires its stdio, and execs.
//!
//! Never a stranger: a worker's exit is reported at once but the worker is
//! reaped only when the agent is done with its process group ([`release`]).
//! Until then its PID, which is also its group's ID, cannot be reused, so a
//! signal to that group reaches this job's processes and nothing else.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use std::sync::Mutex;

use tokio::sync::mpsc;

/// Where one of a child's standard streams goes (or, for stdin, comes from).
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
    pub args: &'a [OsString],
    pub env: &'a BTreeMap<OsString, OsString>,
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
    /// The CPUs the worker may run on (`--numa-binding`), set before exec.
    pub cpus: Option<libc::cpu_set_t>,
}

/// Starts a worker in its own session (pgid = pid). Returns its pid; its
/// exit will be sent on `exits`.
///
/// The worker is *held*: the reaper reports its exit without reaping it
/// (`WNOWAIT`), so its PID stays reserved, as a zombie, until [`release`].
/// While the PID is reserved no other process can have it, so no process
/// group of that ID can exist but the worker's: every [`signal_group`]
/// reaches this job's processes only.
pub fn spawn(spec: SpawnSpec<'_>, exits: &mpsc::UnboundedSender<Exit>) -> io::Result<i32> {
    ensure_reaper()?;
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
        .map(|(k, v)| {
            let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
            kv.extend_from_slice(k.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring(&kv)
        })
        .collect::<io::Result<_>>()?;
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let in_fd: RawFd = match &spec.stdin {
        Stdio::Inherit => 0,
        Stdio::Fd(f) => f.as_raw_fd(),
    };
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

    // The worker is registered as held under the reaper's lock, taken
    // before the fork: the reaper cannot collect it before it is known, even
    // if it exits at once. The child never touches the lock.
    let mut held_now = held();
    // SAFETY: the child runs only async-signal-safe calls until execve or
    // _exit; everything it touches was allocated above.
    let pid = unsafe { libc::fork() };
    if pid > 0 {
        held_now.insert(
            pid,
            Held {
                reported: false,
                exits: exits.clone(),
                pins: 0,
                release_wanted: false,
            },
        );
    }
    drop(held_now);
    if pid < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: both ends are ours and still open.
        unsafe {
            libc::close(err_r);
            libc::close(err_w);
        }
        return Err(e);
    }
    if pid == 0 {
        // SAFETY: in the child, which owns its copies of both ends; see
        // child_after_fork for what it may call.
        unsafe {
            libc::close(err_r);
            child_after_fork(
                parent,
                in_fd,
                out_fd,
                err_fd,
                prog.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                spec.cpus
                    .as_ref()
                    .map_or(std::ptr::null(), |c| c as *const _),
                err_w,
            );
        }
    }
    // Parent.
    // SAFETY: the write end is ours; the child holds its own copy.
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
    // SAFETY: the read end is ours.
    unsafe { libc::close(err_r) };
    drop(spec.stdin);
    drop(spec.stdout);
    drop(spec.stderr);
    if n == 4 {
        // exec failed and the child is exiting: collect it here.
        let mut held = held();
        let mut status = 0;
        loop {
            // SAFETY: waitpid writes the local status.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        held.remove(&pid);
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    Ok(pid)
}

/// The child's side of [`spawn`]. Never returns.
///
/// # Safety
/// Call only in the child of a fork, with pointers that stay valid there (a
/// copy of the parent's memory): it runs only async-signal-safe functions.
// Plain values and pointers prepared before the fork: the child may not
// allocate, so they are not gathered into anything richer.
#[allow(clippy::too_many_arguments)]
unsafe fn child_after_fork(
    parent: libc::pid_t,
    in_fd: RawFd,
    out_fd: RawFd,
    err_fd: RawFd,
    prog: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cpus: *const libc::cpu_set_t,
    err_w: RawFd,
) -> ! {
    // SAFETY: the caller guarantees this is the child of a fork with
    // valid pointers; only async-signal-safe functions are called.
    unsafe {
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
        // Let the launcher's descendants (py-spy, for a stack dump) trace
        // this worker where Yama restricts ptrace to ancestors. Without
        // Yama this fails harmlessly.
        libc::prctl(libc::PR_SET_PTRACER, parent as libc::c_ulong, 0, 0, 0);
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
        if !cpus.is_null()
            && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), cpus) < 0
        {
            fail(err_w);
        }
        if in_fd != 0 && libc::dup2(in_fd, 0) < 0 {
            fail(err_w);
        }
        if out_fd != 1 && libc::dup2(out_fd, 1) < 0 {
            fail(err_w);
        }
        if err_fd != 2 && libc::dup2(err_fd, 2) < 0 {
            fail(err_w);
        }
        // Nothing but 0, 1 and 2 crosses the exec, as with torchrun's
        // `Popen(close_fds=True)`: a descriptor the launcher inherited
        // without close-on-exec (a lock, a supervisor's pipe) must not end
        // up held by every worker and its daemons. Marked close-on-exec
        // rather than closed, so that `err_w` still reports a failed exec;
        // a kernel without that flag (before 5.11) closes around `err_w`.
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            if err_w > 3 {
                libc::syscall(libc::SYS_close_range, 3u32, (err_w - 1) as u32, 0u32);
            }
            libc::syscall(libc::SYS_close_range, (err_w + 1) as u32, u32::MAX, 0u32);
        }
        libc::execve(prog, argv, envp);
        fail(err_w)
    }
}

/// Runs a helper program (found on `PATH` as `execvp` would) to its end
/// and returns its exit and its stdout (stdin and stderr are
/// `/dev/null`), for short probes of the launcher's
/// own (the fingerprint's Python). Blocks: call it off async threads, on a
/// thread that outlives the helper (the helper dies with it).
///
/// Started through [`spawn`], so its exit comes back through the reaper:
/// a launcher's reaper collects every child it does not hold, and a helper
/// waited for in any other way (`std::process::Command`) would lose that
/// race and get `ECHILD` instead of its status.
pub fn output(program: &Path, args: &[OsString]) -> io::Result<(ExitStatus, Vec<u8>)> {
    use std::io::Read;
    let (r, w) = pipe()?;
    let null_in = std::fs::File::open("/dev/null")?;
    let null_err = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    let program = find_program(&program.to_string_lossy())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    let (tx, mut exits) = mpsc::unbounded_channel();
    let pid = spawn(
        SpawnSpec {
            program: &program,
            args,
            env: &env,
            stdin: Stdio::Fd(null_in.into()),
            stdout: Stdio::Fd(w),
            stderr: Stdio::Fd(null_err.into()),
            cpus: None,
        },
        &tx,
    )?;
    drop(tx);
    let mut out = Vec::new();
    let read = std::fs::File::from(r).read_to_end(&mut out);
    let exit = exits.blocking_recv();
    release(pid);
    read?;
    let exit = exit.ok_or_else(|| io::Error::other("the helper's exit was not reported"))?;
    Ok((exit.status, out))
}

/// A pipe, both ends close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `sig` to a worker's whole process group, unless the worker has
/// been [`release`]d. Returns whether the signal was sent (a group with no
/// live member left is not an error).
///
/// Why this cannot hit a stranger: the group ID is the worker's PID, and the
/// worker is checked to be unreaped while holding the lock that every reap
/// takes. An unreaped worker, alive or a zombie, keeps its PID, so no other
/// process can have it, and no group of that ID can exist but the worker's.
pub fn signal_group(pgid: i32, sig: i32) -> bool {
    let held = held();
    if !held.contains_key(&pgid) {
        return false;
    }
    // SAFETY: plain syscall.
    unsafe { libc::killpg(pgid, sig) == 0 }
}

/// Reaps an exited worker, freeing its PID: the launcher never signals its
/// group again. A worker that has not exited yet (one a stop gave up on,
/// in uninterruptible sleep) stays held until it exits, and is reaped by
/// the reaper then: it never stays a zombie for the rest of the run.
pub fn release(pid: i32) {
    let mut held = held();
    match held.get_mut(&pid) {
        None => return,
        Some(h) if h.pins > 0 => {
            // py-spy may be attaching to it: the last pin reaps it.
            h.release_wanted = true;
            return;
        }
        Some(_) => {}
    }
    reap_held(&mut held, pid);
    if let Some(h) = held.get_mut(&pid) {
        h.release_wanted = true;
    }
}

/// Reaps `pid` if it has exited; the caller holds the lock.
fn reap_held(held: &mut BTreeMap<i32, Held>, pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid writes the local status.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r == pid || r < 0 {
        held.remove(&pid);
    }
}

/// Runs `f` while no child of this process can be reaped, so a child PID
/// that `f` reads from `/proc` still names that child when `f` signals it.
pub fn with_reaping_paused<T>(f: impl FnOnce() -> T) -> T {
    let _held = held();
    f()
}

/// A worker spawned and not yet reaped.
#[derive(Debug)]
struct Held {
    /// Its exit was sent already.
    reported: bool,
    /// Where its exit goes: the launch that started it.
    exits: mpsc::UnboundedSender<Exit>,
    /// [`Pin`]s alive: something outside this process (py-spy) is using the
    /// PID, so it must not be freed yet.
    pins: u32,
    /// [`release`] was asked while pinned: reap when the last pin goes.
    release_wanted: bool,
}

/// Keeps a worker's PID from being freed (its zombie unreaped) while it
/// lives: for a program started with the PID as an argument (py-spy), which
/// would otherwise, if the worker were reaped meanwhile, attach to whatever
/// process took the PID next.
#[derive(Debug)]
pub struct Pin(i32);

/// Pins `pid`, if it is a worker not yet reaped.
pub fn pin(pid: i32) -> Option<Pin> {
    let mut held = held();
    held.get_mut(&pid)?.pins += 1;
    Some(Pin(pid))
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut held = held();
        let Some(h) = held.get_mut(&self.0) else {
            return;
        };
        h.pins -= 1;
        if h.pins == 0 && h.release_wanted {
            reap_held(&mut held, self.0);
        }
    }
}

/// Workers spawned and not yet reaped. Its lock is held around every reap,
/// which is what makes [`signal_group`] and [`with_reaping_paused`] safe
/// against PID reuse. One per process, as the child table it mirrors.
static HELD: Mutex<BTreeMap<i32, Held>> = Mutex::new(BTreeMap::new());

fn held() -> std::sync::MutexGuard<'static, BTreeMap<i32, Held>> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

static REAPER: OnceLock<Result<(), i32>> = OnceLock::new();

/// Whether the reaper collects every child of the process (a launcher that
/// owns them all) or only the workers it started (an embedding program).
static REAP_ALL: AtomicBool = AtomicBool::new(false);

/// Lets the reaper collect every child of this process, orphans handed to
/// it as subreaper included. Only for a process that owns all its children
/// (the launcher binary; see [`crate::process::supervisor::Supervisor`]).
pub fn reap_all_children() {
    REAP_ALL.store(true, Ordering::Release);
}

/// Starts (once) the reaper: a thread woken by SIGCHLD that reports every
/// worker's exit the moment it happens, leaving the worker to [`release`].
/// In a launcher ([`reap_all_children`]) it also reaps the other children:
/// the orphaned descendants handed to us as subreaper.
fn ensure_reaper() -> io::Result<()> {
    REAPER
        .get_or_init(|| start_reaper().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)))
        .as_ref()
        .map(|_| ())
        .map_err(|&e| io::Error::from_raw_os_error(e))
}

fn start_reaper() -> io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (wake_r, wake_w) = (fds[0], fds[1]);
    // SAFETY: the action only calls write(2), which is async-signal-safe, on
    // a descriptor that stays open for the life of the process, and keeps
    // errno as it found it.
    unsafe {
        signal_hook_registry::register(libc::SIGCHLD, move || {
            let saved = *libc::__errno_location();
            libc::write(wake_w, [1u8].as_ptr().cast(), 1);
            *libc::__errno_location() = saved;
        })
    }
    .map_err(io::Error::other)?;
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || loop {
            wait_readable(wake_r);
            reap_once();
        })?;
    Ok(())
}

/// Blocks until `fd` has bytes (then drains them), or a second has passed:
/// a SIGCHLD that something else swallowed delays an exit by that much at
/// most.
fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one local pollfd.
    if unsafe { libc::poll(&mut pfd, 1, 1000) } > 0 {
        let mut buf = [0u8; 256];
        // SAFETY: reading into a local buffer from a non-blocking pipe.
        while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

/// One pass: reports every held worker that has exited and, in a launcher,
/// reaps every other child that has exited.
fn reap_once() {
    {
        let mut held = held();
        let mut released = Vec::new();
        for (&pid, h) in held.iter_mut().filter(|(_, h)| !h.reported) {
            if let Some(status) = wait_status(libc::P_PID, pid as libc::id_t, libc::WNOWAIT).1 {
                h.reported = true;
                let _ = h.exits.send(Exit { pid, status });
                if h.release_wanted && h.pins == 0 {
                    released.push(pid);
                }
            }
        }
        // Released while still running: nobody will ask again.
        for pid in released {
            reap_held(&mut held, pid);
        }
    }
    if !REAP_ALL.load(Ordering::Acquire) {
        return;
    }
    // Ordinary children: the first exited child is found with one call; a
    // held worker's zombie in the way means looking at each child instead.
    let mut blocked = false;
    loop {
        let (pid, status) = wait_status(libc::P_ALL, 0, libc::WNOWAIT);
        if status.is_none() {
            break;
        }
        let held = held();
        if held.contains_key(&pid) {
            blocked = true;
            break;
        }
        reap(pid);
    }
    if blocked {
        for pid in children().unwrap_or_default() {
            let held = held();
            if !held.contains_key(&pid) {
                reap(pid);
            }
        }
    }
}

/// `waitid(which, id, WEXITED | WNOHANG | extra)`: the pid and exit status
/// of an exited child, or `(0, None)`.
fn wait_status(which: libc::idtype_t, id: libc::id_t, extra: i32) -> (i32, Option<ExitStatus>) {
    // SAFETY: an all-zero siginfo_t is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall on a local buffer.
    let r = unsafe { libc::waitid(which, id, &mut info, libc::WEXITED | libc::WNOHANG | extra) };
    // SAFETY: waitid succeeded; si_pid is 0 when no child has exited.
    let pid = if r == 0 { unsafe { info.si_pid() } } else { 0 };
    if pid == 0 {
        return (0, None);
    }
    // SAFETY: a child's exit was reported, so si_status is set.
    let st = unsafe { info.si_status() };
    let status = if info.si_code == libc::CLD_EXITED {
        ExitStatus::Code(st)
    } else {
        ExitStatus::Signal(st)
    };
    (pid, Some(status))
}

/// Reaps `pid` if it has exited (an orphan: nobody waits for its status).
/// Call with the reaper's lock held.
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid writes the local status.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// This process's children, from every thread's child list; `None` where
/// the kernel does not list children (`/proc/<pid>/task/<tid>/children`).
pub fn children() -> Option<Vec<i32>> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    let mut out = Vec::new();
    for t in tasks.flatten() {
        match std::fs::read_to_string(t.path().join("children")) {
            Ok(list) => out.extend(
                list.split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            // A thread that ended while we looked.
            Err(_) => {}
        }
    }
    Some(out)
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

/// Opens a log file for writing (truncating, mode 0600 when new),
/// close-on-exec: the one place the log tree's files are created.
pub fn create_file(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    Ok(f.into())
}

/// For tests of children the launcher starts besides its workers.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// Runs the test `name` (its full path in this test binary) in a fresh
    /// copy of the binary whose reaper collects every child that it does
    /// not hold, as the launcher's does (a setting for the whole process,
    /// which would disturb the other tests here). Returns `true` in that
    /// copy, where the caller runs the test's body; `false` in the caller,
    /// once the copy has passed.
    pub fn as_a_launcher(name: &str) -> bool {
        const VAR: &str = "TORCHRUN_RS_TEST_AS_A_LAUNCHER";
        if std::env::var_os(VAR).is_some_and(|v| v == name) {
            reap_all_children();
            return true;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(VAR, name)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the test did not run: {text}");
        false
    }

    /// Runs `f` while workers start and exit one after another on another
    /// thread, so that the reaper is busy all along.
    pub fn while_workers_come_and_go<T>(f: impl FnOnce() -> T) -> T {
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let env = BTreeMap::new();
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let (tx, mut rx) = mpsc::unbounded_channel();
                    let spec = SpawnSpec {
                        program: Path::new("/bin/true"),
                        args: &[],
                        env: &env,
                        stdin: Stdio::Inherit,
                        stdout: Stdio::Inherit,
                        stderr: Stdio::Inherit,
                        cpus: None,
                    };
                    let pid = spawn(spec, &tx).unwrap();
                    rx.blocking_recv().unwrap();
                    release(pid);
                    n += 1;
                    // Busy, not flooding: the work under test gets its share.
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                n
            })
        };
        let out = f();
        stop.store(true, Ordering::Relaxed);
        let started = churn.join().unwrap();
        assert!(started > 0, "no worker came and went");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The third field of `/proc/<pid>/stat`: `Z` for a zombie.
    fn proc_state(pid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.chars().next()
    }

    #[test]
    fn a_worker_released_while_still_running_is_reaped_when_it_exits() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let env = BTreeMap::new();
        let args: Vec<OsString> = vec!["30".into()];
        let pid = spawn(
            SpawnSpec {
                program: Path::new("/bin/sleep"),
                args: &args,
                env: &env,
                stdin: Stdio::Inherit,
                stdout: Stdio::Inherit,
                stderr: Stdio::Inherit,
                cpus: None,
            },
            &tx,
        )
        .unwrap();
        // A stop that gave up on it releases it anyway.
        release(pid);
        assert!(proc_state(pid).is_some(), "still running");
        // It ends later (here: SIGKILL; in life: out of its D state).
        assert!(signal_group(pid, libc::SIGKILL), "still ours to signal");
        let exit = rx.blocking_recv().unwrap();
        assert_eq!(exit.pid, pid);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while proc_state(pid).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "a released worker stayed a zombie after its exit"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            !signal_group(pid, libc::SIGKILL),
            "its PID is no longer ours"
        );
    }

    #[test]
    fn a_helper_gets_its_own_exit_status_while_the_launchers_reaper_collects_every_child() {
        if !test_support::as_a_launcher(
            "process::spawn::tests::a_helper_gets_its_own_exit_status_while_the_launchers_reaper_collects_every_child",
        ) {
            return;
        }
        let args: Vec<OsString> = vec!["-c".into(), "echo hello; exit 3".into()];
        let bad = test_support::while_workers_come_and_go(|| {
            (0..300)
                .map(|_| output(Path::new("/bin/sh"), &args))
                .filter(|r| !matches!(r, Ok((ExitStatus::Code(3), out)) if out == b"hello\n"))
                .map(|r| format!("{r:?}"))
                .collect::<Vec<_>>()
        });
        assert!(
            bad.is_empty(),
            "{} of 300 runs lost their status: {bad:?}",
            bad.len()
        );
    }

    #[test]
    fn a_pinned_worker_is_reaped_only_when_its_last_pin_goes() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let env = BTreeMap::new();
        let pid = spawn(
            SpawnSpec {
                program: Path::new("/bin/true"),
                args: &[],
                env: &env,
                stdin: Stdio::Inherit,
                stdout: Stdio::Inherit,
                stderr: Stdio::Inherit,
                cpus: None,
            },
            &tx,
        )
        .unwrap();
        let exit = rx.blocking_recv().unwrap();
        assert_eq!(exit.pid, pid);
        // A capture starts (py-spy would get this PID), then the group is
        // released: the PID must stay the worker's until the capture ends.
        let first = pin(pid).unwrap();
        let second = pin(pid).unwrap();
        release(pid);
        assert_eq!(proc_state(pid), Some('Z'), "reaped while pinned");
        drop(first);
        assert_eq!(proc_state(pid), Some('Z'), "reaped with a pin left");
        drop(second);
        assert_eq!(proc_state(pid), None, "not reaped after the last pin");
        // A freed PID cannot be pinned again.
        assert!(pin(pid).is_none());
    }
}
