//! No orphans, ever: a guardian process that outlives the launcher by a few
//! milliseconds and stops everything the job started.
//!
//! Workers die with the launcher through `PR_SET_PDEATHSIG`, but their own
//! children do not, and a double-forked daemon escapes every process group.
//! So, before any thread exists, the launcher forks a guardian in a session of
//! its own; the guardian blocks reading a pipe whose only writer is the
//! launcher. When the launcher exits for any reason, SIGKILL included, the
//! read returns end-of-file and the guardian kills every process that carries
//! this job's marker in its environment ([`MARKER_VAR`], which every worker
//! and hence every descendant inherits), then exits.
//!
//! Scanning every process's environment is costly on a busy host (hundreds
//! of agents on one machine would each scan all the others), so it is only
//! the last resort: a launcher that ends normally stops its own subtree (it
//! is a child subreaper, so every descendant still alive is in it) and then
//! [`disarm`]s the guardian, which exits without scanning.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Environment variable that tags every process of a job.
pub const MARKER_VAR: &str = "TORCHRUN_RS_JOB";

/// The launcher's end of the lifeline, held for the life of the process.
struct Lifeline {
    write: OwnedFd,
    marker: String,
    guardian: i32,
}

static LIFELINE: std::sync::OnceLock<Lifeline> = std::sync::OnceLock::new();
static STANDALONE_MARKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The value of [`MARKER_VAR`] for this process's workers: the guardian's if
/// [`start`] ran, else one made up for this process (then only the
/// launcher's own final sweep uses it).
pub fn marker() -> &'static str {
    match LIFELINE.get() {
        Some(l) => &l.marker,
        None => STANDALONE_MARKER.get_or_init(make_marker),
    }
}

fn make_marker() -> String {
    use rand::Rng;
    format!(
        "{}-{:016x}",
        std::process::id(),
        rand::thread_rng().gen::<u64>()
    )
}

/// Forks the guardian. Call from `main` before any other thread starts: the
/// guardian is a copy of a single-threaded process, so it may allocate.
/// Returns the guardian's pid.
pub fn start() -> io::Result<i32> {
    let marker = make_marker();
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see the function's contract: no other thread exists.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: fds[1] is ours to close in the guardian.
        unsafe { libc::close(fds[1]) };
        guardian_main(fds[0], &marker);
    }
    // SAFETY: the parent owns the write end; the read end is the guardian's.
    unsafe { libc::close(fds[0]) };
    let _ = LIFELINE.set(Lifeline {
        // SAFETY: fds[1] is open and owned by nobody else.
        write: unsafe { OwnedFd::from_raw_fd(fds[1]) },
        marker,
        guardian: pid,
    });
    Ok(pid)
}

fn guardian_main(read_fd: i32, marker: &str) -> ! {
    // SAFETY: single-threaded child; plain syscalls.
    unsafe {
        libc::setsid();
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Hold no stream of the launcher's: a test or shell waiting for the
        // launcher's output to close must not wait for us.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        close_all_but(read_fd);
        libc::prctl(
            libc::PR_SET_NAME,
            c"torchrun-rs-guard".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
        let mut buf = [0u8; 64];
        let mut disarmed = false;
        loop {
            let n = libc::read(read_fd, buf.as_mut_ptr().cast(), buf.len());
            if n == 0 {
                break;
            }
            if n < 0 && *libc::__errno_location() != libc::EINTR {
                break;
            }
            if n > 0 && buf[..n as usize].contains(&DISARM) {
                disarmed = true;
            }
        }
        if !disarmed {
            sweep(marker);
        }
    }
    // SAFETY: terminate without running the parent's destructors.
    unsafe { libc::_exit(0) }
}

/// The byte that tells the guardian the launcher left nothing behind.
const DISARM: u8 = b'c';

/// Tells the guardian that no process of the job is left, so it exits
/// without scanning. Call only once nothing else will be started.
pub fn disarm() {
    if let Some(l) = LIFELINE.get() {
        // SAFETY: writing one byte to a pipe we own.
        unsafe { libc::write(l.write.as_raw_fd(), [DISARM].as_ptr().cast(), 1) };
    }
}

/// Kills every live descendant of this process but the guardian, until none
/// is left. As a child subreaper the launcher inherits every orphan of its
/// subtree, so this reaches daemons that left their process group without
/// scanning the whole host. Returns `None` where the kernel does not list
/// children (`/proc/<pid>/task/<tid>/children`); then use [`sweep`].
///
/// Only a launcher that started the guardian owns its whole subtree; a
/// program embedding the engine may have children of its own, so there this
/// returns `None` too.
pub fn stop_descendants() -> Option<usize> {
    let guardian = LIFELINE.get()?.guardian;
    let me = std::process::id() as i32;
    // Probe once: without the kernel's child lists the caller sweeps instead.
    descendants(me)?;
    Some(kill_until_none(|| {
        descendants(me)
            .unwrap_or_default()
            .into_iter()
            .filter(|&p| p != guardian && !is_zombie(p))
            .collect()
    }))
}

/// SIGKILLs what `find` returns, again and again until it finds nothing (a
/// process may fork while we look; 100 rounds at most). Returns how many
/// were killed.
fn kill_until_none(mut find: impl FnMut() -> Vec<i32>) -> usize {
    let mut killed = 0;
    for _ in 0..100 {
        let found = find();
        if found.is_empty() {
            break;
        }
        for pid in &found {
            // SAFETY: plain syscall.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        killed += found.len();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    killed
}

/// Every process below `root`, breadth first.
fn descendants(root: i32) -> Option<Vec<i32>> {
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            // Gone while we looked: it has no children to list.
            continue;
        };
        for t in tasks.flatten() {
            let path = t.path().join("children");
            match std::fs::read_to_string(&path) {
                Ok(list) => {
                    for c in list.split_whitespace().filter_map(|c| c.parse().ok()) {
                        out.push(c);
                        queue.push(c);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && pid == root => return None,
                Err(_) => {}
            }
        }
    }
    Some(out)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        // The state follows the parenthesized command name.
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Kills every process whose environment carries `MARKER_VAR=marker`, again
/// and again until none is left (a process may fork while we scan).
/// Returns how many were killed.
pub fn sweep(marker: &str) -> usize {
    let needle = format!("{MARKER_VAR}={marker}");
    let me = std::process::id() as i32;
    kill_until_none(|| marked_processes(needle.as_bytes(), me))
}

/// Pids of live (non-zombie) processes whose environment holds `needle`.
pub fn marked_processes(needle: &[u8], except: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != except)
        .filter(|&pid| {
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                return false;
            };
            // A zombie's environ reads empty; it is already dead.
            env.split(|&b| b == 0).any(|kv| kv == needle)
        })
        .collect()
}

/// Closes every descriptor from 3 up except `keep`. `close_range` costs one
/// system call; the loop over the whole descriptor table it replaces cost
/// milliseconds per launcher when the open-file limit is high.
unsafe fn close_all_but(keep: i32) {
    let ranges = [(3, keep - 1), (keep + 1, i32::MAX)];
    for (lo, hi) in ranges {
        if lo > hi {
            continue;
        }
        let r = libc::syscall(libc::SYS_close_range, lo as u32, hi as u32, 0u32);
        if r != 0 {
            // Kernels before 5.9: close one by one.
            let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(0, 1 << 20) as i32;
            for fd in lo..hi.min(max.saturating_sub(1)).saturating_add(1) {
                libc::close(fd);
            }
        }
    }
}
