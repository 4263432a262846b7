//! The pip wheel: built by `scripts/build-wheel.sh`, installed into a fresh
//! venv beside torch, and used there for a real gloo job, as a user who
//! installs tools with pip would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn python_path(python: &Path, what: &str) -> PathBuf {
    let out = ok(
        "sysconfig",
        Command::new(python)
            .args([
                "-c",
                &format!("import sysconfig; print(sysconfig.get_path('{what}'))"),
            ])
            .output()
            .unwrap(),
    );
    PathBuf::from(out.trim())
}

#[test]
fn the_wheel_installs_beside_torch_and_runs_a_gloo_job() {
    let root = testkit::repo_root();
    let built = ok(
        "scripts/build-wheel.sh",
        Command::new("bash")
            .arg(root.join("scripts/build-wheel.sh"))
            .output()
            .unwrap(),
    );
    let wheel = PathBuf::from(built.lines().last().unwrap().trim());
    let name = wheel.file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.contains("manylinux2014_x86_64") || name.contains("manylinux_2_17_x86_64"),
        "{name}"
    );
    let size = std::fs::metadata(&wheel).unwrap().len();
    eprintln!("wheel {name}: {:.1} MB", size as f64 / 1e6);

    // Never a file named torchrun: torch's wheel owns that name.
    let listing = ok(
        "zip listing",
        Command::new("python3")
            .args(["-m", "zipfile", "-l"])
            .arg(&wheel)
            .output()
            .unwrap(),
    );
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.ends_with(".data/scripts/torchrun-rs")),
        "{listing}"
    );
    assert!(
        files
            .iter()
            .any(|f| f.ends_with(".data/scripts/torchrun-rs-store")),
        "{listing}"
    );
    assert!(!files.iter().any(|f| f.ends_with("/torchrun")), "{listing}");

    // A fresh venv that sees the test venv's torch.
    let torch_python = testkit::torch_python();
    let dir = tempfile::tempdir().unwrap();
    let venv = dir.path().join("venv");
    ok(
        "venv",
        Command::new(&torch_python)
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .unwrap(),
    );
    let python = venv.join("bin/python");
    let site = python_path(&python, "purelib");
    let torch_site = python_path(&torch_python, "purelib");
    std::fs::write(
        site.join("torch-beside.pth"),
        format!("{}\n", torch_site.display()),
    )
    .unwrap();
    let t0 = Instant::now();
    ok(
        "pip install",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .arg(&wheel)
            .output()
            .unwrap(),
    );
    eprintln!("pip install of the wheel: {:?}", t0.elapsed());
    assert!(
        !venv.join("bin/torchrun").exists(),
        "the wheel installed a torchrun"
    );

    // A real gloo job with the installed launcher, and through python -m.
    let job = testkit::cli_helper("torch_job.py");
    for launcher in [
        vec![venv.join("bin/torchrun-rs").display().to_string()],
        vec![
            python.display().to_string(),
            "-m".into(),
            "torchrun_rs".into(),
        ],
    ] {
        let out = ok(
            "gloo job",
            Command::new(&launcher[0])
                .args(&launcher[1..])
                .args(["--standalone", "--nproc-per-node=2", "-t", "3"])
                .arg(&job)
                .env("PYTHON_EXEC", &python)
                .env("TMPDIR", dir.path())
                .output()
                .unwrap(),
        );
        for r in 0..2 {
            assert!(
                out.contains(&format!("[default{r}]:rank {r} restart 0 sum 3")),
                "{launcher:?}: {out}"
            );
        }
    }
    // torchrun's Python API from the installed package (PyTorch's
    // test_run.py cases and the API beside torch's own).
    let api = Command::new(&python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_run.py"))
        .env_remove("TORCHRUN_RS_BIN")
        .env_remove("PYTHONPATH")
        .env_remove("OMP_NUM_THREADS")
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(api.status.success(), "{}", text(&api.stderr));
    let v = ok(
        "store --help",
        Command::new(venv.join("bin/torchrun-rs-store"))
            .arg("--help")
            .output()
            .unwrap(),
    );
    assert!(v.contains("--port"), "{v}");

    // The torchrun shim: opt-in, and torch's own torchrun is left alone.
    let torchrun = venv.join("bin/torchrun");
    std::fs::write(&torchrun, "#!/bin/sh\necho torch's torchrun\n").unwrap();
    let shim = |args: &[&str]| {
        Command::new(&python)
            .args(["-m", "torchrun_rs.shim"])
            .args(args)
            .output()
            .unwrap()
    };
    let refused = shim(&[]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("--force"),
        "{}",
        text(&refused.stderr)
    );
    assert!(std::fs::read_to_string(&torchrun)
        .unwrap()
        .contains("torch's torchrun"));
    ok("shim --force", shim(&["--force"]));
    let via_shim = ok(
        "torchrun --version",
        Command::new(&torchrun).arg("--version").output().unwrap(),
    );
    assert!(via_shim.starts_with("torchrun-rs "), "{via_shim}");
    ok("shim --remove", shim(&["--remove"]));
    assert!(!torchrun.exists());
}
