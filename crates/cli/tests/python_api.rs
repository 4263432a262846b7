//! torchrun's Python API as torchrun_rs offers it (`torchrun_rs.run`,
//! `torchrun_rs.launcher.api`), checked in the torch venv against torch's
//! own modules: PyTorch's test_run.py cases, the parser, config_from_args,
//! LaunchConfig, launches that succeed and fail.

use std::path::PathBuf;
use std::process::Command;

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
