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

#[test]
fn every_shell_the_flag_table_offers_gets_its_completion_script() {
    let tmp = tempfile::tempdir().unwrap();
    let o = launcher(&["--torchrun-rs-flag-table"], &[], tmp.path());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let table: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let flag = table
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["dest"] == "print_completion")
        .unwrap();
    let shells: Vec<&str> = flag["torch"]["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(shells, ["bash", "zsh", "fish"]);
    for shell in shells {
        let o = launcher(&["--print-completion", shell], &[], tmp.path());
        assert_eq!(o.status.code(), Some(0), "{shell}: {}", text(&o.stderr));
        assert!(text(&o.stdout).contains("nproc-per-node"), "{shell}");
    }
    // fish's own form: `complete -c torchrun-rs ... -l nproc-per-node`.
    let o = launcher(&["--print-completion", "fish"], &[], tmp.path());
    let script = text(&o.stdout);
    assert!(
        script
            .lines()
            .any(|l| l.starts_with("complete -c torchrun-rs") && l.contains("-l nproc-per-node")),
        "{script}"
    );
}

#[test]
fn a_rendezvous_key_torch_reads_is_checked_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    for (backend, conf) in [
        ("c10d", "heartbeat_timeout=1e20"),
        ("c10d", "cas_backoff_max_seconds=-1"),
        ("c10d", "store_type=redis"),
        ("etcd-v3", "heartbeat_timeout=0"),
    ] {
        let o = launcher(
            &[
                &format!("--rdzv-backend={backend}"),
                "--rdzv-endpoint=localhost:29400",
                "--nnodes=2",
                &format!("--rdzv-conf={conf}"),
                "--dry-run",
                "train.py",
            ],
            &[],
            tmp.path(),
        );
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{conf}: {err}");
        let key = conf.split('=').next().unwrap();
        assert!(
            err.lines().next().is_some_and(|l| l.contains(key)) && err.lines().count() <= 2,
            "{conf}: {err}"
        );
    }
    // A valid value is taken; the static backend reads none of these keys.
    for (backend, conf) in [
        (
            "c10d",
            "heartbeat_timeout=2,cas_backoff_max_seconds=0.5,store_type=tcp",
        ),
        ("static", "heartbeat_timeout=1e20,store_type=redis"),
    ] {
        let o = launcher(
            &[
                &format!("--rdzv-backend={backend}"),
                "--rdzv-endpoint=localhost:29400",
                "--nnodes=2",
                "--node-rank=0",
                &format!("--rdzv-conf={conf}"),
                "--dry-run",
                "train.py",
            ],
            &[],
            tmp.path(),
        );
        assert_eq!(o.status.code(), Some(0), "{conf}: {}", text(&o.stderr));
    }
}

/// `--dry-run` in a synthetic cluster environment: the report.
fn dry_run_in(env: &[(&str, &str)], flags: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = flags.to_vec();
    args.extend(["--dry-run", "train.py"]);
    let o = launcher(&args, env, tmp.path());
    assert_eq!(o.status.code(), Some(0), "{env:?}: {}", text(&o.stderr));
    text(&o.stdout)
}

const SLURM: &[(&str, &str)] = &[
    ("SLURM_JOB_ID", "4242"),
    ("SLURM_STEP_ID", "0"),
    ("SLURM_STEP_NUM_NODES", "4"),
    ("SLURM_NODEID", "2"),
    ("SLURM_STEP_NODELIST", "gpu[007-008],gpu[010-011]"),
    ("SLURM_STEP_TASKS_PER_NODE", "1(x4)"),
    ("SLURM_GPUS_ON_NODE", "8"),
];

#[test]
fn a_slurm_step_configures_the_launch() {
    let out = dry_run_in(SLURM, &[]);
    let port = cli::cluster::slurm_port(4242, 0);
    assert!(out.contains("  nnodes: 4\n  nproc_per_node: 8\n"), "{out}");
    assert!(
        out.contains(&format!(
            "  rendezvous: c10d at gpu007:{port}, another node hosts the store\n  run_id: 4242.0\n"
        )),
        "{out}"
    );
    assert!(
        out.contains("note: auto-configured from Slurm job 4242 step 0: "),
        "{out}"
    );
    // A flag wins over the cluster; --no-auto-config turns it all off.
    let out = dry_run_in(SLURM, &["--nproc-per-node=2"]);
    assert!(out.contains("  nproc_per_node: 2\n"), "{out}");
    let out = dry_run_in(SLURM, &["--no-auto-config"]);
    assert!(
        out.contains("  nnodes: 1\n") && !out.contains("auto-configured"),
        "{out}"
    );
    // More than one launcher per node is refused, with the fix.
    let tmp = tempfile::tempdir().unwrap();
    let mut env = SLURM.to_vec();
    env.push(("SLURM_STEP_TASKS_PER_NODE", "8(x4)"));
    let o = launcher(&["--dry-run", "t.py"], &env, tmp.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("srun --ntasks-per-node=1"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn kubernetes_jobs_configure_the_launch() {
    // LeaderWorkerSet.
    let out = dry_run_in(
        &[
            ("LWS_LEADER_ADDRESS", "train-0.train.ns"),
            ("LWS_GROUP_SIZE", "4"),
            ("LWS_WORKER_INDEX", "2"),
        ],
        &[],
    );
    assert!(out.contains("  nnodes: 4\n"), "{out}");
    assert!(
        out.contains("rendezvous: static, store at train-0.train.ns:29500, node rank 2"),
        "{out}"
    );
    // Kubeflow PyTorchJob v1, not elastic.
    let out = dry_run_in(
        &[
            ("MASTER_ADDR", "job-master-0"),
            ("MASTER_PORT", "23456"),
            ("WORLD_SIZE", "3"),
            ("RANK", "1"),
        ],
        &[],
    );
    assert!(
        out.contains("rendezvous: static, store at job-master-0:23456, node rank 1"),
        "{out}"
    );
    // Kubeflow Trainer v2: PET_* says it all; nothing is derived.
    let out = dry_run_in(
        &[
            ("PET_NNODES", "2"),
            ("PET_NPROC_PER_NODE", "2"),
            ("PET_NODE_RANK", "1"),
            ("PET_MASTER_ADDR", "tj-node-0-0.tj"),
            ("PET_MASTER_PORT", "29500"),
            ("JOB_COMPLETION_INDEX", "1"),
        ],
        &[],
    );
    assert!(
        out.contains("rendezvous: static, store at tj-node-0-0.tj:29500, node rank 1"),
        "{out}"
    );
    assert!(!out.contains("auto-configured"), "{out}");
    // JobSet: the node count comes from --nnodes.
    let out = dry_run_in(
        &[
            ("JOB_COMPLETION_INDEX", "3"),
            ("HOSTNAME", "js-workers-0-3"),
        ],
        &["--nnodes=4"],
    );
    assert!(
        out.contains("rendezvous: static, store at js-workers-0-0:29500, node rank 3"),
        "{out}"
    );
    // Kubeflow's PET_STANDALONE="" (torch crashes on it): taken as set.
    let out = dry_run_in(&[("PET_STANDALONE", "")], &[]);
    assert!(
        out.contains("PET_STANDALONE is empty: taken as set"),
        "{out}"
    );
    assert!(out.contains("c10d on this node"), "{out}");
}
