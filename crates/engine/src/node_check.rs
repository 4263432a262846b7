//! `--node-check=CMD` (beyond torch): a command the agent runs with `sh -c`
//! before it joins each rendezvous round: a GPU, NIC or disk check. A
//! non-zero exit keeps the node out of that round and counts as one of its
//! failures (`--max-node-failures`); the agent tries again later.
//!
//! The check's `/bin/sh` is started like a worker ([`process::spawn`]):
//!
//! - its exit comes back through the launcher's reaper, which collects every
//!   child of the launcher that it does not hold; a check waited for by
//!   anyone else would race the reaper for its own status;
//! - it dies with the launcher (parent-death signal: [`start`] is called on
//!   the agent's thread, which lives as long as the launch) and carries the
//!   job's marker, so that what it started is swept by the guardian when the
//!   launcher is SIGKILLed;
//! - it has a session and process group of its own, whose ID is its PID and
//!   stays reserved until it is released: killing that group can only reach
//!   the check's processes.
//!
//! Its stdout and stderr share one pipe, read as they come; only the last
//! [`TAIL_BYTES`] are kept, however much it writes. The check is over when
//! `/bin/sh` exits: what it wrote is read without waiting for the
//! processes it left that still hold the pipe (`daemon &`), and those left
//! in its process group are killed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::process::{self, Exit, ExitStatus, SpawnSpec, Stdio};

/// How long a check may run: a check that hangs (a wedged GPU driver) fails.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// How much of the check's output is kept for the message.
const TAIL_BYTES: usize = 2048;

/// What one run of the check came to.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The exit code; `None` when it could not run, was killed by a signal
    /// or ran past its time.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub took: Duration,
    /// Why it failed, in words, when it did.
    pub why: Option<String>,
    /// The last lines of what it wrote (stdout and stderr).
    pub output: String,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.code == Some(0)
    }

    fn failed(started: Instant, why: String) -> Outcome {
        Outcome {
            code: None,
            signal: None,
            took: started.elapsed(),
            why: Some(why),
            output: String::new(),
        }
    }
}

/// A check that is running: its `/bin/sh`, held by the reaper until
/// released, and the read end of its output.
pub struct Running {
    sh: Held,
    exits: mpsc::UnboundedReceiver<Exit>,
    output: OwnedFd,
    started: Instant,
}

/// The check's `/bin/sh` until it is released. Dropped early (the launcher
/// stopping while the check runs), it kills the check's process group
/// first: the group is the check's own, and its ID cannot be reused before
/// the release.
struct Held(Option<i32>);

