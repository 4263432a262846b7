//! torch's launcher API in Rust: a `LaunchConfig` handed to `launch_agent`
//! (no CLI involved). An embedded launch touches only the workers it starts,
//! so it shares the test process with other tests, and with other launches.

use std::time::Duration;

use engine::{launch_agent, LaunchConfig, RunResult};

fn config(nproc: u32) -> LaunchConfig {
    LaunchConfig {
        nproc_per_node: nproc,
        run_id: "api-test".to_string(),
        rdzv_backend: "c10d".to_string(),
        rdzv_endpoint: "localhost:0".to_string(),
        log_dir: Some(std::path::PathBuf::from("/dev/null")),
        shutdown_timeout: Duration::from_secs(5),
        ..LaunchConfig::default()
    }
}

/// Runs `sh -c SCRIPT` on every worker.
fn run_sh(cfg: &LaunchConfig, script: &str) -> engine::LaunchOutcome {
    launch_agent(cfg, "sh", &["-c".to_string(), script.to_string()]).expect("launch")
}

#[test]
fn launch_agent_api() {
    let out = tempfile::tempdir().unwrap();
    let dump = format!(
        "echo \"$TORCHELASTIC_SIGNALS_TO_HANDLE\" > {}/sig.$RANK",
        out.path().display()
    );

    // The default signal list reaches every worker.
    let outcome = run_sh(&config(2), &dump);
    assert!(matches!(outcome.result, RunResult::Succeeded));
    assert_eq!(outcome.exit_code(), 0);
    for r in 0..2 {
        let got = std::fs::read_to_string(out.path().join(format!("sig.{r}"))).unwrap();
        assert_eq!(got.trim(), "SIGTERM,SIGINT,SIGHUP,SIGQUIT");
    }

    // A configured list is exported as given.
    let mut cfg = config(2);
    cfg.signals_to_handle = "SIGTERM,SIGUSR1,SIGUSR2".to_string();
    let outcome = run_sh(&cfg, &dump);
    assert_eq!(outcome.exit_code(), 0);
    for r in 0..2 {
        let got = std::fs::read_to_string(out.path().join(format!("sig.{r}"))).unwrap();
        assert_eq!(got.trim(), "SIGTERM,SIGUSR1,SIGUSR2");
    }

    // A failure: the root cause's code, the summary, restarts counted.
    let mut cfg = config(2);
    cfg.max_restarts = 1;
    let outcome = run_sh(&cfg, "[ \"$RANK\" = 1 ] && exit 4; sleep 30");
    let RunResult::Failed { failures } = &outcome.result else {
        panic!("expected a failure, got {:?}", outcome.result)
    };
    assert_eq!(outcome.exit_code(), 4);
    let root = &failures[engine::failure::root_cause(failures).unwrap()];
    assert_eq!((root.global_rank, root.exitcode()), (1, 4));
    let report = outcome.report().unwrap();
    assert!(
        report.contains("Root Cause (first observed failure):"),
        "{report}"
    );
    assert!(report.contains("exited with code 4"), "{report}");

    // A configuration the CLI would never produce is refused before
    // anything starts, never a panic.
    let mut cfg = config(1);
    cfg.max_nodes = 0;
    cfg.min_nodes = 0;
    let err = launch_agent(&cfg, "sh", &["-c", "exit 0"]).unwrap_err();
    assert!(
        matches!(err, engine::LaunchError::Config(ref e) if e.flag == "--nnodes"),
        "{err}"
    );
    let mut cfg = config(1);
    cfg.rdzv_configs
        .insert("join_timeout".into(), "1e20".into());
    assert!(launch_agent(&cfg, "sh", &["-c", "exit 0"]).is_err());

    // From inside async code, as an embedding program would call it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcome = rt.block_on(async { run_sh(&config(2), &dump) });
    assert_eq!(outcome.exit_code(), 0);
}

#[test]
fn several_launches_run_side_by_side_in_one_process() {
    let out = tempfile::tempdir().unwrap();
    let mine = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let launches: Vec<_> = (0..3)
        .map(|i| {
            let dir = out.path().to_path_buf();
            std::thread::spawn(move || {
                let mut cfg = config(2);
                cfg.run_id = format!("side-by-side-{i}");
                // Launch i: rank 1 exits with code i (0 = success), after
                // every rank has started, so the launches overlap.
                let script = format!(
                    "touch {d}/up.{i}.$RANK; while [ $(ls {d} | grep -c '^up') -lt 6 ]; do sleep 0.01; done; [ \"$RANK\" = 1 ] && exit {i}; exit 0",
                    d = dir.display()
                );
                run_sh(&cfg, &script).exit_code()
            })
        })
        .collect();
    let codes: Vec<i32> = launches.into_iter().map(|t| t.join().unwrap()).collect();
    // Each launch saw its own workers' exits, and only those.
    assert_eq!(codes, vec![0, 1, 2]);
    // The embedding program's own child was neither reaped nor signalled.
    let mut mine = mine;
    assert!(
        mine.try_wait().unwrap().is_none(),
        "the test's own child was touched"
    );
    mine.kill().unwrap();
    mine.wait().unwrap();
}
