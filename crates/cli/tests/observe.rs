//! What an operator sees of a running launcher: `--status` (and its
//! `--watch`), `/status`, `/healthz` and `/stacks`, with real launchers,
//! real workers and real HTTP clients.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::wait_for;

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

/// `torchrun-rs --metrics-port=0 ARGS` with stdin and stdout null (so that
/// the workers' stdout is not a terminal), and the port it serves on. The
/// rest of its stderr is read by a thread (returned).
fn start_served(
    args: &[&str],
    tweak: impl FnOnce(&mut Command),
) -> (Child, u16, std::thread::JoinHandle<String>) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--metrics-port=0")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    tweak(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let port = loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "no health port line: {seen}"
        );
        seen.push_str(&line);
        if let Some(rest) = line
            .trim()
            .strip_prefix("torchrun-rs: health and metrics on http://")
        {
            break rest.rsplit(':').next().unwrap().parse().unwrap();
        }
    };
    let rest = std::thread::spawn(move || {
        let mut s = seen;
        let _ = err.read_to_string(&mut s);
        s
    });
    (child, port, rest)
}

/// One HTTP/1.0 GET on a new connection: the whole answer, headers included.
fn get(port: u16, path: &str) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut body = String::new();
    let _ = c.read_to_string(&mut body);
    body
}