impl Held {
    /// Kills what is left in the check's process group and frees the PID.
    fn end(&mut self) {
        if let Some(pid) = self.0.take() {
            process::signal_group(pid, libc::SIGKILL);
            process::release(pid);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.end();
    }
}

/// Starts `cmd` with `sh -c`, its environment the launcher's plus the job's
/// `marker`. Call it on the thread the workers are forked from: the check
/// dies with that thread.
pub fn start(cmd: &str, marker: &str) -> Result<Running, Outcome> {
    let started = Instant::now();
    let failed = |what: &str, e: std::io::Error| Outcome::failed(started, format!("{what}: {e}"));
    let (r, w) = crate::logs::log_stream::small_pipe().map_err(|e| failed("no pipe", e))?;
    let w2 = w.try_clone().map_err(|e| failed("no pipe", e))?;
    let null = std::fs::File::open("/dev/null").map_err(|e| failed("no /dev/null", e))?;
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    env.insert(process::lifeline::MARKER_VAR.into(), marker.into());
    let args: Vec<OsString> = vec!["-c".into(), cmd.into()];
    let (tx, exits) = mpsc::unbounded_channel();
    let pid = process::spawn(
        SpawnSpec {
            program: std::path::Path::new("/bin/sh"),
            args: &args,
            env: &env,
            stdin: Stdio::Fd(null.into()),
            stdout: Stdio::Fd(w),
            stderr: Stdio::Fd(w2),
            cpus: None,
        },
        &tx,
    )
    .map_err(|e| failed("could not start /bin/sh", e))?;
    Ok(Running {
        sh: Held(Some(pid)),
        exits,
        output: r,
        started,
    })
}

/// Runs `cmd` to its end (see [`start`] and [`Running::finish`]).
#[cfg(test)]
pub async fn run(cmd: &str, marker: &str, timeout: Duration) -> Outcome {
    match start(cmd, marker) {
        Ok(running) => running.finish(timeout).await,
        Err(outcome) => outcome,
    }
}

impl Running {
    /// Reads the check's output until its `/bin/sh` exits, at most
    /// `timeout`; then ends what is left of it.
    pub async fn finish(mut self, timeout: Duration) -> Outcome {
        let mut tail = Tail::default();
        let raw = self.output.as_raw_fd();
        let mut pipe = match self
            .output
            .try_clone()
            .map(tokio::net::unix::pipe::Receiver::from_owned_fd)
        {
            Ok(Ok(p)) => Some(p),
            // Without the reactor's help the output is read once, at the end.
            _ => None,
        };
        let mut buf = vec![0u8; 16 << 10];
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let exit = loop {
            tokio::select! {
                exit = self.exits.recv() => break exit,
                n = async { pipe.as_mut().unwrap().read(&mut buf).await }, if pipe.is_some() => {
                    match n {
                        Ok(n) if n > 0 => tail.push(&buf[..n]),
                        // End of output (or a broken pipe): wait for the exit.
                        _ => pipe = None,
                    }
                }
                _ = &mut deadline => break None,
            }
        };
        let timed_out = exit.is_none();
        let exit = match exit {
            Some(e) => Some(e),
            None => {
                // Past its time: the whole group goes, and sh's exit is
                // awaited briefly (a process in uninterruptible sleep may
                // not die at once; it is reaped when it does).
                if let Some(pid) = self.sh.0 {
                    process::signal_group(pid, libc::SIGKILL);
                }
                tokio::time::timeout(Duration::from_secs(5), self.exits.recv())
                    .await
                    .ok()
                    .flatten()
            }
        };
        // sh is gone: kill what it left in its group (still its own, the
        // zombie being held), then take what is in the pipe without waiting
        // for a leftover that holds its write end.
        self.sh.end();
        drop(pipe);
        drain_now(raw, &mut tail);
        let output = tail.lines();
        let took = self.started.elapsed();
        if timed_out {
            return Outcome {
                output,
                ..Outcome::failed(
                    self.started,
                    format!("ran past its {} s", timeout.as_secs()),
                )
            };
        }
        let (code, signal) = match exit.map(|e| e.status) {
            Some(ExitStatus::Code(c)) => (Some(c), None),
            Some(ExitStatus::Signal(s)) => (None, Some(s)),
            None => (None, None),
        };
        Outcome {
            code,
            signal,
            took,
            why: match (code, signal) {
                (Some(0), _) => None,
                (Some(c), _) => Some(format!("exited with {c}")),
                (None, Some(s)) => Some(format!("was killed by signal {s}")),
                (None, None) => Some("ended abnormally".into()),
            },
            output,
        }
    }
}

/// Reads what `fd` holds now, without blocking.
fn drain_now(fd: i32, tail: &mut Tail) {
    // SAFETY: plain fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut buf = [0u8; 16 << 10];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            tail.push(&buf[..n as usize]);
        } else if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {
            continue;
        } else {
            break;
        }
    }
}

