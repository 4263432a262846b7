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

use crate::process;

/// Environment variable that tags every process of a job.
pub const MARKER_VAR: &str = "TORCHRUN_RS_JOB";

/// The launcher's end of the lifeline to its guardian. Owned by the
/// [`crate::process::supervisor::Supervisor`]; dropping it (or the launcher dying)
/// sets the guardian sweeping.
#[derive(Debug)]
pub struct Lifeline {
    write: OwnedFd,
    marker: String,
    guardian: i32,
}

/// What identifies this run's processes: the marker value, and the moment
/// the launcher started (no process started before it can be its
/// descendant).
struct RunIdentity {
    marker: String,
    started: u64,
}

/// A marker no other run can have: 128 random bits from the operating
/// system's generator (unguessable, so no process gets it but by inheriting
/// it from this run), after the pid for people reading `ps e`.
pub fn make_marker() -> String {
    use rand::Rng;
    format!(
        "{}-{:032x}",
        std::process::id(),
        rand::rngs::OsRng.gen::<u128>()
    )
}

/// A process's start time, in clock ticks after boot (`/proc/<pid>/stat`
/// field 22), read through a `/proc/<pid>` directory descriptor.
fn start_time_at(proc_dir: i32) -> Option<u64> {
    let stat = read_at(proc_dir, c"stat")?;
    let stat = String::from_utf8_lossy(&stat);
    // Fields after the parenthesized command name, which may hold spaces.
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state); field 22 is the 20th after it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn own_start_time() -> u64 {
    let me = c"/proc/self";
    // SAFETY: plain open of a path we own the string of.
    let fd = unsafe {
        libc::open(
            me.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return 0;
    }
    // SAFETY: `fd` was just opened and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    start_time_at(fd.as_raw_fd()).unwrap_or(0)
}

/// Reads a whole file below a directory descriptor.
fn read_at(dir: i32, name: &std::ffi::CStr) -> Option<Vec<u8>> {
    // SAFETY: plain openat; the result is owned below.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just opened and is owned here.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut out).ok()?;
    Some(out)
}

/// The number of threads of this process (`None` if `/proc` cannot tell).
fn thread_count() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/task").ok()?.count())
}

impl Lifeline {
    /// Forks the guardian. The guardian is a copy of this process and may
    /// allocate, which is only sound while this process has a single thread:
    /// called with more, it refuses (an error) rather than fork.
    pub fn start() -> io::Result<Lifeline> {
        if thread_count().is_some_and(|n| n > 1) {
            return Err(io::Error::other(
                "the guardian must be started before any other thread of the launcher",
            ));
        }
        let marker = make_marker();
        let started = own_start_time();
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: this process has one thread (checked above), so the child
        // is a complete copy of it.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: fds[1] is ours to close in the guardian.
            unsafe { libc::close(fds[1]) };
            guardian_main(fds[0], &RunIdentity { marker, started });
        }
        // SAFETY: the parent owns the write end; the read end is the guardian's.
        unsafe { libc::close(fds[0]) };
        Ok(Lifeline {
            // SAFETY: fds[1] is open and owned by nobody else.
            write: unsafe { OwnedFd::from_raw_fd(fds[1]) },
            marker,
            guardian: pid,
        })
    }

    /// The value of [`MARKER_VAR`] that this run's workers carry.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Tells the guardian that no process of the job is left, so it exits
    /// without scanning. Call only once nothing else will be started.
    pub fn disarm(&self) {
        // SAFETY: writing one byte to a pipe we own.
        unsafe { libc::write(self.write.as_raw_fd(), [DISARM].as_ptr().cast(), 1) };
    }

    /// Kills every live descendant of this process but the guardian, until
    /// none is left. As a child subreaper the launcher inherits every orphan
    /// of its subtree, so this reaches daemons that left their process group
    /// without scanning the whole host. Returns `None` where the kernel does
    /// not list children (`/proc/<pid>/task/<tid>/children`); then use
    /// [`sweep`].
    ///
    /// Only direct children are killed, each while no child can be reaped
    /// ([`process::with_reaping_paused`]): a listed child keeps its PID until
    /// this launcher reaps it, so the PID cannot name a stranger. A killed
    /// child's own children become ours (subreaper) and are killed in the
    /// next round; a zombie's children are ours already.
    pub fn stop_descendants(&self) -> Option<usize> {
        let guardian = self.guardian;
        // Probe once: without the kernel's child lists the caller sweeps instead.
        process::children()?;
        let mut killed = 0;
        for _ in 0..100 {
            let found = process::with_reaping_paused(|| {
                let live: Vec<i32> = process::children()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|&p| p != guardian && !is_zombie(p))
                    .collect();
                for pid in &live {
                    // SAFETY: plain syscall; `pid` is our unreaped child (see above).
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
                live.len()
            });
            if found == 0 {
                break;
            }
            killed += found;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Some(killed)
    }
}

