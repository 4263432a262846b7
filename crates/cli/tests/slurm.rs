//! Under a real Slurm (`scripts/slurm-up.sh` starts munged, slurmctld and
//! slurmd for this one node): `srun` of a gloo job auto-configured from the
//! step's environment, `scancel -s USR1` forwarded to the workers while the
//! job goes on, `scancel` stopping the workers (the step exits 143).
//! Skipped, with a line saying why, only where the daemons cannot start.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

/// The cluster's slurm.conf, starting the daemons if need be.
fn cluster() -> Option<PathBuf> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm-up.sh");
    let out = Command::new("bash").arg(script).output().unwrap();
    if !out.status.success() {
        eprintln!(
            "SKIPPED: no Slurm here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

fn slurm(conf: &PathBuf, prog: &str) -> Command {
    let mut c = Command::new(prog);
    c.env("SLURM_CONF", conf);
    c
}

/// `srun -N1 -n1 --job-name=NAME torchrun-rs ARGS`.
fn srun(conf: &PathBuf, name: &str, args: &[&str]) -> Child {
    slurm(conf, "srun")
        .args(["-N1", "-n1", "--job-name", name, BIN])
        .args(args)
        .env("PYTHON_EXEC", testkit::torch_python())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The job id of the running job named `name`.
fn job_id(conf: &PathBuf, name: &str) -> String {
    testkit::wait_for(Duration::from_secs(30), "the job in squeue", || {
        let out = slurm(conf, "squeue")
            .args(["-h", "-n", name, "-o", "%i"])
            .output()
            .unwrap();
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!id.is_empty()).then_some(id)
    })
}

fn scancel(conf: &PathBuf, args: &[&str]) {
    let st = slurm(conf, "scancel").args(args).status().unwrap();
    assert!(st.success());
}

fn worker() -> String {
    testkit::cli_helper("worker.py")
}

#[test]
fn srun_of_a_gloo_job_is_configured_from_the_real_step_environment() {
    let Some(conf) = cluster() else { return };
    let job = srun(
        &conf,
        "trrs-gloo",
        &[
            "--nproc-per-node=2",
            "-t",
            "3",
            &testkit::cli_helper("torch_job.py"),
        ],
    );
    let out = job.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let said = stderr
        .lines()
        .find(|l| l.contains("auto-configured from Slurm job "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(said.contains(" step 0: nnodes=1"), "{said}");
    for r in 0..2 {
        assert!(
            stdout.contains(&format!("[default{r}]:rank {r} restart 0 sum 3")),
            "{stdout}"
        );
    }
}

#[test]
fn scancel_usr1_reaches_the_workers_and_the_job_goes_on() {
    let Some(conf) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let mut job = srun(
        &conf,
        "trrs-usr1",
        &[
            "--nproc-per-node=2",
            "--forward-signals=SIGUSR1,SIGUSR2",
            &worker(),
            "record",
            &d,
        ],
    );
    let id = job_id(&conf, "trrs-usr1");
    testkit::wait_for(Duration::from_secs(30), "both workers", || {
        (dir.path().join("pid.0").exists() && dir.path().join("pid.1").exists()).then_some(())
    });
    scancel(&conf, &["-s", "USR1", &id]);
    let got = |r: u32, sig: &str| {
        std::fs::read_to_string(dir.path().join(format!("signals.{r}")))
            .is_ok_and(|s| s.contains(sig))
    };
    testkit::wait_for(Duration::from_secs(20), "SIGUSR1 at both workers", || {
        (got(0, "SIGUSR1") && got(1, "SIGUSR1")).then_some(())
    });
    // The job goes on; SIGUSR2 to the launcher alone (Slurm would signal
    // every process of the step) makes the workers exit 0.
    assert!(
        job.try_wait().unwrap().is_none(),
        "the step ended on SIGUSR1"
    );
    let worker_pid = std::fs::read_to_string(dir.path().join("pid.0")).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", worker_pid.trim())).unwrap();
    let launcher: i32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: the launcher this test started (the worker's parent).
    assert_eq!(unsafe { libc::kill(launcher, libc::SIGUSR2) }, 0);
    let out = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("forwarding SIGUSR1 to the workers"),
        "{stderr}"
    );
}

#[test]
fn scancel_stops_the_workers_and_the_step_exits_143() {
    let Some(conf) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let job = srun(
        &conf,
        "trrs-cancel",
        &["--nproc-per-node=2", &worker(), "record", &d, "die"],
    );
    let id = job_id(&conf, "trrs-cancel");
    testkit::wait_for(Duration::from_secs(30), "both workers", || {
        (dir.path().join("pid.0").exists() && dir.path().join("pid.1").exists()).then_some(())
    });
    scancel(&conf, &[&id]);
    let out = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    for r in 0..2 {
        let s = std::fs::read_to_string(dir.path().join(format!("signals.{r}"))).unwrap();
        assert!(s.contains("SIGTERM"), "rank {r}: {s}");
    }
}