/// The last [`TAIL_BYTES`] of a stream (at most twice that in memory).
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
        self.0.extend_from_slice(bytes);
        if self.0.len() > 2 * TAIL_BYTES {
            let cut = self.0.len() - TAIL_BYTES;
            self.0.drain(..cut);
        }
    }

    /// The last few lines, lossily decoded, joined with ` | `.
    fn lines(&self) -> String {
        let start = self.0.len().saturating_sub(TAIL_BYTES);
        let text = String::from_utf8_lossy(&self.0[start..]);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gone_within(pid: i32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        // SAFETY: signal 0 only checks for existence.
        while unsafe { libc::kill(pid, 0) } == 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    fn read_pid(path: &std::path::Path) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return p;
            }
            assert!(Instant::now() < deadline, "no pid in {}", path.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn a_passing_check_passes_and_a_failing_one_says_why_with_its_output() {
        let ok = run("true", "m", TIMEOUT).await;
        assert!(ok.passed() && ok.why.is_none(), "{ok:?}");
        let bad = run(
            "echo checking; echo 'GPU 3: ECC errors' >&2; exit 3",
            "m",
            TIMEOUT,
        )
        .await;
        assert!(!bad.passed());
        assert_eq!(bad.code, Some(3));
        assert_eq!(bad.why.as_deref(), Some("exited with 3"));
        assert_eq!(bad.output, "checking | GPU 3: ECC errors");
    }

    #[tokio::test]
    async fn a_check_that_hangs_fails_at_its_timeout_and_its_children_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cmd = format!(
            "sleep 600 & echo $! > {}; echo waiting; wait",
            pidfile.display()
        );
        let started = Instant::now();
        let out = run(&cmd, "m", Duration::from_millis(500)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!out.passed());
        assert!(out.why.unwrap().contains("ran past"));
        assert_eq!(out.output, "waiting");
        // The background sleep was in the check's group: killed with it.
        let pid = read_pid(&pidfile);
        assert!(
            gone_within(pid, Duration::from_secs(5)),
            "the check's child survived"
        );
    }

    #[tokio::test]
    async fn a_check_is_over_when_its_shell_exits_though_a_child_holds_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let in_group = dir.path().join("in_group");
        let left = dir.path().join("left");
        // One child stays in the check's group, one leaves it (a daemon):
        // both keep the output pipe open for ten minutes.
        let cmd = format!(
            "sleep 600 & echo $! > {g}; \
             setsid sh -c 'echo $$ > {l}.new; mv {l}.new {l}; exec sleep 601' & \
             while [ ! -e {l} ]; do sleep 0.01; done; echo ready",
            g = in_group.display(),
            l = left.display()
        );
        let started = Instant::now();
        let out = run(&cmd, "m", TIMEOUT).await;
        assert!(out.passed(), "{out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited {:?} for the check's children",
            started.elapsed()
        );
        assert_eq!(out.output, "ready");
        // What stayed in the check's group is killed with it; the daemon
        // that left it is not ours to signal here (the launcher's sweep
        // finds it by the job's marker).
        assert!(
            gone_within(read_pid(&in_group), Duration::from_secs(5)),
            "a leftover in the check's group survived"
        );
        let daemon = read_pid(&left);
        // SAFETY: signal 0 only checks for existence; then our own child's
        // child, started above, is stopped.
        unsafe {
            assert_eq!(libc::kill(daemon, 0), 0, "the daemon was killed");
            libc::kill(daemon, libc::SIGKILL);
        }
    }

    /// A passing check passes while workers start and exit, in a process
    /// whose reaper collects every child it does not hold (a launcher's).
    #[test]
    fn passing_checks_pass_while_the_launchers_reaper_collects_every_child() {
        use crate::process::test_support;
        if !test_support::as_a_launcher(
            "node_check::tests::passing_checks_pass_while_the_launchers_reaper_collects_every_child",
        ) {
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let failed: Vec<Outcome> = test_support::while_workers_come_and_go(|| {
            (0..300)
                .map(|_| rt.block_on(run("true", "m", TIMEOUT)))
                .filter(|o| !o.passed())
                .collect()
        });
        assert!(
            failed.is_empty(),
            "{} of 300 passing checks failed: {:?}",
            failed.len(),
            failed.first()
        );
    }

    #[test]
    fn only_a_bounded_tail_of_the_output_is_kept() {
        let mut tail = Tail::default();
        let line = [b'x'; 1000];
        for _ in 0..100_000 {
            tail.push(&line);
            tail.push(b"\n");
            assert!(tail.0.len() <= 2 * TAIL_BYTES);
        }
        tail.push(&[b'y'; 100_000]);
        assert!(tail.0.len() <= 2 * TAIL_BYTES);
        tail.push(b"\nlast\n");
        assert!(tail.lines().ends_with(" | last"), "{}", tail.lines());
    }
}