fn status(port: u16) -> Value {
    let answer = get(port, "/status");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes `text` as an executable file.
fn script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// A Python worker that runs `body`, then writes OUT/ready.RANK and waits
/// for OUT/go.
fn python_worker(out: &Path, body: &str) -> String {
    let path = out.join("worker.py");
    std::fs::write(
        &path,
        format!(
            "import os, sys, time\n\
             out = sys.argv[1]\n\
             rank = os.environ['RANK']\n\
             {body}\n\
             open(os.path.join(out, 'ready.' + rank), 'w').close()\n\
             while not os.path.exists(os.path.join(out, 'go')):\n    time.sleep(0.01)\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn send(child: &Child, sig: i32) {
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id() as i32, sig) };
}

#[test]
fn status_watch_ends_on_sigint_and_sigterm() {
    let out = tempfile::tempdir().unwrap();
    let worker = python_worker(out.path(), "");
    let (mut launcher, port, _) = start_served(
        &[
            "--nproc-per-node=1",
            "--no-python",
            "python3",
            &worker,
            &out.path().display().to_string(),
        ],
        |c| {
            c.env("TMPDIR", out.path());
        },
    );
    let addr = format!("127.0.0.1:{port}");
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut watch = Command::new(BIN)
            .args(["--status", &addr, "--watch"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Once the table is shown, the signal can only reach a running
        // watch loop.
        let (mut rest, _) = testkit::read_until_line(watch.stdout.take().unwrap(), "last line");
        let drain = std::thread::spawn(move || std::io::copy(&mut rest, &mut std::io::sink()));
        send(&watch, sig);
        assert_eq!(
            wait_exit(&mut watch, Duration::from_secs(10)),
            Some(code),
            "signal {sig}"
        );
        let _ = drain.join();
    }
    std::fs::write(out.path().join("go"), "").unwrap();
    assert_eq!(wait_exit(&mut launcher, Duration::from_secs(30)), Some(0));
}

/// A client that sends a request's first bytes and then one more byte
/// every 200 ms, never ending its headers.
fn slow_loris(port: u16) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
            return;
        };
        if c.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").is_err() {
            return;
        }
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(200));
            if c.write_all(b"a").is_err() {
                return;
            }
        }
    })
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn healthz_answers_while_hundreds_of_clients_sit_idle_or_trickle() {
    let out = tempfile::tempdir().unwrap();
    let worker = python_worker(out.path(), "");
    let (mut launcher, port, _) = start_served(
        &[
            "--nproc-per-node=1",
            "--no-python",
            "python3",
            &worker,
            &out.path().display().to_string(),
        ],
        |c| {
            c.env("TMPDIR", out.path());
        },
    );
    wait_for(Duration::from_secs(30), "the worker", || {
        out.path().join("ready.0").exists().then_some(())
    });
    assert!(get(port, "/healthz").starts_with("HTTP/1.0 200"));
    let fds_before = open_fds(launcher.id());
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let loris: Vec<_> = (0..60).map(|_| slow_loris(port)).collect();
    // A liveness probe, five times over the next seconds: each answered
    // within a bound far below the 10 s an idle client may hold on.
    for probe in 0..5 {
        let t0 = Instant::now();
        let answer = get(port, "/healthz");
        let took = t0.elapsed();
        assert!(
            answer.starts_with("HTTP/1.0 200"),
            "probe {probe}: {answer}"
        );
        assert!(took < Duration::from_secs(3), "probe {probe} took {took:?}");
        let fds = open_fds(launcher.id());
        assert!(
            fds <= fds_before + 34,
            "the launcher holds {fds} descriptors (had {fds_before} before the clients came)"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(idle);
    for l in loris {
        let _ = l.join();
    }
    std::fs::write(out.path().join("go"), "").unwrap();
    assert_eq!(wait_exit(&mut launcher, Duration::from_secs(30)), Some(0));
}

#[test]
fn stacks_requests_during_a_long_capture_share_it_and_captures_are_a_second_apart() {
    let out = tempfile::tempdir().unwrap();
    let bin = out.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = out.path().join("spy.log");
    // A py-spy that takes 0.8 s per rank (a stand-in: the real one's speed
    // is not ours to set): a capture of two ranks takes over a second.
    script(
        &bin.join("py-spy"),
        &format!(
            "#!/bin/sh\necho \"start $(date +%s.%N)\" >> {0}\nsleep 0.8\necho \"end $(date +%s.%N)\" >> {0}\n\
             printf 'Thread 1 (idle): \"MainThread\"\\n    wait (worker.py:9)\\n'\n",
            log.display()
        ),
    );
    let worker = python_worker(out.path(), "");
    let (mut launcher, port, _) = start_served(
        &[
            "--nproc-per-node=2",
            "--no-python",
            "python3",
            &worker,
            &out.path().display().to_string(),
        ],
        |c| {
            c.env("TMPDIR", out.path())
                .env("PATH", format!("{}:/usr/bin:/bin", bin.display()));
        },
    );
    wait_for(Duration::from_secs(30), "the workers", || {
        (out.path().join("ready.0").exists() && out.path().join("ready.1").exists()).then_some(())
    });
    let answers: Vec<String> = (0..5)
        .map(|_| std::thread::spawn(move || get(port, "/stacks")))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let read_log = || -> Vec<(String, f64)> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let (what, at) = l.split_once(' ').unwrap();
                (what.to_string(), at.parse().unwrap())
            })
            .collect()
    };
    for a in &answers {
        assert!(a.starts_with("HTTP/1.0 200"), "{a}");
        assert!(a.contains("wait (worker.py:9)"), "{a}");
    }
    let starts = read_log().iter().filter(|(w, _)| w == "start").count();
    assert_eq!(
        starts, 2,
        "five requests at once: one capture of two ranks, not {starts} ranks' worth"
    );
    // More requests, back to back, for a while: each capture starts at
    // least a second after the previous one ended.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        assert!(get(port, "/stacks").starts_with("HTTP/1.0 200"));
    }
    let entries = read_log();
    // Captures are sequential (two ranks each): start, end, start, end.
    let captures: Vec<(f64, f64)> = entries
        .chunks(4)
        .filter(|c| c.len() == 4)
        .map(|c| (c[0].1, c[3].1))
        .collect();
    assert!(captures.len() >= 2, "{entries:?}");
    for pair in captures.windows(2) {
        let pause = pair[1].0 - pair[0].1;
        assert!(
            pause >= 0.99,
            "a capture started {pause:.2} s after the previous one ended: {entries:?}"
        );
    }
    std::fs::write(out.path().join("go"), "").unwrap();
    assert_eq!(wait_exit(&mut launcher, Duration::from_secs(30)), Some(0));
}

/// A tqdm-like bar: 300 states after carriage returns, coloured, on the
/// given stream, the last state `100%|####|`.
const BAR: &str = "s = getattr(sys, sys.argv[2])\n\
s.write('\\x1b[1mtraining\\x1b[0m\\n')\n\
for i in range(301):\n    s.write('\\r\\x1b[32m%3d%%|%s|\\x1b[0m' % (i // 3, '#' * (i // 75)))\n    s.flush()\n";

