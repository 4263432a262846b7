//! Raw-bytes tests over real TCP: each command as torch's client sends it
//! (the captures of spec §9.5), and the server's answers byte for byte.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tcpstore::{BindAddr, Limits, Server};

struct Running {
    _rt: tokio::runtime::Runtime,
    port: u16,
}

fn start_with(limits: Limits) -> Running {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let port = rt.block_on(async {
        let server = Server::bind_with_limits(BindAddr::Any(0), limits).unwrap();
        let port = server.local_addr().port();
        std::mem::forget(server.spawn());
        port
    });
    Running { _rt: rt, port }
}

fn start() -> Running {
    start_with(Limits::default())
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A validated raw connection (the `connect` capture: VALIDATE + PING).
fn connect(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hex("00 cef7853c 0d 9e280000")).unwrap();
    assert_eq!(read_n(&mut s, 4), hex("9e280000"));
    s
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    s.read_exact(&mut v).unwrap();
    v
}

fn exchange(s: &mut TcpStream, req: &str, reply: &str) {
    s.write_all(&hex(req)).unwrap();
    let want = hex(reply);
    assert_eq!(read_n(s, want.len()), want, "reply to {req}");
}

/// The server closed the connection (EOF or reset) without answering.
fn assert_closed(s: &mut TcpStream) {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(_) => panic!("server answered instead of closing"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "unexpected error {e}"
        ),
    }
}

#[test]
fn set_get_add_captures() {
    let srv = start();
    let mut s = connect(srv.port);
    s.write_all(&hex("01 0300000000000000 2f6b31 0200000000000000 7631"))
        .unwrap();
    exchange(&mut s, "06 0100000000000000 0300000000000000 2f6b31", "00");
    exchange(
        &mut s,
        "03 0300000000000000 2f6b31",
        "0200000000000000 7631",
    );
    exchange(
        &mut s,
        "04 0400000000000000 2f636e74 0500000000000000",
        "0500000000000000",
    );
    exchange(
        &mut s,
        "04 0400000000000000 2f636e74 feffffffffffffff",
        "0300000000000000",
    );
    // The counter is stored as decimal text.
    exchange(
        &mut s,
        "03 0400000000000000 2f636e74",
        "0100000000000000 33",
    );
    // GET of a missing key answers an empty value (torch's libuv server).
    exchange(&mut s, "03 0200000000000000 2f7a", "0000000000000000");
}

#[test]
fn compare_set_captures() {
    let srv = start();
    let mut s = connect(srv.port);
    s.write_all(&hex("01 0300000000000000 2f6b31 0200000000000000 7631"))
        .unwrap();
    exchange(
        &mut s,
        "02 0300000000000000 2f6b31 0200000000000000 7631 0200000000000000 7632",
        "0200000000000000 7632",
    );
    // Missing key, non-empty expected: returns expected, stores nothing.
    exchange(
        &mut s,
        "02 0700000000000000 2f616273656e74 0100000000000000 78 0100000000000000 79",
        "0100000000000000 78",
    );
    exchange(
        &mut s,
        "05 0100000000000000 0700000000000000 2f616273656e74",
        "01",
    );
    // Missing key, empty expected: stores desired.
    exchange(
        &mut s,
        "02 0700000000000000 2f616273656e74 0000000000000000 0100000000000000 79",
        "0100000000000000 79",
    );
}

#[test]
fn check_numkeys_delete_append_captures() {
    let srv = start();
    let mut s = connect(srv.port);
    exchange(
        &mut s,
        "05 0100000000000000 0500000000000000 2f6e6f7065",
        "01",
    );
    s.write_all(&hex("01 0300000000000000 2f6b31 0200000000000000 7631"))
        .unwrap();
    s.write_all(&hex("09 0200000000000000 2f61 0100000000000000 78"))
        .unwrap();
    s.write_all(&hex("09 0200000000000000 2f61 0100000000000000 79"))
        .unwrap();
    exchange(&mut s, "03 0200000000000000 2f61", "0200000000000000 7879");
    exchange(&mut s, "07", "0200000000000000");
    exchange(&mut s, "08 0300000000000000 2f6b31", "0100000000000000");
    exchange(&mut s, "08 0300000000000000 2f6b31", "0000000000000000");
    exchange(&mut s, "07", "0100000000000000");
}

