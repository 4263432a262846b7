//! Load generator for a TCPStore server (ours or torch's), speaking the wire
//! protocol directly so both servers see identical traffic.
//!
//! store-load mix HOST PORT CONNS SECONDS PID [ROUNDS]
//!                                         -> prints ops/s and the server's CPU µs
//!                                            per op, the median of ROUNDS rounds
//! store-load fanout HOST PORT WAITERS      -> prints ms from SET to the last waiter released
//! store-load idle HOST PORT CONNS PID      -> prints server RSS bytes per idle connection
//! store-load storm HOST PORT CLIENTS SECS   -> `ms errors`: CLIENTS connect at once and run
//!                                            init_process_group's store pattern; ms from the
//!                                            first connect to the last release, and how many
//!                                            connects were refused or reset (then retried);
//!                                            `timeout` if not done within SECS

use std::time::{Duration, Instant};

use tcpstore::codec::{self, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(host: &str, port: u16) -> TcpStream {
    let mut s = TcpStream::connect((host, port)).await.expect("connect");
    s.set_nodelay(true).unwrap();
    let mut hello = vec![];
    codec::encode(
        &Request::Validate {
            magic: codec::VALIDATE_MAGIC,
        },
        &mut hello,
    );
    codec::encode(&Request::Ping { nonce: 1 }, &mut hello);
    s.write_all(&hello).await.unwrap();
    assert_eq!(s.read_u32_le().await.unwrap(), 1);
    s
}

async fn mix_worker(mut s: TcpStream, id: usize, until: Instant) -> (TcpStream, u64) {
    let key = format!("/k{}", id % 64).into_bytes();
    let counter = format!("/c{}", id % 64).into_bytes();
    let mut buf = vec![];
    let mut ops = 0u64;
    let mut reply = [0u8; 64];
    while Instant::now() < until {
        for op in 0..3 {
            buf.clear();
            match op {
                0 => codec::encode(
                    &Request::Set {
                        key: &key,
                        value: b"some-value-0123456789",
                    },
                    &mut buf,
                ),
                1 => codec::encode(&Request::Get { key: &key }, &mut buf),
                _ => codec::encode(
                    &Request::Add {
                        key: &counter,
                        delta: 1,
                    },
                    &mut buf,
                ),
            }
            s.write_all(&buf).await.unwrap();
            match op {
                0 => {}
                1 => {
                    let n = s.read_u64_le().await.unwrap() as usize;
                    s.read_exact(&mut reply[..n]).await.unwrap();
                }
                _ => {
                    s.read_i64_le().await.unwrap();
                }
            }
            ops += 1;
        }
    }
    // SET has no reply: a PING makes sure the server processed everything.
    buf.clear();
    codec::encode(&Request::Ping { nonce: 9 }, &mut buf);
    s.write_all(&buf).await.unwrap();
    s.read_u32_le().await.unwrap();
    (s, ops)
}

/// What a rank does with the `env://` store during `init_process_group`:
/// connect, validate, count itself in, publish its key, wait for the last
/// one to open the barrier, read a few keys. A refused or reset connect is
/// counted and retried, as torch's client retries.
async fn storm_client(
    host: &str,
    port: u16,
    i: usize,
    n: usize,
    errors: &std::sync::atomic::AtomicUsize,
) {
    let mut s = loop {
        match TcpStream::connect((host, port)).await {
            Ok(s) => break s,
            Err(_) => {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    s.set_nodelay(true).unwrap();
    let mut buf = vec![];
    codec::encode(
        &Request::Validate {
            magic: codec::VALIDATE_MAGIC,
        },
        &mut buf,
    );
    codec::encode(
        &Request::Add {
            key: b"init/",
            delta: 1,
        },
        &mut buf,
    );
    let me = format!("/rank/{i}");
    codec::encode(
        &Request::Set {
            key: me.as_bytes(),
            value: b"addr:port",
        },
        &mut buf,
    );
    if s.write_all(&buf).await.is_err() {
        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Box::pin(storm_client(host, port, i, n, errors)).await;
    }
    let count = match s.read_i64_le().await {
        Ok(c) => c,
        Err(_) => {
            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Box::pin(storm_client(host, port, i, n, errors)).await;
        }
    };
    buf.clear();
    if count as usize == n {
        codec::encode(
            &Request::Set {
                key: b"/barrier",
                value: b"1",
            },
            &mut buf,
        );
    }
    codec::encode_keys(codec::code::WAIT, &[b"/barrier"], &mut buf);
    s.write_all(&buf).await.unwrap();
    assert_eq!(s.read_u8().await.unwrap(), codec::STOP_WAITING);
    for key in [
        b"/rank/0".to_vec(),
        format!("/rank/{}", (i + 1) % n).into_bytes(),
    ] {
        buf.clear();
        codec::encode(&Request::Get { key: &key }, &mut buf);
        s.write_all(&buf).await.unwrap();
        let len = s.read_u64_le().await.unwrap() as usize;
        let mut v = vec![0u8; len];
        s.read_exact(&mut v).await.unwrap();
    }
}

/// User + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from the pid as field 1.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let host = args[2].clone();
    let port: u16 = args[3].parse().unwrap();
    match args[1].as_str() {
        "mix" => {
            let conns: usize = args[4].parse().unwrap();
            let secs: f64 = args[5].parse().unwrap();
            // Connections are opened first, concurrently, and not timed.
            let opening: Vec<_> = (0..conns)
                .map(|_| {
                    let host = host.clone();
                    tokio::spawn(async move { connect(&host, port).await })
                })
                .collect();
            let mut streams = Vec::with_capacity(conns);
            for o in opening {
                streams.push(o.await.unwrap());
            }
            let pid: u32 = args[6].parse().unwrap();
            // Timed rounds over the same connections (torch's server takes
            // minutes to accept 1,000); the median round is printed, since
            // single runs on two shared cores vary by 15 %.
            let rounds: usize = args.get(7).map_or(1, |r| r.parse().unwrap());
            let mut results = vec![];
            for _ in 0..rounds {
                let cpu_before = cpu_seconds(pid);
                let start = Instant::now();
                let until = start + Duration::from_secs_f64(secs);
                let tasks: Vec<_> = streams
                    .drain(..)
                    .enumerate()
                    .map(|(i, s)| tokio::spawn(mix_worker(s, i, until)))
                    .collect();
                let mut total = 0;
                for t in tasks {
                    let (s, ops) = t.await.unwrap();
                    streams.push(s);
                    total += ops;
                }
                let elapsed = start.elapsed().as_secs_f64();
                let cpu = cpu_seconds(pid) - cpu_before;
                results.push((total as f64 / elapsed, cpu * 1e6 / total as f64));
            }
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "{:.0} {:.2}",
                median(results.iter().map(|r| r.0).collect()),
                median(results.iter().map(|r| r.1).collect())
            );
        }
        "fanout" => {
            let n: usize = args[4].parse().unwrap();
            // Waiters connect once, concurrently (torch's server accepts
            // slowly); then 5 rounds, each on its own key; the median is printed.
            let opening: Vec<_> = (0..n)
                .map(|_| {
                    let host = host.clone();
                    tokio::spawn(async move { connect(&host, port).await })
                })
                .collect();
            let mut waiters = Vec::with_capacity(n);
            for o in opening {
                waiters.push(o.await.unwrap());
            }
            let mut setter = connect(&host, port).await;
            let mut times = Vec::new();
            for round in 0..5 {
                let key = format!("/fan{}-{round}", std::process::id()).into_bytes();
                let mut buf = vec![];
                codec::encode_keys(codec::code::WAIT, &[&key], &mut buf);
                for w in waiters.iter_mut() {
                    w.write_all(&buf).await.unwrap();
                }
                // Every WAIT must be registered before the SET: a server gives
                // no way to observe that, so the generator pauses.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let tasks: Vec<_> = waiters
                    .drain(..)
                    .map(|mut s| {
                        tokio::spawn(async move {
                            s.read_u8().await.unwrap();
                            (s, Instant::now())
                        })
                    })
                    .collect();
                tokio::task::yield_now().await;
                buf.clear();
                codec::encode(
                    &Request::Set {
                        key: &key,
                        value: b"go",
                    },
                    &mut buf,
                );
                let t0 = Instant::now();
                setter.write_all(&buf).await.unwrap();
                let mut last = t0;
                for t in tasks {
                    let (s, at) = t.await.unwrap();
                    last = last.max(at);
                    waiters.push(s);
                }
                times.push((last - t0).as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            println!("{:.2}", times[times.len() / 2]);
        }
        "idle" => {
            let n: usize = args[4].parse().unwrap();
            let pid: u32 = args[5].parse().unwrap();
            let mut warm = vec![];
            for _ in 0..16 {
                warm.push(connect(&host, port).await);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let before = rss_bytes(pid);
            let opening: Vec<_> = (0..n)
                .map(|_| {
                    let host = host.clone();
                    tokio::spawn(async move { connect(&host, port).await })
                })
                .collect();
            let mut conns = Vec::with_capacity(n);
            for o in opening {
                conns.push(o.await.unwrap());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = rss_bytes(pid);
            println!("{}", after.saturating_sub(before) / n as u64);
            drop(conns);
        }
        "storm" => {
            let n: usize = args[4].parse().unwrap();
            let limit = Duration::from_secs(args[5].parse().unwrap());
            let errors = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let t0 = Instant::now();
            let clients: Vec<_> = (0..n)
                .map(|i| {
                    let (host, errors) = (host.clone(), errors.clone());
                    tokio::spawn(async move { storm_client(&host, port, i, n, &errors).await })
                })
                .collect();
            let all = async {
                for c in clients {
                    c.await.unwrap();
                }
            };
            match tokio::time::timeout(limit, all).await {
                Ok(()) => println!(
                    "{:.0} {}",
                    t0.elapsed().as_secs_f64() * 1e3,
                    errors.load(std::sync::atomic::Ordering::Relaxed)
                ),
                Err(_) => println!(
                    "timeout {}",
                    errors.load(std::sync::atomic::Ordering::Relaxed)
                ),
            }
            std::process::exit(0);
        }
        other => panic!("unknown mode {other}"),
    }
}
