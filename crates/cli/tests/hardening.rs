//! Defects a review found in the launcher's handling of processes, output
//! and HTTP, each with the test that showed it: real launchers, real
//! workers, real HTTP clients.

use std::io::{BufRead, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::wait_for;

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

/// PATH with the test venv's bin first (py-spy, torch's python).
fn venv_path() -> String {
    let bin = testkit::torch_python().parent().unwrap().to_path_buf();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `torchrun-rs --metrics-port=0 FLAGS worker.py MODE OUTDIR`, and the port
/// it serves on.
fn start_served(
    flags: &[&str],
    mode: &str,
    out: &Path,
    tweak: impl FnOnce(&mut Command),
) -> (Child, u16, std::thread::JoinHandle<String>) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--metrics-port=0")
        .args(flags)
        .arg(testkit::cli_helper("worker.py"))
        .arg(mode)
        .arg(out)
        .env("PYTHON_EXEC", "python3")
        .env("PATH", venv_path())
        .env("TMPDIR", out)
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

fn get(port: u16, path: &str) -> String {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut body = String::new();
    let _ = c.read_to_string(&mut body);
    body
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the launcher did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The children of `pid` with their command names and states.
fn children_of(pid: u32) -> Vec<(i32, String, char)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 2..].split(' ');
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: u32 = rest.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == pid {
            out.push((stat[..open].trim().parse().unwrap_or(0), comm, state));
        }
    }
    out
}

#[test]
fn a_stacks_request_with_a_variable_that_is_not_utf8_does_not_end_the_job() {
    let out = tempfile::tempdir().unwrap();
    let (mut child, port, _) =
        start_served(&["--nproc-per-node=1"], "until-file", out.path(), |c| {
            c.env("BAD", std::ffi::OsStr::from_bytes(b"caf\xe9"));
        });
    wait_for(Duration::from_secs(30), "the worker", || {
        out.path().join("pid.0").exists().then_some(())
    });
    let stacks = get(port, "/stacks");
    assert!(stacks.starts_with("HTTP/1.0 200"), "{stacks}");
    assert!(stacks.contains("worker.py"), "py-spy's dump: {stacks}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the launcher ended after /stacks"
    );
    std::fs::write(out.path().join("go"), "").unwrap();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), Some(0));
}

