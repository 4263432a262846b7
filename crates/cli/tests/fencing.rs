//! Fault schedules between the ones each recovery feature was first proven
//! on: a node that comes back after it was evicted, and a survivor whose
//! workers fail because another node died. Real launchers on 127.0.0.x,
//! c10d, shell workers (`--no-python`) that record every start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{free_port, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

/// A worker that records `<node> <group rank> <world> <restart count>` at
/// its start, then runs until `stop` appears in `dir`; it exits 7 when
/// `crash.<node>` appears (and takes the file away), as a gloo or NCCL
/// worker does on a connection its peer reset. With `on-term.<node>` in
/// `dir`, a SIGTERM makes it create the file named there first (its peer's
/// crash file: the connection it closes).
const WORKER: &str = r#"
dir=$1; node=$2
echo "$node $GROUP_RANK $WORLD_SIZE $TORCHELASTIC_RESTART_COUNT" >> "$dir/starts"
if [ -e "$dir/on-term.$node" ]; then
  trap ': > "$(cat "$dir/on-term.$node")"; exit 143' TERM
fi
while [ ! -e "$dir/stop" ]; do
  if [ -e "$dir/crash.$node" ]; then rm -f "$dir/crash.$node"; exit 7; fi
  sleep 0.01
done
"#;

fn worker(dir: &Path) -> PathBuf {
    let w = dir.join("worker.sh");
    std::fs::write(&w, WORKER).unwrap();
    w
}

const WINDOW_3S: &str =
    "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=120";

fn agent(n: u8, port: u16, run_id: &str, dir: &Path, extra: &[&str]) -> Child {
    agent_with(n, port, run_id, dir, WINDOW_3S, "0.1", extra)
}

