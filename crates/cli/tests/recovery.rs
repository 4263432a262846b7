//! The restart policy beyond torchrun's: a wait before each restart
//! (`--restart-backoff`) and exit codes that end the job at once
//! (`--fatal-exit-codes`).

use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

fn run(flags: &[&str], mode: &str, args: &[&str], out: &std::path::Path) -> Output {
    Command::new(BIN)
        .args(flags)
        .arg(testkit::cli_helper("worker.py"))
        .arg(mode)
        .arg(out)
        .args(args)
        .env("PYTHON_EXEC", "python3")
        .env("TMPDIR", out)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn events(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_fatal_exit_code_ends_the_job_without_using_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &[
            "--nproc-per-node=2",
            "--max-restarts=3",
            "--fatal-exit-codes=2,3",
        ],
        "exit",
        &["3", "0"],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("one of --fatal-exit-codes"), "{err}");
    assert!(
        !dir.path().join("env.0.1.json").exists(),
        "a restart was made: {err}"
    );
    // Another code still restarts.
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        &[
            "--nproc-per-node=1",
            "--max-restarts=1",
            "--fatal-exit-codes=3",
        ],
        "fail-once",
        &["0"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(0));
    assert!(dir.path().join("env.0.1.json").exists());
}

#[test]
fn the_restart_waits_for_its_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let o = run(
        &[
            "--nproc-per-node=1",
            "--max-restarts=1",
            "--restart-backoff=1",
            "--events-file",
            file.to_str().unwrap(),
        ],
        "fail-once",
        &["0"],
        dir.path(),
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ev = events(&file);
    let ts = |name: &str, attempt: u64| {
        ev.iter()
            .find(|e| e["event"] == name && e["attempt"] == attempt)
            .unwrap_or_else(|| panic!("no {name} of attempt {attempt}: {ev:?}"))["ts"]
            .as_f64()
            .unwrap()
    };
    // `ts` is in milliseconds.
    let gap = (ts("worker_started", 1) - ts("worker_exited", 0)) / 1000.0;
    // The backoff (1 to 1.25 s), then the rendezvous and the start.
    assert!(
        (1.0..5.0).contains(&gap),
        "the restart came {gap:.2} s after the failure"
    );
    let wait = ev
        .iter()
        .find(|e| e["event"] == "restart_backoff")
        .expect("the backoff is in the events file");
    let w = wait["wait_s"].as_f64().unwrap();
    assert!((1.0..=1.25).contains(&w), "{wait}");
}

#[test]
fn restart_policy_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, needle) in [
        ("--restart-backoff=5:1", "--restart-backoff"),
        ("--restart-backoff=soon", "--restart-backoff"),
        ("--fatal-exit-codes=0", "--fatal-exit-codes"),
        ("--fatal-exit-codes=3,x", "--fatal-exit-codes"),
    ] {
        let o = run(&[flag], "env", &[], dir.path());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag}: {err}");
        assert!(
            err.contains(needle) && err.lines().count() <= 2,
            "{flag}: {err}"
        );
    }
}

#[test]
fn a_sibling_stopped_by_the_launcher_never_matches_a_fatal_exit_code() {
    // Rank 0 fails with 2; rank 1, stopped by the launcher, exits 1 on
    // SIGTERM (as Lightning does). 1 is fatal, 2 is not: the job restarts,
    // and the second attempt succeeds.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let script = r#"
        [ "$TORCHELASTIC_RESTART_COUNT" = 0 ] || exit 0
        if [ "$LOCAL_RANK" = 0 ]; then
            while [ ! -e "$OUT/ready" ]; do sleep 0.02; done
            exit 2
        fi
        trap 'exit 1' TERM
        touch "$OUT/ready"
        while :; do sleep 0.02; done
    "#;
    let o = Command::new(BIN)
        .args([
            "--nproc-per-node=2",
            "--max-restarts=1",
            "--fatal-exit-codes=1",
            "--events-file",
            file.to_str().unwrap(),
            "--no-python",
            "sh",
            "-c",
            script,
        ])
        .env("OUT", dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(!err.contains("one of --fatal-exit-codes"), "{err}");
    let ev = events(&file);
    let exit_of = |rank: u64| {
        ev.iter()
            .find(|e| e["event"] == "worker_exited" && e["attempt"] == 0 && e["local_rank"] == rank)
            .unwrap_or_else(|| panic!("no exit of rank {rank}: {ev:?}"))
            .clone()
    };
    assert_eq!(exit_of(0)["exit_code"], 2);
    assert_eq!(exit_of(0)["reason"], "failed");
    assert_eq!(exit_of(1)["exit_code"], 1);
    assert_eq!(exit_of(1)["reason"], "stopped");
    assert!(ev.iter().any(|e| e["event"] == "restart"), "{ev:?}");
}
