//! `--node-check` with the built binary: its status is its own (the
//! launcher's reaper never takes it), it dies with the launcher, and its
//! output costs the launcher a bounded amount of memory and time.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{pid_alive, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

fn launcher(flags: &[&str], events: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg(format!("--events-file={}", events.display()))
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn events(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn count(ev: &[serde_json::Value], name: &str) -> usize {
    ev.iter().filter(|e| e["event"] == name).count()
}

/// Waits at most `within` for the launcher to exit; its code and stderr.
fn finish_within(mut c: Child, within: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + within;
    while c.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = c.kill();
            let out = c.wait_with_output().unwrap();
            panic!(
                "the launcher did not exit within {within:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = c.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_passing_check_is_never_counted_as_a_failure_across_restarts() {
    // Every attempt's workers fail, so the check runs again before each
    // restart while the launcher's reaper collects the workers. One
    // counted check failure would exclude the node (--max-node-failures=1).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let c = launcher(
        &[
            "--standalone",
            "--nproc-per-node=2",
            "--max-restarts=10",
            "--node-check=true",
            "--max-node-failures=1",
            "--no-python",
            "sh",
            "-c",
            "exit 1",
        ],
        &file,
    )
    .spawn()
    .unwrap();
    let (code, err) = finish_within(c, Duration::from_secs(120));
    assert_eq!(code, Some(1), "{err}");
    assert!(!err.contains("--node-check"), "{err}");
    assert!(!err.contains("excluded"), "{err}");
    let ev = events(&file);
    assert_eq!(count(&ev, "node_check_failed"), 0, "{ev:?}");
    assert_eq!(count(&ev, "node_check_passed"), 11, "{ev:?}");
    assert_eq!(count(&ev, "restart"), 10, "{ev:?}");
}

#[test]
fn a_check_dies_with_a_sigkilled_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let (sh, sleep) = (dir.path().join("sh.pid"), dir.path().join("sleep.pid"));
    // The shell runs `sleep` as its child: a grandchild of the launcher,
    // which no parent-death signal reaches.
    let check = format!(
        "--node-check=echo $$ > {}; sleep 97 & echo $! > {}; wait",
        sh.display(),
        sleep.display()
    );
    let mut c = launcher(
        &[
            "--standalone",
            "--nproc-per-node=1",
            &check,
            "--no-python",
            "true",
        ],
        &file,
    )
    .spawn()
    .unwrap();
    let read = |p: &std::path::Path| -> i32 {
        wait_for(Duration::from_secs(30), "the check's pid files", || {
            std::fs::read_to_string(p).ok()?.trim().parse().ok()
        })
    };
    let pids = [read(&sh), read(&sleep)];
    assert!(pids.iter().all(|&p| pid_alive(p)));
    // SAFETY: a plain system call on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
    c.wait().unwrap();
    wait_for(
        Duration::from_secs(3),
        "the check's shell and sleep to be gone",
        || pids.iter().all(|&p| !pid_alive(p)).then_some(()),
    );
}

#[test]
fn a_check_that_writes_200_mb_costs_the_launcher_no_more_than_a_tail() {
    // The check reports its parent's (the launcher's) peak memory after
    // writing 200 MB, then fails so that its last lines are shown.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let check = "--node-check=head -c 200000000 /dev/zero | tr '\\0' x; echo; \
                 grep VmHWM /proc/$PPID/status; exit 3";
    let c = launcher(
        &[
            "--standalone",
            "--nproc-per-node=1",
            check,
            "--max-node-failures=1",
            "--no-python",
            "true",
        ],
        &file,
    )
    .spawn()
    .unwrap();
    let (code, err) = finish_within(c, Duration::from_secs(120));
    assert_eq!(code, Some(1), "{err}");
    let ev = events(&file);
    let failed = ev
        .iter()
        .find(|e| e["event"] == "node_check_failed")
        .unwrap_or_else(|| panic!("{ev:?}"));
    assert_eq!(failed["exit_code"], 3, "{failed}");
    let output = failed["output"].as_str().unwrap();
    assert!(output.len() < 4096, "{} bytes of output kept", output.len());
    let kb: u64 = output
        .split("VmHWM:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {output:?}"));
    eprintln!("the launcher's peak memory: {kb} kB");
    assert!(kb < 64 * 1024, "the launcher's peak memory was {kb} kB");
}

#[test]
fn a_check_whose_child_keeps_its_output_open_ends_with_its_shell() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let pid = dir.path().join("sleep.pid");
    let check = format!(
        "--node-check=sleep 600 & echo $! > {}; echo started",
        pid.display()
    );
    let c = launcher(
        &[
            "--standalone",
            "--nproc-per-node=1",
            &check,
            "--no-python",
            "true",
        ],
        &file,
    )
    .spawn()
    .unwrap();
    let (code, err) = finish_within(c, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    let ev = events(&file);
    let passed = ev
        .iter()
        .find(|e| e["event"] == "node_check_passed")
        .unwrap_or_else(|| panic!("{ev:?}"));
    let took = passed["took_s"].as_f64().unwrap();
    assert!(took < 10.0, "the check took {took} s");
    // Left in the check's own process group: stopped with it.
    let sleep: i32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for(Duration::from_secs(5), "the check's leftover to go", || {
        (!pid_alive(sleep)).then_some(())
    });
}
