//! torchrun-rs with real PyTorch workers (CPU, gloo), and side by side with
//! the real `torchrun` for the environment contract.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

fn helper(name: &str) -> String {
    testkit::cli_helper(name)
}

fn python() -> PathBuf {
    testkit::torch_python()
}

fn torchrun() -> PathBuf {
    python().with_file_name("torchrun")
}

fn run(cmd: &mut Command) -> Output {
    cmd.env("PYTHON_EXEC", python()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs torch_job.py on two workers (tee'd) and checks both all-reduced
/// on attempt `restart`.
fn assert_gloo_job(flags: &[&str], job_args: &[&str], restart: u32) {
    let out = run(Command::new(BIN)
        .args(["--nproc-per-node=2", "-t", "3"])
        .args(flags)
        .arg(helper("torch_job.py"))
        .args(job_args));
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    for r in 0..2 {
        let line = format!("[default{r}]:rank {r} restart {restart} sum 3");
        assert!(stdout.contains(&line), "{stdout}");
    }
}

#[test]
fn gloo_all_reduce_across_two_workers() {
    assert_gloo_job(&[], &[], 0);
}

#[test]
fn gloo_job_restarts_after_a_deliberate_failure() {
    assert_gloo_job(&["--max-restarts=1"], &["fail-once", "1"], 1);
}

#[test]
fn record_traceback_appears_in_the_summary() {
    let err_file = tempfile::NamedTempFile::new().unwrap();
    let out = run(Command::new(BIN)
        .args(["--nproc-per-node=2"])
        .arg(helper("torch_job.py"))
        .arg("raise")
        .env("TORCHELASTIC_ERROR_FILE", err_file.path()));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Root Cause (first observed failure):"),
        "{stderr}"
    );
    assert!(
        stderr.contains("  traceback : Traceback (most recent call last):"),
        "{stderr}"
    );
    assert!(stderr.contains("ValueError: boom from rank 1"), "{stderr}");
    assert!(stderr.contains("/attempt_0/1/error.json"), "{stderr}");
    // The launcher's own error file gets the root cause's, with errorCode.
    let copied = std::fs::read_to_string(err_file.path()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&copied).unwrap();
    assert_eq!(v["message"]["errorCode"], 1);
    assert!(v["message"]["message"]
        .as_str()
        .unwrap()
        .contains("boom from rank 1"));
}

#[test]
fn run_path_failures_are_titled_and_recorded_as_torch_does() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fails.py");
    std::fs::write(
        &script,
        "import os\nif os.environ['RANK'] == '1':\n    raise ValueError('boom in run-path')\n",
    )
    .unwrap();
    for launcher in [PathBuf::from(BIN), torchrun()] {
        let out = run(Command::new(&launcher)
            .args(["--run-path", "--nproc-per-node=2"])
            .arg(&script)
            .env("TMPDIR", dir.path()));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{launcher:?}: {stderr}");
        assert!(
            stderr.contains("run_script_path FAILED"),
            "{launcher:?}: {stderr}"
        );
        assert!(
            stderr.contains("ValueError: boom in run-path"),
            "{launcher:?}: {stderr}"
        );
        assert!(
            stderr.contains("/attempt_0/1/error.json"),
            "{launcher:?}: {stderr}"
        );
    }
}

/// The console event lines of a launch, with what differs between two
/// launches (run id, pids, durations) redacted.
fn console_events(launcher: &std::path::Path, job: &[&str]) -> Vec<String> {
    let out = run(Command::new(launcher)
        .args([
            "--standalone",
            "--nproc-per-node=2",
            "--max-restarts=1",
            "--event-log-handler=console",
            "--no-python",
        ])
        .args(job)
        .env_remove("LOGLEVEL"));
    let mut lines = Vec::new();
    for l in text(&out.stderr).lines().filter(|l| l.starts_with('{')) {
        let mut l = l.to_string();
        for (start, end) in [
            ("\"run_id\": \"", "\""),
            ("\"worker_id\": \"", "\""),
            ("\"duration_ms\": ", "}"),
            ("\\\"worker_pid\\\": [", "]"),
        ] {
            let mut from = 0;
            while let Some(i) = l[from..].find(start).map(|i| i + from + start.len()) {
                let j = i + l[i..].find(end).unwrap();
                if &l[i..j] != "null" {
                    l.replace_range(i..j, "X");
                }
                from = i;
            }
        }
        lines.push(l);
    }
    lines
}

#[test]
fn console_events_match_torchruns_byte_for_byte() {
    // Rank 0 fails, rank 1 is stopped: a job whose ranks all failed at once
    // would race their exits against the launcher's stopping of the rest.
    let fail = "if [ \"$LOCAL_RANK\" = 0 ]; then exit 3; fi; exec sleep 60";
    for job in [&["true"][..], &["sh", "-c", fail][..]] {
        let ours = console_events(std::path::Path::new(BIN), job);
        let theirs = console_events(&torchrun(), job);
        assert!(ours.len() >= 7, "{ours:#?}");
        assert_eq!(ours, theirs, "{job:?}");
    }
    // Silenced as torch's event logger is; an unknown handler fails at once.
    let out = run(Command::new(BIN)
        .args([
            "--standalone",
            "--event-log-handler=console",
            "--no-python",
            "true",
        ])
        .env("LOGLEVEL", "WARNING"));
    assert!(
        !text(&out.stderr).contains("torchelastic.worker.status"),
        "{}",
        text(&out.stderr)
    );
    let out = run(Command::new(BIN).args(["--event-log-handler=kafka", "--no-python", "true"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("choose from 'null', 'console', 'dynamic_rendezvous'"),
        "{}",
        text(&out.stderr)
    );
}

/// Replaces the values that legitimately differ between two launches with
/// their shape, so the two environments can be compared key by key.
fn shape(key: &str, value: &str, run_id: &str) -> String {
    let v = if run_id.is_empty() || run_id == "none" || key == "TORCHELASTIC_RUN_ID" {
        value.to_string()
    } else {
        value.replace(run_id, "<RUN_ID>")
    };
    match key {
        "MASTER_PORT" => {
            assert!(v.parse::<u16>().is_ok(), "MASTER_PORT {v}");
            "<PORT>".to_string()
        }
        // A generated run id is a fresh uuid4; a given one stays as it is.
        "TORCHELASTIC_RUN_ID"
            if v.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12] =>
        {
            "<UUID4>".to_string()
        }
        "TORCHELASTIC_ERROR_FILE" => {
            // <tmp>/torchelastic_XXXXXXXX/<RUN_ID>_XXXXXXXX/attempt_0/<r>/error.json
            let parts: Vec<&str> = v.rsplit('/').take(5).collect();
            // The random suffix may itself contain '_' (Python's mkdtemp alphabet).
            let suffix = parts[3]
                .strip_prefix("<RUN_ID>_")
                .or_else(|| parts[3].strip_prefix("none_"))
                .unwrap_or_else(|| panic!("run dir of {v}"));
            assert_eq!(suffix.len(), 8, "{v}");
            assert!(
                parts[4].starts_with("torchelastic_") && parts[4].len() == 21,
                "{v}"
            );
            format!(
                "<TMP>/torchelastic_<8>/<RUN_ID>_<8>/{}/{}/{}",
                parts[2], parts[1], parts[0]
            )
        }
        _ => v,
    }
}

fn launched_env(launcher: &[&str], flags: &[&str], nproc: usize) -> Vec<BTreeMap<String, String>> {
    launched_env_nodes(launcher, &[flags], nproc)
}

/// One agent per entry of `nodes` (its flags), all at once; the workers'
/// environments by global rank.
fn launched_env_nodes(
    launcher: &[&str],
    nodes: &[&[&str]],
    world: usize,
) -> Vec<BTreeMap<String, String>> {
    let out_dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let agents: Vec<_> = nodes
        .iter()
        .map(|flags| {
            Command::new(launcher[0])
                .args(&launcher[1..])
                .args(*flags)
                .arg(helper("dump_env.py"))
                .arg(out_dir.path())
                .env("PYTHON_EXEC", python())
                .env("TMPDIR", tmp.path())
                .env_remove("OMP_NUM_THREADS")
                .env_remove("TORCHELASTIC_ERROR_FILE")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for a in agents {
        let out = a.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{launcher:?}: {}",
            text(&out.stderr)
        );
    }
    let base: BTreeMap<String, String> = std::env::vars().collect();
    (0..world)
        .map(|r| {
            let s = std::fs::read_to_string(out_dir.path().join(format!("{r}.json"))).unwrap();
            let all: BTreeMap<String, String> = serde_json::from_str(&s).unwrap();
            let run_id = all.get("TORCHELASTIC_RUN_ID").cloned().unwrap_or_default();
            // What the launcher added or changed, as shapes.
            all.iter()
                .filter(|(k, v)| {
                    base.get(*k) != Some(*v)
                        && k.as_str() != "TMPDIR"
                        && k.as_str() != "PYTHON_EXEC"
                })
                .map(|(k, v)| (k.clone(), shape(k, v, &run_id)))
                .collect()
        })
        .collect()
}

#[test]
fn environment_matches_real_torchrun() {
    let port = testkit::free_port();
    let torchrun = torchrun().display().to_string();
    let port_flag = format!("--master-port={port}");
    for flags in [
        vec!["--standalone", "--nproc-per-node=2"],
        vec!["--nproc-per-node=2", port_flag.as_str()],
    ] {
        let theirs = launched_env(&[torchrun.as_str()], &flags, 2);
        let ours = launched_env(&[BIN], &flags, 2);
        for r in 0..2 {
            let mut mine = ours[r].clone();
            // Our one deliberate addition: the job marker that lets the
            // guardian find a worker's daemonized descendants (README).
            assert!(mine.remove("TORCHRUN_RS_JOB").is_some());
            assert_eq!(mine, theirs[r], "rank {r} with {flags:?}");
        }
    }
}

#[test]
fn multi_node_environment_matches_real_torchrun() {
    // Two c10d nodes of two workers on 127.0.0.2 and .3: every worker's
    // environment, rank by rank, against the real torchrun's.
    let port = testkit::free_port();
    let endpoint = format!("--rdzv-endpoint=127.0.0.2:{port}");
    let node = |addr: &'static str| {
        [
            "--nnodes=2".to_string(),
            "--nproc-per-node=2".into(),
            "--rdzv-backend=c10d".into(),
            endpoint.clone(),
            "--rdzv-id=envdiff".into(),
            format!("--local-addr={addr}"),
        ]
    };
    let (a, b) = (node("127.0.0.2"), node("127.0.0.3"));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    let torchrun = torchrun().display().to_string();
    let theirs = launched_env_nodes(&[torchrun.as_str()], &[&a, &b], 4);
    let ours = launched_env_nodes(&[BIN], &[&a, &b], 4);
    for r in 0..4 {
        let mut mine = ours[r].clone();
        assert!(mine.remove("TORCHRUN_RS_JOB").is_some());
        assert_eq!(mine, theirs[r], "rank {r}");
    }
}

fn timer_job(restarts: &str, dir: &std::path::Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(["--nproc-per-node=2", &format!("--max-restarts={restarts}")])
        .arg(helper("timer_job.py"))
        .arg(dir)
        .env("TMPDIR", dir)
        .env("TORCHELASTIC_ENABLE_FILE_TIMER", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

fn pid_in(dir: &std::path::Path, name: &str) -> i32 {
    std::fs::read_to_string(dir.join(name))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn an_expired_file_timer_fails_the_worker_and_the_job_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let out = timer_job("1", dir.path(), &[]);
    let stderr = text(&out.stderr);
    // The launcher survives (torch kills itself here) and restarts the group.
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("watchdog timer 'stuck-step' of local_rank 1"),
        "{stderr}"
    );
    assert!(dir.path().join("pid.0.1").exists() && dir.path().join("pid.1.1").exists());
    // Nothing of the first attempt is left.
    for name in ["pid.0.0", "pid.1.0"] {
        assert!(
            !testkit::pid_alive(pid_in(dir.path(), name)),
            "{name} still runs"
        );
    }
    // The FIFO was ours and is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("watchdog_timer_")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn an_expired_file_timer_without_restarts_is_the_summarys_root_cause() {
    let dir = tempfile::tempdir().unwrap();
    let out = timer_job("0", dir.path(), &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 9), "{stderr}");
    assert!(
        stderr.contains("Root Cause (first observed failure):"),
        "{stderr}"
    );
    // Where it was when the timer expired (py-spy), then the signal.
    assert!(
        stderr.contains("Root cause: rank 1 (local_rank 1, pid ")
            && stderr.contains("watchdog timer 'stuck-step' expired in ")
            && stderr.contains("(timer_job.py:")
            && stderr.contains("; the worker was stopped (SIGKILL)"),
        "{stderr}"
    );
    assert!(stderr.contains("local_rank 1 was in "), "{stderr}");
}

#[test]
fn garbage_a_huge_line_and_a_foreign_pid_on_the_timer_file_are_warnings() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("timers");
    let launcher = Command::new(BIN)
        .args(["--nproc-per-node=2", "--max-restarts=1"])
        .arg(helper("timer_job.py"))
        .arg(dir.path())
        .env("PYTHON_EXEC", python())
        .env("TMPDIR", dir.path())
        .env("TORCHELASTIC_TIMER_FILE", &fifo)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Only once rank 1's request is in: a 10 MB write into the FIFO is not
    // atomic, so a request sent during it would be torn apart with the junk.
    testkit::wait_for(
        std::time::Duration::from_secs(60),
        "the armed timer",
        || dir.path().join("armed").exists().then_some(()),
    );
    {
        // A stranger's timer: this test process, expiring at once.
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"not json at all\n").unwrap();
        w.write_all(&vec![b'x'; 10 << 20]).unwrap();
        w.write_all(b"\n").unwrap();
        let foreign = format!(
            "{{\"version\": 1, \"pid\": {}, \"scope_id\": \"evil\", \"expiration_time\": 1.0, \"signal\": 9}}\n",
            std::process::id()
        );
        w.write_all(foreign.as_bytes()).unwrap();
    }
    let out = launcher.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    // The real timer still works; the junk changed nothing else.
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("ignored a malformed request"), "{stderr}");
    assert!(stderr.contains("longer than 4096 bytes"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "pid {}, which is not a worker",
            std::process::id()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("watchdog timer 'stuck-step'"), "{stderr}");
}

