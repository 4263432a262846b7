//! Several agents on this machine forming one job with the static backend.

use std::path::Path;
use std::process::{Child, Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

fn helper(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/helpers")
        .join(name)
        .display()
        .to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn agent(node_rank: u32, nnodes: u32, port: u16, extra: &[&str], script: &[String]) -> Child {
    Command::new(BIN)
        .args([
            &format!("--nnodes={nnodes}"),
            &format!("--node-rank={node_rank}"),
            "--master-addr=127.0.0.1",
            &format!("--master-port={port}"),
        ])
        .args(extra)
        .args(script)
        .env("PYTHON_EXEC", testkit::torch_python())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn two_static_nodes_run_one_gloo_job() {
    let port = free_port();
    let script = vec![helper("torch_job.py")];
    let a = agent(0, 2, port, &["--nproc-per-node=2", "-t", "3"], &script);
    let b = agent(1, 2, port, &["--nproc-per-node=2", "-t", "3"], &script);
    let mut all = String::new();
    for (n, c) in [a, b].into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "node {n}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        all.push_str(&stdout);
    }
    // Four workers, global ranks 0..3, all summing 1+2+3+4.
    for r in 0..4 {
        assert!(all.contains(&format!("rank {r} restart 0 sum 10")), "{all}");
    }
}

#[test]
fn heterogeneous_static_nodes_rank_like_torch() {
    let port = free_port();
    let out_dir = tempfile::tempdir().unwrap();
    let script = vec![helper("dump_env.py"), out_dir.path().display().to_string()];
    let a = agent(0, 2, port, &["--nproc-per-node=1"], &script);
    let b = agent(1, 2, port, &["--nproc-per-node=3"], &script);
    for c in [a, b] {
        let out = c.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (rank, group_rank, local_rank, local_ws) in
        [(0, 0, 0, 1), (1, 1, 0, 3), (2, 1, 1, 3), (3, 1, 2, 3)]
    {
        let s = std::fs::read_to_string(out_dir.path().join(format!("{rank}.json"))).unwrap();
        let e: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(e["WORLD_SIZE"], "4");
        assert_eq!(e["GROUP_RANK"], group_rank.to_string());
        assert_eq!(e["GROUP_WORLD_SIZE"], "2");
        assert_eq!(e["LOCAL_RANK"], local_rank.to_string());
        assert_eq!(e["LOCAL_WORLD_SIZE"], local_ws.to_string());
        assert_eq!(e["ROLE_RANK"], rank.to_string());
        assert_eq!(e["MASTER_ADDR"], "127.0.0.1");
        assert_eq!(e["MASTER_PORT"], port.to_string());
        assert_eq!(e["TORCHELASTIC_RUN_ID"], "none");
    }
}

#[test]
fn a_missing_static_node_is_named() {
    let port = free_port();
    let out = agent(
        0,
        3,
        port,
        &["--rdzv-conf=timeout=1"],
        &["--no-python".into(), "true".into()],
    )
    .wait_with_output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("missing node ranks: 1, 2"), "{err}");
}

#[test]
fn a_node_rank_out_of_range_is_a_usage_error() {
    let out = agent(
        2,
        2,
        free_port(),
        &[],
        &["--no-python".into(), "true".into()],
    )
    .wait_with_output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--node-rank"), "{err}");
}

#[test]
fn a_signal_stops_a_node_waiting_for_the_others() {
    let port = free_port();
    let mut waiting = agent(0, 2, port, &[], &["--no-python".into(), "true".into()]);
    // The node hosts the store and waits for node 1: wait until it listens.
    testkit::wait_for(
        std::time::Duration::from_secs(20),
        "the store to listen",
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
    );
    unsafe { libc::kill(waiting.id() as i32, libc::SIGTERM) };
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = waiting.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "still waiting for the rendezvous after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(143));
}
