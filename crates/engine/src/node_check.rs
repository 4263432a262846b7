//! `--node-check=CMD` (beyond torch): a command the agent runs with `sh -c`
//! before it joins each rendezvous round: a GPU, NIC or disk check. A
//! non-zero exit keeps the node out of that round and counts as one of its
//! failures (`--max-node-failures`); the agent tries again later.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

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
}

/// Kills the check's process group if the check is abandoned (the launcher
/// stopping, the time running out) before it was reaped: the group is the
/// check's own, made for it, and nothing else is signalled.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: killpg has no memory effects.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
    }
}

/// Runs `cmd` with `sh -c` in a process group of its own, at most
/// `timeout`.
pub async fn run(cmd: &str, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let failed = |why: String| Outcome {
        code: None,
        signal: None,
        took: started.elapsed(),
        why: Some(why),
        output: String::new(),
    };
    let mut child = match tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return failed(format!("could not start /bin/sh: {e}")),
    };
    let mut guard = GroupGuard(child.id().map(|p| p as i32));
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let read = async {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let ra = async {
            if let Some(o) = out.as_mut() {
                let _ = o.read_to_end(&mut a).await;
            }
        };
        let rb = async {
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_end(&mut b).await;
            }
        };
        tokio::join!(ra, rb);
        a.extend_from_slice(&b);
        a
    };
    let waited = tokio::time::timeout(timeout, async {
        let (bytes, status) = tokio::join!(read, child.wait());
        (bytes, status)
    })
    .await;
    match waited {
        Err(_) => {
            // The guard kills the group; the child is reaped by tokio.
            drop(guard);
            let _ = child.wait().await;
            failed(format!("ran past its {} s", timeout.as_secs()))
        }
        Ok((bytes, status)) => {
            // Reaped: whatever is left of its group is no longer known to
            // be the check's, and is not touched.
            guard.0 = None;
            let output = tail(&bytes);
            match status {
                Err(e) => Outcome {
                    output,
                    ..failed(format!("could not wait for it: {e}"))
                },
                Ok(st) => Outcome {
                    code: st.code(),
                    signal: st.signal(),
                    took: started.elapsed(),
                    why: match (st.code(), st.signal()) {
                        (Some(0), _) => None,
                        (Some(c), _) => Some(format!("exited with {c}")),
                        (None, Some(s)) => Some(format!("was killed by signal {s}")),
                        (None, None) => Some("ended abnormally".into()),
                    },
                    output,
                },
            }
        }
    }
}

/// The last few lines of `bytes`, lossily decoded, joined with ` | `.
fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(TAIL_BYTES);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_passing_check_passes_and_a_failing_one_says_why_with_its_output() {
        let ok = run("true", TIMEOUT).await;
        assert!(ok.passed() && ok.why.is_none());
        let bad = run(
            "echo checking; echo 'GPU 3: ECC errors' >&2; exit 3",
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
        let cmd = format!("sleep 600 & echo $! > {}; wait", pidfile.display());
        let started = Instant::now();
        let out = run(&cmd, Duration::from_millis(500)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!out.passed());
        assert!(out.why.unwrap().contains("ran past"));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background sleep was in the check's group: killed with it.
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only checks for existence.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(Instant::now() < deadline, "the check's child survived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
