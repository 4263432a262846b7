//! torchrun's Python API as torchrun_rs offers it (`torchrun_rs.run`,
//! `torchrun_rs.launcher.api`), checked in the torch venv against torch's
//! own modules: PyTorch's test_run.py cases, the parser, config_from_args,
//! LaunchConfig, launches that succeed and fail.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

/// The repository's `python/` directory (the package's source).
fn package_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../python")
}

fn python_test(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Runs a Python unittest file with the torch venv, the package from the
/// source tree and this build's launcher.
fn unittest(name: &str) {
    let out = Command::new(testkit::torch_python())
        .arg(python_test(name))
        .env("PYTHONPATH", package_dir())
        .env("TORCHRUN_RS_BIN", BIN)
        .env_remove("OMP_NUM_THREADS")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    eprintln!(
        "{}",
        err.lines()
            .filter(|l| l.contains(" ms"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn torchs_test_run_cases_and_the_api_beside_torchs() {
    unittest("test_run.py");
}

/// A fresh venv that sees the torch venv (torch, accelerate, lightning)
/// and this source tree's torchrun_rs package: the in-process hook goes
/// into its site-packages, never into the shared torch venv.
struct Venv {
    _dir: tempfile::TempDir,
    root: PathBuf,
    python: PathBuf,
    site: PathBuf,
    tmp: PathBuf,
}

fn fresh_venv() -> Venv {
    let dir = tempfile::tempdir().unwrap();
    let venv = dir.path().join("venv");
    let st = Command::new(testkit::torch_python())
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(st.success());
    let python = venv.join("bin/python");
    let purelib = |py: &std::path::Path| {
        let out = Command::new(py)
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ])
            .output()
            .unwrap();
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    };
    let site = purelib(&python);
    let torch_site = purelib(&testkit::torch_python());
    std::fs::write(
        site.join("beside.pth"),
        format!("{}\n{}\n", torch_site.display(), package_dir().display()),
    )
    .unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    Venv {
        _dir: dir,
        root: venv,
        python,
        site,
        tmp,
    }
}

/// A fresh venv that sees the torch venv, with a copy of the torchrun_rs
/// package in its own site-packages (as pip installs it, and as `pip
/// uninstall` removes it).
fn venv_with_the_package_installed() -> Venv {
    let v = fresh_venv();
    let torch_site = std::fs::read_to_string(v.site.join("beside.pth")).unwrap();
    let torch_site = torch_site.lines().next().unwrap().to_string();
    std::fs::write(v.site.join("beside.pth"), format!("{torch_site}\n")).unwrap();
    let st = Command::new("cp")
        .arg("-r")
        .arg(package_dir().join("torchrun_rs"))
        .arg(&v.site)
        .status()
        .unwrap();
    assert!(st.success());
    v
}

impl Venv {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.python);
        c.env("TORCHRUN_RS_BIN", BIN)
            .env("TMPDIR", &self.tmp)
            .env_remove("PYTHONPATH")
            .env_remove("OMP_NUM_THREADS");
        c
    }

    fn ok(&self, c: &mut Command) -> String {
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    }
}

/// What each rank of tool_job.py wrote: (sum, world, under torchrun-rs).
fn ranks(dir: &std::path::Path) -> Vec<(f64, u64, bool)> {
    (0..2)
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(format!("rank.{r}"))).unwrap(),
            )
            .unwrap();
            (
                v["sum"].as_f64().unwrap(),
                v["world"].as_u64().unwrap(),
                v["torchrun_rs"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Runs a tool's launch command (`python -c "<entry>" ARGS... tool_job.py
/// OUT`) and returns what the two ranks wrote.
fn tool_run(v: &Venv, entry: &str, args: &[&str], off: bool) -> Vec<(f64, u64, bool)> {
    let out = tempfile::tempdir().unwrap();
    let mut c = v.cmd();
    c.args(["-c", entry])
        .args(args)
        .arg(testkit::cli_helper("tool_job.py"))
        .arg(out.path());
    if off {
        c.env("TORCHRUN_RS_IN_PROCESS", "0");
    }
    v.ok(&mut c);
    ranks(out.path())
}

const FABRIC: &str =
    "import sys; from lightning.fabric.cli import _main; sys.argv[0] = 'fabric'; sys.exit(_main())";
const ACCELERATE: &str = "import sys; from accelerate.commands.accelerate_cli import main; sys.argv[0] = 'accelerate'; sys.exit(main())";

#[test]
fn lightning_fabric_and_accelerate_run_under_torchrun_rs_with_the_in_process_hook() {
    let v = fresh_venv();
    let fabric = ["run", "--accelerator=cpu", "--devices=2"];
    let accelerate = ["launch", "--multi_gpu", "--num_processes", "2"];
    // Under torch first (no hook yet): the reference result.
    let want = vec![(3.0, 2, false), (3.0, 2, false)];
    assert_eq!(tool_run(&v, FABRIC, &fabric, false), want);
    v.ok(v.cmd().args(["-m", "torchrun_rs.shim", "--in-process"]));
    let under_us = vec![(3.0, 2, true), (3.0, 2, true)];
    assert_eq!(tool_run(&v, FABRIC, &fabric, false), under_us);
    assert_eq!(tool_run(&v, ACCELERATE, &accelerate, false), under_us);
    // Off for one run: torch's launcher again.
    assert_eq!(tool_run(&v, ACCELERATE, &accelerate, true), want);
    // A callable entrypoint falls back to torch's launcher, with a notice.
    let out = tempfile::tempdir().unwrap();
    let script = out.path().join("callable.py");
    std::fs::write(
        &script,
        "import os, sys\n\
         from torch.distributed.launcher.api import LaunchConfig, elastic_launch\n\
         def f(d):\n\
         \x20   open(os.path.join(d, os.environ['RANK']), 'w').write(str('TORCHRUN_RS_JOB' in os.environ))\n\
         if __name__ == '__main__':\n\
         \x20   c = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1, rdzv_backend='c10d', rdzv_endpoint='localhost:0')\n\
         \x20   elastic_launch(c, f)(sys.argv[1])\n",
    )
    .unwrap();
    let err = v.ok(v.cmd().arg(&script).arg(out.path()));
    assert!(
        err.contains(
            "torchrun-rs: a Python callable as entrypoint runs under torch's own launcher"
        ),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("0")).unwrap(),
        "False"
    );
    // Removed: torch's launcher again.
    v.ok(v.cmd().args(["-m", "torchrun_rs.shim", "--remove"]));
    assert_eq!(tool_run(&v, FABRIC, &fabric, false), want);
}

#[test]
fn the_hook_costs_an_unrelated_python_start_under_5_ms() {
    // Two venvs alike but for the hook, timed in turns (the best of 20
    // each), so that a busy machine slows both alike.
    let plain = fresh_venv();
    let hooked = fresh_venv();
    hooked.ok(hooked
        .cmd()
        .args(["-m", "torchrun_rs.shim", "--in-process"]));
    let (mut without, mut with) = (Duration::MAX, Duration::MAX);
    for _ in 0..20 {
        for (v, best) in [(&plain, &mut without), (&hooked, &mut with)] {
            let t = std::time::Instant::now();
            v.ok(v.cmd().args(["-c", "pass"]));
            *best = (*best).min(t.elapsed());
        }
    }
    eprintln!("python -c pass: {without:?} without the hook, {with:?} with it");
    assert!(
        with < without + Duration::from_millis(5),
        "{without:?} -> {with:?}"
    );
    // --help answers, exit 0.
    let out = hooked
        .cmd()
        .args(["-m", "torchrun_rs.shim", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn the_command_line_agrees_with_torchs_parser_argument_for_argument() {
    // 2,000 generated argument vectors and every unique prefix of torch's
    // long options, through torch's parser and through --dry-run.
    let out = Command::new(testkit::torch_python())
        .arg(python_test("differential_cli.py"))
        .arg(BIN)
        .arg("2000")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{}", err.lines().next().unwrap_or(""));
    assert!(out.status.success(), "{err}");
}

/// A Python program that calls `torchrun_rs.run.main([...])` (as Lightning
/// Fabric does) on two workers of worker.py's `record die` mode: each
/// writes the signals it gets to `signals.<rank>` and then exits. Its
/// stderr goes to a file: a launcher that outlived the caller must not keep
/// the test waiting on a pipe.
struct Caller {
    child: std::process::Child,
    out: tempfile::TempDir,
    launcher: i32,
    workers: [i32; 2],
}

fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(')').unwrap();
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

impl Caller {
    fn start() -> Caller {
        let out = tempfile::tempdir().unwrap();
        let err = std::fs::File::create(out.path().join("caller.err")).unwrap();
        let child = Command::new(testkit::torch_python())
            .args([
                "-c",
                "import sys, torchrun_rs.run as r; r.main(sys.argv[1:])",
                "--nproc-per-node=2",
            ])
            .arg(testkit::cli_helper("worker.py"))
            .arg("record")
            .arg(out.path())
            .arg("die")
            .env("PYTHONPATH", package_dir())
            .env("TORCHRUN_RS_BIN", BIN)
            .env("PYTHON_EXEC", "python3")
            .env("TMPDIR", out.path())
            .env_remove("OMP_NUM_THREADS")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let pid = |r: usize| {
            let p = out.path().join(format!("pid.{r}"));
            testkit::wait_for(Duration::from_secs(60), "a worker's pid", || {
                std::fs::read_to_string(&p).ok()?.trim().parse::<i32>().ok()
            })
        };
        let workers = [pid(0), pid(1)];
        let launcher = parent_of(workers[0]);
        assert_ne!(launcher, child.id() as i32, "workers are the launcher's");
        assert_eq!(parent_of(launcher), child.id() as i32);
        Caller {
            child,
            out,
            launcher,
            workers,
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: a signal to the caller this test started.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// The caller's exit status and stderr (within 60 s).
    fn finish(&mut self) -> (std::process::ExitStatus, String) {
        let status = testkit::wait_for(Duration::from_secs(60), "the caller to exit", || {
            self.child.try_wait().unwrap()
        });
        let err = std::fs::read_to_string(self.out.path().join("caller.err")).unwrap();
        (status, err)
    }

    fn signals_seen(&self, rank: usize) -> String {
        std::fs::read_to_string(self.out.path().join(format!("signals.{rank}")))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn all_gone(&self) -> bool {
        !testkit::pid_alive(self.launcher) && self.workers.iter().all(|&p| !testkit::pid_alive(p))
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        // A failed test leaves nothing running: the launcher this test's
        // caller started (its guardian then stops the workers).
        let ours = std::fs::read(format!("/proc/{}/cmdline", self.launcher))
            .is_ok_and(|c| String::from_utf8_lossy(&c).starts_with(BIN));
        if ours && testkit::pid_alive(self.launcher) {
            // SAFETY: a signal to the launcher this test's caller started.
            unsafe { libc::kill(self.launcher, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM or SIGINT at a Python caller reaches the workers through the
/// launcher, with their grace (their handlers run), and the caller ends as
/// torch's agent does: `SignalException`, once nothing of the job is left.
fn a_signal_at_the_caller_stops_the_job_with_grace(sig: i32, name: &str) {
    let mut c = Caller::start();
    c.signal(sig);
    let (status, err) = c.finish();
    assert!(
        c.all_gone(),
        "the launcher or a worker outlived the caller: {err}"
    );
    assert_eq!(status.code(), Some(1), "{status:?}: {err}");
    assert!(
        err.contains("SignalException") && err.contains("got signal"),
        "{err}"
    );
    for r in 0..2 {
        assert_eq!(c.signals_seen(r), name, "rank {r}'s handler: {err}");
    }
}

#[test]
fn sigterm_at_a_python_caller_stops_the_workers_with_grace_and_raises_signal_exception() {
    a_signal_at_the_caller_stops_the_job_with_grace(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_at_a_python_caller_reaches_the_workers_handlers_not_sigkill() {
    a_signal_at_the_caller_stops_the_job_with_grace(libc::SIGINT, "SIGINT");
}

#[test]
fn a_sigkilled_python_caller_takes_its_launcher_and_workers_with_it() {
    let mut c = Caller::start();
    c.signal(libc::SIGKILL);
    let (status, _) = c.finish();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let t0 = std::time::Instant::now();
    testkit::wait_for(
        Duration::from_secs(20),
        "the launcher and its workers to end with their caller",
        || c.all_gone().then_some(()),
    );
    eprintln!(
        "launcher and workers gone {:?} after the caller",
        t0.elapsed()
    );
    // Stopped as a SIGTERM of the launcher stops them: handlers ran.
    for r in 0..2 {
        assert_eq!(c.signals_seen(r), "SIGTERM", "rank {r}");
    }
}

/// A job script that writes `OUT/ran.<RANK>`: whether it ran under
/// torchrun-rs (its marker) and its Python's `sys.prefix`.
fn marker_script(dir: &std::path::Path) -> PathBuf {
    let script = dir.join("job.py");
    std::fs::write(
        &script,
        "import json, os, sys\n\
         json.dump({'torchrun_rs': 'TORCHRUN_RS_JOB' in os.environ, 'prefix': sys.prefix},\n\
         \x20         open(os.path.join(sys.argv[1], 'ran.' + os.environ['RANK']), 'w'))\n",
    )
    .unwrap();
    script
}

fn ran(out: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("ran.0")).unwrap()).unwrap()
}

#[test]
fn with_the_package_uninstalled_the_hooks_pth_line_leaves_torchs_launcher_working() {
    let v = venv_with_the_package_installed();
    v.ok(v.cmd().args(["-m", "torchrun_rs.shim", "--in-process"]));
    // What pip uninstall does: the package goes, the .pth file (which pip
    // does not know) stays.
    std::fs::remove_dir_all(v.site.join("torchrun_rs")).unwrap();
    assert!(v.site.join("torchrun_rs_in_process.pth").exists());
    let out = tempfile::tempdir().unwrap();
    let err = v.ok(v
        .cmd()
        .args(["-m", "torch.distributed.run", "--nproc-per-node=1"])
        .arg(marker_script(out.path()))
        .arg(out.path()));
    assert!(!err.contains("Traceback"), "{err}");
    assert_eq!(ran(out.path())["torchrun_rs"], false, "{err}");
    // The in-process API too: torch's own, without a word.
    let api = v
        .cmd()
        .args([
            "-c",
            "import torch.distributed.run as r, torch.distributed.launcher.api as a\n\
             assert not hasattr(r, '_torchrun_rs') and not hasattr(a, '_torchrun_rs')\n\
             r.get_args_parser()",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&api.stderr);
    assert!(api.status.success(), "{err}");
    assert!(!err.contains("torchrun-rs"), "{err}");
}

#[test]
fn with_the_launcher_missing_the_hook_falls_back_to_torchs_functions_with_one_warning() {
    let v = fresh_venv();
    v.ok(v.cmd().args(["-m", "torchrun_rs.shim", "--in-process"]));
    let out = tempfile::tempdir().unwrap();
    let job = v
        .cmd()
        .args([
            "-c",
            "import sys, torch.distributed.run as r\n\
             p = r.get_args_parser()\n\
             r.get_args_parser()\n\
             print(type(p._actions[1]).__module__)\n\
             r.main(['--nproc-per-node=1', *sys.argv[1:]])",
        ])
        .arg(marker_script(out.path()))
        .arg(out.path())
        .env("TORCHRUN_RS_BIN", out.path().join("no-such-torchrun-rs"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&job.stderr);
    assert!(job.status.success(), "{err}");
    // torch's parser (its own env action), and torch's launcher ran the job.
    assert_eq!(
        String::from_utf8_lossy(&job.stdout).trim(),
        "torch.distributed.argparse_util",
        "{err}"
    );
    assert_eq!(ran(out.path())["torchrun_rs"], false, "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("torchrun-rs")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("cannot be run") && warnings[0].contains("torch's own launcher"),
        "{err}"
    );
}

#[test]
fn python_m_torchrun_rs_and_a_venvs_launcher_run_by_path_use_that_venvs_python() {
    let v = fresh_venv();
    let want = v.root.canonicalize().unwrap();
    let prefix = |mut c: Command| {
        let out = tempfile::tempdir().unwrap();
        let o = c
            .args(["--nproc-per-node=1"])
            .arg(marker_script(out.path()))
            .arg(out.path())
            .env("TMPDIR", &v.tmp)
            .env_remove("OMP_NUM_THREADS")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        PathBuf::from(ran(out.path())["prefix"].as_str().unwrap())
            .canonicalize()
            .unwrap()
    };
    // The venv is not active (PATH's python3 is another Python): workers
    // still run on the Python that ran `python -m torchrun_rs`.
    let mut c = v.cmd();
    c.args(["-m", "torchrun_rs"])
        .env_remove("PYTHON_EXEC")
        .env_remove("VIRTUAL_ENV");
    assert_eq!(prefix(c), want);
    // An explicit PYTHON_EXEC still wins.
    let mut c = v.cmd();
    c.args(["-m", "torchrun_rs"])
        .env("PYTHON_EXEC", testkit::torch_python())
        .env_remove("VIRTUAL_ENV");
    assert_ne!(prefix(c), want);
    // <venv>/bin/torchrun-rs called by path, as a Slurm script does.
    let installed = v.root.join("bin/torchrun-rs");
    if std::fs::hard_link(BIN, &installed).is_err() {
        std::fs::copy(BIN, &installed).unwrap();
    }
    let mut c = Command::new(&installed);
    c.env_remove("PYTHON_EXEC").env_remove("VIRTUAL_ENV");
    assert_eq!(prefix(c), want);
}
