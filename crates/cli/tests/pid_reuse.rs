//! The launcher never signals a process that is not its own: a stranger
//! that takes a finished worker's PID (and leads a process group of that ID)
//! survives a successful job, a failed job, a restart, and a launcher
//! stopped by SIGTERM. Each case runs in a PID namespace of its own, where
//! the decoy can ask for the exact PID (helpers/pid_reuse.py).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

#[derive(Debug)]
struct Outcome {
    launcher_rc: i64,
    decoy: String,
    decoy_alive: Option<bool>,
    decoy_signal: Option<i64>,
    stderr: String,
}

fn run(mode: &str) -> Outcome {
    let out = tempfile::tempdir().unwrap();
    let res = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "python3"])
        .arg(testkit::cli_helper("pid_reuse.py"))
        .args(["orchestrate", BIN])
        .arg(out.path())
        .arg(mode)
        .env_remove("OMP_NUM_THREADS")
        .output()
        .expect("run unshare");
    let launcher_err = std::fs::read_to_string(out.path().join("launcher.err")).unwrap_or_default();
    let stdout = String::from_utf8_lossy(&res.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{mode}: no result ({e}); stdout: {stdout}\nstderr: {}\nlauncher: {launcher_err}",
            String::from_utf8_lossy(&res.stderr)
        )
    });
    Outcome {
        launcher_rc: v["launcher_rc"].as_i64().unwrap(),
        decoy: v["decoy"].as_str().unwrap().to_string(),
        decoy_alive: v["decoy_alive"].as_bool(),
        decoy_signal: v["decoy_signal"].as_i64(),
        stderr: launcher_err,
    }
}

/// The decoy got a finished worker's PID and is still alive.
fn assert_took_the_pid_and_survived(o: &Outcome) {
    assert_eq!(o.decoy, "taken", "{o:?}");
    assert_eq!(
        o.decoy_alive,
        Some(true),
        "the decoy died by signal {:?}: {o:?}",
        o.decoy_signal
    );
}

#[test]
fn a_finished_workers_pid_stays_reserved_while_its_group_may_be_signalled() {
    // Rank 0 has exited; its sibling still runs, so the launcher may still
    // signal rank 0's group: the PID must not be free for anyone to take.
    let o = run("success");
    assert_eq!(o.launcher_rc, 0, "{o:?}");
    assert_eq!(o.decoy, "reserved", "{o:?}");
}

#[test]
fn a_failed_job_stops_its_groups_without_touching_a_pid_taker() {
    let o = run("failure");
    assert_eq!(o.launcher_rc, 1, "{o:?}");
    assert_eq!(o.decoy, "reserved", "{o:?}");
}

#[test]
fn a_stranger_with_a_pid_from_an_earlier_attempt_survives_the_job() {
    let o = run("restart");
    assert_eq!(o.launcher_rc, 0, "{o:?}");
    assert_took_the_pid_and_survived(&o);
}

#[test]
fn a_stranger_with_a_pid_from_an_earlier_attempt_survives_a_sigterm_stop() {
    let o = run("sigterm");
    assert_eq!(o.launcher_rc, 128 + libc::SIGTERM as i64, "{o:?}");
    assert_took_the_pid_and_survived(&o);
    assert!(
        o.stderr.contains("SIGTERM") || o.stderr.contains("15"),
        "{}",
        o.stderr
    );
}

/// A pids cgroup of this test's own that allows `max` tasks; removed on
/// drop. `None` where no pids cgroup can be made (not root, cgroup v2 only
/// without delegation).
struct PidsCgroup(std::path::PathBuf);

impl PidsCgroup {
    fn new(max: u32) -> Option<PidsCgroup> {
        let base = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
            .into_iter()
            .map(std::path::Path::new)
            .find(|b| {
                b.join("cgroup.procs").exists()
                    && (b.join("pids.max").exists() || b.ends_with("pids"))
            })?;
        let dir = base.join(format!("torchrun-rs-test-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        let cg = PidsCgroup(dir);
        std::fs::write(cg.0.join("pids.max"), max.to_string()).ok()?;
        Some(cg)
    }
    fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.0.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_process_limit_reached_halfway_stops_the_started_workers_and_names_the_limit() {
    let cg = PidsCgroup::new(24).expect("a writable pids cgroup (the tests run as root)");
    let procs = cg.0.join("cgroup.procs");
    let started = std::time::Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec {BIN} --standalone --nproc-per-node=200 --no-python sleep 60",
            procs.display()
        ))
        .env_remove("OMP_NUM_THREADS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the started workers were waited out, not stopped"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("limit on processes") && errors[0].contains("pids.max"),
        "{stderr}"
    );
    // Every worker started before the limit is gone (the guardian may take
    // a moment to exit after the launcher).
    testkit::wait_for(
        std::time::Duration::from_secs(10),
        "the cgroup to empty",
        || cg.procs().is_empty().then_some(()),
    );
}
