//! The built `torchrun-rs` binary, run with small helper workers: the
//! environment contract, exit statuses, restarts, signals, and no orphans.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{pid_alive, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

fn helper() -> String {
    testkit::cli_helper("worker.py")
}

struct Run {
    child: Child,
    out: tempfile::TempDir,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

struct Done {
    code: Option<i32>,
    signal: Option<i32>,
    #[allow(dead_code)] // kept for debugging failing tests
    stdout: String,
    stderr: String,
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Starts `torchrun-rs FLAGS worker.py MODE OUTDIR ARGS` (PYTHON_EXEC is the
/// system python3; the helper needs no torch).
fn start(flags: &[&str], mode: &str, args: &[&str]) -> Run {
    start_with(flags, mode, args, |_| {})
}

fn start_with(flags: &[&str], mode: &str, args: &[&str], tweak: impl FnOnce(&mut Command)) -> Run {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(flags)
        .arg(helper())
        .arg(mode)
        .arg(out.path())
        .args(args)
        .env("PYTHON_EXEC", "python3")
        .env_remove("OMP_NUM_THREADS")
        .env("TMPDIR", out.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tweak(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let stdout = Some(reader(child.stdout.take().unwrap()));
    let stderr = Some(reader(child.stderr.take().unwrap()));
    Run {
        child,
        out,
        stdout,
        stderr,
    }
}

impl Run {
    fn path(&self, name: &str) -> PathBuf {
        self.out.path().join(name)
    }
    fn wait_file(&self, name: &str) -> String {
        let p = self.path(name);
        wait_for(Duration::from_secs(30), &format!("file {name}"), || {
            std::fs::read_to_string(&p).ok()
        })
    }
    fn pid_of(&self, name: &str) -> i32 {
        self.wait_file(name).trim().parse().unwrap()
    }
    fn signal(&self, sig: i32) {
        // SAFETY: a plain system call on values owned here.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
    fn finish(mut self) -> (Done, tempfile::TempDir) {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "launcher did not exit within 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let done = Done {
            code: status.code(),
            signal: status.signal(),
            stdout: self.stdout.take().unwrap().join().unwrap(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
        };
        (done, self.out)
    }
}

fn env_of(dir: &Path, rank: u32, restart: u32) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(format!("env.{rank}.{restart}.json"))).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["env"].clone()
}

#[test]
fn worker_environment_contract_standalone() {
    let (done, dir) = start(&["--standalone", "--nproc-per-node=2"], "env", &[]).finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let e0 = env_of(dir.path(), 0, 0);
    let e1 = env_of(dir.path(), 1, 0);
    for (i, e) in [&e0, &e1].into_iter().enumerate() {
        assert_eq!(e["RANK"], i.to_string());
        assert_eq!(e["LOCAL_RANK"], i.to_string());
        assert_eq!(e["ROLE_RANK"], i.to_string());
        assert_eq!(e["GROUP_RANK"], "0");
        assert_eq!(e["WORLD_SIZE"], "2");
        assert_eq!(e["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(e["ROLE_WORLD_SIZE"], "2");
        assert_eq!(e["GROUP_WORLD_SIZE"], "1");
        assert_eq!(e["ROLE_NAME"], "default");
        assert_eq!(e["TORCHELASTIC_RESTART_COUNT"], "0");
        assert_eq!(e["TORCHELASTIC_MAX_RESTARTS"], "0");
        assert_eq!(e["TORCHELASTIC_USE_AGENT_STORE"], "True");
        assert_eq!(e["TORCH_NCCL_ASYNC_ERROR_HANDLING"], "1");
        assert_eq!(
            e["TORCHELASTIC_SIGNALS_TO_HANDLE"],
            "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
        );
        assert_eq!(e["OMP_NUM_THREADS"], "1");
        let run_id = e["TORCHELASTIC_RUN_ID"].as_str().unwrap();
        assert_eq!(run_id.len(), 36, "uuid4 run id: {run_id}");
        let ef = e["TORCHELASTIC_ERROR_FILE"].as_str().unwrap();
        assert!(
            ef.starts_with(dir.path().to_str().unwrap())
                && ef.contains("torchelastic_")
                && ef.contains(run_id)
                && ef.ends_with(&format!("/attempt_0/{i}/error.json")),
            "{ef}"
        );
        let port: u16 = e["MASTER_PORT"].as_str().unwrap().parse().unwrap();
        assert!(port > 0);
    }
    assert_eq!(e0["MASTER_ADDR"], e1["MASTER_ADDR"]);
    assert_eq!(e0["MASTER_PORT"], e1["MASTER_PORT"]);
    // torch's banner: one warning whose every line carries the launcher's
    // prefix, the first one empty.
    let banner: Vec<&str> = done
        .stderr
        .lines()
        .skip_while(|l| !(l.starts_with('W') && l.ends_with("torchrun-rs] ")))
        .take(4)
        .collect();
    assert_eq!(banner.len(), 4, "{}", done.stderr);
    assert!(
        banner[1].ends_with(&format!("torchrun-rs] {}", "*".repeat(41))),
        "{banner:?}"
    );
    assert!(
        banner[2].contains("torchrun-rs] Setting OMP_NUM_THREADS"),
        "{banner:?}"
    );
    assert!(banner.iter().all(|l| l.starts_with('W')), "{banner:?}");
}

#[test]
fn master_port_uses_static_backend_values() {
    let port = testkit::free_port();
    let (done, dir) = start(
        &["--nproc-per-node=1", &format!("--master-port={port}")],
        "env",
        &[],
    )
    .finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let e = env_of(dir.path(), 0, 0);
    assert_eq!(e["TORCHELASTIC_RUN_ID"], "none");
    assert_eq!(e["MASTER_ADDR"], "127.0.0.1");
    assert_eq!(e["MASTER_PORT"], port.to_string());
    assert!(
        e.get("OMP_NUM_THREADS").is_none(),
        "nproc 1 sets no OMP_NUM_THREADS"
    );
}

#[test]
fn signals_to_handle_is_exported_to_workers() {
    let (done, dir) = start(&["--signals-to-handle=SIGTERM,SIGUSR1,SIGUSR2"], "env", &[]).finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert_eq!(
        env_of(dir.path(), 0, 0)["TORCHELASTIC_SIGNALS_TO_HANDLE"],
        "SIGTERM,SIGUSR1,SIGUSR2"
    );
}

#[test]
fn script_args_pass_through_with_local_rank_macros() {
    let (done, dir) = start(
        &["--nproc-per-node=2"],
        "env",
        &[
            "--nproc-per-node",
            "5",
            "--lr=${local_rank}",
            "$local_rank",
            "a$$b",
            "$HOME",
        ],
    )
    .finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let text = std::fs::read_to_string(dir.path().join("env.1.0.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let argv: Vec<&str> = v["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &argv[3..],
        &["--nproc-per-node", "5", "--lr=1", "1", "a$b", "$HOME"]
    );
}

#[test]
fn exit_code_of_the_root_cause_and_summary() {
    let (done, _dir) = start(&["--nproc-per-node=2"], "exit", &["3", "1"]).finish();
    assert_eq!(done.code, Some(3), "{}", done.stderr);
    assert!(done.stderr.contains("worker.py FAILED"), "{}", done.stderr);
    assert!(done.stderr.contains("Root Cause (first observed failure):"));
    assert!(done
        .stderr
        .contains("  rank      : 1 (local_rank: 1)\n  exitcode  : 3 (pid: "));
    // The stopped sibling is listed under Failures.
    assert!(done.stderr.contains("(SIGTERM)"), "{}", done.stderr);
    assert!(
        !done.stderr.contains("Traceback"),
        "no Python traceback around the summary"
    );
}

#[test]
fn signal_death_gives_128_plus_n() {
    let (done, _dir) = start(&["--nproc-per-node=2"], "signal", &["11", "0"]).finish();
    assert_eq!(done.code, Some(139), "{}", done.stderr);
    assert!(
        done.stderr.contains("exitcode  : -11 (pid: "),
        "{}",
        done.stderr
    );
    assert!(done.stderr.contains("(SIGSEGV)"));
    assert!(done.stderr.contains("killed by signal 11 (SIGSEGV)"));
}

#[test]
fn failed_worker_is_restarted_with_restart_count() {
    let (done, dir) = start(
        &["--nproc-per-node=2", "--max-restarts=2"],
        "fail-once",
        &["1"],
    )
    .finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let e = env_of(dir.path(), 1, 1);
    assert_eq!(e["TORCHELASTIC_RESTART_COUNT"], "1");
    assert_eq!(e["TORCHELASTIC_MAX_RESTARTS"], "2");
    // torch logs the restart at info level: not shown by default.
    assert!(
        !done.stderr.contains("Worker group FAILED"),
        "{}",
        done.stderr
    );
    let (done, _dir) = start_with(
        &["--nproc-per-node=2", "--max-restarts=2"],
        "fail-once",
        &["1"],
        |c| {
            c.env("LOGLEVEL", "INFO");
        },
    )
    .finish();
    assert!(
        done.stderr.lines().any(|l| l.starts_with('I')
            && l.ends_with("Worker group FAILED. 2/2 attempts left; will restart worker group")),
        "{}",
        done.stderr
    );
    assert!(
        !dir.path().join("env.0.2.json").exists(),
        "no third attempt"
    );
}

#[test]
fn restarts_exhausted_fails() {
    let (done, dir) = start(&["--max-restarts=1"], "exit", &["5"]).finish();
    assert_eq!(done.code, Some(5), "{}", done.stderr);
    assert!(
        dir.path().join("env.0.1.json").exists(),
        "one restart happened"
    );
}

#[test]
fn sigterm_is_forwarded_and_exit_is_143() {
    let run = start(&["--nproc-per-node=2"], "record", &["die"]);
    let pids = [run.pid_of("pid.0"), run.pid_of("pid.1")];
    run.signal(libc::SIGTERM);
    let (done, dir) = run.finish();
    assert_eq!(done.code, Some(143), "{}", done.stderr);
    for r in 0..2 {
        let got = std::fs::read_to_string(dir.path().join(format!("signals.{r}"))).unwrap();
        assert_eq!(got.trim(), "SIGTERM");
    }
    for p in pids {
        assert!(!pid_alive(p));
    }
}

#[test]
fn sigint_is_forwarded_as_sigint() {
    let run = start(&[], "record", &["die"]);
    run.pid_of("pid.0");
    run.signal(libc::SIGINT);
    let (done, dir) = run.finish();
    assert_eq!(done.code, Some(130), "{}", done.stderr);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("signals.0"))
            .unwrap()
            .trim(),
        "SIGINT"
    );
}

#[test]
fn shutdown_timeout_then_sigkill() {
    let run = start(
        &["--nproc-per-node=2", "--shutdown-timeout=1"],
        "record",
        &["ignore"],
    );
    let pids = [run.pid_of("pid.0"), run.pid_of("pid.1")];
    let t0 = Instant::now();
    run.signal(libc::SIGTERM);
    let (done, _dir) = run.finish();
    let took = t0.elapsed();
    assert_eq!(done.code, Some(143), "{}", done.stderr);
    assert!(
        took >= Duration::from_millis(900),
        "SIGKILL came before the grace period: {took:?}"
    );
    assert!(
        done.stderr.contains("forcefully exiting via SIGKILL"),
        "{}",
        done.stderr
    );
    for p in pids {
        assert!(!pid_alive(p));
    }
}

#[test]
fn second_signal_skips_the_grace_period() {
    let run = start(&["--shutdown-timeout=30"], "record", &["ignore"]);
    run.pid_of("pid.0");
    run.signal(libc::SIGTERM);
    // The worker records the first signal: then the launcher is in its grace.
    run.wait_file("signals.0");
    let t0 = Instant::now();
    run.signal(libc::SIGTERM);
    let (done, _dir) = run.finish();
    assert_eq!(done.code, Some(143), "{}", done.stderr);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "second signal did not skip the 30 s grace"
    );
}

#[test]
fn forward_signals_keep_the_job_running() {
    let run = start(
        &["--nproc-per-node=2", "--forward-signals=SIGUSR1,SIGUSR2"],
        "record",
        &[],
    );
    run.pid_of("pid.0");
    run.pid_of("pid.1");
    run.signal(libc::SIGUSR1);
    wait_for(Duration::from_secs(20), "SIGUSR1 at both workers", || {
        (0..2)
            .all(|r| {
                std::fs::read_to_string(run.path(&format!("signals.{r}")))
                    .is_ok_and(|s| s.contains("SIGUSR1"))
            })
            .then_some(())
    });
    // Still running; SIGUSR2 makes the workers exit 0 and the job succeeds.
    run.signal(libc::SIGUSR2);
    let (done, _dir) = run.finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
}

#[test]
fn unknown_signal_name_is_a_warning_and_others_still_work() {
    let run = start(
        &["--signals-to-handle=SIGTERM,SIGBOGUS"],
        "record",
        &["die"],
    );
    run.pid_of("pid.0");
    run.signal(libc::SIGTERM);
    let (done, _dir) = run.finish();
    assert!(done.stderr.contains("SIGBOGUS"), "{}", done.stderr);
    assert_eq!(done.code, Some(143));
}

#[test]
fn sigkill_of_the_launcher_leaves_no_process_behind() {
    let run = start(&["--nproc-per-node=2"], "double-fork", &[]);
    let mut pids = vec![];
    for r in 0..2 {
        pids.push(run.pid_of(&format!("pid.{r}")));
        pids.push(run.pid_of(&format!("child.{r}")));
        pids.push(run.pid_of(&format!("daemon.{r}")));
    }
    assert!(pids.iter().all(|&p| pid_alive(p)));
    run.signal(libc::SIGKILL);
    let (done, _dir) = run.finish();
    assert_eq!(done.signal, Some(libc::SIGKILL));
    let t0 = Instant::now();
    wait_for(
        Duration::from_secs(1),
        "every worker and descendant to be gone",
        || pids.iter().all(|&p| !pid_alive(p)).then_some(()),
    );
    eprintln!("all gone {:?} after the launcher died", t0.elapsed());
}

#[test]
fn a_killed_launchers_guardian_sweeps_only_its_own_run() {
    let a = start(&[], "double-fork", &[]);
    let b = start(&[], "double-fork", &[]);
    let a_pids = [a.pid_of("pid.0"), a.pid_of("child.0"), a.pid_of("daemon.0")];
    let b_pids = [b.pid_of("pid.0"), b.pid_of("child.0"), b.pid_of("daemon.0")];
    // A process that copied run A's environment, marker included.
    let a_marker = env_of(a.out.path(), 0, 0)["TORCHRUN_RS_JOB"]
        .as_str()
        .unwrap()
        .to_string();
    let b_marker = env_of(b.out.path(), 0, 0)["TORCHRUN_RS_JOB"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(a_marker, b_marker);
    // Unguessable: 128 random bits after the pid.
    let random = a_marker.rsplit('-').next().unwrap();
    assert_eq!(random.len(), 32, "{a_marker}");
    let mut stranger = Command::new("sleep")
        .arg("60")
        .env("TORCHRUN_RS_JOB", &a_marker)
        .spawn()
        .unwrap();
    b.signal(libc::SIGKILL);
    let (done, _dir) = b.finish();
    assert_eq!(done.signal, Some(libc::SIGKILL));
    wait_for(
        Duration::from_secs(2),
        "run B's processes to be gone",
        || b_pids.iter().all(|&p| !pid_alive(p)).then_some(()),
    );
    assert!(
        a_pids.iter().all(|&p| pid_alive(p)),
        "run B's guardian touched run A"
    );
    assert!(
        pid_alive(stranger.id() as i32),
        "run B's guardian touched a stranger"
    );
    a.signal(libc::SIGTERM);
    let (done, _dir) = a.finish();
    assert_eq!(done.code, Some(143), "{}", done.stderr);
    assert!(
        pid_alive(stranger.id() as i32),
        "a launcher that stops normally sweeps only its own subtree"
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
}

#[test]
fn sigterm_of_the_launcher_stops_daemonized_descendants_too() {
    let run = start(&[], "double-fork", &[]);
    let pids = [
        run.pid_of("pid.0"),
        run.pid_of("child.0"),
        run.pid_of("daemon.0"),
    ];
    run.signal(libc::SIGTERM);
    let (done, _dir) = run.finish();
    assert_eq!(done.code, Some(143), "{}", done.stderr);
    wait_for(Duration::from_secs(1), "descendants gone", || {
        pids.iter().all(|&p| !pid_alive(p)).then_some(())
    });
}

#[test]
fn no_python_finds_the_binary_on_path() {
    let out = Command::new(BIN)
        .args(["--no-python", "--nproc-per-node=2", "echo", "hello"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("hello")
            .count(),
        2
    );
    let out = Command::new(BIN)
        .args(["--no-python", "no-such-binary-xyz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-binary-xyz"));
}

#[test]
fn usage_errors_are_one_line_and_exit_2() {
    for (args, needle) in [
        (vec!["--nproc-per-node=abc", "x.py"], "--nproc-per-node"),
        (vec!["--nnodes=3:2", "x.py"], "--nnodes"),
        (vec!["--max-restarts", "x", "x.py"], "--max-restarts"),
        (vec!["--r", "x.py"], "ambiguous option"),
        (vec!["--no-such-flag", "x.py"], "--no-such-flag"),
        (vec!["--rdzv-conf=a", "x.py"], "--rdzv-conf"),
        (vec!["-t", "7", "x.py"], "--tee"),
        (vec!["--watch", "x.py"], "--watch goes with --status"),
        (vec![], "training_script"),
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.lines().next().unwrap().contains(needle),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
    }
    let out = Command::new(BIN)
        .args(["x.py"])
        .env("PET_STANDALONE", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PET_STANDALONE"));
}

#[test]
fn pet_variables_configure_the_launch() {
    let (done, dir) = start_with(&[], "env", &[], |c| {
        c.env("PET_NPROC_PER_NODE", "3")
            .env("PET_MAX_RESTARTS", "4");
    })
    .finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let e = env_of(dir.path(), 2, 0);
    assert_eq!(e["WORLD_SIZE"], "3");
    assert_eq!(e["TORCHELASTIC_MAX_RESTARTS"], "4");
}

#[test]
fn help_exits_0() {
    let out = Command::new(BIN).arg("-h").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--nproc-per-node"));
}

#[test]
fn module_mode_runs_python_dash_m() {
    let out = Command::new(BIN)
        .args(["--nproc-per-node=2", "-m", "this"])
        .env("PYTHON_EXEC", "python3")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("Beautiful is better than ugly.").count(),
        2,
        "{stdout}"
    );
}

#[test]
fn a_signal_outside_the_handled_list_still_leaves_no_process_behind() {
    // SIGTERM is not handled here: it kills the launcher the default way,
    // where torchrun would orphan its workers.
    let run = start(
        &["--nproc-per-node=2", "--signals-to-handle=SIGINT"],
        "double-fork",
        &[],
    );
    let mut pids = vec![];
    for r in 0..2 {
        pids.push(run.pid_of(&format!("pid.{r}")));
        pids.push(run.pid_of(&format!("daemon.{r}")));
    }
    run.signal(libc::SIGTERM);
    let (done, _dir) = run.finish();
    assert_eq!(done.signal, Some(libc::SIGTERM), "{}", done.stderr);
    wait_for(
        Duration::from_secs(1),
        "every worker and descendant to be gone",
        || pids.iter().all(|&p| !pid_alive(p)).then_some(()),
    );
}

#[test]
fn the_root_causes_stderr_tail_is_in_the_report_without_redirects() {
    // The launcher's stderr is a pipe here, as in any cluster job.
    let (done, _dir) = start(&["--nproc-per-node=2"], "complain", &["1", "50"]).finish();
    assert_eq!(done.code, Some(3), "{}", done.stderr);
    // The worker's lines pass through unchanged (no prefix)...
    for i in 0..50 {
        let line = format!("complaint {i} from rank 1");
        assert!(done.stderr.lines().any(|l| l == line), "{}", done.stderr);
    }
    // ...and the report ends with the last 20 of them.
    let report = &done.stderr[done.stderr.find("Root cause: rank 1").expect("report")..];
    assert!(report.contains("Last lines of its stderr:\n"), "{report}");
    for i in 30..50 {
        assert!(
            report.contains(&format!("  complaint {i} from rank 1\n")),
            "{report}"
        );
    }
    assert!(!report.contains("complaint 29 from"), "{report}");
}

#[test]
fn logs_specs_other_than_the_builtin_default_are_refused_before_anything_starts() {
    let run = start(&["--logs-specs=fancy"], "env", &[]);
    let out = run.out.path().to_path_buf();
    let (done, _dir) = run.finish();
    assert_eq!(done.code, Some(2), "{}", done.stderr);
    assert!(
        done.stderr
            .contains("could not find entrypoint under 'torchrun.logs_specs[fancy]' key"),
        "{}",
        done.stderr
    );
    assert!(!out.join("env.0.0.json").exists(), "a worker started");
    assert!(
        std::fs::read_dir(&out).unwrap().next().is_none(),
        "something was written"
    );
    let (done, dir) = start(&["--logs-specs=default"], "env", &[]).finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert!(dir.path().join("env.0.0.json").exists());
}

#[test]
fn virtual_local_rank_with_too_few_visible_devices_is_a_usage_error() {
    let run = start_with(
        &["--nproc-per-node=3", "--virtual-local-rank"],
        "env",
        &[],
        |c| {
            c.env("CUDA_VISIBLE_DEVICES", "4,5");
        },
    );
    let out = run.out.path().to_path_buf();
    let (done, _dir) = run.finish();
    assert_eq!(done.code, Some(2), "{}", done.stderr);
    assert!(
        done.stderr.contains("--virtual-local-rank")
            && done.stderr.contains("CUDA_VISIBLE_DEVICES=4,5"),
        "{}",
        done.stderr
    );
    assert!(
        std::fs::read_dir(&out).unwrap().next().is_none(),
        "something was written"
    );
}

fn journal(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn the_events_file_tells_a_restarted_jobs_story() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let (done, _d) = start(
        &[
            "--nproc-per-node=2",
            "--max-restarts=1",
            "--events-file",
            file.to_str().unwrap(),
        ],
        "fail-once",
        &["1"],
    )
    .finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let ev = journal(&file);
    let names: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
    let mut ts = 0.0;
    for e in &ev {
        assert_eq!(e["schema"], "torchrun-rs.events/1", "{e}");
        let t = e["ts"].as_f64().unwrap();
        assert!(t >= ts, "timestamps go forward: {e}");
        ts = t;
    }
    assert_eq!(names.first(), Some(&"launcher_started"));
    assert_eq!(names.last(), Some(&"job_finished"));
    assert_eq!(ev.last().unwrap()["result"], "succeeded");
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "rendezvous_completed")
            .count(),
        2,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == "worker_started").count(),
        4,
        "{names:?}"
    );
    let failed = ev
        .iter()
        .find(|e| e["event"] == "worker_exited" && e["reason"] == "failed")
        .expect("the failure");
    assert_eq!(
        (failed["rank"].as_u64(), failed["exit_code"].as_i64()),
        (Some(1), Some(7))
    );
    assert_eq!(failed["attempt"], 0);
    let stopping = ev.iter().find(|e| e["event"] == "group_stopping").unwrap();
    assert_eq!(stopping["cause"], "worker_failed");
    let restart = ev.iter().find(|e| e["event"] == "restart").unwrap();
    assert_eq!(
        (
            restart["restarts_left"].as_u64(),
            restart["attempt"].as_u64()
        ),
        (Some(0), Some(1))
    );
    let ok = ev
        .iter()
        .filter(|e| {
            e["event"] == "worker_exited" && e["reason"] == "succeeded" && e["attempt"] == 1
        })
        .count();
    assert_eq!(ok, 2, "{names:?}");
}

#[test]
fn the_events_file_records_a_signal_and_how_the_job_ended() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let run = start(
        &[
            "--nproc-per-node=1",
            "--events-file",
            file.to_str().unwrap(),
        ],
        "sleep",
        &[],
    );
    run.pid_of("pid.0");
    run.signal(libc::SIGTERM);
    let (done, _d) = run.finish();
    assert_eq!(done.code, Some(143), "{}", done.stderr);
    let ev = journal(&file);
    let sig = ev
        .iter()
        .find(|e| e["event"] == "signal_received")
        .expect("signal");
    assert_eq!(
        (sig["signal"].as_str(), sig["action"].as_str()),
        (Some("SIGTERM"), Some("shutdown"))
    );
    let end = ev.last().unwrap();
    assert_eq!(
        (
            end["event"].as_str(),
            end["result"].as_str(),
            end["detail"].as_i64()
        ),
        (Some("job_finished"), Some("signaled"), Some(15))
    );
}

/// Reads the launcher's stderr until it names its health port.
fn health_port(stderr: &mut impl std::io::BufRead) -> u16 {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no health port line"
        );
        if let Some(rest) = line
            .trim()
            .strip_prefix("torchrun-rs: health and metrics on http://")
        {
            return rest.rsplit(':').next().unwrap().parse().unwrap();
        }
    }
}

#[test]
fn health_status_and_metrics_over_http_through_a_jobs_life() {
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["--nproc-per-node=2", "--metrics-port=0"])
        .arg(helper())
        .args(["until-file"])
        .arg(out.path())
        .env("PYTHON_EXEC", "python3")
        .env("TMPDIR", out.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let port = health_port(&mut err);
    wait_for(Duration::from_secs(30), "both workers", || {
        (out.path().join("pid.0").exists() && out.path().join("pid.1").exists()).then_some(())
    });
    let scrape = Command::new(testkit::torch_python())
        .arg(testkit::cli_helper("scrape.py"))
        .arg(port.to_string())
        .output()
        .unwrap();
    assert!(
        scrape.status.success(),
        "{}",
        String::from_utf8_lossy(&scrape.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&scrape.stdout).unwrap();
    for (path, code) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/status", 200),
        ("/metrics", 200),
        ("/nope", 404),
    ] {
        assert_eq!(v[path], code, "{path}: {v}");
    }
    let s = &v["status"];
    assert_eq!(s["phase"], "running", "{s}");
    assert_eq!(s["world_size"], 2);
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for (r, w) in workers.iter().enumerate() {
        assert_eq!(w["state"], "running");
        let pid: i64 = std::fs::read_to_string(out.path().join(format!("pid.{r}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(w["pid"], pid);
    }
    let m = &v["metrics"];
    assert_eq!(
        m["torchelastic_workers_remaining_restarts,role=default"], 0.0,
        "{m}"
    );
    assert_eq!(
        m["torchrun_rs_workers,role=default,state=running"], 2.0,
        "{m}"
    );
    assert_eq!(m["torchrun_rs_rendezvous_rounds"], 1.0, "{m}");
    // The agent hosts its workers' store (these plain workers do not
    // connect; the agent's own client does).
    assert!(
        m["torchrun_rs_store_connections"].as_f64().unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        m["torchrun_rs_store_requests"].as_f64().unwrap() > 0.0,
        "{m}"
    );
    eprintln!("/metrics p99 over 200 scrapes: {} ms", v["p99_ms"]);
    // On demand: every running rank's stack (py-spy from the test venv).
    let stacks = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"GET /stacks HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        body
    };
    for r in 0..2 {
        assert!(
            stacks.contains(&format!("== local rank {r} (pid ")),
            "{stacks}"
        );
    }
    assert!(stacks.contains("worker.py"), "{stacks}");
    std::fs::write(out.path().join("go"), "").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_health_port_in_use_is_a_warning_not_a_failed_job() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (done, _d) = start_with(&["--nproc-per-node=1"], "env", &[], |c| {
        c.env("TORCHELASTIC_HEALTH_CHECK_PORT", &port);
    })
    .finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert!(
        done.stderr.contains("cannot serve health and metrics on"),
        "{}",
        done.stderr
    );
}

#[test]
fn a_worker_that_ignores_the_stop_signal_has_its_stack_taken_before_the_sigkill() {
    let logs = tempfile::tempdir().unwrap();
    let run = start(
        &[
            "--nproc-per-node=1",
            "--shutdown-timeout=1",
            "--log-dir",
            logs.path().to_str().unwrap(),
        ],
        "stubborn",
        &[],
    );
    let pid = run.pid_of("pid.0");
    run.signal(libc::SIGTERM);
    let (done, _d) = run.finish();
    assert_eq!(done.code, Some(143), "{}", done.stderr);
    assert!(!pid_alive(pid));
    assert!(
        done.stderr.contains(&format!(
            "local_rank 0 (pid {pid}) ignored the stop signal for the whole grace period; it is in stubborn ("
        )),
        "{}",
        done.stderr
    );
    assert!(
        done.stderr.contains("/attempt_0/0/stack-"),
        "{}",
        done.stderr
    );
}

#[test]
fn torchs_own_test_launch_elastic_argument_list_runs() {
    // PyTorch's test_launch_elastic, argument for argument (a list, no
    // shell: the quotes are part of the --rdzv-conf value, so its keys are
    // `'join_timeout` and `timeout` with the value `5'`, which c10d never
    // reads; torch runs it).
    let port = testkit::free_port().to_string();
    let flags = [
        "--nnodes=1:2".to_string(),
        "--nproc-per-node=4".to_string(),
        "--rdzv-backend=c10d".to_string(),
        format!("--rdzv-endpoint=localhost:{port}"),
        "--rdzv-conf='join_timeout=5,last_call_timeout=1,timeout=5'".to_string(),
        "--rdzv-id=test_launch_elastic".to_string(),
        "--monitor-interval=1".to_string(),
        "--start-method=spawn".to_string(),
        "--max-restarts=0".to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (done, out) = start(&flags, "env", &[]).finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    for r in 0..4 {
        assert!(
            out.path().join(format!("env.{r}.0.json")).exists(),
            "rank {r}"
        );
    }
}

/// A job of two `say-until-file` workers with a metrics port; its port.
fn observed_job(extra: &[&str]) -> (std::process::Child, tempfile::TempDir, u16) {
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["--nproc-per-node=2", "--metrics-port=0"])
        .args(extra)
        .arg(helper())
        .args(["say-until-file"])
        .arg(out.path())
        .env("PYTHON_EXEC", "python3")
        .env("TMPDIR", out.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let port = health_port(&mut err);
    // Keep draining the launcher's stderr.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    wait_for(Duration::from_secs(30), "both workers", || {
        (out.path().join("pid.0").exists() && out.path().join("pid.1").exists()).then_some(())
    });
    (child, out, port)
}

/// `GET path` from `ip` to the port; the status code and the body.
fn http_get(ip: std::net::IpAddr, port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect((ip, port)).unwrap();
    c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let code = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

/// An address of this machine that is not loopback (the one its default
/// route leaves from), if it has one.
fn outside_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    Some(s.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback())
}

#[test]
fn stacks_answer_this_machine_only_and_at_most_once_a_second() {
    let (mut child, out, port) = observed_job(&[]);
    let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let (code, first) = http_get(lo, port, "/stacks");
    assert_eq!(code, 200, "{first}");
    assert!(first.contains("== local rank 1 (pid "), "{first}");
    // A second request within the second gets the same capture.
    let t = std::time::Instant::now();
    let (_, second) = http_get(lo, port, "/stacks");
    if t.elapsed() < Duration::from_millis(900) {
        assert_eq!(first, second);
    }
    match outside_address() {
        Some(ip) => {
            let (code, body) = http_get(ip, port, "/stacks");
            assert_eq!(code, 403, "{body}");
            assert!(body.contains("--open-stacks"), "{body}");
            // What Kubernetes probes and Prometheus read stays open.
            for path in ["/healthz", "/readyz", "/metrics", "/status"] {
                assert_eq!(http_get(ip, port, path).0, 200, "{path}");
            }
        }
        None => eprintln!("no address but loopback here: the refusal is not checked"),
    }
    std::fs::write(out.path().join("go"), "").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    // Opened by the flag: served to the network too.
    if let Some(ip) = outside_address() {
        let (mut child, out, port) = observed_job(&["--open-stacks"]);
        assert_eq!(http_get(ip, port, "/stacks").0, 200);
        std::fs::write(out.path().join("go"), "").unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0));
    }
}