#[test]
fn multi_set_multi_get_list_keys_captures() {
    let srv = start();
    let mut s = connect(srv.port);
    s.write_all(&hex(
        "0b 0200000000000000 0300000000000000 2f6d31 0100000000000000 41 0300000000000000 2f6d32 0200000000000000 4242",
    ))
    .unwrap();
    exchange(
        &mut s,
        "06 0200000000000000 0300000000000000 2f6d31 0300000000000000 2f6d32",
        "00",
    );
    exchange(
        &mut s,
        "0a 0200000000000000 0300000000000000 2f6d31 0300000000000000 2f6d32",
        "0100000000000000 41 0200000000000000 4242",
    );
    s.write_all(&hex("11")).unwrap();
    assert_eq!(read_n(&mut s, 8), hex("0200000000000000"));
    let mut keys = vec![];
    for _ in 0..2 {
        let len = u64::from_le_bytes(read_n(&mut s, 8).try_into().unwrap());
        keys.push(read_n(&mut s, len as usize));
    }
    keys.sort();
    assert_eq!(keys, vec![b"/m1".to_vec(), b"/m2".to_vec()]);
}

#[test]
fn queue_captures() {
    let srv = start();
    let mut s = connect(srv.port);
    s.write_all(&hex("0e 0200000000000000 2f71 0100000000000000 61"))
        .unwrap();
    exchange(&mut s, "10 0200000000000000 2f71", "0100000000000000");
    // A non-empty queue satisfies CHECK and WAIT.
    exchange(&mut s, "05 0100000000000000 0200000000000000 2f71", "00");
    exchange(
        &mut s,
        "0f 0200000000000000 2f71",
        "0100000000000000 0100000000000000 61",
    );
    exchange(&mut s, "0f 0200000000000000 2f71", "0000000000000000");
    // Queues are not keys.
    exchange(&mut s, "07", "0000000000000000");
}

#[test]
fn wait_is_released_by_every_kind_of_write() {
    let srv = start();
    let writes = [
        "01 0200000000000000 2f77 0100000000000000 31",
        "04 0200000000000000 2f77 0100000000000000",
        "09 0200000000000000 2f77 0100000000000000 31",
        "02 0200000000000000 2f77 0000000000000000 0100000000000000 31",
        "0b 0100000000000000 0200000000000000 2f77 0100000000000000 31",
    ];
    for write in writes {
        let mut waiter = connect(srv.port);
        let mut writer = connect(srv.port);
        exchange(&mut writer, "08 0200000000000000 2f77", "");
        let _ = read_n(&mut writer, 8);
        waiter
            .write_all(&hex("06 0100000000000000 0200000000000000 2f77"))
            .unwrap();
        // Not yet released: a CHECK on the writer proves the key is missing.
        exchange(
            &mut writer,
            "05 0100000000000000 0200000000000000 2f77",
            "01",
        );
        writer.write_all(&hex(write)).unwrap();
        assert_eq!(read_n(&mut waiter, 1), vec![0], "released by {write}");
    }
}

#[test]
fn wait_needs_all_keys() {
    let srv = start();
    let mut waiter = connect(srv.port);
    let mut writer = connect(srv.port);
    waiter
        .write_all(&hex(
            "06 0200000000000000 0200000000000000 2f61 0200000000000000 2f62",
        ))
        .unwrap();
    writer
        .write_all(&hex("01 0200000000000000 2f61 0000000000000000"))
        .unwrap();
    waiter
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        waiter.read(&mut b).is_err(),
        "released before all keys exist"
    );
    waiter
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    writer
        .write_all(&hex("01 0200000000000000 2f62 0000000000000000"))
        .unwrap();
    assert_eq!(read_n(&mut waiter, 1), vec![0]);
}