fn agent_with(
    n: u8,
    port: u16,
    run_id: &str,
    dir: &Path,
    conf: &str,
    monitor_interval: &str,
    extra: &[&str],
) -> Child {
    Command::new(BIN)
        .args([
            "--nnodes=2:3",
            "--nproc-per-node=1",
            "--max-restarts=3",
            "--rdzv-backend=c10d",
            &format!("--rdzv-endpoint=127.0.0.2:{port}"),
            &format!("--rdzv-id={run_id}"),
            &format!("--local-addr=127.0.0.{n}"),
            &format!("--rdzv-conf={conf}"),
            &format!(
                "--events-file={}",
                dir.join(format!("events.{n}")).display()
            ),
            &format!("--monitor-interval={monitor_interval}"),
            "--no-python",
        ])
        .args(extra)
        .arg("/bin/sh")
        .arg(worker(dir))
        .arg(dir)
        .arg(n.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Every worker start so far: (node, group rank, world size, restarts).
fn starts(dir: &Path) -> Vec<(u8, u32, u32, u32)> {
    std::fs::read_to_string(dir.join("starts"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<u32> = l.split(' ').filter_map(|x| x.parse().ok()).collect();
            (f.len() == 4).then(|| (f[0] as u8, f[1], f[2], f[3]))
        })
        .collect()
}

/// The latest start of each of `nodes`, once each of them started after
/// `after` starts in all and they form one complete world of their number.
fn one_world(dir: &Path, nodes: &[u8], after: usize) -> Option<Vec<(u8, u32, u32, u32)>> {
    let all = starts(dir);
    let new = all.get(after..)?;
    let mut last = Vec::new();
    for n in nodes {
        last.push(*new.iter().rev().find(|s| s.0 == *n)?);
    }
    let world = nodes.len() as u32;
    let mut ranks: Vec<u32> = last.iter().map(|s| s.1).collect();
    ranks.sort_unstable();
    (last.iter().all(|s| s.2 == world) && ranks == (0..world).collect::<Vec<_>>()).then_some(last)
}

fn signal(pids: &[i32], sig: i32) {
    for &pid in pids {
        // SAFETY: a plain system call on processes this test started.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The PIDs of `agent`'s processes: itself and its descendants.
fn tree(agent: u32) -> Vec<i32> {
    let mut out = vec![agent as i32];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        if let Ok(children) =
            std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
        {
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        i += 1;
    }
    out
}

fn stop_all(dir: &Path, agents: Vec<Child>) -> Vec<(Option<i32>, String)> {
    std::fs::write(dir.join("stop"), b"").unwrap();
    agents
        .into_iter()
        .map(|mut a| {
            let mut err = String::new();
            let _ = a
                .stderr
                .take()
                .map(|mut e| std::io::Read::read_to_string(&mut e, &mut err));
            (a.wait().unwrap().code(), err)
        })
        .collect()
}

#[test]
fn a_node_frozen_past_the_window_comes_back_as_a_new_node_and_the_job_goes_on() {
    // One node's launcher and worker stop (SIGSTOP) for 7 s with a 3 s
    // heartbeat window: a GC pause, an NFS stall, a VM migration. The others
    // evict it and run on as two; when it resumes it learns it was evicted,
    // stops its stale workers and joins again as a newcomer: the job grows
    // back to three. Nobody else fails, nobody runs a rank twice.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = agent(2, port, "fenced", d, &[]);
    let b = agent(3, port, "fenced", d, &[]);
    let c = agent(4, port, "fenced", d, &[]);
    wait_for(Duration::from_secs(60), "a world of 3", || {
        one_world(d, &[2, 3, 4], 0)
    });
    let frozen = tree(c.id());
    let before = starts(d).len();
    signal(&frozen, libc::SIGSTOP);
    wait_for(
        Duration::from_secs(30),
        "the survivors in a world of 2",
        || one_world(d, &[2, 3], before),
    );
    // Frozen 7 s in all (past the window: evicted).
    let evicted_at = starts(d).len();
    std::thread::sleep(Duration::from_secs(4));
    let resumed = Instant::now();
    signal(&frozen, libc::SIGCONT);
    let world = wait_for(Duration::from_secs(30), "a world of 3 again", || {
        one_world(d, &[2, 3, 4], evicted_at)
    });
    let took = resumed.elapsed();
    // The world of 3 holds: no storm of evictions after it.
    std::thread::sleep(Duration::from_secs(3));
    let all = starts(d);
    let codes = stop_all(d, vec![a, b, c]);
    for (code, err) in &codes {
        assert_eq!(*code, Some(0), "a launcher failed:\n{err}\nstarts: {all:?}");
    }
    assert_eq!(
        all.len(),
        evicted_at + 3,
        "the world of 3 re-formed more than once: {all:?}"
    );
    // No restart was used: an eviction and a newcomer are membership changes.
    assert!(world.iter().all(|s| s.3 == 0), "{world:?}");
    let events = std::fs::read_to_string(d.join("events.4")).unwrap();
    assert!(events.contains("node_evicted"), "{events}");
    eprintln!("a returning node is running in the world of 3 {took:?} after it resumed");
    // The window (3 s), plus a round's last call and a busy machine.
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_survivor_whose_workers_fail_after_a_peers_death_is_not_blamed() {
    // --max-node-failures=1: the node whose launcher and workers are killed
    // is the cause; a survivor whose worker exits 7 right after (as a gloo
    // or NCCL worker does on a reset connection) is not excluded for it.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let limit = ["--max-node-failures=1"];
    let a = agent(2, port, "blame", d, &limit);
    let b = agent(3, port, "blame", d, &limit);
    let c = agent(4, port, "blame", d, &limit);
    wait_for(Duration::from_secs(60), "a world of 3", || {
        one_world(d, &[2, 3, 4], 0)
    });
    let before = starts(d).len();
    // Node 4 is killed whole; node 3's worker fails right after.
    let victim = tree(c.id());
    signal(&victim, libc::SIGKILL);
    std::fs::write(d.join("crash.3"), b"").unwrap();
    let mut c = c;
    let _ = c.wait();
    wait_for(
        Duration::from_secs(60),
        "the survivors in a world of 2",
        || one_world(d, &[2, 3], before),
    );
    let all = starts(d);
    let codes = stop_all(d, vec![a, b]);
    for (code, err) in &codes {
        assert_eq!(*code, Some(0), "a survivor failed:\n{err}\nstarts: {all:?}");
        assert!(!err.contains("this node is excluded"), "{err}");
        assert!(!err.contains("host 127.0.0.3 is excluded"), "{err}");
    }
    // The dead node's host is the cause, and is counted.
    let (_, err) = &codes[0];
    assert!(err.contains("host 127.0.0.4 is excluded"), "{err}");
}

/// The timestamps (ms) of `event` in node `n`'s events file.
fn event_times(dir: &Path, n: u8, event: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join(format!("events.{n}")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == event)
        .filter_map(|e| e["ts"].as_f64())
        .collect()
}

#[test]
fn a_worker_failure_reaches_the_other_nodes_through_the_store_not_their_poll() {
    // Default heartbeats (5 s) and a 5 s monitor interval: the others poll
    // their membership every 2.5 s. The store wakes them instead.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let conf = "last_call_timeout=1,join_timeout=120";
    let agents: Vec<Child> = (2..5)
        .map(|n| agent_with(n, port, "wake", d, conf, "5", &[]))
        .collect();
    wait_for(Duration::from_secs(60), "a world of 3", || {
        one_world(d, &[2, 3, 4], 0)
    });
    let before = starts(d).len();
    std::fs::write(d.join("crash.3"), b"").unwrap();
    wait_for(Duration::from_secs(60), "a world of 3 again", || {
        one_world(d, &[2, 3, 4], before)
    });
    let codes = stop_all(d, agents);
    for (code, err) in &codes {
        assert_eq!(*code, Some(0), "{err}");
    }
    let failed_at = event_times(d, 3, "worker_exited")[0];
    for n in [2, 4] {
        let stopping = event_times(d, n, "group_stopping")[0];
        let after = stopping - failed_at;
        eprintln!("node {n} stopped its workers {after:.1} ms after the failure on node 3");
        // Well under the 2.5 s poll, with room for a busy machine.
        assert!(after < 1000.0, "node {n}: {after:.1} ms");
    }
}

#[test]
fn an_evicted_node_whose_stale_worker_failed_does_not_end_the_job() {
    // --max-restarts=0: node 4's launcher alone stalls past the window (its
    // worker goes on) and its worker fails meanwhile. That failure belongs
    // to a round that went on without node 4: the others run on.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let none = ["--max-restarts=0"];
    let a = agent(2, port, "stale-failure", d, &none);
    let b = agent(3, port, "stale-failure", d, &none);
    let mut c = agent(4, port, "stale-failure", d, &none);
    wait_for(Duration::from_secs(60), "a world of 3", || {
        one_world(d, &[2, 3, 4], 0)
    });
    let before = starts(d).len();
    signal(&[c.id() as i32], libc::SIGSTOP);
    wait_for(
        Duration::from_secs(30),
        "the survivors in a world of 2",
        || one_world(d, &[2, 3], before),
    );
    std::fs::write(d.join("crash.4"), b"").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    signal(&[c.id() as i32], libc::SIGCONT);
    let code = c.wait().unwrap().code();
    assert_eq!(code, Some(7), "node 4 ends with its own worker's failure");
    // The others were not told to stop: they still run as two.
    std::thread::sleep(Duration::from_secs(1));
    let codes = stop_all(d, vec![a, b]);
    for (code, err) in &codes {
        assert_eq!(*code, Some(0), "{err}");
        assert!(!err.contains("restarts are spent"), "{err}");
    }
}

#[test]
fn a_survivor_whose_workers_fail_after_a_peer_is_preempted_is_not_blamed() {
    // --max-node-failures=1: node 4 is stopped by SIGTERM (a preemption: it
    // leaves for good) and node 3's worker fails right after, on the
    // connection node 4's worker closed. Nobody is at fault.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let limit = ["--max-node-failures=1"];
    std::fs::write(d.join("on-term.4"), d.join("crash.3").to_str().unwrap()).unwrap();
    let a = agent(2, port, "preempted", d, &limit);
    let b = agent(3, port, "preempted", d, &limit);
    let mut c = agent(4, port, "preempted", d, &limit);
    wait_for(Duration::from_secs(60), "a world of 3", || {
        one_world(d, &[2, 3, 4], 0)
    });
    let before = starts(d).len();
    signal(&[c.id() as i32], libc::SIGTERM);
    assert_eq!(c.wait().unwrap().code(), Some(143));
    wait_for(
        Duration::from_secs(60),
        "the survivors in a world of 2",
        || one_world(d, &[2, 3], before),
    );
    let codes = stop_all(d, vec![a, b]);
    for (code, err) in &codes {
        assert_eq!(*code, Some(0), "{err}");
        assert!(!err.contains("excluded"), "{err}");
    }
    // Node 3's worker did fail in the round node 4 left.
    let failed = std::fs::read_to_string(d.join("events.3")).unwrap();
    assert!(
        failed.contains("\"exit_code\": 7"),
        "node 3's worker never failed: {failed}"
    );
}

#[test]
fn the_host_serving_the_store_is_never_excluded_and_the_job_goes_on() {
    // --max-node-failures=1 and the failing node is the one whose launcher
    // serves the rendezvous store (127.0.0.2, the endpoint): excluding it
    // would take the store, and the job, with it.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let limit = ["--max-node-failures=1"];
    let agents: Vec<Child> = (2..5)
        .map(|n| agent(n, port, "store-host", d, &limit))
        .collect();
    wait_for(Duration::from_secs(60), "a world of 3", || {
        one_world(d, &[2, 3, 4], 0)
    });
    let before = starts(d).len();
    std::fs::write(d.join("crash.2"), b"").unwrap();
    wait_for(Duration::from_secs(60), "a world of 3 again", || {
        one_world(d, &[2, 3, 4], before)
    });
    let codes = stop_all(d, agents);
    for (code, err) in &codes {
        assert_eq!(*code, Some(0), "{err}");
    }
}