fn guardian_main(read_fd: i32, run: &RunIdentity) -> ! {
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
            sweep_run(run);
        }
    }
    // SAFETY: terminate without running the parent's destructors.
    unsafe { libc::_exit(0) }
}

/// The byte that tells the guardian the launcher left nothing behind.
const DISARM: u8 = b'c';

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        // The state follows the parenthesized command name.
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Kills every process of this run that is still alive (see [`sweep_run`]).
/// Returns how many were killed.
pub fn sweep(marker: &str) -> usize {
    sweep_run(&RunIdentity {
        marker: marker.to_string(),
        started: own_start_time(),
    })
}

/// Kills every process whose environment carries `MARKER_VAR=<marker>` and
/// that started after the launcher, again and again until none is left (a
/// process may fork while we scan; 100 rounds at most).
///
/// Why this cannot hit a stranger: each candidate is pinned by opening its
/// `/proc/<pid>` directory first; the environment and start time are read
/// through that descriptor, and the signal is sent through it too
/// (`pidfd_send_signal`). If the process ends and its PID is reused after
/// the directory was opened, the reads fail and the signal is refused
/// (ESRCH) instead of reaching the newcomer. A stranger would also need this
/// run's marker, 128 random bits, and to have started after the launcher.
fn sweep_run(run: &RunIdentity) -> usize {
    let needle = format!("{MARKER_VAR}={}", run.marker);
    let me = std::process::id() as i32;
    let mut killed = 0;
    for _ in 0..100 {
        let found = kill_marked(needle.as_bytes(), run.started, me);
        if found == 0 {
            break;
        }
        killed += found;
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    killed
}

/// One scan of `/proc`: SIGKILLs the live processes of this run (see
/// [`sweep_run`]) other than `except`. Returns how many were signalled.
fn kill_marked(needle: &[u8], started: u64, except: i32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let pids = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok());
    let mut killed = 0;
    for pid in pids.filter(|&p| p != except) {
        let Ok(path) = std::ffi::CString::new(format!("/proc/{pid}")) else {
            continue;
        };
        // SAFETY: plain open; the result is owned below.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            continue;
        }
        // SAFETY: `fd` was just opened and is owned here.
        let proc_dir = unsafe { OwnedFd::from_raw_fd(fd) };
        let ours = read_at(proc_dir.as_raw_fd(), c"environ").is_some_and(|env| {
            // A zombie's environ reads empty; it is already dead.
            env.split(|&b| b == 0).any(|kv| kv == needle)
        }) && start_time_at(proc_dir.as_raw_fd()).is_some_and(|t| t >= started);
        if ours && signal_pinned(&proc_dir, pid, libc::SIGKILL) {
            killed += 1;
        }
    }
    killed
}

/// Sends `sig` to the process whose `/proc/<pid>` directory `proc_dir` is.
/// Kernels before 5.1 have no `pidfd_send_signal`; there the pid is
/// signalled after the checks, the best that such a kernel allows.
fn signal_pinned(proc_dir: &OwnedFd, pid: i32, sig: i32) -> bool {
    // SAFETY: plain syscall; a null siginfo means "as kill(2) would".
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            proc_dir.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r == 0 {
        return true;
    }
    if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        // SAFETY: plain syscall.
        return unsafe { libc::kill(pid, sig) } == 0;
    }
    false
}

/// Closes every descriptor from 3 up except `keep`. `close_range` costs one
/// system call; the loop over the whole descriptor table it replaces cost
/// milliseconds per launcher when the open-file limit is high.
///
/// # Safety
/// Call only where no other thread exists or uses descriptors (the
/// guardian right after its fork): descriptors are closed by number.
unsafe fn close_all_but(keep: i32) {
    // SAFETY: closing descriptors by number; the caller guarantees no
    // other thread uses them.
    unsafe {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_spares_a_marked_process_older_than_the_run() {
        let marker = make_marker();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(MARKER_VAR, &marker)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let needle = format!("{MARKER_VAR}={marker}");
        // Wait for the exec: the environment is the child's own after it.
        for _ in 0..1000 {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // A run that started after the process: not one of its processes.
        assert_eq!(kill_marked(needle.as_bytes(), u64::MAX, 0), 0);
        assert!(child.try_wait().unwrap().is_none());
        // Another run's marker: not one of its processes either.
        assert_eq!(kill_marked(b"TORCHRUN_RS_JOB=1-0", 0, 0), 0);
        assert!(child.try_wait().unwrap().is_none());
        // This run, started before it: swept.
        assert_eq!(kill_marked(needle.as_bytes(), own_start_time(), 0), 1);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