#[test]
fn stacks_requests_whose_clients_go_away_leave_no_zombie() {
    let out = tempfile::tempdir().unwrap();
    let (mut child, port, _) =
        start_served(&["--nproc-per-node=2"], "until-file", out.path(), |_| {});
    wait_for(Duration::from_secs(30), "the workers", || {
        (out.path().join("pid.0").exists() && out.path().join("pid.1").exists()).then_some(())
    });
    // Three clients ask for the stacks and hang up at once (curl -m).
    for _ in 0..3 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"GET /stacks HTTP/1.0\r\n\r\n").unwrap();
        drop(c);
    }
    let launcher = child.id();
    let spies = |all: bool| {
        children_of(launcher)
            .into_iter()
            .filter(|(_, comm, state)| comm == "py-spy" && (all || *state == 'Z'))
            .count()
    };
    wait_for(Duration::from_secs(10), "a py-spy started", || {
        (spies(true) > 0).then_some(())
    });
    // Every capture runs to its end and is reaped.
    wait_for(
        Duration::from_secs(60),
        "no py-spy left, zombie or not",
        || (spies(true) == 0).then_some(()),
    );
    std::fs::write(out.path().join("go"), "").unwrap();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), Some(0));
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn idle_http_clients_cannot_starve_the_launcher_of_descriptors() {
    let out = tempfile::tempdir().unwrap();
    // Few descriptors, many idle clients: the launcher must still restart
    // its workers (pipes, log files) and must not spin.
    let (mut child, port, stderr) = start_served(
        &["--nproc-per-node=2", "--max-restarts=1", "--tee=3"],
        "fail-first-on-file",
        out.path(),
        |c| {
            // SAFETY: setrlimit only, between fork and exec.
            unsafe {
                c.pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: 96,
                        rlim_max: 96,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    wait_for(Duration::from_secs(30), "the workers", || {
        (out.path().join("pid.0").exists() && out.path().join("pid.1").exists()).then_some(())
    });
    let idle: Vec<std::net::TcpStream> = (0..150)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (t0, c0) = (Instant::now(), cpu_seconds(child.id()));
    std::thread::sleep(Duration::from_secs(1));
    let busy = (cpu_seconds(child.id()) - c0) / t0.elapsed().as_secs_f64();
    assert!(
        busy < 0.3,
        "the launcher used {:.0} % of a core while clients sat idle",
        busy * 100.0
    );
    std::fs::write(out.path().join("go"), "").unwrap();
    let code = wait_exit(&mut child, Duration::from_secs(60));
    drop(idle);
    let stderr = stderr.join().unwrap();
    assert_eq!(code, Some(0), "the restart must succeed: {stderr}");
    assert!(out.path().join("env.0.1.json").exists(), "{stderr}");
}

#[test]
fn workers_inherit_no_descriptor_beyond_0_1_2() {
    let out = tempfile::tempdir().unwrap();
    let held = std::fs::File::create(out.path().join("held")).unwrap();
    let report = out.path().join("fd42");
    let script = format!(
        "if [ -e /proc/self/fd/42 ]; then echo leaked > {0}; else echo closed > {0}; fi",
        report.display()
    );
    let mut cmd = Command::new(BIN);
    cmd.args(["--nproc-per-node=1", "--no-python", "sh", "-c", &script])
        .env("TMPDIR", out.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    {
        use std::os::fd::AsRawFd;
        let fd = held.as_raw_fd();
        // SAFETY: dup2 only, between fork and exec: fd 42 is inherited by
        // the launcher without close-on-exec, as a parent's lock would be.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 42) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let st = cmd.status().unwrap();
    assert_eq!(st.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&report).unwrap().trim(), "closed");
}

#[test]
fn bytes_that_are_not_utf8_reach_the_workers_unchanged() {
    let out = tempfile::tempdir().unwrap();
    // TMPDIR (where the log directory goes) is not UTF-8 either.
    let tmp = out.path().join(std::ffi::OsStr::from_bytes(b"tmp-\xff"));
    std::fs::create_dir(&tmp).unwrap();
    let script = "printf %s \"$BAD\" > \"$0/var\"; printf %s \"$1\" > \"$0/arg\"; \
                  if [ -d \"$(dirname \"$TORCHELASTIC_ERROR_FILE\")\" ]; then echo yes > \"$0/errdir\"; fi";
    let st = Command::new(BIN)
        .args(["--nproc-per-node=1", "--no-python", "sh", "-c", script])
        .arg(out.path())
        .arg(std::ffi::OsStr::from_bytes(b"arg-\xe9"))
        .env("BAD", std::ffi::OsStr::from_bytes(b"var-\xe9\xff"))
        .env("TMPDIR", &tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(0));
    assert_eq!(
        std::fs::read(out.path().join("var")).unwrap(),
        b"var-\xe9\xff"
    );
    assert_eq!(std::fs::read(out.path().join("arg")).unwrap(), b"arg-\xe9");
    assert!(
        out.path().join("errdir").exists(),
        "TORCHELASTIC_ERROR_FILE names a directory that exists"
    );
}

#[test]
fn a_second_watchdog_expiry_during_a_stack_capture_is_acted_on() {
    let out = tempfile::tempdir().unwrap();
    // A py-spy that takes 3 s to answer, so that both expiries arrive while
    // the first capture runs: a stand-in, since the real one's speed is not
    // ours to set.
    let bin = out.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let spy = bin.join("py-spy");
    std::fs::write(
        &spy,
        "#!/bin/sh\nsleep 3\nprintf 'Thread 1 (idle): \"MainThread\"\\n    stuck (timer_pair.py:20)\\n'\n",
    )
    .unwrap();
    std::fs::set_permissions(&spy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut child = Command::new(BIN)
        .args(["--nproc-per-node=2", "--max-restarts=0"])
        .arg(testkit::cli_helper("timer_pair.py"))
        .arg(out.path())
        .env("PYTHON_EXEC", testkit::torch_python())
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("TORCHELASTIC_TIMER_FILE", out.path().join("timers"))
        .env("TMPDIR", out.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::BufReader::new(err).read_to_string(&mut s);
        s
    });
    // Rank 1 would sleep 120 s: the launcher must stop it on its expiry.
    let code = wait_exit(&mut child, Duration::from_secs(45));
    let stderr = stderr.join().unwrap();
    // The timer's signal (SIGKILL, torch's default) ends rank 1: the
    // launcher exits as its root cause did.
    assert_eq!(code, Some(137), "{stderr}");
    assert!(
        stderr.contains("watchdog timer 'stuck-b' of local_rank 1"),
        "{stderr}"
    );
}

#[test]
fn a_daemon_left_by_a_failed_attempt_is_gone_before_the_next_attempt_starts() {
    let out = tempfile::tempdir().unwrap();
    let st = Command::new(BIN)
        .args(["--nproc-per-node=2", "--max-restarts=1"])
        .arg(testkit::cli_helper("worker.py"))
        .arg("daemon-fail-once")
        .arg(out.path())
        .env("PYTHON_EXEC", "python3")
        .env("TMPDIR", out.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(0));
    for rank in 0..2 {
        let seen =
            std::fs::read_to_string(out.path().join(format!("daemon-alive.{rank}"))).unwrap();
        assert_eq!(
            seen, "no",
            "rank {rank}'s daemon from attempt 0 still ran in attempt 1"
        );
    }
}