fn status_line_under(flags: &[&str], stream: &str) {
    let out = tempfile::tempdir().unwrap();
    let worker = python_worker(out.path(), BAR);
    let outdir = out.path().display().to_string();
    let mut args = vec!["--nproc-per-node=2"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--no-python", "python3", &worker, &outdir, stream]);
    let (mut launcher, port, _) = start_served(&args, |c| {
        c.env("TMPDIR", out.path());
    });
    wait_for(Duration::from_secs(30), "the workers", || {
        (out.path().join("ready.0").exists() && out.path().join("ready.1").exists()).then_some(())
    });
    let workers = wait_for(Duration::from_secs(10), "both last lines", || {
        let v = status(port);
        let w = v["workers"].as_array().unwrap().clone();
        w.iter().all(|w| w["last_line"].is_string()).then_some(w)
    });
    for w in &workers {
        assert_eq!(w["last_line"], "100%|####|", "{flags:?} {stream}: {w}");
        let quiet = w["seconds_since_output"].as_f64();
        assert!(
            quiet.is_some_and(|s| (0.0..60.0).contains(&s)),
            "{flags:?} {stream}: {w}"
        );
    }
    // The table, too, is plain text.
    let table = Command::new(BIN)
        .args(["--status", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(table.status.code(), Some(0));
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("100%|####|"), "{table}");
    assert!(
        !table.chars().any(|c| c.is_control() && c != '\n'),
        "control characters in the table: {table:?}"
    );
    std::fs::write(out.path().join("go"), "").unwrap();
    assert_eq!(wait_exit(&mut launcher, Duration::from_secs(30)), Some(0));
}

#[test]
fn status_shows_a_progress_bar_printed_to_stdout_under_tee() {
    status_line_under(&["--tee=3"], "stdout");
}

#[test]
fn status_shows_a_progress_bar_printed_to_stdout_under_redirects() {
    status_line_under(&["--redirects=3"], "stdout");
}

#[test]
fn status_shows_a_progress_bar_passed_through_as_plain_text() {
    // Neither -t nor -r, the launcher's stdout and stderr not terminals.
    status_line_under(&[], "stderr");
    status_line_under(&[], "stdout");
}

#[test]
fn status_counts_the_memory_and_cpu_of_a_workers_children() {
    let out = tempfile::tempdir().unwrap();
    // The worker forks a child (as a DataLoader does) that uses 1.5 s of
    // CPU and 256 MiB of memory, then waits.
    let worker = python_worker(
        out.path(),
        "if os.fork() == 0:\n    \
             t = time.process_time()\n    \
             while time.process_time() - t < 1.5: pass\n    \
             data = b'\\x01' * (256 << 20)\n    \
             open(os.path.join(out, 'child.' + rank), 'w').close()\n    \
             time.sleep(120)\n    \
             os._exit(0)\n\
         while not os.path.exists(os.path.join(out, 'child.' + rank)):\n    time.sleep(0.01)",
    );
    let (mut launcher, port, _) = start_served(
        &[
            "--nproc-per-node=1",
            "--no-python",
            "python3",
            &worker,
            &out.path().display().to_string(),
        ],
        |c| {
            c.env("TMPDIR", out.path());
        },
    );
    wait_for(Duration::from_secs(60), "the worker and its child", || {
        out.path().join("ready.0").exists().then_some(())
    });
    let w = status(port)["workers"][0].clone();
    assert_eq!(w["processes"], 2, "{w}");
    assert!(
        w["rss_bytes"].as_f64().unwrap() >= 256.0 * 1048576.0,
        "the child's memory is the worker's: {w}"
    );
    assert!(
        w["cpu_seconds"].as_f64().unwrap() >= 1.4,
        "the child's CPU time is the worker's: {w}"
    );
    let metrics = get(port, "/metrics");
    let rss_line = metrics
        .lines()
        .find(|l| l.starts_with("torchrun_rs_worker_resident_bytes{"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let rss: f64 = rss_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(rss >= 256.0 * 1048576.0, "{rss_line}");
    std::fs::write(out.path().join("go"), "").unwrap();
    // The child is in the worker's group: stopped with it at the end.
    assert_eq!(wait_exit(&mut launcher, Duration::from_secs(30)), Some(0));
}