#[test]
fn status_prints_a_table_of_the_running_job_and_watch_keeps_it_live() {
    let (mut child, out, port) = observed_job(&[]);
    let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    // /status and /metrics carry each worker's memory, CPU and last line.
    let (_, status) = http_get(lo, port, "/status");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    for w in v["workers"].as_array().unwrap() {
        assert!(w["rss_bytes"].as_f64().unwrap() > 1e6, "{w}");
        assert!(w["cpu_seconds"].as_f64().is_some(), "{w}");
        assert_eq!(w["last_line"], format!("hello from rank {}", w["rank"]));
    }
    let (_, metrics) = http_get(lo, port, "/metrics");
    assert!(
        metrics.contains("torchrun_rs_worker_resident_bytes{local_rank=\"1\"}"),
        "{metrics}"
    );
    let t = std::time::Instant::now();
    let o = Command::new(BIN)
        .args(["--status", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let took = t.elapsed();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("--status answered in {took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert!(table.contains(": running, role default"), "{table}");
    for r in 0..2 {
        let pid = std::fs::read_to_string(out.path().join(format!("pid.{r}"))).unwrap();
        let row = table
            .lines()
            .find(|l| l.contains(pid.trim()))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(
            row.contains("running") && row.contains(&format!("hello from rank {r}")),
            "{row}"
        );
    }
    // --watch in a real terminal (tmux): the table, redrawn in place.
    let session = format!("trrs-status-{}", std::process::id());
    let st = Command::new("tmux")
        .args(["new-session", "-d", "-s", &session, "-x", "160", "-y", "20"])
        .arg(format!("{BIN} --status 127.0.0.1:{port} --watch"))
        .status();
    if st.is_ok_and(|s| s.success()) {
        let screen = wait_for(Duration::from_secs(10), "the table in tmux", || {
            let o = Command::new("tmux")
                .args(["capture-pane", "-p", "-t", &session])
                .output()
                .ok()?;
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.contains("hello from rank 1").then_some(s)
        });
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &session])
            .status();
        assert!(screen.starts_with("torchrun-rs at 127.0.0.1:"), "{screen}");
        assert_eq!(
            screen.matches("torchrun-rs at").count(),
            1,
            "redrawn in place: {screen}"
        );
    } else {
        eprintln!("tmux cannot start here: --watch is not checked in a terminal");
    }
    std::fs::write(out.path().join("go"), "").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    // Nobody there: one line, exit 1.
    let o = Command::new(BIN)
        .args(["--status", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no launcher answers at"));
}

#[test]
fn the_grafana_dashboards_queries_use_metrics_the_launcher_exports() {
    let (mut child, out, port) = observed_job(&[]);
    let (_, metrics) = http_get("127.0.0.1".parse().unwrap(), port, "/metrics");
    let exported: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    std::fs::write(out.path().join("go"), "").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dashboards/torchrun-rs.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut used = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("torchrun_rs_") || w.starts_with("torchelastic_"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                assert!(
                    exported.contains(n),
                    "panel {}: {n} is not exported ({exported:?})",
                    panel["title"]
                );
                used += 1;
            }
        }
    }
    assert!(used >= 10);
}

#[test]
fn pet_status_and_pet_watch_in_the_environment_do_not_turn_a_launch_into_a_query() {
    // torchrun-rs's --status/--watch are not torch's options: a PET_ name
    // for them (left in a job's environment) is not read.
    let (done, dir) = start_with(&["--standalone", "--nproc-per-node=2"], "env", &[], |c| {
        c.env("PET_STATUS", "localhost:1").env("PET_WATCH", "1");
    })
    .finish();
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    for r in 0..2 {
        assert!(
            dir.path().join(format!("env.{r}.0.json")).exists(),
            "rank {r} did not run: {}",
            done.stderr
        );
    }
}
