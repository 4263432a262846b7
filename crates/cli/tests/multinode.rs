//! Several agents on this machine forming one job with the static backend.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

fn helper(name: &str) -> String {
    testkit::cli_helper(name)
}

/// A worker that does nothing: `--no-python true`.
fn noop_job() -> Vec<String> {
    vec!["--no-python".into(), "true".into()]
}

use testkit::{finish, free_port, read_until_line};

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

/// A static agent that must fail with exit status `code`, saying `needle`.
fn assert_static_fails_with(node_rank: u32, nnodes: u32, extra: &[&str], code: i32, needle: &str) {
    let out = agent(node_rank, nnodes, free_port(), extra, &noop_job())
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(needle), "{err}");
}

#[test]
fn a_missing_static_node_is_named() {
    assert_static_fails_with(
        0,
        3,
        &["--rdzv-conf=timeout=1"],
        1,
        "missing node ranks: 1, 2",
    );
}

#[test]
fn a_node_rank_out_of_range_is_a_usage_error() {
    assert_static_fails_with(2, 2, &[], 2, "--node-rank");
}

#[test]
fn a_signal_stops_a_node_waiting_for_the_others() {
    let port = free_port();
    let mut waiting = agent(0, 2, port, &[], &noop_job());
    // The node hosts the store and waits for node 1: wait until it listens.
    testkit::wait_for(
        std::time::Duration::from_secs(20),
        "the store to listen",
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
    );
    // SAFETY: a plain system call on values owned here.
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

/// A c10d agent on its own loopback address (127.0.0.N).
fn c10d_agent(n: u8, nnodes: &str, nproc: u32, port: u16, conf: &str, script: &[String]) -> Child {
    c10d_command(
        BIN,
        &[],
        n,
        nnodes,
        nproc,
        port,
        conf,
        "elastic-test",
        script,
    )
}

/// The command line of a c10d agent, run as `program prefix.. BIN flags..`
/// (`program` is BIN itself, or a wrapper such as `faketime`).
#[allow(clippy::too_many_arguments)]
fn c10d_command(
    program: &str,
    prefix: &[&str],
    n: u8,
    nnodes: &str,
    nproc: u32,
    port: u16,
    conf: &str,
    run_id: &str,
    script: &[String],
) -> Child {
    Command::new(program)
        .args(prefix)
        .args([
            &format!("--nnodes={nnodes}"),
            &format!("--nproc-per-node={nproc}"),
            "--rdzv-backend=c10d",
            &format!("--rdzv-endpoint=127.0.0.2:{port}"),
            &format!("--rdzv-id={run_id}"),
            &format!("--local-addr=127.0.0.{n}"),
            &format!("--rdzv-conf={conf}"),
            "-t",
            "3",
        ])
        .args(script)
        .env("PYTHON_EXEC", testkit::torch_python())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `torchrun-rs-store`, built beside this test's launcher by the workspace
/// build (`scripts/test.sh` builds every target first).
fn store_bin() -> String {
    let bin = std::path::Path::new(BIN).with_file_name("torchrun-rs-store");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin.display().to_string()
}

/// Reads a child's stdout until a line containing `needle` appears.
fn wait_line(
    c: &mut Child,
    needle: &str,
) -> (std::io::BufReader<std::process::ChildStdout>, String) {
    read_until_line(c.stdout.take().unwrap(), needle)
}

fn elastic(want: u32) -> Vec<String> {
    vec![helper("elastic_job.py"), want.to_string()]
}

const FAST: &str = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=2";

#[test]
fn two_c10d_nodes_run_one_gloo_job() {
    let port = free_port();
    let a = c10d_agent(2, "2", 2, port, FAST, &[helper("torch_job.py")]);
    let b = c10d_agent(3, "2", 2, port, FAST, &[helper("torch_job.py")]);
    let (ca, oa, ea) = finish(a);
    let (cb, ob, eb) = finish(b);
    assert_eq!((ca, cb), (Some(0), Some(0)), "{ea}\n{eb}");
    let all = oa + &ob;
    for r in 0..4 {
        assert!(all.contains(&format!("rank {r} restart 0 sum 10")), "{all}");
    }
}

#[test]
fn a_late_node_grows_the_world_without_using_a_restart() {
    let port = free_port();
    let mut a = c10d_agent(2, "2:3", 1, port, FAST, &elastic(3));
    let b = c10d_agent(3, "2:3", 1, port, FAST, &elastic(3));
    // The first two form a world of 2 and run.
    let (ra, seen_a) = wait_line(&mut a, "world 2");
    assert!(seen_a.contains("restart 0"), "{seen_a}");
    let c = c10d_agent(4, "2:3", 1, port, FAST, &elastic(3));
    let (cc, oc, ec) = finish(c);
    let (cb, ob, eb) = finish(b);
    let status = a.wait().unwrap();
    let mut oa = String::new();
    std::io::Read::read_to_string(&mut { ra }, &mut oa).unwrap();
    assert_eq!(
        (status.code(), cb, cc),
        (Some(0), Some(0), Some(0)),
        "{eb}\n{ec}"
    );
    let all = seen_a + &oa + &ob + &oc;
    for r in 0..3 {
        assert!(
            all.contains(&format!("rank {r} world 3 restart 0 master 127.0.0.2:")),
            "{all}"
        );
    }
}

/// An agent, the rest of its stdout, and what was read of it so far.
type Running = (Child, std::io::BufReader<std::process::ChildStdout>, String);

/// SIGKILLs `victim`, waits for the survivors to finish with status 0, and
/// returns everything they printed.
fn kill_one_and_finish(victim: &mut Child, survivors: [Running; 2]) -> String {
    // SAFETY: a plain system call on values owned here.
    unsafe { libc::kill(victim.id() as i32, libc::SIGKILL) };
    victim.wait().unwrap();
    let mut all = String::new();
    let mut codes = Vec::new();
    for (mut child, mut rest, seen) in survivors {
        codes.push(child.wait().unwrap().code());
        all += &seen;
        std::io::Read::read_to_string(&mut rest, &mut all).unwrap();
    }
    assert_eq!(codes, [Some(0), Some(0)], "{all}");
    all
}

#[test]
fn survivors_of_a_killed_node_re_form_a_smaller_world() {
    let port = free_port();
    let mut a = c10d_agent(2, "2:3", 1, port, FAST, &elastic(2));
    let mut b = c10d_agent(3, "2:3", 1, port, FAST, &elastic(2));
    let mut c = c10d_agent(4, "2:3", 1, port, FAST, &elastic(2));
    let (ra, seen_a) = wait_line(&mut a, "world 3");
    let (rb, seen_b) = wait_line(&mut b, "world 3");
    let (_rc, _) = wait_line(&mut c, "world 3");
    let t0 = std::time::Instant::now();
    let all = kill_one_and_finish(&mut c, [(a, ra, seen_a), (b, rb, seen_b)]);
    assert!(
        all.contains("rank 0 world 2 restart 0") && all.contains("rank 1 world 2 restart 0"),
        "{all}"
    );
    eprintln!("survivors finished {:?} after the node died", t0.elapsed());
}

#[test]
fn a_killed_agent_is_seen_at_once_and_a_gloo_job_re_forms_without_the_heartbeat_window() {
    // Default heartbeats (5 s x 3): re-forming within seconds means the
    // death was seen through the closed connection, not the window.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("127.0.0.2:{port}");
    // The agent that does not host the store dies, and its worker with it.
    let took = re_form_after_killing(dir.path(), 2, |n| {
        loop_agent(n, &endpoint, "killed", "last_call_timeout=1", dir.path())
    });
    eprintln!("agent killed -> survivors re-formed in {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "{took:?}: the heartbeat window (15 s) was waited out"
    );
}

/// Starts agents on 127.0.0.2, .3 and .4 (`start(n)`) of a 2:3 gloo loop
/// job, SIGKILLs the `victim`-th (0-2) once all three run, and returns how
/// long until both survivors' new workers run in a world of 2.
fn re_form_after_killing(
    dir: &std::path::Path,
    victim: usize,
    start: impl Fn(u8) -> Child,
) -> Duration {
    let mut agents: Vec<Child> = (2..=4).map(&start).collect();
    let mut running = Vec::new();
    for (i, a) in agents.iter_mut().enumerate() {
        let (r, seen) = wait_line(a, "world 3");
        running.push((i, r, seen));
    }
    let mut dead = agents.remove(victim);
    let killed_at = wall_ms();
    // SAFETY: a plain system call on a child of this test.
    unsafe { libc::kill(dead.id() as i32, libc::SIGKILL) };
    dead.wait().unwrap();
    wait_for_new_workers(dir);
    // Timed on the survivors' own events, not on torch's start.
    let survivors_at: Vec<u8> = (2..=4u8)
        .filter(|n| usize::from(*n) - 2 != victim)
        .collect();
    let took = re_formed_after(dir, &survivors_at, 2, killed_at);
    let survivors: Vec<Running> = agents
        .into_iter()
        .zip(running.into_iter().filter(|(i, _, _)| *i != victim))
        .map(|(a, (_, r, seen))| (a, r, seen))
        .collect();
    let all = kill_finish(survivors);
    assert!(
        all.contains("rank 0 world 2") && all.contains("rank 1 world 2"),
        "the survivors re-formed a world of 2: {all}"
    );
    took
}

#[test]
fn a_frozen_node_is_evicted_within_its_heartbeat_window() {
    // Heartbeats every second, dead after 3 s; one node's agent and worker
    // stop (SIGSTOP: no FIN, no RST, as a machine that hangs).
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("127.0.0.2:{port}");
    let conf = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3";
    let start = |n: u8| loop_agent(n, &endpoint, "frozen-node", conf, dir.path());
    let mut a = start(2);
    let mut b = start(3);
    let mut c = start(4);
    let (ra, seen_a) = wait_line(&mut a, "world 3");
    let (rb, seen_b) = wait_line(&mut b, "world 3");
    let (_rc, _) = wait_line(&mut c, "world 3");
    // The frozen node's processes: its agent and its worker (group rank 2).
    let worker: i32 = std::fs::read_to_string(dir.path().join("pid.2"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t0 = std::time::Instant::now();
    let frozen_at = wall_ms();
    for pid in [c.id() as i32, worker] {
        // SAFETY: a plain system call on processes this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    wait_for_new_workers(dir.path());
    let workers_took = t0.elapsed();
    let took = re_formed_after(dir.path(), &[2, 3], 2, frozen_at);
    for pid in [c.id() as i32, worker] {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = c.wait();
    let all = kill_finish(vec![(a, ra, seen_a), (b, rb, seen_b)]);
    assert!(all.contains("rank 1 world 2"), "{all}");
    eprintln!(
        "node frozen -> survivors re-formed in {took:?} (window 3 s), their new workers ran {workers_took:?} after it"
    );
    // The window, a second for the checks, a second for the rest (timed on
    // the launchers' events: torch's start is not the recovery).
    assert!(took < Duration::from_secs(6), "{took:?}");
}

#[test]
fn every_node_of_a_round_has_the_jobs_restart_count() {
    // Node 2's worker fails; nodes 3 and 4 only see the group re-form. With
    // torch each node counts its own restarts (pytorch#108158): 1 on node
    // 2, 0 on the others. The job has made one restart: all say 1.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let job = vec![
        helper("worker.py"),
        "rank0-fails-first".to_string(),
        dir.path().display().to_string(),
    ];
    let agents: Vec<Child> = (2..5)
        .map(|n| {
            Command::new(BIN)
                .args([
                    "--nnodes=3",
                    "--nproc-per-node=1",
                    "--max-restarts=1",
                    "--rdzv-backend=c10d",
                    &format!("--rdzv-endpoint=127.0.0.2:{port}"),
                    "--rdzv-id=counts",
                    &format!("--local-addr=127.0.0.{n}"),
                    &format!("--rdzv-conf={FAST}"),
                ])
                .args(&job)
                .env("PYTHON_EXEC", "python3")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for a in agents {
        let (code, _, err) = finish(a);
        assert_eq!(code, Some(0), "{err}");
    }
    for rank in 0..3 {
        let env: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("env.{rank}.1.json")))
                .unwrap_or_else(|_| panic!("rank {rank} never ran with restart count 1")),
        )
        .unwrap();
        assert_eq!(env["env"]["TORCHELASTIC_RESTART_COUNT"], "1");
    }
}

/// `torchrun-rs-store --port PORT`, started once the port is free.
fn store_at(port: u16) -> Child {
    Command::new(store_bin())
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Three agents of a gloo job on a standalone store at `port`.
fn store_loss_job(port: u16, dir: &std::path::Path, conf: &str) -> Vec<Child> {
    let endpoint = format!("127.0.0.1:{port}");
    let conf = format!("is_host=false,last_call_timeout=1,{conf}");
    (2..5)
        .map(|n| loop_agent(n, &endpoint, "store-loss", &conf, dir))
        .collect()
}

#[test]
fn a_store_restarted_at_its_address_lets_the_survivors_re_form() {
    // The node that hosts the store dies (its store and its agent); a
    // store comes back at the same address, as a pod behind its service.
    let port = free_port();
    let mut store = store_at(port);
    let dir = tempfile::tempdir().unwrap();
    let mut agents = store_loss_job(port, dir.path(), "join_timeout=60");
    let mut c = agents.pop().unwrap();
    let mut b = agents.pop().unwrap();
    let mut a = agents.pop().unwrap();
    let (ra, seen_a) = wait_line(&mut a, "world 3");
    let (rb, seen_b) = wait_line(&mut b, "world 3");
    let (_rc, _) = wait_line(&mut c, "world 3");
    let _ = store.kill();
    let _ = store.wait();
    // SAFETY: a plain system call on a child of this test.
    unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
    c.wait().unwrap();
    // The survivors' workers fail, their agents wait for a store.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        (starts(dir.path(), 0), starts(dir.path(), 1)),
        (1, 1),
        "re-formed without a store"
    );
    let mut store = store_at(port);
    let all = kill_finish(vec![(a, ra, seen_a), (b, rb, seen_b)]);
    let _ = store.kill();
    let _ = store.wait();
    assert!(
        all.contains("rank 0 world 2") && all.contains("rank 1 world 2"),
        "{all}"
    );
}

#[test]
fn a_store_that_does_not_come_back_ends_the_job_with_one_line_naming_it() {
    let port = free_port();
    let mut store = store_at(port);
    let dir = tempfile::tempdir().unwrap();
    let mut agents = store_loss_job(port, dir.path(), "join_timeout=3");
    for a in agents.iter_mut() {
        let _ = wait_line(a, "world 3");
    }
    let _ = store.kill();
    let _ = store.wait();
    let mut c = agents.pop().unwrap();
    // SAFETY: a plain system call on a child of this test.
    unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
    c.wait().unwrap();
    let t0 = std::time::Instant::now();
    for a in agents {
        let (code, _, err) = finish(a);
        assert_eq!(code, Some(1), "{err}");
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| {
                l.contains(&format!(
                    "the rendezvous store at 127.0.0.1:{port} did not answer"
                ))
            })
            .collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].contains("etcd-v3") && lines[0].contains("torchrun-rs-store"),
            "{err}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}

/// An agent of a 2:3-node gloo job whose workers all-reduce in a loop
/// (`allreduce_loop.py`: in a world of 2 they exit 0).
fn loop_agent(n: u8, endpoint: &str, run_id: &str, conf: &str, dir: &std::path::Path) -> Child {
    Command::new(BIN)
        .args([
            "--nnodes=2:3",
            "--nproc-per-node=1",
            "--max-restarts=3",
            "--rdzv-backend=c10d",
            &format!("--rdzv-endpoint={endpoint}"),
            &format!("--rdzv-id={run_id}"),
            &format!("--local-addr=127.0.0.{n}"),
            &format!("--rdzv-conf={conf}"),
            &format!(
                "--events-file={}",
                dir.join(format!("events.{n}")).display()
            ),
        ])
        .arg(helper("allreduce_loop.py"))
        .arg(dir)
        .arg("2")
        .env("PYTHON_EXEC", testkit::torch_python())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Milliseconds since the epoch, as the events file stamps them.
fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// How long after `t0` (wall, ms) the nodes `nodes` of a `loop_agent` job
/// completed a round of `world` nodes, by their own events: the launcher's
/// recovery, without the workers' (torch's) start.
fn re_formed_after(dir: &std::path::Path, nodes: &[u8], world: u32, t0: f64) -> Duration {
    let last = nodes
        .iter()
        .map(|n| {
            events_of(dir, *n)
                .iter()
                .filter(|e| e["event"] == "rendezvous_completed" && e["group_world_size"] == world)
                .filter_map(|e| e["ts"].as_f64())
                .find(|&ts| ts > t0)
                .unwrap_or_else(|| panic!("node {n} completed no round of {world} after the fault"))
        })
        .fold(t0, f64::max);
    Duration::from_secs_f64((last - t0) / 1000.0)
}

/// How many workers of group rank `g` have started (`allreduce_loop.py`).
fn starts(dir: &std::path::Path, g: u32) -> usize {
    std::fs::read_to_string(dir.join(format!("start.{g}"))).map_or(0, |s| s.lines().count())
}

/// Until the workers of group ranks 0 and 1 have started a second time.
fn wait_for_new_workers(dir: &std::path::Path) {
    testkit::wait_for(
        Duration::from_secs(60),
        "the survivors' new workers",
        || (starts(dir, 0) >= 2 && starts(dir, 1) >= 2).then_some(()),
    );
}

#[test]
fn a_node_that_keeps_failing_is_excluded_and_a_spare_takes_its_place() {
    // One failure is enough here (--max-node-failures=1: the counting of
    // several is the state machine's unit test); the bad node's worker
    // fails after 3 s, while a spare waits.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let agent = |n: u8, bad: bool| {
        let mut c = Command::new(BIN);
        c.args([
            "--nnodes=2:2",
            "--nproc-per-node=1",
            "--max-restarts=5",
            "--max-node-failures=1",
            "--rdzv-backend=c10d",
            &format!("--rdzv-endpoint=127.0.0.2:{port}"),
            "--rdzv-id=bad-node",
            &format!("--local-addr=127.0.0.{n}"),
            &format!("--rdzv-conf={FAST}"),
        ])
        .arg(helper("worker.py"))
        .args(["fail-if-env"])
        .arg(dir.path())
        .arg("3")
        .env("PYTHON_EXEC", "python3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if bad {
            c.env("FAIL_HERE", "1");
        }
        c.spawn().unwrap()
    };
    // The store's host is a good node; the bad one joins it.
    let good = agent(2, false);
    let bad = agent(3, true);
    testkit::wait_for(Duration::from_secs(30), "both workers", || {
        (dir.path().join("pid.0").exists() && dir.path().join("pid.1").exists()).then_some(())
    });
    let mut spare = agent(4, false);
    let _spare_err = read_until_line(spare.stderr.take().unwrap(), "waiting as a spare");
    let (code, _, err) = finish(bad);
    assert_eq!(code, Some(1), "{err}");
    let why: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("excluded from the run"))
        .collect();
    assert_eq!(why.len(), 1, "{err}");
    for a in [good, spare] {
        let (code, _, err) = finish(a);
        assert_eq!(code, Some(0), "{err}");
    }
    // The last round: the good node and the spare (rank 1), after the
    // job's one restart.
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("env.1.1.json")).unwrap())
            .unwrap();
    assert_eq!(last["env"]["WORLD_SIZE"], "2");
    assert!(
        last["env"].get("FAIL_HERE").is_none(),
        "rank 1 is the spare"
    );
}

#[test]
fn a_node_with_a_smaller_restart_budget_than_the_jobs_count_stops_cleanly() {
    // Node a (--max-restarts=1) fails first: the job's count becomes 1.
    // Node b (--max-restarts=0) then fails: none is left for it. It must
    // stop with its failure, not wrap its budget around and restart.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let agent = |n: u8, max: &str, tag: &str, fail_on: &str| {
        Command::new(BIN)
            .args([
                "--nnodes=2",
                "--nproc-per-node=1",
                &format!("--max-restarts={max}"),
                "--rdzv-backend=c10d",
                &format!("--rdzv-endpoint=127.0.0.2:{port}"),
                "--rdzv-id=budgets",
                &format!("--local-addr=127.0.0.{n}"),
                &format!("--rdzv-conf={FAST}"),
            ])
            .arg(helper("worker.py"))
            .arg("fail-on-start")
            .arg(dir.path())
            .env("PYTHON_EXEC", "python3")
            .env("NODE_TAG", tag)
            .env("FAIL_ON_START", fail_on)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = agent(2, "1", "a", "1");
    let b = agent(3, "0", "b", "2");
    let (code_b, _, err_b) = finish(b);
    assert_eq!(code_b, Some(1), "{err_b}");
    assert!(!err_b.contains("internal error"), "{err_b}");
    assert!(
        err_b.contains("Root Cause"),
        "b stops with its own failure: {err_b}"
    );
    let (code_a, _, err_a) = finish(a);
    assert_ne!(code_a, Some(0), "{err_a}");
    // b's second start was its last.
    let b_starts = std::fs::read_to_string(dir.path().join("starts-b")).unwrap();
    assert_eq!(b_starts.len(), 2, "b restarted past its budget");
}

/// Waits for each agent to exit 0; everything they printed.
fn kill_finish(agents: Vec<Running>) -> String {
    let mut all = String::new();
    for (mut child, mut rest, seen) in agents {
        let mut err = String::new();
        let _ = child
            .stderr
            .take()
            .map(|mut e| std::io::Read::read_to_string(&mut e, &mut err));
        let code = child.wait().unwrap().code();
        all += &seen;
        std::io::Read::read_to_string(&mut rest, &mut all).unwrap();
        assert_eq!(code, Some(0), "{all}\n{err}");
    }
    all
}

#[test]
fn a_node_stopped_by_sigterm_leaves_and_the_survivors_re_form_at_once() {
    // Default heartbeats: without the leave, the survivors would wait for
    // the 15 s heartbeat window.
    let port = free_port();
    let conf = "join_timeout=120";
    let dir = tempfile::tempdir().unwrap();
    let start = |n: u8| {
        let events = format!(
            "--events-file={}",
            dir.path().join(format!("events.{n}")).display()
        );
        c10d_command(
            BIN,
            &[&events],
            n,
            "2:3",
            1,
            port,
            conf,
            "elastic-test",
            &elastic(2),
        )
    };
    let mut a = start(2);
    let mut b = start(3);
    let mut c = start(4);
    let (ra, seen_a) = wait_line(&mut a, "world 3");
    let (rb, seen_b) = wait_line(&mut b, "world 3");
    let (_rc, _) = wait_line(&mut c, "world 3");
    let stopped_at = wall_ms();
    // SAFETY: a plain system call on values owned here.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    assert_eq!(c.wait().unwrap().code(), Some(143));
    let mut all = String::new();
    for (mut child, mut rest, seen) in [(a, ra, seen_a), (b, rb, seen_b)] {
        assert_eq!(child.wait().unwrap().code(), Some(0));
        all += &seen;
        std::io::Read::read_to_string(&mut rest, &mut all).unwrap();
    }
    assert!(
        all.contains("rank 0 world 2 restart 0") && all.contains("rank 1 world 2 restart 0"),
        "{all}"
    );
    // Timed on the survivors' own events (their round of two), not on
    // torch's start and exit.
    let took = re_formed_after(dir.path(), &[2, 3], 2, stopped_at);
    eprintln!("survivors re-formed {took:?} after SIGTERM of the third node");
    assert!(
        took < std::time::Duration::from_secs(10),
        "{took:?}: the survivors waited for the heartbeat window"
    );
}

/// Reads a child's stderr until a line containing `needle` appears.
fn wait_err_line(c: &mut Child, needle: &str) -> std::io::BufReader<std::process::ChildStderr> {
    read_until_line(c.stderr.take().unwrap(), needle).0
}

#[test]
fn a_spare_replaces_a_lost_node() {
    let port = free_port();
    // Nodes 2 and 3 (one worker each) form the world; node 4 (two workers)
    // arrives beyond --nnodes max and waits as a spare.
    let mut a = c10d_agent(2, "2:2", 1, port, FAST, &elastic(3));
    let mut b = c10d_agent(3, "2:2", 1, port, FAST, &elastic(3));
    let (ra, seen_a) = wait_line(&mut a, "world 2");
    let (_rb, _) = wait_line(&mut b, "world 2");
    let mut c = c10d_agent(4, "2:2", 2, port, FAST, &elastic(3));
    let mut ec = wait_err_line(&mut c, "waiting as a spare");
    // SAFETY: a plain system call on values owned here.
    unsafe { libc::kill(b.id() as i32, libc::SIGKILL) };
    b.wait().unwrap();
    let (rc, seen_c) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_line(&mut c, "world 3")
    }))
    .unwrap_or_else(|_| {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut ec, &mut err);
        panic!("the spare never ran in a world of 3; its stderr:\n{err}")
    });
    let (sa, sc) = (a.wait().unwrap(), c.wait().unwrap());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut { ra }, &mut rest).unwrap();
    std::io::Read::read_to_string(&mut { rc }, &mut rest).unwrap();
    assert_eq!((sa.code(), sc.code()), (Some(0), Some(0)), "{rest}");
    assert!((seen_a + &seen_c + &rest).contains("world 3 restart 0"));
}

