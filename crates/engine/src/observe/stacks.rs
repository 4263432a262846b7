//! A worker's Python and native stacks, without code changes: `py-spy dump`
//! when py-spy is installed (`pip install py-spy`; found on PATH). Workers
//! allow the launcher's descendants to trace them (`PR_SET_PTRACER`), so this
//! works under Yama's `ptrace_scope=1` too. py-spy is started like a worker
//! (its PID held until it is reaped), so stopping a stuck one can never
//! signal a stranger.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::process::{self, SpawnSpec, Stdio};

/// One rank's stack dump.
#[derive(Debug, Clone)]
pub struct Stack {
    pub text: String,
    /// The innermost frame of the main thread, e.g. `all_reduce (train.py:52)`.
    pub top: Option<String>,
}

/// The innermost frame of the main thread (else the first thread) of a
/// `py-spy dump`.
pub fn top_frame(dump: &str) -> Option<String> {
    let lines: Vec<&str> = dump.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("Thread ") && l.contains("\"MainThread\""))
        .or_else(|| lines.iter().position(|l| l.starts_with("Thread ")))?;
    lines[start + 1..]
        .iter()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

/// How many py-spy processes may run at once: each pauses its target, and a
/// burst of requests (a scraper, a retrying client) must not start one per
/// request and rank without bound.
const MAX_CAPTURES: usize = 8;

static CAPTURES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CAPTURES);

/// Dumps `pid`'s stacks with py-spy, in 10 s at most.
///
/// The capture runs in a task of its own, to its end, whatever happens to
/// the caller: an HTTP client that goes away drops this future, but py-spy
/// is still waited for and reaped (no zombie per aborted request), and a
/// panic inside is an `Err`, never the launcher's end.
pub async fn capture(pid: i32) -> Result<Stack, String> {
    crate::background::spawn(capture_to_the_end(pid))
        .await
        .unwrap_or_else(|_| Err("the stack capture failed (internal error)".to_string()))
}

async fn capture_to_the_end(pid: i32) -> Result<Stack, String> {
    let _slot = CAPTURES
        .acquire()
        .await
        .map_err(|_| "stack captures are shut down".to_string())?;
    // py-spy gets the PID as a number: the worker must not be reaped (its
    // PID freed for a stranger) until py-spy is done with it.
    let _pin = process::pin(pid).ok_or("the worker has already exited and been released")?;
    let py_spy = process::find_program("py-spy")
        .ok_or("py-spy is not installed (pip install py-spy): no stack capture")?;
    let (r, w) = crate::logs::log_stream::small_pipe().map_err(|e| e.to_string())?;
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(|e| e.to_string())?;
    // The launcher's environment as bytes: a variable that is not UTF-8 is
    // passed on as it is, never a reason to fail (or panic).
    let env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    let args: Vec<OsString> = vec!["dump".into(), "--pid".into(), pid.to_string().into()];
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let spy = process::spawn(
        SpawnSpec {
            program: &py_spy,
            args: &args,
            env: &env,
            stdin: Stdio::Inherit,
            stdout: Stdio::Fd(w),
            stderr: Stdio::Fd(null.into()),
            cpus: None,
        },
        &exits_tx,
    )
    .map_err(|e| format!("cannot start py-spy: {e}"))?;
    let reader = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        let _ = std::fs::File::from(r).read_to_string(&mut text);
        text
    });
    let finished = tokio::time::timeout(Duration::from_secs(10), exits.recv()).await;
    if finished.is_err() {
        // Held until released: this reaches py-spy's own group only.
        process::signal_group(spy, libc::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(5), exits.recv()).await;
    }
    process::release(spy);
    let text = reader.await.unwrap_or_default();
    if finished.is_err() {
        return Err("py-spy did not answer in 10 s".to_string());
    }
    if text.trim().is_empty() {
        return Err(
            "py-spy printed nothing (not a Python process, or not allowed to trace it)".to_string(),
        );
    }
    Ok(Stack {
        top: top_frame(&text),
        text,
    })
}

/// Ranks grouped by their top frame, the smallest groups (the odd ones
/// out) first: `ranks 0-6: all_reduce (train.py:52)`.
pub fn group_report(tops: &[(u32, Option<String>)]) -> Vec<String> {
    let mut by: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (rank, top) in tops {
        by.entry(top.clone().unwrap_or_else(|| "<no stack>".to_string()))
            .or_default()
            .push(*rank);
    }
    let mut groups: Vec<(String, Vec<u32>)> = by.into_iter().collect();
    groups.sort_by_key(|(_, ranks)| (ranks.len(), ranks.first().copied()));
    groups
        .into_iter()
        .map(|(frame, mut ranks)| {
            ranks.sort_unstable();
            let set: std::collections::BTreeSet<u32> = ranks.iter().copied().collect();
            let list = crate::process::numa::format_ranges(&set);
            let word = if ranks.len() == 1 { "rank" } else { "ranks" };
            format!("{word} {list}: {frame}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_frame_and_the_grouping() {
        let dump = "Process 1: python t.py\nPython v3.11\n\nThread 7 (idle): \"pt_autograd\"\n    f (x.py:1)\nThread 1 (idle): \"MainThread\"\n    all_reduce (dist.py:2501)\n    <module> (train.py:52)\n";
        assert_eq!(
            top_frame(dump).as_deref(),
            Some("all_reduce (dist.py:2501)")
        );
        let tops: Vec<(u32, Option<String>)> = (0..8)
            .map(|r| {
                (
                    r,
                    Some(
                        if r == 7 {
                            "__next__ (data.py:88)"
                        } else {
                            "all_reduce (train.py:52)"
                        }
                        .to_string(),
                    ),
                )
            })
            .collect();
        assert_eq!(
            group_report(&tops),
            vec![
                "rank 7: __next__ (data.py:88)",
                "ranks 0-6: all_reduce (train.py:52)"
            ]
        );
    }
}
