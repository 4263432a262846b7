//! The client is safe to cancel and bounded in time: a request whose future
//! is dropped midway, or that times out, never leaves a reply behind for the
//! next request to read, and a store that stops answering fails a request
//! after the request timeout.

use std::time::{Duration, Instant};

use tcpstore::{BindAddr, Client, ClientError, ConnectOptions, Server};

async fn client(port: u16) -> Client {
    Client::connect("127.0.0.1", port, ConnectOptions::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_wait_dropped_midway_does_not_corrupt_the_next_request() {
    let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
    let mut a = client(server.port()).await;
    let mut b = client(server.port()).await;
    b.add("version", 5).await.unwrap();
    // A wait whose future is dropped (a select! took another branch).
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        a.wait(&["k"], Duration::from_secs(10)),
    )
    .await;
    assert!(dropped.is_err(), "the wait was still waiting");
    // The key arrives: the server releases the old wait with STOP_WAITING.
    b.set("k", b"v").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(a.add("version", 0).await.unwrap(), 5);
    assert_eq!(a.get_now("k").await.unwrap(), b"v");
    server.shutdown().await;
}

#[tokio::test]
async fn a_read_dropped_before_its_reply_does_not_answer_the_next_request() {
    let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
    let mut a = client(server.port()).await;
    a.set("big", &vec![7u8; 8 << 20]).await.unwrap();
    a.add("n", 3).await.unwrap();
    // Dropped as soon as it is first polled: the request is sent, the 8 MiB
    // reply is not read.
    let dropped = tokio::time::timeout(Duration::from_micros(1), a.get_now("big")).await;
    assert!(dropped.is_err());
    assert_eq!(a.add("n", 0).await.unwrap(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn a_store_that_stops_answering_fails_a_request_after_the_request_timeout() {
    // A peer that answers the handshake, then nothing (a frozen host).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut held = Vec::new();
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 64];
            let _ = s.read(&mut hello).await;
            let _ = s.write_all(&std::process::id().to_le_bytes()).await;
            held.push(s);
        }
    });
    let mut c = client(port).await;
    c.set_request_timeout(Duration::from_millis(300));
    let t0 = Instant::now();
    let r = c.add("version", 0).await;
    assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // The next request opens a fresh connection, and fails in time too.
    let t0 = Instant::now();
    assert!(c.get_now("k").await.is_err());
    assert!(t0.elapsed() < Duration::from_secs(3));
    frozen.abort();
}

#[tokio::test]
async fn an_idle_connection_to_a_store_that_restarted_is_replaced_before_a_request() {
    let first = Server::bind(BindAddr::Any(0)).unwrap().spawn();
    let port = first.port();
    let mut c = client(port).await;
    c.set("k", b"v").await.unwrap();
    // The store's host restarts while the client is idle.
    first.shutdown().await;
    let second = Server::bind(BindAddr::Any(port)).unwrap().spawn();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The first request after it goes to the new store, not into the dead
    // connection.
    assert_eq!(c.add("n", 1).await.unwrap(), 1);
    assert_eq!(c.get_now("k").await.unwrap(), b"");
    second.shutdown().await;
}