#[test]
fn cancel_wait_capture_and_reuse() {
    let srv = start();
    let mut s = connect(srv.port);
    s.write_all(&hex("06 0100000000000000 0600000000000000 2f6e65766572"))
        .unwrap();
    exchange(&mut s, "0c", "01");
    // The cancelled wait is gone: a later SET sends nothing stray.
    s.write_all(&hex("01 0600000000000000 2f6e65766572 0000000000000000"))
        .unwrap();
    exchange(&mut s, "0d 01020304", "01020304");
}

#[test]
fn disconnect_drops_waits_not_keys() {
    let srv = start();
    {
        let mut s = connect(srv.port);
        s.write_all(&hex("01 0200000000000000 2f6b 0100000000000000 76"))
            .unwrap();
        s.write_all(&hex("06 0100000000000000 0200000000000000 2f78"))
            .unwrap();
        exchange(&mut s, "0d 00000000", "00000000");
    }
    let mut s = connect(srv.port);
    exchange(&mut s, "03 0200000000000000 2f6b", "0100000000000000 76");
    s.write_all(&hex("01 0200000000000000 2f78 0000000000000000"))
        .unwrap();
    exchange(&mut s, "07", "0200000000000000");
}

#[test]
fn barrier_releases_everyone_at_world_size() {
    let srv = start();
    let mut a = connect(srv.port);
    let mut b = connect(srv.port);
    let mut c = connect(srv.port);
    let req = "12 0200000000000000 2f62 0300000000000000";
    a.write_all(&hex(req)).unwrap();
    b.write_all(&hex(req)).unwrap();
    // Both registered before the third arrives: poll the counter on c.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        c.write_all(&hex("03 0200000000000000 2f62")).unwrap();
        let len = u64::from_le_bytes(read_n(&mut c, 8).try_into().unwrap());
        if read_n(&mut c, len as usize) == b"2" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "barrier counter never reached 2"
        );
    }
    // Not released early.
    a.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(
        a.read(&mut [0u8; 1]).is_err(),
        "released before world_size arrived"
    );
    a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    exchange(&mut c, req, "00");
    assert_eq!(read_n(&mut a, 1), vec![0]);
    assert_eq!(read_n(&mut b, 1), vec![0]);
}

#[test]
fn frames_split_byte_by_byte_and_pipelined() {
    let srv = start();
    let mut s = connect(srv.port);
    let mut frames = hex("01 0300000000000000 2f6b31 0200000000000000 7631");
    frames.extend(hex("03 0300000000000000 2f6b31"));
    frames.extend(hex("0d 05060708"));
    for b in &frames {
        s.write_all(std::slice::from_ref(b)).unwrap();
    }
    assert_eq!(read_n(&mut s, 14), hex("0200000000000000 7631 05060708"));
    // All in one write.
    s.write_all(&frames).unwrap();
    assert_eq!(read_n(&mut s, 14), hex("0200000000000000 7631 05060708"));
}

#[test]
fn bad_input_closes_only_the_offender() {
    let srv = start_with(Limits {
        max_key_len: 8 * 1024,
        max_value_len: 1024,
        ..Limits::default()
    });
    let mut good = connect(srv.port);
    good.write_all(&hex("01 0200000000000000 2f67 0100000000000000 31"))
        .unwrap();

    let cases: Vec<Vec<u8>> = vec![
        hex("00 deadbeef"),                                        // wrong magic
        hex("01 0200000000000000 2f67 0000000000000000"),          // first command not VALIDATE
        hex("ff"),                                                 // garbage before validation
        [hex("00 cef7853c"), hex("63")].concat(),                  // unknown command
        [hex("00 cef7853c"), hex("03 ffffffffffffff7f")].concat(), // key length beyond limit
        [
            hex("00 cef7853c"),
            hex("01 0100000000000000 61 0108000000000000"),
        ]
        .concat(), // value too long
        [
            hex("00 cef7853c"),
            hex("01 0200000000000000 2f67 0100000000000000 78"),
            hex("04 0200000000000000 2f67 0100000000000000"),
        ]
        .concat(), // ADD on non-integer
    ];
    for bytes in cases {
        let mut bad = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        bad.write_all(&bytes).unwrap();
        assert_closed(&mut bad);
        // The well-behaved client is unaffected.
        exchange(&mut good, "0d 2a000000", "2a000000");
    }
    // Stored data survived; the ADD on a non-integer stored nothing new.
    exchange(&mut good, "03 0200000000000000 2f67", "0100000000000000 78");
}

