//! torch's file watchdog, wire-compatible, without its failure mode.
//!
//! With `TORCHELASTIC_ENABLE_FILE_TIMER=1` (or `TORCHELASTIC_TIMER_FILE`
//! set), the launcher makes a FIFO at `TORCHELASTIC_TIMER_FILE` (else
//! `$TMPDIR/watchdog_timer_<uuid>`), exports the path to the workers, and
//! reads the JSON lines of torch's `FileTimerClient` (`{"version": 1, "pid":
//! P, "scope_id": S, "expiration_time": T, "signal": N}`; a negative time
//! releases the timer). A timer of one of this job's workers (or of their
//! descendants) that expires becomes an event of the agent's loop, which
//! treats it as that worker's failure: torch instead kills its own launcher.
//! Malformed or oversized lines and foreign pids are warnings.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::logs::failure::json;

/// torch's request size limit (PIPE_BUF); longer lines are refused.
const MAX_LINE: usize = 4096;

/// An expired timer, for the agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Expired {
    /// The pid the timer named (a worker or one of its descendants).
    pub pid: i32,
    pub scope: String,
    /// The signal the client asked for.
    pub signal: i32,
}

/// The pids whose timers are honoured: the running workers (their
/// descendants are found through `/proc`).
pub type Workers = Arc<Mutex<BTreeSet<i32>>>;

/// The FIFO and its reader task; the FIFO is removed on drop.
pub struct Watchdog {
    pub path: PathBuf,
    /// (device, inode) of the FIFO `start` made.
    made: (u64, u64),
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.task.abort();
        // Only the FIFO `start` made: if something else has since taken the
        // path (another run given the same TORCHELASTIC_TIMER_FILE), it stays.
        if identity(&self.path).is_some_and(|id| id == self.made) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Whether some process has `path` (a FIFO) open for reading: opening it
/// for writing without blocking succeeds only then (ENXIO otherwise).
fn has_reader(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .is_ok()
}

/// The FIFO path torch would use, when the watchdog is asked for.
pub fn wanted(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let path = env("TORCHELASTIC_TIMER_FILE").filter(|p| !p.is_empty());
    let enabled = env("TORCHELASTIC_ENABLE_FILE_TIMER").as_deref() == Some("1");
    match path {
        Some(p) => Some(PathBuf::from(p)),
        None if enabled => {
            use rand::Rng;
            let id: u128 = rand::thread_rng().gen();
            Some(std::env::temp_dir().join(format!("watchdog_timer_{id:032x}")))
        }
        None => None,
    }
}

/// Makes the FIFO and starts reading it. A file already at `path` is
/// replaced only if it is a FIFO nobody reads (a finished run's, as torch
/// replaces it); a FIFO another process serves, or anything else there, is
/// not ours to delete.
pub fn start(
    path: &Path,
    workers: Workers,
    expired: mpsc::UnboundedSender<Expired>,
    heartbeat: crate::logs::log_stream::Activity,
) -> std::io::Result<Watchdog> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_fifo() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a FIFO; not replacing it",
                    path.display()
                ),
            ));
        }
        if has_reader(path) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is a FIFO another process is reading; not replacing it",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::other("a NUL byte in the timer file path"))?;
    // SAFETY: mkfifo on a NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Read and write: no EOF when clients come and go, and no blocking open.
    let rx = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)?;
    let made = identity(path).ok_or_else(|| std::io::Error::other("the FIFO vanished"))?;
    let task = tokio::spawn(serve(rx, workers, expired, heartbeat));
    Ok(Watchdog {
        path: path.to_path_buf(),
        made,
        task,
    })
}

/// One parsed request.
#[derive(Debug, PartialEq)]
struct Request {
    pid: i32,
    scope: String,
    expiration: f64,
    signal: i32,
}

fn parse(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
    let j = json::parse(text)?;
    let num = |k: &str| match j.get(k) {
        Some(json::Json::Num(n)) => Ok(*n),
        _ => Err(format!("no number '{k}'")),
    };
    let pid = num("pid")?;
    if !(1.0..=f64::from(i32::MAX)).contains(&pid) || pid.fract() != 0.0 {
        return Err(format!("pid {pid} is not a process id"));
    }
    let scope = j
        .get("scope_id")
        .and_then(|s| s.as_str())
        .ok_or("no string 'scope_id'")?
        .to_string();
    let signal = num("signal")?;
    Ok(Request {
        pid: pid as i32,
        scope,
        expiration: num("expiration_time")?,
        signal: signal.clamp(-1.0, 64.0) as i32,
    })
}