#[test]
fn a_hang_is_reported_with_every_ranks_frame_and_on_hang_fail_ends_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let mut c = Command::new(BIN);
    c.args([
        "--nproc-per-node=2",
        "--hang-timeout=10s",
        "--on-hang=fail",
        "--log-dir",
    ])
    .arg(&logs)
    .arg(helper("hang_job.py"))
    .arg(dir.path())
    .env("TMPDIR", dir.path());
    let t0 = std::time::Instant::now();
    let out = run(&mut c);
    let took = t0.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 15), "{stderr}");
    assert!(
        stderr.contains("no worker wrote any output for"),
        "{stderr}"
    );
    let report: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("  rank ") && !l.starts_with("  rank  "))
        .collect();
    assert_eq!(report.len(), 2, "{stderr}");
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("  rank 1: stuck_forever (")),
        "{stderr}"
    );
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("  rank 0: all_reduce (")),
        "{stderr}"
    );
    // The stuck rank is the root cause, and each rank's stack is on disk.
    assert!(
        stderr.contains("Root cause: rank 1 (local_rank 1"),
        "{stderr}"
    );
    assert!(stderr.contains("hung: no output for"), "{stderr}");
    let run_dir = std::fs::read_dir(&logs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for r in 0..2 {
        let stacks: Vec<_> = std::fs::read_dir(run_dir.join(format!("attempt_0/{r}")))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("stack-"))
            .collect();
        assert_eq!(stacks.len(), 1, "rank {r}");
        let text = std::fs::read_to_string(stacks[0].path()).unwrap();
        assert!(text.contains("Thread"), "{text}");
    }
    eprintln!("hang reported and the job ended {took:?} after the launch (timeout 10 s)");
    assert!(took < std::time::Duration::from_secs(60), "{took:?}");
}