#[test]
fn a_spare_exits_0_when_the_job_ends() {
    let port = free_port();
    let out = tempfile::tempdir().unwrap();
    let job = vec![
        helper("worker.py"),
        "until-file".into(),
        out.path().display().to_string(),
    ];
    let a = c10d_agent(2, "1:1", 1, port, FAST, &job);
    // The job runs; a second node arrives and waits as a spare.
    testkit::wait_for(
        std::time::Duration::from_secs(30),
        "the job's worker",
        || out.path().join("pid.0").exists().then_some(()),
    );
    let mut spare = c10d_agent(3, "1:1", 1, port, FAST, &job);
    let _e = wait_err_line(&mut spare, "waiting as a spare");
    std::fs::write(out.path().join("go"), "").unwrap();
    let (ca, _, ea) = finish(a);
    let (cs, _, es) = finish(spare);
    assert_eq!((ca, cs), (Some(0), Some(0)), "{ea}\n{es}");
}

/// A network namespace joined to this one by a veth pair: a test host of
/// our own, whose link can be cut. Removed on drop.
struct TestHost {
    ns: String,
    host_if: String,
    peer_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) is needed");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestHost {
    /// Host side `10.213.<net>.1`, namespace side `10.213.<net>.2`.
    fn new(net: u8) -> TestHost {
        let id = std::process::id() % 100_000;
        // Names carry `net` too: tests of one process run side by side.
        let t = TestHost {
            ns: format!("trs{id}n{net}"),
            host_if: format!("trsh{id}n{net}"),
            peer_if: format!("trsn{id}n{net}"),
        };
        let peer = t.peer_if.clone();
        ip(&["netns", "add", &t.ns]);
        ip(&[
            "link", "add", &t.host_if, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &t.ns]);
        ip(&[
            "addr",
            "add",
            &format!("10.213.{net}.1/24"),
            "dev",
            &t.host_if,
        ]);
        ip(&["link", "set", &t.host_if, "up"]);
        ip(&[
            "netns",
            "exec",
            &t.ns,
            "ip",
            "addr",
            "add",
            &format!("10.213.{net}.2/24"),
            "dev",
            &peer,
        ]);
        ip(&["netns", "exec", &t.ns, "ip", "link", "set", &peer, "up"]);
        ip(&["netns", "exec", &t.ns, "ip", "link", "set", "lo", "up"]);
        t
    }

    fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// The launcher, run in network namespace `ns` if given.
