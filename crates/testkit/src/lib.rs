//! Helpers shared by the integration tests: the Python interpreter with torch,
//! and waiting for events with deadlines (never sleep-and-hope).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// The Python interpreter of the venv with the pinned torch. Taken from
/// `TORCHRUN_RS_PYTHON`, else created (once, cached under ~/.cache) by
/// `scripts/setup-python.sh`. Tests that need torch fail loudly when it cannot
/// be had: they never pass by skipping.
pub fn torch_python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        if let Some(p) = std::env::var_os("TORCHRUN_RS_PYTHON") {
            return PathBuf::from(p);
        }
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/setup-python.sh"))
            .output()
            .expect("run scripts/setup-python.sh");
        assert!(
            out.status.success(),
            "scripts/setup-python.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let venv = String::from_utf8(out.stdout).expect("utf-8 path");
        PathBuf::from(venv.trim()).join("bin/python")
    })
    .clone()
}

/// A loopback port nobody listens on right now (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// Polls `cond` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A helper program of the launcher's tests (`crates/cli/tests/helpers`).
pub fn cli_helper(name: &str) -> String {
    repo_root()
        .join("crates/cli/tests/helpers")
        .join(name)
        .display()
        .to_string()
}

/// Waits for a child to exit: its status code, stdout and stderr.
pub fn finish(c: std::process::Child) -> (Option<i32>, String, String) {
    let out = c.wait_with_output().expect("wait for the child");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads `r` until a line containing `needle` appears; returns the reader
/// (for the rest) and what was read. Panics if the stream ends first.
pub fn read_until_line<R: std::io::Read>(r: R, needle: &str) -> (std::io::BufReader<R>, String) {
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(r);
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).expect("read a line") > 0,
            "stream closed before {needle:?}: {seen}"
        );
        seen.push_str(&line);
        if line.contains(needle) {
            return (r, seen);
        }
    }
}

/// A `torchrun-rs-store` process on a kernel-chosen port; killed on drop.
pub struct StoreProcess {
    child: std::process::Child,
    pub port: u16,
}

impl StoreProcess {
    /// Starts `bin` (the test's `CARGO_BIN_EXE_torchrun-rs-store`) with
    /// `--port 0` and `extra` arguments, and reads the port it printed.
    pub fn start(bin: &str, extra: &[&str]) -> StoreProcess {
        use std::io::BufRead;
        let mut child = Command::new(bin)
            .args(["--port", "0"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start torchrun-rs-store");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the bound address");
        // "torchrun-rs-store listening on [::]:PORT"
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port");
        StoreProcess { child, port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's open-file soft limit to its hard limit, for tests
/// that hold thousands of connections (a shell's default soft limit may be
/// 1024).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A real etcd server (Debian's `etcd-server`; `scripts/test.sh` installs
/// it) on loopback, with a data directory of its own; killed and the
/// directory removed on drop. It can be killed and started again on the
/// same data and ports, as an operator's restart would.
pub struct EtcdServer {
    child: Option<std::process::Child>,
    pub port: u16,
    peer_port: u16,
    dir: PathBuf,
    /// TLS flags, if any (`--cert-file`, ...): the client URL is https.
    tls: Vec<String>,
}

impl EtcdServer {
    pub fn start() -> EtcdServer {
        EtcdServer::start_with(Vec::new())
    }

    /// With `tls` flags (`--cert-file=..`, `--key-file=..`,
    /// `--trusted-ca-file=..`, `--client-cert-auth`), served over https.
    pub fn start_with(tls: Vec<String>) -> EtcdServer {
        let dir = std::env::temp_dir().join(format!(
            "torchrun-rs-etcd-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("etcd's directory");
        let mut s = EtcdServer {
            child: None,
            port: free_port(),
            peer_port: free_port(),
            dir,
            tls,
        };
        s.launch();
        s
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_empty() {
            "http"
        } else {
            "https"
        }
    }

    /// `127.0.0.1:port`, as `--rdzv-endpoint` takes it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let log = self.dir.join("etcd.log");
        let _ = std::fs::remove_file(&log);
        let client = format!("{}://127.0.0.1:{}", self.scheme(), self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child =
            Command::new(std::env::var("TORCHRUN_RS_ETCD").unwrap_or_else(|_| "etcd".into()))
                .args([
                    "--name=test".to_string(),
                    format!("--data-dir={}", self.dir.join("data").display()),
                    format!("--listen-client-urls={client}"),
                    format!("--advertise-client-urls={client}"),
                    format!("--listen-peer-urls={peer}"),
                    format!("--initial-advertise-peer-urls={peer}"),
                    format!("--initial-cluster=test={peer}"),
                ])
                .args(&self.tls)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).expect("etcd's log"))
                .spawn()
                .expect("this test needs etcd (apt-get install etcd-server; scripts/test.sh does)");
        self.child = Some(child);
        wait_for(Duration::from_secs(30), "etcd to serve clients", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("ready to serve client requests")
                .then_some(())
        });
    }

    /// SIGKILLs the server (its data stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on its data and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Runs `etcdctl` against this server (v3 API); its stdout. Panics,
    /// with its stderr, if it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!(
                "--endpoints={}://127.0.0.1:{}",
                self.scheme(),
                self.port
            ))
            .args(args)
            .output()
            .expect("this test needs etcdctl (apt-get install etcd-client; scripts/test.sh does)");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
