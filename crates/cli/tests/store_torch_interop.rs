//! Interop with real PyTorch (CPU): torch's client against our server, our
//! client against torch's server, and a gloo process group bootstrapped through
//! our server exactly as torchrun's agent store is used.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tcpstore::{Client, ClientError, ConnectOptions};

fn python_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tcpstore/tests/python")
        .join(name)
}

/// Our standalone store binary on a kernel-chosen port.
fn our_store() -> testkit::StoreProcess {
    testkit::StoreProcess::start(env!("CARGO_BIN_EXE_torchrun-rs-store"), &[])
}

#[test]
fn torch_client_drives_our_server() {
    let store = our_store();
    let out = Command::new(testkit::torch_python())
        .arg(python_fixture("store_ops.py"))
        .args(["127.0.0.1", &store.port.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "store_ops.py against our server failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn torch_client_over_ipv6_loopback() {
    let store = our_store();
    let out = Command::new(testkit::torch_python())
        .args(["-c", "import sys, torch.distributed as d; s=d.TCPStore('::1', int(sys.argv[1]), is_master=False); s.set('x','y'); print(s.get('x').decode())"])
        .arg(store.port.to_string())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "y",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn our_client_drives_torch_server() {
    let mut server = Command::new(testkit::torch_python())
        .arg(python_fixture("torch_server.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().expect("torch server printed its port");

    let opts = ConnectOptions {
        timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    };
    let mut c = Client::connect("127.0.0.1", port, opts).await.unwrap();
    let mut d = Client::connect("localhost", port, opts).await.unwrap();

    c.set("k1", b"v1").await.unwrap();
    assert_eq!(d.get("k1").await.unwrap(), b"v1");
    assert_eq!(c.add("cnt", 5).await.unwrap(), 5);
    assert_eq!(c.add("cnt", -2).await.unwrap(), 3);
    assert_eq!(c.get("cnt").await.unwrap(), b"3");
    assert_eq!(c.compare_set("k1", b"v1", b"v2").await.unwrap(), b"v2");
    assert_eq!(c.compare_set("absent", b"x", b"y").await.unwrap(), b"x");
    assert!(!c.check(&["absent"]).await.unwrap());
    assert!(c.check(&["k1", "cnt"]).await.unwrap());
    let err = c
        .wait(&["never"], Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::WaitTimeout { .. }), "{err}");
    assert_eq!(
        c.get("k1").await.unwrap(),
        b"v2",
        "usable after a cancelled wait"
    );
    assert_eq!(c.num_keys().await.unwrap(), 2);
    assert!(c.delete_key("k1").await.unwrap());
    assert!(!c.delete_key("k1").await.unwrap());
    c.append("a", b"x").await.unwrap();
    c.append("a", b"yz").await.unwrap();
    assert_eq!(c.get("a").await.unwrap(), b"xyz");
    c.multi_set(&[("m1", b"A"), ("m2", b"BB")]).await.unwrap();
    assert_eq!(
        c.multi_get(&["m1", "m2"]).await.unwrap(),
        vec![b"A".to_vec(), b"BB".to_vec()]
    );
    c.queue_push("q", b"one").await.unwrap();
    assert_eq!(c.queue_len("q").await.unwrap(), 1);
    assert_eq!(d.queue_pop("q", true).await.unwrap(), b"one");
    assert!(matches!(
        c.queue_pop("q", false).await,
        Err(ClientError::QueueEmpty)
    ));
    let mut keys = c.list_keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, vec!["a", "cnt", "m1", "m2"]);
    assert_eq!(c.ping(77).await.unwrap(), 77);

    // A wait released by the other client's write.
    let waiter =
        tokio::spawn(async move { c.wait(&["late"], Duration::from_secs(20)).await.map(|_| c) });
    d.set("late", b"1").await.unwrap();
    waiter.await.unwrap().unwrap();

    drop(server.stdin.take());
    server.wait().unwrap();
}

#[tokio::test]
async fn our_client_connect_gives_up_at_its_deadline() {
    // A port nobody listens on: bind, read the port, close.
    let port = testkit::free_port();
    let opts = ConnectOptions {
        timeout: Duration::from_millis(600),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    };
    let err = Client::connect("127.0.0.1", port, opts)
        .await
        .err()
        .expect("no server");
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&port.to_string()));
}

#[test]
fn gloo_process_group_bootstraps_through_our_server() {
    let store = our_store();
    let world = 2;
    let workers: Vec<Child> = (0..world)
        .map(|rank| {
            Command::new(testkit::torch_python())
                .arg(python_fixture("gloo_allreduce.py"))
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", store.port.to_string())
                .env("TORCHELASTIC_USE_AGENT_STORE", "True")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, w) in workers.into_iter().enumerate() {
        let out = w.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "rank {rank} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("rank {rank} sum 3")
        );
    }
    // The workers used our store: the gloo bootstrap keys are there.
    let mut probe = std::net::TcpStream::connect(("127.0.0.1", store.port)).unwrap();
    probe.write_all(&[0, 0xce, 0xf7, 0x85, 0x3c, 7]).unwrap();
    let mut n = [0u8; 8];
    std::io::Read::read_exact(&mut probe, &mut n).unwrap();
    assert!(i64::from_le_bytes(n) >= 2, "no keys written by the workers");
}

#[tokio::test]
async fn a_port_that_is_not_a_store_is_a_clear_error_not_a_hang() {
    // Something that accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let opts = ConnectOptions {
        timeout: Duration::from_secs(1),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    };
    let err = Client::connect("127.0.0.1", port, opts)
        .await
        .err()
        .expect("not a store");
    assert!(err.to_string().contains("handshake"), "{err}");
    drop(listener);
}

#[tokio::test]
async fn a_port_that_answers_otherwise_is_named_at_once() {
    // An HTTP server, say: it answers the handshake with its own protocol.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = c.read(&mut buf);
        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let opts = ConnectOptions {
        timeout: Duration::from_secs(60),
        ..ConnectOptions::default()
    };
    let t0 = std::time::Instant::now();
    let err = Client::connect("127.0.0.1", port, opts)
        .await
        .err()
        .expect("not a store");
    // No retrying for a minute: the first answer settles it.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(
        err.to_string(),
        format!("127.0.0.1:{port} is not a TCPStore: it answered the handshake with \"HTTP\"")
    );
    server.join().unwrap();
}