fn launcher_in(ns: Option<&str>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    }
}

#[test]
fn a_node_cut_off_the_network_is_evicted_and_the_rest_re_form() {
    let net = 7;
    let remote = TestHost::new(net);
    let port = free_port();
    let out = tempfile::tempdir().unwrap();
    let endpoint = format!("--rdzv-endpoint=10.213.{net}.1:{port}");
    let agent_at = |addr: &str, ns: Option<&str>| {
        launcher_in(ns)
            .args([
                "--nnodes=2:3",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                &endpoint,
                "--rdzv-id=netcut",
                &format!("--local-addr={addr}"),
                &format!("--rdzv-conf={FAST}"),
            ])
            .arg(helper("worker.py"))
            .args(["until-world", &out.path().display().to_string(), "2"])
            .env("PYTHON_EXEC", "python3")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = agent_at(&format!("10.213.{net}.1"), None);
    let b = agent_at("127.0.0.3", None);
    let mut c = agent_at(&format!("10.213.{net}.2"), Some(&remote.ns));
    // All three run in one world of 3.
    testkit::wait_for(std::time::Duration::from_secs(60), "a world of 3", || {
        (0..3)
            .all(|r| out.path().join(format!("env.{r}.0.json")).exists())
            .then_some(())
    });
    remote.cut();
    // The two left evict the silent node and finish in a world of 2.
    let (ca, _, ea) = finish(a);
    let (cb, _, eb) = finish(b);
    assert_eq!((ca, cb), (Some(0), Some(0)), "{ea}\n{eb}");
    assert!(
        ea.contains("stopped sending heartbeats") || eb.contains("stopped sending heartbeats"),
        "{ea}\n{eb}"
    );
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn gloo_all_reduce_between_a_node_and_one_in_its_own_network_namespace() {
    let net = 8;
    let remote = TestHost::new(net);
    let port = free_port();
    let endpoint = format!("--rdzv-endpoint=10.213.{net}.1:{port}");
    // gloo binds to the named interface's address on each side of the veth.
    let agent_at = |addr: String, ifname: &str, ns: Option<&str>| {
        launcher_in(ns)
            .args([
                "--nnodes=2",
                "--nproc-per-node=2",
                "--rdzv-backend=c10d",
                &endpoint,
                "--rdzv-id=netns-gloo",
                &format!("--local-addr={addr}"),
                &format!("--rdzv-conf={FAST}"),
                "-t",
                "3",
                &helper("torch_job.py"),
            ])
            .env("PYTHON_EXEC", testkit::torch_python())
            .env("GLOO_SOCKET_IFNAME", ifname)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = agent_at(format!("10.213.{net}.1"), &remote.host_if, None);
    let b = agent_at(format!("10.213.{net}.2"), &remote.peer_if, Some(&remote.ns));
    let (ca, oa, ea) = finish(a);
    let (cb, ob, eb) = finish(b);
    assert_eq!((ca, cb), (Some(0), Some(0)), "{ea}\n{eb}");
    for r in 0..2 {
        assert!(oa.contains(&format!("rank {r} restart 0 sum 10")), "{oa}");
    }
    for r in 2..4 {
        assert!(ob.contains(&format!("rank {r} restart 0 sum 10")), "{ob}");
    }
}

/// Runs a c10d agent (`--no-python true`) with `flags`, which must fail
/// with exit status 1 and one line of error containing `needle`.
fn assert_c10d_fails_with(flags: &[&str], needle: &str) {
    let out = Command::new(BIN)
        .arg("--rdzv-backend=c10d")
        .args(flags)
        .args(["--no-python", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn an_unreachable_endpoint_is_a_clear_error() {
    let port = free_port();
    assert_c10d_fails_with(
        &[
            "--nnodes=2",
            &format!("--rdzv-endpoint=127.0.0.9:{port}"),
            "--rdzv-conf=is_host=false,read_timeout=1",
        ],
        &format!("cannot reach the rendezvous store at 127.0.0.9:{port}"),
    );
}

#[test]
fn clocks_that_differ_between_nodes_do_not_evict_anyone() {
    // Heartbeats every second, a node is dead after 2 s without one; the
    // three nodes' clocks differ by 20 s and the job runs for 4 s.
    assert!(
        Command::new("faketime").arg("--version").output().is_ok(),
        "this test needs faketime (apt-get install faketime; scripts/test.sh does)"
    );
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let job: Vec<String> = vec![
        helper("worker.py"),
        "sleep".into(),
        dir.path().display().to_string(),
        "4".into(),
    ];
    let conf = "keep_alive_interval=1,keep_alive_max_attempt=2";
    let agents: Vec<Child> = [(2, "+0s"), (3, "+10s"), (4, "-10s")]
        .into_iter()
        .map(|(n, offset)| {
            c10d_command(
                "faketime",
                &["-f", offset, BIN],
                n,
                "3",
                1,
                port,
                conf,
                "skew",
                &job,
            )
        })
        .collect();
    for a in agents {
        let (code, out, err) = finish(a);
        assert_eq!(code, Some(0), "{out}\n{err}");
        assert!(!err.contains("stopped sending heartbeats"), "{err}");
        assert!(!err.contains("restart"), "no restart expected: {err}");
    }
}

#[test]
fn a_step_of_the_wall_clock_does_not_make_live_nodes_look_dead() {
    // A node's wall clock jumps 60 s ahead (an NTP step, a resumed VM)
    // while the job runs; heartbeats every second, dead after 2 s.
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        std::path::Path::new(lib).exists(),
        "this test needs faketime (apt-get install faketime; scripts/test.sh does)"
    );
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "+0\n").unwrap();
    let go = dir.path().join("go");
    let script = format!(
        "echo started >> {0}/starts.$GROUP_RANK; while [ ! -e {1} ]; do sleep 0.05; done",
        dir.path().display(),
        go.display()
    );
    let agent = |n: u8, jumping: bool| {
        let mut c = Command::new(BIN);
        c.args([
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            &format!("--rdzv-endpoint=127.0.0.2:{port}"),
            "--rdzv-id=clock-step",
            &format!("--local-addr=127.0.0.{n}"),
            "--rdzv-conf=keep_alive_interval=1,keep_alive_max_attempt=2,last_call_timeout=1",
            "--no-python",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if jumping {
            // The wall clock only: the monotonic one is the kernel's.
            c.env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", &clock)
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        c.spawn().unwrap()
    };
    let host = agent(2, false);
    let stepping = agent(3, true);
    testkit::wait_for(Duration::from_secs(60), "both workers", || {
        (dir.path().join("starts.0").exists() && dir.path().join("starts.1").exists()).then_some(())
    });
    std::fs::write(&clock, "+60\n").unwrap();
    // Two and a half dead-node windows: what would evict, would have.
    std::thread::sleep(Duration::from_secs(5));
    std::fs::write(&go, "").unwrap();
    for a in [host, stepping] {
        let (code, out, err) = finish(a);
        assert_eq!(code, Some(0), "{out}\n{err}");
        assert!(!err.contains("stopped sending heartbeats"), "{err}");
    }
    for rank in 0..2 {
        let starts = std::fs::read_to_string(dir.path().join(format!("starts.{rank}"))).unwrap();
        assert_eq!(starts.lines().count(), 1, "group rank {rank} restarted");
    }
}

#[test]
fn a_store_that_freezes_while_a_node_joins_fails_the_join_in_bounded_time() {
    let store = testkit::StoreProcess::start(&store_bin(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let mut agent = Command::new(BIN)
        .args([
            "--nnodes=2",
            "--rdzv-backend=c10d",
            &format!("--rdzv-endpoint=127.0.0.1:{}", store.port),
            "--rdzv-id=frozen",
            "--rdzv-conf=is_host=false,read_timeout=3,join_timeout=5",
            "--events-file",
        ])
        .arg(&events)
        .args(["--no-python", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    testkit::wait_for(Duration::from_secs(30), "the agent joining", || {
        std::fs::read_to_string(&events)
            .ok()
            .filter(|e| e.contains("rendezvous_joining"))
    });
    // The store's host stops answering, without closing anything.
    // SAFETY: a plain system call on a process this test started.
    unsafe { libc::kill(store.pid() as i32, libc::SIGSTOP) };
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = agent.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = agent.kill();
            // SAFETY: as above.
            unsafe { libc::kill(store.pid() as i32, libc::SIGCONT) };
            panic!("the agent still waits on a frozen store after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: as above.
    unsafe { libc::kill(store.pid() as i32, libc::SIGCONT) };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().unwrap(), &mut err).unwrap();
    assert_ne!(status.code(), Some(0), "{err}");
    // Each request gives up after read_timeout (3 s), the join after
    // join_timeout (5 s), not after the kernel's retransmissions.
    assert!(err.contains("did not answer"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    eprintln!("a frozen store failed the join after {:?}", t0.elapsed());
}

#[test]
fn two_jobs_with_different_ids_share_one_store() {
    let store = testkit::StoreProcess::start(&store_bin(), &[]);
    let conf = format!("{FAST},is_host=false");
    let start = |n: u8, id: &str| {
        c10d_command(
            BIN,
            &[],
            n,
            "2",
            2,
            store.port,
            &conf,
            id,
            &[helper("torch_job.py")],
        )
    };
    let agents = [
        ("job-a", start(2, "job-a")),
        ("job-b", start(4, "job-b")),
        ("job-a", start(3, "job-a")),
        ("job-b", start(5, "job-b")),
    ];
    let mut out = std::collections::BTreeMap::<&str, String>::new();
    for (id, a) in agents {
        let (code, o, e) = finish(a);
        assert_eq!(code, Some(0), "{id}: {e}");
        *out.entry(id).or_default() += &o;
    }
    for (id, o) in out {
        // Each job is a world of 4 (2 nodes x 2) of its own.
        for r in 0..4 {
            assert!(
                o.contains(&format!("rank {r} restart 0 sum 10")),
                "{id}: {o}"
            );
        }
        assert_eq!(o.matches("sum 10").count(), 4, "{id}: {o}");
    }
}

#[test]
fn a_rendezvous_store_that_dies_mid_job_does_not_stop_the_workers() {
    let store = testkit::StoreProcess::start(&store_bin(), &[]);
    let conf = format!("{FAST},is_host=false");
    let dir = tempfile::tempdir().unwrap();
    let job = vec![
        helper("worker.py"),
        "until-file".into(),
        dir.path().display().to_string(),
    ];
    let a = c10d_command(BIN, &[], 2, "2", 1, store.port, &conf, "dies", &job);
    let b = c10d_command(BIN, &[], 3, "2", 1, store.port, &conf, "dies", &job);
    testkit::wait_for(
        std::time::Duration::from_secs(60),
        "both workers running",
        || (dir.path().join("pid.0").exists() && dir.path().join("pid.1").exists()).then_some(()),
    );
    drop(store);
    // The agents notice (their membership checks fail) but the workers,
    // which talk to their own round's store, carry on and finish.
    let mut agents = [a, b];
    let _noticed: Vec<_> = agents
        .iter_mut()
        .map(|a| wait_err_line(a, "cannot reach the rendezvous store"))
        .collect();
    std::fs::write(dir.path().join("go"), "").unwrap();
    for mut a in agents {
        assert_eq!(a.wait().unwrap().code(), Some(0));
    }
}

#[test]
fn a_stalled_rendezvous_store_does_not_hold_up_a_workers_failure() {
    let store = testkit::StoreProcess::start(&store_bin(), &[]);
    let conf = format!("{FAST},is_host=false");
    let dir = tempfile::tempdir().unwrap();
    let job = vec![
        helper("worker.py"),
        "fail-on-file".into(),
        dir.path().display().to_string(),
        "1".into(),
    ];
    let mut a = c10d_command(BIN, &[], 2, "2", 1, store.port, &conf, "stall", &job);
    let mut b = c10d_command(BIN, &[], 3, "2", 1, store.port, &conf, "stall", &job);
    testkit::wait_for(
        std::time::Duration::from_secs(60),
        "both workers running",
        || (dir.path().join("pid.0").exists() && dir.path().join("pid.1").exists()).then_some(()),
    );
    // The agent of global rank 1 is its worker's parent.
    let pid1: i32 = std::fs::read_to_string(dir.path().join("pid.1"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid1}/stat")).unwrap();
    let ppid: u32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    // The store stops answering. Membership checks run every half second
    // (FAST); give one time to be under way and stuck. (Were none stuck,
    // this test would pass without showing anything, never fail wrongly;
    // the previous agent, whose loop awaited the check, hung here.)
    // SAFETY: a plain system call on values owned here.
    unsafe { libc::kill(store.pid() as i32, libc::SIGSTOP) };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let failing = if ppid == a.id() { &mut a } else { &mut b };
    std::fs::write(dir.path().join("go"), "").unwrap();
    // The failure is handled at once, store or no store.
    let t0 = std::time::Instant::now();
    let _err = wait_err_line(failing, "failed (exitcode: 1)");
    let took = t0.elapsed();
    eprintln!("failure handled {took:?} after the worker exited, with the store stopped");
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    // SAFETY: a plain system call on values owned here.
    unsafe { libc::kill(store.pid() as i32, libc::SIGCONT) };
    for mut c in [a, b] {
        // SAFETY: a plain system call on values owned here.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
    }
}

#[test]
fn when_rank_0_dies_the_next_round_meets_at_the_new_rank_0() {
    // The rendezvous store runs on its own so that rank 0's agent can die.
    let store = testkit::StoreProcess::start(&store_bin(), &[]);
    let conf = format!("{FAST},is_host=false");
    let start = |n: u8| {
        c10d_command(
            BIN,
            &[],
            n,
            "2:3",
            1,
            store.port,
            &conf,
            "new-master",
            &elastic(2),
        )
    };
    let (mut a, mut b, mut c) = (start(2), start(3), start(4));
    let (_ra, seen_a) = wait_line(&mut a, "world 3");
    assert!(seen_a.contains("rank 0 world 3"), "{seen_a}");
    let (rb, seen_b) = wait_line(&mut b, "world 3");
    let (rc, seen_c) = wait_line(&mut c, "world 3");
    let all = kill_one_and_finish(&mut a, [(b, rb, seen_b), (c, rc, seen_c)]);
    // Every worker of the new round uses the new rank 0's store.
    for r in 0..2 {
        assert!(
            all.contains(&format!("rank {r} world 2 restart 0 master 127.0.0.3:")),
            "{all}"
        );
    }
}

#[test]
fn a_foreign_value_under_the_rendezvous_key_is_a_clear_error() {
    // What a Python torchrun agent with the same --rdzv-id leaves there: a
    // pickled state, here written by torch's own TCPStore client.
    let store = testkit::StoreProcess::start(&store_bin(), &[]);
    let set = Command::new(testkit::torch_python())
        .args([
            "-c",
            "import sys, torch.distributed as d\n\
             s = d.TCPStore('127.0.0.1', int(sys.argv[1]), is_master=False)\n\
             s.set('torch.rendezvous.shared', b'\\x80\\x04\\x95pickled')",
            &store.port.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert_c10d_fails_with(
        &[
            "--nnodes=1",
            &format!("--rdzv-endpoint=127.0.0.1:{}", store.port),
            "--rdzv-id=shared",
            "--rdzv-conf=is_host=false",
        ],
        "torch.rendezvous.shared does not hold a torchrun-rs rendezvous state",
    );
}

#[test]
fn exit_barrier_timeout_in_rdzv_conf_bounds_the_wait_for_slower_nodes() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = format!("{FAST},exit_barrier_timeout=1");
    // Node 2's worker is done at once; node 3's runs until the test says so.
    let fast = c10d_agent(2, "2", 1, port, &conf, &noop_job());
    let slow_job = vec![
        helper("worker.py"),
        "until-file".into(),
        dir.path().display().to_string(),
    ];
    let slow = c10d_agent(3, "2", 1, port, &conf, &slow_job);
    // The finished node gives up on the barrier while the other still runs.
    let (code, _, err) = finish(fast);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("Error waiting on exit barrier"), "{err}");
    std::fs::write(dir.path().join("go"), "").unwrap();
    let (code, _, err) = finish(slow);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn an_endpoint_taken_by_something_else_is_named_at_once() {
    // An HTTP server on the endpoint's port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut c in listener.incoming().flatten() {
            let mut buf = [0u8; 64];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let t0 = std::time::Instant::now();
    assert_c10d_fails_with(
        &[
            "--nnodes=2",
            &format!("--rdzv-endpoint=127.0.0.1:{port}"),
            "--rdzv-conf=is_host=false",
        ],
        &format!("127.0.0.1:{port} is not a TCPStore: it answered the handshake with \"HTTP\""),
    );
    // Not after read_timeout's minute of retries.
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn a_worker_failing_on_one_node_restarts_the_whole_job() {
    // Rank 3 (on the second node) raises after joining the process group;
    // the other ranks' collectives fail with it. Both nodes re-form and the
    // job finishes in a second round.
    let port = free_port();
    let start = |n: u8| {
        c10d_command(
            BIN,
            &["--max-restarts=1"],
            n,
            "2",
            2,
            port,
            FAST,
            "fail-across",
            &[helper("torch_job.py"), "fail-once".into(), "3".into()],
        )
    };
    let (a, b) = (start(2), start(3));
    let (ca, oa, ea) = finish(a);
    let (cb, ob, eb) = finish(b);
    assert_eq!((ca, cb), (Some(0), Some(0)), "{ea}\n{eb}");
    // The failing node used its restart; every rank of the new round ran.
    assert!(
        ob.contains("rank 2 restart 1 sum 10") && ob.contains("rank 3 restart 1 sum 10"),
        "{ob}"
    );
    for r in 0..2 {
        assert!(oa.contains(&format!("rank {r} restart ")), "{oa}");
    }
    assert_eq!((oa + &ob).matches(" sum 10").count(), 4);
}

/// A Slurm step's environment for one node (`srun --ntasks-per-node=1`).
fn slurm_agent(job: u64, node_id: u32, local_addr: &str, out: &std::path::Path) -> Child {
    Command::new(BIN)
        .args([
            &format!("--local-addr={local_addr}"),
            "--no-python",
            "sh",
            "-c",
            &format!(
                "echo \"$RANK $GROUP_RANK $WORLD_SIZE\" > {}/rank.$PPID",
                out.display()
            ),
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLURM_JOB_ID", job.to_string())
        .env("SLURM_STEP_ID", "0")
        .env("SLURM_STEP_NUM_NODES", "2")
        .env("SLURM_NODEID", node_id.to_string())
        // The first node of the list has the higher address: ranks must
        // follow Slurm's order, not the addresses'.
        .env("SLURM_STEP_NODELIST", "127.0.0.[3,2]")
        .env("SLURM_STEP_TASKS_PER_NODE", "1(x2)")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_slurm_step_forms_with_global_rank_0_on_its_first_node_from_the_environment_alone() {
    // A job id whose derived port is free here.
    let job = (1000..2000u64)
        .find(|&j| {
            let p = cli::cluster::slurm_port(j, 0);
            std::net::TcpListener::bind(("0.0.0.0", p)).is_ok()
        })
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let second = slurm_agent(job, 1, "127.0.0.2", out.path());
    let first = slurm_agent(job, 0, "127.0.0.3", out.path());
    let (first_pid, second_pid) = (first.id(), second.id());
    let (c1, _, e1) = finish(first);
    let (c2, _, e2) = finish(second);
    assert_eq!((c1, c2), (Some(0), Some(0)), "{e1}\n{e2}");
    assert!(e1.contains("auto-configured from Slurm job"), "{e1}");
    let rank_of =
        |pid: u32| std::fs::read_to_string(out.path().join(format!("rank.{pid}"))).unwrap();
    assert_eq!(rank_of(first_pid).trim(), "0 0 2", "node 0 of the step");
    assert_eq!(rank_of(second_pid).trim(), "1 1 2", "node 1 of the step");
}

#[test]
fn a_hang_across_nodes_is_reported_once_for_the_whole_job() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let agent = |n: u8| {
        Command::new(BIN)
            .args([
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                &format!("--rdzv-endpoint=127.0.0.2:{port}"),
                "--rdzv-id=hang",
                &format!("--local-addr=127.0.0.{n}"),
                &format!("--rdzv-conf={FAST}"),
                "--hang-timeout=10s",
            ])
            .arg(helper("hang_job.py"))
            .arg(dir.path())
            .env("PYTHON_EXEC", testkit::torch_python())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut agents = [agent(2), agent(3)];
    // Whichever agent has group rank 0 prints the cluster-wide report.
    let (tx, rx) = std::sync::mpsc::channel();
    for a in agents.iter_mut() {
        let err = a.stderr.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(err).lines().map_while(Result::ok);
            while let Some(l) = lines.next() {
                if l.contains("across the 2 node(s) that reported") {
                    let report: Vec<String> = lines.by_ref().take(2).collect();
                    let _ = tx.send(report);
                }
            }
        });
    }
    let report = rx
        .recv_timeout(std::time::Duration::from_secs(90))
        .expect("a cluster-wide hang report");
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("  rank 1: stuck_forever (")),
        "{report:?}"
    );
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("  rank 0: all_reduce (")),
        "{report:?}"
    );
    for a in agents.iter_mut() {
        // SAFETY: a plain system call on values owned here.
        unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
        let _ = a.wait();
    }
}

#[test]
fn the_events_file_names_the_node_that_was_evicted() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let with_events = |n: u8| -> Vec<String> {
        let mut v = vec![
            "--events-file".to_string(),
            dir.path().join(format!("events.{n}")).display().to_string(),
        ];
        v.extend(elastic(2));
        v
    };
    let mut a = c10d_agent(2, "2:3", 1, port, FAST, &with_events(2));
    let mut b = c10d_agent(3, "2:3", 1, port, FAST, &with_events(3));
    let mut c = c10d_agent(4, "2:3", 1, port, FAST, &with_events(4));
    let (ra, seen_a) = wait_line(&mut a, "world 3");
    let (rb, seen_b) = wait_line(&mut b, "world 3");
    let (_rc, _) = wait_line(&mut c, "world 3");
    let victim = c.id();
    kill_one_and_finish(&mut c, [(a, ra, seen_a), (b, rb, seen_b)]);
    let mut evicted = Vec::new();
    for n in [2, 3] {
        for line in std::fs::read_to_string(dir.path().join(format!("events.{n}")))
            .unwrap()
            .lines()
        {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["event"] == "node_evicted" {
                evicted.push(v["node"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(
        evicted.contains(&format!("127.0.0.4:{victim}")),
        "{evicted:?}"
    );
}

/// An agent of a 2:3-node gloo job (`allreduce_loop.py DIR WANT`) with
/// `--node-check` and an events file; `extra` flags before the script.
fn checked_agent(
    n: u8,
    port: u16,
    conf: &str,
    dir: &std::path::Path,
    want: &str,
    extra: &[String],
) -> Child {
    Command::new(BIN)
        .args([
            "--nnodes=2:3",
            "--nproc-per-node=1",
            "--max-restarts=3",
            "--rdzv-backend=c10d",
            &format!("--rdzv-endpoint=127.0.0.2:{port}"),
            "--rdzv-id=node-check",
            &format!("--local-addr=127.0.0.{n}"),
            &format!("--rdzv-conf={conf}"),
            &format!(
                "--events-file={}",
                dir.join(format!("events.{n}")).display()
            ),
        ])
        .args(extra)
        .arg(helper("allreduce_loop.py"))
        .arg(dir)
        .arg(want)
        .env("PYTHON_EXEC", testkit::torch_python())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn events_of(dir: &std::path::Path, n: u8) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(format!("events.{n}")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn a_node_whose_check_fails_stays_out_until_it_passes_then_joins_the_job() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let healthy = dir.path().join("healthy");
    let check = vec![format!("--node-check=test -e {}", healthy.display())];
    let a = checked_agent(2, port, FAST, dir.path(), "3", &[]);
    let b = checked_agent(3, port, FAST, dir.path(), "3", &[]);
    let c = checked_agent(4, port, FAST, dir.path(), "3", &check);
    // The two healthy nodes run without the third (a world of 2 loops).
    wait_for_new_workers_once(dir.path());
    let failed = |e: &serde_json::Value| e["event"] == "node_check_failed";
    testkit::wait_for(Duration::from_secs(30), "a failed check", || {
        events_of(dir.path(), 4).iter().any(failed).then_some(())
    });
    std::fs::write(&healthy, "").unwrap();
    // Once its check passes it joins: the group re-forms as 3 and ends.
    for (n, agent) in [(2, a), (3, b), (4, c)] {
        let (code, out, err) = finish(agent);
        assert_eq!(code, Some(0), "node {n}: {err}");
        assert!(out.contains("world 3"), "node {n}: {out}");
    }
    let events = events_of(dir.path(), 4);
    let f = events.iter().find(|e| failed(e)).unwrap();
    assert_eq!(f["exit_code"], 1, "{f}");
    assert!(events.iter().any(|e| e["event"] == "node_check_passed"));
    // No worker of the unhealthy node ran before its check passed.
    let first_pass = events
        .iter()
        .position(|e| e["event"] == "node_check_passed");
    let first_worker = events.iter().position(|e| e["event"] == "worker_started");
    assert!(first_pass < first_worker, "{events:?}");
}

/// Until the workers of group ranks 0 and 1 have started once.
fn wait_for_new_workers_once(dir: &std::path::Path) {
    testkit::wait_for(Duration::from_secs(60), "the first workers", || {
        (starts(dir, 0) >= 1 && starts(dir, 1) >= 1).then_some(())
    });
}

#[test]
fn a_node_whose_check_keeps_failing_is_excluded_and_every_node_says_so() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // The round waits 5 s for a third node: time for two failed checks.
    let conf = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=2";
    let limit = "--max-node-failures=2".to_string();
    // The healthy two run on in a world of 2 (they want 3).
    let metrics = "--metrics-port=0".to_string();
    let mut a = checked_agent(2, port, conf, dir.path(), "3", &[limit.clone(), metrics]);
    let b = checked_agent(3, port, conf, dir.path(), "3", std::slice::from_ref(&limit));
    let check = "--node-check=echo 'GPU 3: uncorrectable ECC error' >&2; exit 3".to_string();
    let c = checked_agent(4, port, conf, dir.path(), "3", &[limit, check]);
    let (code, _, err) = finish(c);
    assert_eq!(code, Some(1), "{err}");
    let said = |needle: &str| err.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(said("excluded from the run"), 1, "{err}");
    assert_eq!(said("GPU 3: uncorrectable ECC error"), 2, "{err}");
    let mine = events_of(dir.path(), 4);
    let checks: Vec<_> = mine
        .iter()
        .filter(|e| e["event"] == "node_check_failed")
        .collect();
    assert_eq!(checks.len(), 2, "{mine:?}");
    assert_eq!(checks[0]["exit_code"], 3);
    assert!(checks[0]["output"].as_str().unwrap().contains("ECC"));
    assert!(mine
        .iter()
        .any(|e| e["event"] == "node_excluded" && e["this_node"] == true));
    assert!(!mine.iter().any(|e| e["event"] == "worker_started"));
    // The others learn it with their round: events file, /status, /metrics.
    wait_for_new_workers_once(dir.path());
    let (_err_a, port_a) = health_port(a.stderr.take().unwrap());
    let scrape = Command::new(testkit::torch_python())
        .arg(testkit::cli_helper("scrape.py"))
        .arg(port_a.to_string())
        .output()
        .unwrap();
    assert!(
        scrape.status.success(),
        "{}",
        String::from_utf8_lossy(&scrape.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&scrape.stdout).unwrap();
    assert_eq!(
        v["status"]["excluded_nodes"],
        serde_json::json!(["127.0.0.4"]),
        "{v}"
    );
    assert_eq!(v["status"]["node_failures"]["127.0.0.4"], 2, "{v}");
    assert_eq!(
        v["metrics"]["torchrun_rs_node_excluded,node=127.0.0.4"], 1.0,
        "{v}"
    );
    assert_eq!(
        v["metrics"]["torchrun_rs_node_failures,node=127.0.0.4"], 2.0,
        "{v}"
    );
    for mut agent in [a, b] {
        // SAFETY: our own child.
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        let _ = agent.wait();
    }
    for n in [2, 3] {
        let theirs = events_of(dir.path(), n);
        let ex = theirs
            .iter()
            .find(|e| e["event"] == "node_excluded")
            .unwrap_or_else(|| panic!("node {n}: {theirs:?}"));
        assert_eq!(ex["node"], "127.0.0.4");
        assert_eq!(ex["failures"], 2);
    }
}

/// Reads an agent's stderr up to its health port line.
fn health_port(
    err: std::process::ChildStderr,
) -> (std::io::BufReader<std::process::ChildStderr>, u16) {
    let (r, seen) = read_until_line(err, "health and metrics on http://");
    let line = seen
        .lines()
        .find(|l| l.contains("health and metrics on http://"))
        .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    (r, port)
}

/// Two nodes, `--max-restarts=0`: node `bad`'s worker fails after 2 s, the
/// other's waits. Both stop; what each printed, and the job's root cause
/// its events file recorded.
fn spent_budget(bad: u8) -> [(Option<i32>, String, String); 2] {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let agent = |n: u8| {
        let mut c = Command::new(BIN);
        c.args([
            "--nnodes=2",
            "--nproc-per-node=1",
            "--max-restarts=0",
            "--rdzv-backend=c10d",
            &format!("--rdzv-endpoint=127.0.0.2:{port}"),
            "--rdzv-id=spent",
            &format!("--local-addr=127.0.0.{n}"),
            &format!("--rdzv-conf={FAST}"),
            &format!(
                "--events-file={}",
                dir.path().join(format!("events.{n}")).display()
            ),
        ])
        .arg(helper("worker.py"))
        .arg("fail-if-env")
        .arg(dir.path())
        .arg("2")
        .env("PYTHON_EXEC", "python3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if n == bad {
            c.env("FAIL_HERE", "1");
        }
        c.spawn().unwrap()
    };
    let (a, b) = (agent(2), agent(3));
    let t0 = std::time::Instant::now();
    let out = [a, b].map(|c| {
        let (code, _, err) = finish(c);
        (code, err)
    });
    assert!(t0.elapsed() < Duration::from_secs(40), "{:?}", t0.elapsed());
    let mut n = 1;
    out.map(|(code, err)| {
        n += 1;
        let recorded = events_of(dir.path(), n)
            .iter()
            .find(|e| e["event"] == "job_finished")
            .and_then(|e| e["job_root_cause"].as_str().map(str::to_string))
            .unwrap_or_default();
        (code, err, recorded)
    })
}

/// The job's root cause as a launcher's last words name it.
fn job_root_cause(err: &str) -> &str {
    let at = err
        .find("(the first failure on any node): ")
        .unwrap_or_else(|| panic!("no job root cause: {err}"));
    err[at..].lines().next().unwrap()
}

#[test]
fn when_the_budget_is_spent_every_node_names_the_same_root_cause() {
    for bad in [3, 2] {
        let [(code_a, err_a, ev_a), (code_b, err_b, ev_b)] = spent_budget(bad);
        assert_eq!(code_a, Some(1), "{err_a}");
        assert_eq!(code_b, Some(1), "{err_b}");
        let (ra, rb) = (job_root_cause(&err_a), job_root_cause(&err_b));
        assert_eq!(ra, rb, "node 2: {err_a}\nnode 3: {err_b}");
        // The events file (which the Python API's ChildFailedError reads)
        // names the same one on both nodes.
        assert!(!ev_a.is_empty() && ev_a == ev_b, "{ev_a:?} {ev_b:?}");
        assert!(ra.ends_with(&ev_a), "{ra} / {ev_a}");
        assert!(
            ra.contains(&format!("on 127.0.0.{bad} exited with code 1")),
            "{ra}"
        );
        assert!(!err_a.contains("rendezvous is closed") && !err_b.contains("rendezvous is closed"));
    }
}

/// Two static nodes, each with its own script and NCCL_ALGO; what each
/// printed and how it exited.
fn fingerprinted_pair(
    scripts: [&str; 2],
    algos: [&str; 2],
    extra: &[&str],
) -> Vec<(Option<i32>, String, String)> {
    let port = free_port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<Child> = (0..2)
        .map(|n| {
            // The same command on both (train.py in each node's working
            // directory); only the contents may differ, as with two commits.
            let cwd = dir.path().join(format!("node{n}"));
            std::fs::create_dir(&cwd).unwrap();
            std::fs::write(cwd.join("train.py"), scripts[n]).unwrap();
            Command::new(BIN)
                .current_dir(&cwd)
                .args([
                    "--nnodes=2",
                    &format!("--node-rank={n}"),
                    "--master-addr=127.0.0.1",
                    &format!("--master-port={port}"),
                ])
                .args(extra)
                .arg("train.py")
                .env("PYTHON_EXEC", "python3")
                .env("NCCL_ALGO", algos[n])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children.into_iter().map(finish).collect()
}

#[test]
fn nodes_that_differ_are_named_at_the_rendezvous_and_refused_with_require_same_nodes() {
    let same = "print('ran')\n";
    // Alike: nothing said.
    let runs = fingerprinted_pair([same, same], ["Ring", "Ring"], &[]);
    for (code, out, err) in &runs {
        assert_eq!(*code, Some(0), "{err}");
        assert!(out.contains("ran"));
        assert!(!err.contains("differ"), "{err}");
    }
    // Another script and NCCL_ALGO on node 1: node 0 prints what differs.
    let other = "print('ran')  # another commit\n";
    let runs = fingerprinted_pair([same, other], ["Ring", "Tree"], &[]);
    for (code, _, err) in &runs {
        assert_eq!(*code, Some(0), "{err}");
    }
    let err0 = &runs[0].2;
    assert!(err0.contains("the nodes of this round differ"), "{err0}");
    let line = |err: &str, key: &str| {
        err.lines()
            .find(|l| l.trim_start().starts_with(key))
            .map(str::to_string)
    };
    let algo = line(err0, "NCCL_ALGO:").unwrap_or_else(|| panic!("{err0}"));
    assert!(
        algo.contains("Ring on node 0") && algo.contains("Tree on node 1"),
        "{algo}"
    );
    assert!(line(err0, "script digest:").is_some(), "{err0}");
    assert!(
        !runs[1].2.contains("differ"),
        "only node 0 prints it: {}",
        runs[1].2
    );
    // Fatal on every node with --require-same-nodes, before any worker.
    let runs = fingerprinted_pair([same, other], ["Ring", "Tree"], &["--require-same-nodes"]);
    for (code, out, err) in &runs {
        assert_eq!(*code, Some(1), "{err}");
        assert!(!out.contains("ran"), "a worker started: {out}");
        assert!(line(err, "NCCL_ALGO:").is_some(), "{err}");
        assert!(err.contains("--require-same-nodes"), "{err}");
    }
}

#[test]
fn with_a_standalone_store_killing_any_agent_lets_the_others_re_form() {
    // The store lives apart from the training nodes: the agent that would
    // have hosted it (the first) is as expendable as any other.
    let store = testkit::StoreProcess::start(&store_bin(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("127.0.0.1:{}", store.port);
    let conf = "last_call_timeout=1,is_host=false";
    let took = re_form_after_killing(dir.path(), 0, |n| {
        loop_agent(n, &endpoint, "standalone-store", conf, dir.path())
    });
    eprintln!("first agent killed, standalone store -> re-formed in {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}
