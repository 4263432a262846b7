//! 10,000 idle connections against the standalone server: it keeps serving,
//! and its memory stays bounded (a guard against per-connection buffers
//! being kept; the benchmark measures the real figure).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn ping(s: &mut TcpStream, nonce: u32) {
    let mut req = vec![13u8];
    req.extend_from_slice(&nonce.to_le_bytes());
    s.write_all(&req).unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), nonce);
}

#[test]
fn ten_thousand_idle_connections() {
    testkit::raise_fd_limit();
    let store = testkit::StoreProcess::start(
        env!("CARGO_BIN_EXE_torchrun-rs-store"),
        &["--host", "127.0.0.1"],
    );
    let (port, pid) = (store.port, store.pid());

    let mut probe = TcpStream::connect(("127.0.0.1", port)).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    probe.write_all(&[0, 0xce, 0xf7, 0x85, 0x3c]).unwrap();
    ping(&mut probe, 1);
    let before = rss_kib(pid);

    let n = 10_000;
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // Half validate, half say nothing at all.
        if i % 2 == 0 {
            s.write_all(&[0, 0xce, 0xf7, 0x85, 0x3c]).unwrap();
        }
        idle.push(s);
    }
    // The server is still responsive with all of them open...
    ping(&mut probe, 2);
    // ...and has accepted them all: a fresh client is served after them.
    let mut late = TcpStream::connect(("127.0.0.1", port)).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    late.write_all(&[0, 0xce, 0xf7, 0x85, 0x3c]).unwrap();
    ping(&mut late, 3);
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown * 1024 / n as u64 <= 16 * 1024,
        "{grown} KiB for {n} idle connections"
    );
    drop(idle);
    ping(&mut probe, 4);
}

/// A connect storm: 4,000 clients at once (as the ranks of a large job at
/// init_process_group), every one accepted and served, none refused or
/// reset (the listen backlog is the system's maximum and the accept loop
/// drains it).
#[test]
fn four_thousand_clients_connecting_at_once_are_all_served() {
    testkit::raise_fd_limit();
    let store = testkit::StoreProcess::start(
        env!("CARGO_BIN_EXE_torchrun-rs-store"),
        &["--host", "127.0.0.1"],
    );
    let port = store.port;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let failures: Vec<String> = rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let clients: Vec<_> = (0..4000u32)
            .map(|i| {
                tokio::spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .map_err(|e| format!("connect {i}: {e}"))?;
                    let mut req = vec![0, 0xce, 0xf7, 0x85, 0x3c, 13];
                    req.extend_from_slice(&i.to_le_bytes());
                    s.write_all(&req)
                        .await
                        .map_err(|e| format!("write {i}: {e}"))?;
                    let n = s
                        .read_u32_le()
                        .await
                        .map_err(|e| format!("read {i}: {e}"))?;
                    if n != i {
                        return Err(format!("client {i} got {n}"));
                    }
                    Ok::<_, String>(s)
                })
            })
            .collect();
        let mut failures = Vec::new();
        let mut open = Vec::new();
        for c in clients {
            match c.await.unwrap() {
                Ok(s) => open.push(s),
                Err(e) => failures.push(e),
            }
        }
        drop(open);
        failures
    });
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}