#[test]
fn stalled_half_frame_does_not_block_others() {
    let srv = start();
    let mut stalled = connect(srv.port);
    stalled.write_all(&hex("01 0300000000000000 2f6b")).unwrap();
    let mut other = connect(srv.port);
    exchange(&mut other, "0d 07000000", "07000000");
    // The stalled client finishes its frame later and is served.
    stalled.write_all(&hex("31 0000000000000000")).unwrap();
    exchange(
        &mut stalled,
        "03 0300000000000000 2f6b31",
        "0000000000000000",
    );
    exchange(&mut other, "07", "0100000000000000");
}

#[test]
fn many_idle_connections_keep_the_server_responsive() {
    testkit::raise_fd_limit();
    let srv = start();
    let n = 1_000;
    let idle: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(("127.0.0.1", srv.port)).unwrap())
        .collect();
    let mut s = connect(srv.port);
    exchange(&mut s, "0d 01000000", "01000000");
    drop(idle);
    exchange(&mut s, "07", "0000000000000000");
}

/// A client that pipelines large GETs and then a WAIT, and reads the replies
/// slowly: a STOP_WAITING released while its replies are still being written
/// comes after them, never inside one (a reply the socket took only part of
/// is finished first).
#[test]
fn a_wait_released_mid_reply_is_answered_after_the_reply() {
    const BIG: usize = 4 << 20;
    const GETS: usize = 4;
    let srv = start();
    let mut reader = connect(srv.port);
    let mut writer = connect(srv.port);
    let mut set = hex("01 0400000000000000 2f626967");
    set.extend_from_slice(&(BIG as u64).to_le_bytes());
    set.extend(std::iter::repeat_n(b'x', BIG));
    writer.write_all(&set).unwrap();
    exchange(&mut writer, "0d 01000000", "01000000");
    let mut pipelined = vec![];
    for _ in 0..GETS {
        pipelined.extend(hex("03 0400000000000000 2f626967"));
    }
    pipelined.extend(hex("06 0100000000000000 0200000000000000 2f77"));
    reader.write_all(&pipelined).unwrap();
    let mut replies = vec![];
    let mut chunk = vec![0; 256 << 10];
    let mut released = false;
    let want = GETS * (8 + BIG) + 1;
    while replies.len() < want {
        let n = reader.read(&mut chunk).unwrap();
        assert!(n > 0, "closed after {} bytes", replies.len());
        replies.extend_from_slice(&chunk[..n]);
        if !released && replies.len() >= 8 + BIG / 2 {
            // Halfway through the first reply: release the wait (the PING
            // answer proves the SET was applied).
            writer
                .write_all(&hex("01 0200000000000000 2f77 0100000000000000 31"))
                .unwrap();
            exchange(&mut writer, "0d 02000000", "02000000");
            released = true;
        }
    }
    assert_eq!(replies.len(), want);
    for g in 0..GETS {
        let reply = &replies[g * (8 + BIG)..(g + 1) * (8 + BIG)];
        assert_eq!(reply[..8], (BIG as u64).to_le_bytes(), "reply {g}");
        let bad = reply[8..].iter().position(|&b| b != b'x');
        assert_eq!(bad, None, "reply {g} has a foreign byte");
    }
    assert_eq!(replies[want - 1], tcpstore::codec::STOP_WAITING);
}