/// Whether `pid` is a worker or a descendant of one (its ancestry in /proc).
fn belongs(pid: i32, workers: &BTreeSet<i32>) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        if workers.contains(&p) {
            return true;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            return false;
        };
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<i32>().ok())
        else {
            return false;
        };
        if ppid <= 1 {
            return false;
        }
        p = ppid;
    }
    false
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn serve(
    mut rx: tokio::net::unix::pipe::Receiver,
    workers: Workers,
    expired: mpsc::UnboundedSender<Expired>,
    heartbeat: crate::logs::log_stream::Activity,
) {
    let mut timers: BTreeMap<(i32, String), (f64, i32)> = BTreeMap::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut skipping = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = rx.read(&mut buf) => {
                let n = match r {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!("the watchdog's timer file cannot be read ({e}); timers are off");
                        return;
                    }
                };
                for &b in &buf[..n] {
                    if b != b'\n' {
                        if !skipping {
                            pending.push(b);
                            if pending.len() > MAX_LINE {
                                tracing::warn!("watchdog: a request longer than {MAX_LINE} bytes was ignored");
                                pending.clear();
                                skipping = true;
                            }
                        }
                        continue;
                    }
                    if std::mem::take(&mut skipping) {
                        continue;
                    }
                    let line = std::mem::take(&mut pending);
                    match parse(&line) {
                        Err(e) => tracing::warn!("watchdog: ignored a malformed request ({e})"),
                        Ok(r) => {
                            let ours = belongs(r.pid, &workers.lock().unwrap_or_else(|p| p.into_inner()));
                            if !ours {
                                tracing::warn!("watchdog: ignored a timer of pid {}, which is not a worker of this job", r.pid);
                            } else if r.expiration < 0.0 {
                                crate::logs::log_stream::touch(&heartbeat);
                                timers.remove(&(r.pid, r.scope));
                            } else {
                                crate::logs::log_stream::touch(&heartbeat);
                                timers.insert((r.pid, r.scope), (r.expiration, r.signal));
                            }
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let t = now();
                let live = workers.lock().unwrap_or_else(|p| p.into_inner()).clone();
                // Timers of processes no longer in the job are dropped.
                timers.retain(|(pid, _), _| belongs(*pid, &live));
                let due: Vec<(i32, String, i32)> = timers
                    .iter()
                    .filter(|(_, (exp, _))| *exp <= t)
                    .map(|((pid, scope), (_, sig))| (*pid, scope.clone(), *sig))
                    .collect();
                for (pid, scope, signal) in due {
                    timers.remove(&(pid, scope.clone()));
                    if signal > 0 {
                        let _ = expired.send(Expired { pid, scope, signal });
                    } else {
                        tracing::info!("watchdog: timer '{scope}' of pid {pid} expired with no signal; not acting");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO another run serves is refused, not deleted; a stale one
    /// (nobody reading) is replaced; the FIFO is removed on drop only while
    /// it is still the one made, never a file that took its path since.
    #[tokio::test]
    async fn only_its_own_fifo_is_replaced_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timers");
        let start = |p: &Path| {
            let (tx, _rx) = mpsc::unbounded_channel();
            super::start(p, Workers::default(), tx, Default::default())
        };
        let first = start(&path).unwrap();
        let err = start(&path).err().expect("a served FIFO is refused");
        assert!(
            err.to_string().contains("another process is reading"),
            "{err}"
        );
        assert!(identity(&path) == Some(first.made));
        drop(first);
        assert!(!path.exists());

        // A stale FIFO, nobody reading: replaced.
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let second = start(&path).unwrap();
        // Someone else's file takes the path: dropping leaves it alone.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"theirs").unwrap();
        drop(second);
        assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
    }

    #[test]
    fn torchs_request_lines_parse() {
        let r = parse(br#"{"version": 1, "pid": 4242, "scope_id": "train.py#88", "expiration_time": 1767225600.25, "signal": 9}"#).unwrap();
        assert_eq!(
            r,
            Request {
                pid: 4242,
                scope: "train.py#88".into(),
                expiration: 1767225600.25,
                signal: 9
            }
        );
        for bad in [
            &b"garbage"[..],
            br#"{"pid": -3, "scope_id": "x", "expiration_time": 1, "signal": 9}"#,
            br#"{"pid": 1}"#,
            b"\xff",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
