//! The etcd-v3 rendezvous against a real etcd (Debian's `etcd-server`,
//! installed by `scripts/test.sh`) on loopback: agents on addresses of
//! their own (127.0.0.N), real torch workers.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{finish, read_until_line, EtcdServer};

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

/// Heartbeats every second, a node is dead 2 s after its last one.
const FAST: &str = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=2";

fn helper(name: &str) -> String {
    testkit::cli_helper(name)
}

fn elastic(want: u32) -> Vec<String> {
    vec![helper("elastic_job.py"), want.to_string()]
}

/// What an agent is started with.
struct Agent<'a> {
    n: u8,
    nnodes: &'a str,
    nproc: u32,
    endpoint: String,
    backend: &'a str,
    conf: String,
    run_id: &'a str,
}

impl<'a> Agent<'a> {
    fn new(etcd: &EtcdServer, n: u8, nnodes: &'a str) -> Agent<'a> {
        Agent {
            n,
            nnodes,
            nproc: 1,
            endpoint: etcd.endpoint(),
            backend: "etcd-v3",
            conf: FAST.into(),
            run_id: "etcd-test",
        }
    }

    fn command(&self, program: &str, prefix: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(prefix)
            .args([
                &format!("--nnodes={}", self.nnodes),
                &format!("--nproc-per-node={}", self.nproc),
                &format!("--rdzv-backend={}", self.backend),
                &format!("--rdzv-endpoint={}", self.endpoint),
                &format!("--rdzv-id={}", self.run_id),
                &format!("--local-addr=127.0.0.{}", self.n),
                &format!("--rdzv-conf={}", self.conf),
                "-t",
                "3",
            ])
            .env("PYTHON_EXEC", testkit::torch_python())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn spawn(&self, script: &[String]) -> Child {
        self.command(BIN, &[]).args(script).spawn().unwrap()
    }
}

type Running = (Child, std::io::BufReader<std::process::ChildStdout>, String);

fn running(mut c: Child, needle: &str) -> Running {
    let (r, seen) = read_until_line(c.stdout.take().unwrap(), needle);
    (c, r, seen)
}

/// Waits for each agent to exit 0; everything they printed.
fn all_succeed(agents: Vec<Running>) -> String {
    let mut all = String::new();
    for (mut c, mut rest, seen) in agents {
        let mut err = String::new();
        let _ = c.stderr.take().map(|mut e| e.read_to_string(&mut err));
        let code = c.wait().unwrap().code();
        all += &seen;
        rest.read_to_string(&mut all).unwrap();
        assert_eq!(code, Some(0), "{all}\n{err}");
    }
    all
}

/// The keys etcd holds under `prefix`.
fn keys(etcd: &EtcdServer, prefix: &str) -> Vec<String> {
    etcd.etcdctl(&["get", "--prefix", "--keys-only", prefix])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn two_etcd_nodes_run_one_gloo_job_and_their_keys_expire_after_them() {
    let etcd = EtcdServer::start();
    let mut spec = Agent::new(&etcd, 2, "2");
    spec.nproc = 2;
    // A short run lease, so that the run's keys are seen to expire.
    spec.conf = format!("{FAST},run_ttl=3");
    let a = spec.spawn(&[helper("torch_job.py")]);
    spec.n = 3;
    let b = spec.spawn(&[helper("torch_job.py")]);
    let (ca, oa, ea) = finish(a);
    let (cb, ob, eb) = finish(b);
    assert_eq!((ca, cb), (Some(0), Some(0)), "{ea}\n{eb}");
    let all = oa + &ob;
    for r in 0..4 {
        assert!(all.contains(&format!("rank {r} restart 0 sum 10")), "{all}");
    }
    // The run's state outlives its agents (a late joiner learns the job is
    // over) until the run lease expires; their own keys went with them.
    let run = "/torch/elastic/rendezvous/etcd-test/";
    let left = keys(&etcd, run);
    assert!(left.contains(&format!("{run}state")), "{left:?}");
    assert!(!left.iter().any(|k| k.contains("/alive/")), "{left:?}");
    testkit::wait_for(Duration::from_secs(20), "the run's keys to expire", || {
        keys(&etcd, run).is_empty().then_some(())
    });
}

#[test]
fn a_late_node_grows_the_world_without_using_a_restart() {
    let etcd = EtcdServer::start();
    let spec = |n| Agent::new(&etcd, n, "2:3");
    let (a, b) = (spec(2).spawn(&elastic(3)), spec(3).spawn(&elastic(3)));
    // The first two form a world of 2 and run.
    let a = running(a, "world 2");
    assert!(a.2.contains("restart 0"), "{}", a.2);
    let c = spec(4).spawn(&elastic(3));
    let all = all_succeed(vec![a, running(b, "world 3"), running(c, "world 3")]);
    for r in 0..3 {
        assert!(
            all.contains(&format!("rank {r} world 3 restart 0 master 127.0.0.2:")),
            "{all}"
        );
    }
}

#[test]
fn survivors_of_a_killed_node_re_form_within_the_lease_ttl() {
    let etcd = EtcdServer::start();
    let spec = |n| Agent::new(&etcd, n, "2:3");
    let started = [2, 3, 4].map(|n| spec(n).spawn(&elastic(2)));
    let [a, b, c] = started.map(|c| running(c, "world 3"));
    let (mut c, _rc, _) = c;
    let t0 = Instant::now();
    // SAFETY: a plain system call on a child of this test.
    unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
    c.wait().unwrap();
    let all = all_succeed(vec![a, b]);
    let took = t0.elapsed();
    assert!(
        all.contains("rank 0 world 2 restart 0") && all.contains("rank 1 world 2 restart 0"),
        "{all}"
    );
    eprintln!("survivors finished {took:?} after the node died (lease TTL 2 s)");
    // The lease TTL (2 s), plus re-forming and a torch start.
    assert!(took < Duration::from_secs(15), "{took:?}");
}

#[test]
fn a_killed_agent_is_seen_at_once_not_after_its_lease_ttl() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let events = |n: u8| dir.path().join(format!("events.{n}"));
    let started = [2, 3, 4].map(|n| {
        let mut a = Agent::new(&etcd, n, "2:3");
        // Default heartbeats: the lease lives 15 s after the death.
        a.conf = "last_call_timeout=1".into();
        a.command(BIN, &[&format!("--events-file={}", events(n).display())])
            .args(elastic(2))
            .spawn()
            .unwrap()
    });
    let [a, b, c] = started.map(|c| running(c, "world 3"));
    let (mut c, _rc, _) = c;
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0;
    // SAFETY: a plain system call on a child of this test.
    unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
    c.wait().unwrap();
    let all = all_succeed(vec![a, b]);
    assert!(all.contains("world 2 restart 0"), "{all}");
    // Timed on the survivors' own events (the round of two completing),
    // not on torch's start and exit, which a busy machine stretches.
    for n in [2, 3] {
        let text = std::fs::read_to_string(events(n)).unwrap();
        let re_formed = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == "rendezvous_completed" && e["group_world_size"] == 2)
            .filter_map(|e| e["ts"].as_f64())
            .next()
            .unwrap_or_else(|| panic!("node {n} never re-formed as two: {text}"));
        let took = (re_formed - killed_at) / 1000.0;
        eprintln!("node {n} re-formed as two {took:.2} s after the node died");
        // The lease (15 s) was not waited out.
        assert!(took < 8.0, "{took:.2} s");
    }
}

#[test]
fn a_spare_replaces_a_lost_node() {
    let etcd = EtcdServer::start();
    let started = [2, 3].map(|n| Agent::new(&etcd, n, "2:2").spawn(&elastic(3)));
    let [a, b] = started.map(|c| running(c, "world 2"));
    let (mut b, _rb, _) = b;
    let mut spare = Agent::new(&etcd, 4, "2:2");
    spare.nproc = 2;
    let mut c = spare.spawn(&elastic(3));
    let _err = read_until_line(c.stderr.take().unwrap(), "waiting as a spare");
    // SAFETY: a plain system call on a child of this test.
    unsafe { libc::kill(b.id() as i32, libc::SIGKILL) };
    b.wait().unwrap();
    let all = all_succeed(vec![a, running(c, "world 3")]);
    assert!(all.contains("world 3 restart 0"), "{all}");
}

#[test]
fn etcd_restarted_mid_job_leaves_the_workers_running() {
    let mut etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let job = vec![
        helper("worker.py"),
        "until-file".into(),
        dir.path().display().to_string(),
    ];
    let mut spec = Agent::new(&etcd, 2, "2");
    // A dead-node window longer than the restart.
    spec.conf = "keep_alive_interval=1,keep_alive_max_attempt=10".into();
    let a = spec.spawn(&job);
    spec.n = 3;
    let b = spec.spawn(&job);
    testkit::wait_for(Duration::from_secs(60), "both workers running", || {
        (dir.path().join("pid.0").exists() && dir.path().join("pid.1").exists()).then_some(())
    });
    let pids = |d: &std::path::Path| {
        (0..2)
            .map(|r| std::fs::read_to_string(d.join(format!("pid.{r}"))).unwrap())
            .collect::<Vec<_>>()
    };
    let before = pids(dir.path());
    etcd.kill();
    // The agents notice (their lease renewals fail) ...
    let mut agents = [a, b];
    let errs: Vec<_> = agents
        .iter_mut()
        .map(|a| {
            read_until_line(
                a.stderr.take().unwrap(),
                "cannot renew this node's etcd lease",
            )
            .0
        })
        .collect();
    etcd.restart();
    // ... and reconnect, with the workers untouched.
    let _errs: Vec<_> = errs
        .into_iter()
        .map(|e| read_until_line(e, "etcd answers again").0)
        .collect();
    assert_eq!(pids(dir.path()), before, "a worker was restarted");
    std::fs::write(dir.path().join("go"), "").unwrap();
    for mut a in agents {
        assert_eq!(a.wait().unwrap().code(), Some(0));
    }
    // One attempt only: nobody restarted.
    assert!(!dir.path().join("env.0.1.json").exists());
}

#[test]
fn a_lost_state_key_and_a_compaction_make_the_agents_re_form_not_crash() {
    let etcd = EtcdServer::start();
    let spec = |n| Agent::new(&etcd, n, "2");
    let started = [2, 3].map(|n| spec(n).spawn(&elastic(3)));
    let [a, b] = started.map(|c| running(c, "world 2"));
    // Compact away every old revision (watches started before it must not
    // break), then delete the state as an operator's mistake would.
    let status = etcd.etcdctl(&["endpoint", "status", "--write-out=json"]);
    let rev: i64 = status
        .split("\"revision\":")
        .nth(1)
        .and_then(|s| s.split([',', '}']).next())
        .and_then(|s| s.trim().parse().ok())
        .expect("a revision");
    etcd.etcdctl(&["compact", &rev.to_string()]);
    etcd.etcdctl(&["del", "/torch/elastic/rendezvous/etcd-test/state"]);
    // Both re-form (the group restarts, in a new round) and keep going.
    // (A membership change uses no restart: the count stays 0.)
    let mut agents = Vec::new();
    for (mut c, mut r, seen) in [a, b] {
        let (_, more) = read_until_line(&mut r, "world 2 restart 0");
        agents.push((c.id(), seen + &more));
        // SAFETY: a plain system call on a child of this test.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let code = c.wait().unwrap().code();
        assert_eq!(code, Some(143), "{agents:?}");
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(
            err.contains("the rendezvous state in etcd is gone"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn tls_with_a_ca_and_client_certificates_under_both_naming_families() {
    let dir = tempfile::tempdir().unwrap();
    let certs = testkit_certs(dir.path());
    let etcd = EtcdServer::start_with(vec![
        format!("--cert-file={}", certs.server_cert),
        format!("--key-file={}", certs.server_key),
        format!("--trusted-ca-file={}", certs.ca),
        "--client-cert-auth".into(),
    ]);
    // etcd-v2's names on one node, the legacy backend's on the other: both
    // are served by the v3 backend.
    let mut a = Agent::new(&etcd, 2, "2");
    a.backend = "etcd-v2";
    a.conf = format!(
        "{FAST},protocol=https,ca_cert={},ssl_cert={},ssl_cert_key={}",
        certs.ca, certs.client_cert, certs.client_key
    );
    let mut b = Agent::new(&etcd, 3, "2");
    b.backend = "etcd";
    b.conf = format!(
        "{FAST},protocol=HTTPS,cacert={},cert={},key={}",
        certs.ca, certs.client_cert, certs.client_key
    );
    let (a, b) = (
        a.spawn(&[helper("torch_job.py")]),
        b.spawn(&[helper("torch_job.py")]),
    );
    let ((ca, oa, ea), (cb, ob, eb)) = (finish(a), finish(b));
    assert_eq!((ca, cb), (Some(0), Some(0)), "{ea}\n{eb}");
    assert_eq!((oa + &ob).matches("sum 3").count(), 2);
    for (err, name) in [(&ea, "etcd-v2"), (&eb, "etcd")] {
        let notices: Vec<_> = err
            .lines()
            .filter(|l| l.contains(&format!("--rdzv-backend={name}:")))
            .collect();
        assert_eq!(notices.len(), 1, "one notice expected: {err}");
    }
    // Without the client certificate, etcd refuses the agent: one line.
    let mut c = Agent::new(&etcd, 4, "1");
    c.conf = format!("protocol=https,ca_cert={},read_timeout=2", certs.ca);
    let (code, _, err) = finish(c.spawn(&[helper("torch_job.py")]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&etcd.endpoint()), "{err}");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files in `dir`.
struct Certs {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn testkit_certs(dir: &std::path::Path) -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let issue = |names: Vec<String>, client: bool| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        // etcd's JSON gateway reaches etcd's gRPC server with the server's
        // own certificate: with --client-cert-auth, that one must allow
        // client authentication too (as etcd's TLS guide says).
        p.extended_key_usages = if client {
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ]
        };
        let cert = p.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (sc, sk) = issue(vec!["127.0.0.1".into(), "localhost".into()], false);
    let (cc, ck) = issue(vec!["torchrun-rs-agent".into()], true);
    Certs {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", sc),
        server_key: write("server-key.pem", sk),
        client_cert: write("client.pem", cc),
        client_key: write("client-key.pem", ck),
    }
}

#[test]
fn two_runs_with_different_ids_share_one_etcd() {
    let etcd = EtcdServer::start();
    let start = |n: u8, id: &'static str| {
        let mut a = Agent::new(&etcd, n, "2");
        a.run_id = id;
        a.nproc = 2;
        (id, a.spawn(&[helper("torch_job.py")]))
    };
    let agents = [
        start(2, "job-a"),
        start(4, "job-b"),
        start(3, "job-a"),
        start(5, "job-b"),
    ];
    let mut out = std::collections::BTreeMap::<&str, String>::new();
    for (id, a) in agents {
        let (code, o, e) = finish(a);
        assert_eq!(code, Some(0), "{id}: {e}");
        *out.entry(id).or_default() += &o;
    }
    for (id, o) in out {
        assert_eq!(o.matches("sum 10").count(), 4, "{id}: {o}");
    }
}

#[test]
fn clocks_20_s_apart_do_not_evict_anyone() {
    assert!(
        Command::new("faketime").arg("--version").output().is_ok(),
        "this test needs faketime (apt-get install faketime; scripts/test.sh does)"
    );
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let job: Vec<String> = vec![
        helper("worker.py"),
        "sleep".into(),
        dir.path().display().to_string(),
        "4".into(),
    ];
    let agents: Vec<Child> = [(2, "+0s"), (3, "+20s"), (4, "-10s")]
        .into_iter()
        .map(|(n, offset)| {
            Agent::new(&etcd, n, "3")
                .command("faketime", &["-f", offset, BIN])
                .args(&job)
                .spawn()
                .unwrap()
        })
        .collect();
    for a in agents {
        let (code, out, err) = finish(a);
        assert_eq!(code, Some(0), "{out}\n{err}");
        assert!(!err.contains("expired"), "{err}");
        assert!(!err.contains("restart"), "no restart expected: {err}");
    }
}

#[test]
fn several_endpoints_fail_over_to_one_that_answers() {
    let etcd = EtcdServer::start();
    let mut a = Agent::new(&etcd, 2, "1");
    // Nothing listens on the first endpoint.
    a.endpoint = format!("127.0.0.1:{},{}", testkit::free_port(), etcd.endpoint());
    let (code, out, err) = finish(a.spawn(&[helper("torch_job.py")]));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("rank 0 restart 0 sum 1"), "{out}");
}

/// An agent that must fail: exit status 1 and one line saying `needle`.
fn assert_fails_with(a: &Agent, needle: &str) -> std::time::Duration {
    let t0 = Instant::now();
    let (code, _, err) = finish(a.spawn(&[helper("torch_job.py")]));
    let took = t0.elapsed();
    assert_eq!(code, Some(1), "{err}");
    let lines: Vec<_> = err.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    took
}

#[test]
fn an_unreachable_etcd_is_named_after_read_timeout() {
    let port = testkit::free_port();
    let a = Agent {
        n: 2,
        nnodes: "1",
        nproc: 1,
        endpoint: format!("127.0.0.1:{port}"),
        backend: "etcd-v3",
        conf: "read_timeout=2".into(),
        run_id: "nobody",
    };
    let took = assert_fails_with(&a, &format!("cannot reach etcd at http://127.0.0.1:{port}"));
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[test]
fn wrong_credentials_and_a_garbage_state_are_clear_errors() {
    let etcd = EtcdServer::start();
    // A key holding garbage where the run's state belongs.
    etcd.etcdctl(&[
        "put",
        "/torch/elastic/rendezvous/garbage/state",
        "not a state",
    ]);
    let mut a = Agent::new(&etcd, 2, "1");
    a.run_id = "garbage";
    assert_fails_with(&a, "does not hold a torchrun-rs rendezvous state");
    // Users: root (to manage) and an agent user with a password.
    etcd.etcdctl(&["user", "add", "root:rootpw"]);
    etcd.etcdctl(&["user", "add", "agent:s3cret"]);
    etcd.etcdctl(&["role", "add", "rdzv"]);
    etcd.etcdctl(&[
        "role",
        "grant-permission",
        "rdzv",
        "--prefix=true",
        "readwrite",
        "/torch/",
    ]);
    etcd.etcdctl(&["user", "grant-role", "agent", "rdzv"]);
    etcd.etcdctl(&["auth", "enable"]);
    let mut b = Agent::new(&etcd, 3, "1");
    b.run_id = "auth";
    b.conf = "username=agent,password=wrong".into();
    assert_fails_with(&b, "etcd did not accept the credentials");
    // The password from the environment works and is never echoed.
    b.conf = "username=agent".into();
    let out = b
        .command(BIN, &[])
        .env("TORCHRUN_RS_ETCD_PASSWORD", "s3cret")
        .arg(helper("torch_job.py"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

/// SIGTERM while an agent is still waiting for the others: it stops at once
/// with 143, leaves the round it had joined, and takes its keys with it (its
/// lease is revoked on the way out, not left to expire).
#[test]
fn a_signal_stops_an_agent_waiting_for_the_others_and_it_leaves() {
    let etcd = EtcdServer::start();
    let mut spec = Agent::new(&etcd, 2, "2");
    // A 10 s lease: a key gone within 5 s was revoked, not expired.
    spec.conf = "keep_alive_interval=5,keep_alive_max_attempt=2".into();
    let mut waiting = spec.spawn(&elastic(2));
    let run = "/torch/elastic/rendezvous/etcd-test/";
    let state = || etcd.etcdctl(&["get", "--print-value-only", &format!("{run}state")]);
    // Wait until it is a participant of the forming round.
    testkit::wait_for(Duration::from_secs(20), "the agent to join", || {
        state()
            .lines()
            .any(|l| l.starts_with("P ") && l.contains("127.0.0.2"))
            .then_some(())
    });
    // SAFETY: a plain system call on values owned here.
    unsafe { libc::kill(waiting.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = waiting.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still waiting for the rendezvous after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let left = keys(&etcd, run);
    let after = state();
    assert_eq!(status.code(), Some(143), "{left:?}\n{after}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(!left.iter().any(|k| k.contains("/alive/")), "{left:?}");
    assert!(!after.contains("127.0.0.2"), "{after}");
}

/// etcd's only endpoint goes away for a moment (a restart, as a leader
/// election would make it answer UNAVAILABLE) while a node waits for the
/// other: the node keeps waiting instead of ending the job.
#[test]
fn a_node_waiting_for_the_others_survives_a_restart_of_etcd() {
    let mut etcd = EtcdServer::start();
    let mut spec = Agent::new(&etcd, 2, "2");
    // A lease long enough to outlive the restart: what is tested is the
    // requests that fail meanwhile, not eviction.
    spec.conf = "last_call_timeout=1,keep_alive_interval=2,keep_alive_max_attempt=5".into();
    let waiting = spec.spawn(&elastic(2));
    let run = "/torch/elastic/rendezvous/etcd-test/";
    testkit::wait_for(Duration::from_secs(20), "the first node to join", || {
        etcd.etcdctl(&["get", "--print-value-only", &format!("{run}state")])
            .lines()
            .any(|l| l.starts_with("P ") && l.contains("127.0.0.2"))
            .then_some(())
    });
    etcd.kill();
    std::thread::sleep(Duration::from_millis(1500));
    etcd.restart();
    spec.n = 3;
    let late = spec.spawn(&elastic(2));
    let all = all_succeed(vec![running(waiting, "world 2"), running(late, "world 2")]);
    assert!(
        all.contains("rank 0 world 2") && all.contains("rank 1 world 2"),
        "{all}"
    );
}