#[test]
fn without_py_spy_a_hung_group_is_stopped_with_sigabrt_and_faulthandler_prints_the_stacks() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(BIN)
        // --tee files each rank's stderr besides printing it.
        .args([
            "--nproc-per-node=2",
            "--hang-timeout=10s",
            "--on-hang=fail",
            "--tee=2",
        ])
        .arg(helper("hang_job.py"))
        .arg(dir.path())
        .env("TMPDIR", dir.path())
        // py-spy lives in the test venv's bin, which this PATH leaves out.
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env_remove("PYTHONFAULTHANDLER"));
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("<no stack: py-spy is not installed"),
        "{stderr}"
    );
    assert!(stderr.contains("Fatal Python error: Aborted"), "{stderr}");
    // Both ranks' faulthandler dumps are written at once, in small pieces;
    // each rank's own stderr file holds its dump whole.
    let logs = stderr
        .lines()
        .find_map(|l| l.strip_prefix("Worker logs: "))
        .unwrap_or_else(|| panic!("no log dir named: {stderr}"));
    let rank1 = std::fs::read_to_string(format!("{logs}/attempt_0/1/stderr.log")).unwrap();
    assert!(rank1.contains("Fatal Python error: Aborted"), "{rank1}");
    assert!(rank1.contains("in stuck_forever"), "{rank1}");
}
