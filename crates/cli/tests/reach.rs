//! Reaching users where they run: `--dry-run`, `--version`, completion
//! scripts, and configuration derived from a cluster's environment.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs the launcher with `args` in an environment holding only PATH and
/// `env` (no cluster variables from the machine running the tests).
fn launcher(args: &[&str], env: &[(&str, &str)], tmp: &std::path::Path) -> Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TMPDIR", tmp)
        .env("PYTHON_EXEC", "python3");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn dry_run_prints_each_workers_command_and_environment_and_starts_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("ran");
    let script = format!("touch {}", marker.display());
    let o = launcher(
        &[
            "--nproc-per-node=2",
            "--dry-run",
            "--no-python",
            "sh",
            "-c",
            &script,
        ],
        &[],
        tmp.path(),
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(!marker.exists(), "a worker ran");
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "something was written"
    );
    assert!(
        out.contains("  rendezvous: c10d on this node, store on a free port"),
        "{out}"
    );
    for r in 0..2 {
        assert!(
            out.contains(&format!("local rank {r}:\n  command: sh -c 'touch ")),
            "{out}"
        );
        assert!(out.contains(&format!("    LOCAL_RANK={r}\n")), "{out}");
        assert!(out.contains(&format!("    RANK={r}\n")), "{out}");
    }
    assert!(out.contains("    WORLD_SIZE=2\n"), "{out}");
    assert!(out.contains("    OMP_NUM_THREADS=1\n"), "{out}");
    assert!(
        out.contains("    TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT\n"),
        "{out}"
    );
}

#[test]
fn dry_run_of_a_static_node_shows_its_ranks_and_a_bad_value_is_still_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = launcher(
        &[
            "--nnodes=3",
            "--node-rank=2",
            "--nproc-per-node=4",
            "--master-addr=10.1.2.3",
            "--master-port=29511",
            "--dry-run",
            "train.py",
        ],
        &[],
        tmp.path(),
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        out.contains("rendezvous: static, store at 10.1.2.3:29511, node rank 2"),
        "{out}"
    );
    assert!(
        out.contains("local rank 3:\n  command: python3 -u train.py\n"),
        "{out}"
    );
    assert!(
        out.contains("    RANK=11\n") && out.contains("    WORLD_SIZE=12\n"),
        "{out}"
    );
    assert!(
        out.contains("    MASTER_ADDR=10.1.2.3\n    MASTER_PORT=29511\n"),
        "{out}"
    );
    let o = launcher(
        &[
            "--nnodes=2",
            "--node-rank=5",
            "--master-port=1",
            "--dry-run",
            "t.py",
        ],
        &[],
        tmp.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("--node-rank"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn version_names_the_torch_release_it_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let o = launcher(&["--version"], &[], tmp.path());
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        text(&o.stdout),
        format!(
            "torchrun-rs {} (flags and behaviour of torchrun from torch 2.15)\n",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn completion_scripts_load_in_their_shells() {
    let tmp = tempfile::tempdir().unwrap();
    for (shell, check) in [("bash", "bash"), ("zsh", "zsh")] {
        let o = launcher(&["--print-completion", shell], &[], tmp.path());
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        let script = tmp.path().join(format!("completion.{shell}"));
        std::fs::write(&script, &o.stdout).unwrap();
        assert!(text(&o.stdout).contains("--nproc-per-node"), "{shell}");
        let checked = Command::new(check)
            .arg("-n")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| {
                panic!("{check} is needed for this test (scripts/test.sh installs it): {e}")
            });
        assert!(
            checked.status.success(),
            "{shell}: {}",
            text(&checked.stderr)
        );
    }
    // bash: the script registers a completion that offers our flags.
    let probe = format!(
        "source {}; f=$(complete -p torchrun-rs | sed 's/.*-F \\([^ ]*\\).*/\\1/'); COMP_WORDS=(torchrun-rs --nproc); COMP_CWORD=1; COMP_LINE='torchrun-rs --nproc'; COMP_POINT=${{#COMP_LINE}}; $f torchrun-rs --nproc torchrun-rs; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        tmp.path().join("completion.bash").display()
    );
    let o = Command::new("bash").arg("-c").arg(&probe).output().unwrap();
    let offered = text(&o.stdout);
    assert!(
        offered.lines().any(|l| l == "--nproc-per-node"),
        "{offered}\n{}",
        text(&o.stderr)
    );
    let o = launcher(&["--print-completion", "tcsh"], &[], tmp.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("choose from 'bash', 'zsh', 'fish'"));
}
