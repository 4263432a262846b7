//! Health, status and metrics over HTTP (`--metrics-port`, or torch's
//! `TORCHELASTIC_HEALTH_CHECK_PORT`, which torch's open-source build accepts
//! but never serves). One small hyper server, started before the rendezvous
//! and kept across restarts:
//!
//! - `/healthz`: 200 when the agent's loop answers a ping within 5 s;
//! - `/readyz`: 200 while workers of a completed rendezvous run;
//! - `/status`: JSON: phase, attempt, ranks, each local worker;
//! - `/metrics`: Prometheus text (torch's metric names, sanitized, and ours);
//! - `/stacks`: every running local rank's stacks (py-spy).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use crate::logs::failure::Json;
use crate::logs::last_line::{Output, Seen};
use crate::process::proc_stats::Usage;

/// One local worker, as `/status` and `/metrics` show it.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub local_rank: u32,
    pub rank: u32,
    pub pid: i32,
    /// `running`, `succeeded`, `failed`, `stopped`.
    pub state: &'static str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Where its last output can be read (its last line, its quiet time).
    pub output: Output,
}

/// What the agent reports; read by the server.
#[derive(Debug, Default)]
pub struct Observed {
    pub role: String,
    /// `starting`, `rendezvous`, `running`, `stopping`, `finishing`, `done`.
    pub phase: &'static str,
    pub attempt: u32,
    pub max_restarts: u32,
    pub rounds: u64,
    pub round_seconds: f64,
    pub group_rank: Option<u32>,
    pub group_world_size: Option<u32>,
    pub world_size: Option<u32>,
    pub workers: Vec<WorkerStatus>,
    pub restarts_by_cause: BTreeMap<&'static str, u64>,
    /// When a worker last armed or released a watchdog timer (with the
    /// file watchdog on).
    pub watchdog_beat: Option<crate::logs::log_stream::Activity>,
    /// The workers' store, when this agent hosts it.
    pub store: Option<std::sync::Arc<tcpstore::ServerStats>>,
    pub exits_by_reason: BTreeMap<&'static str, u64>,
    /// `--node-check` runs that failed on this node.
    pub node_check_failures: u32,
    /// Failing and excluded hosts, as the last round told.
    pub node_failures: crate::rendezvous::dynamic::NodeFailures,
}

pub type SharedObserved = Arc<Mutex<Observed>>;

/// A ping to the agent's loop; the loop answers by dropping or sending.
pub type Ping = oneshot::Sender<()>;

/// Where the server runs.
pub struct HealthServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How many HTTP connections are open at once: the server never takes
/// more descriptors than this (and one being accepted), since the launcher
/// needs its own for pipes, log files and the store. When all are taken, a
/// new client takes the place of the oldest one that has not sent a whole
/// request yet (see [`Connections`]), so that idle or slow clients, however
/// many, never keep a liveness probe out.
const MAX_CONNECTIONS: usize = 32;

/// A client must send its request's headers within this time: an idle
/// client does not hold a descriptor for ever even when nobody needs it,
/// while a long `/stacks` is not cut short. Each connection serves one
/// request (no keep-alive), so a connection is either waiting for its
/// request or answering it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause after a failed accept (out of descriptors, say), doubling up
/// to [`ACCEPT_BACKOFF_MAX`]: never a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// `/stacks` runs py-spy on every worker (pausing it): a new capture starts
/// at least this long after the previous one ended (a capture of many ranks
/// may take longer than this); requests in between get the last one.
const STACKS_EVERY: Duration = Duration::from_secs(1);

/// The last `/stacks` capture and when it ended.
type StacksCache = Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, String)>>>;

/// Binds `addr` and serves; `pings` reach the agent's loop. `/stacks`
/// (workers' stacks and command lines) answers loopback clients only
/// unless `open_stacks`.
pub async fn start(
    addr: SocketAddr,
    observed: SharedObserved,
    pings: mpsc::UnboundedSender<Ping>,
    open_stacks: bool,
) -> std::io::Result<HealthServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let conns = Arc::new(Connections::default());
    let stacks: StacksCache = Arc::default();
    let task = tokio::spawn(async move {
        let mut backoff = ACCEPT_BACKOFF;
        loop {
            // Every connection is answering a request (each bounded in
            // time): wait for one to end, clients wait in the backlog.
            conns.room().await;
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF;
                    accepted
                }
                Err(e) => {
                    tracing::debug!("health server: accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            let (observed, pings, stacks) = (observed.clone(), pings.clone(), stacks.clone());
            // Stacks and command lines are for this machine's users only,
            // unless the operator opened them.
            let may_see_stacks = open_stacks || peer.ip().to_canonical().is_loopback();
            conns.make_room();
            let conn = conns.open();
            let open = Open(conns.clone(), conn.clone());
            // A connection's panic ends that connection, not the job.
            crate::background::spawn(async move {
                let _open = open;
                let answering = conn.clone();
                let service = hyper::service::service_fn(move |req| {
                    let (observed, pings, stacks) =
                        (observed.clone(), pings.clone(), stacks.clone());
                    // From here on, never shed (a lost race: it is
                    // being shed and the answer is dropped with it).
                    let _ = answering.state.compare_exchange(
                        WAITING,
                        ANSWERING,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    async move {
                        let stacks = may_see_stacks.then_some(&stacks);
                        Ok::<_, Infallible>(respond(req, &observed, &pings, stacks).await)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let serve = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(io, service);
                // Dropping the connection closes it.
                tokio::select! {
                    _ = serve => {}
                    _ = conn.shed.notified() => {
                        tracing::debug!("health server: closed an idle connection from {peer} for a new client");
                    }
                }
            });
        }
    });
    Ok(HealthServer { addr, task })
}

/// A connection waits for its request, answers it, or is being shed.
const WAITING: u8 = 0;
const ANSWERING: u8 = 1;
const SHED: u8 = 2;

/// One open connection.
#[derive(Default)]
struct Conn {
    state: AtomicU8,
    /// Told to close, for a newer client.
    shed: tokio::sync::Notify,
}

/// The open connections, oldest first. At [`MAX_CONNECTIONS`], the oldest
/// one still waiting for its request is closed when a new client comes: a
/// client that sends its request at once (a probe, a scraper) is answered
/// however many others sit idle or trickle bytes, and the descriptors stay
/// bounded.
#[derive(Default)]
struct Connections {
    open: Mutex<std::collections::VecDeque<Arc<Conn>>>,
    /// A connection ended.
    ended: tokio::sync::Notify,
}

impl Connections {
    fn list(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once a new connection may be accepted: below the limit, or
    /// at it with one connection that may be shed for the new one (and
    /// none being shed already: one descriptor over the limit, briefly,
    /// never more).
    async fn room(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before looking: an end in between is not missed.
            ended.as_mut().enable();
            {
                let open = self.list();
                let state = |s| open.iter().any(|c| c.state.load(Ordering::Acquire) == s);
                if open.len() < MAX_CONNECTIONS || !state(SHED) && state(WAITING) {
                    return;
                }
            }
            ended.await;
        }
    }

    /// A new connection came: at the limit, the oldest one still waiting
    /// for its request is closed. It leaves the list as its task ends.
    fn make_room(&self) {
        let open = self.list();
        if open.len() < MAX_CONNECTIONS {
            return;
        }
        let oldest_waiting = open.iter().find(|c| {
            c.state
                .compare_exchange(WAITING, SHED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        });
        if let Some(c) = oldest_waiting {
            c.shed.notify_one();
        }
    }

    fn open(&self) -> Arc<Conn> {
        let c = Arc::new(Conn::default());
        self.list().push_back(c.clone());
        c
    }
}

/// Removes its connection from the list when the connection's task ends.
struct Open(Arc<Connections>, Arc<Conn>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.list().retain(|c| !Arc::ptr_eq(c, &self.1));
        self.0.ended.notify_waiters();
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn respond(
    req: Request<hyper::body::Incoming>,
    observed: &SharedObserved,
    pings: &mpsc::UnboundedSender<Ping>,
    stacks: Option<&StacksCache>,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/healthz" => {
            let (tx, rx) = oneshot::channel();
            let alive = pings.send(tx).is_ok()
                && tokio::time::timeout(Duration::from_secs(5), rx)
                    .await
                    .is_ok_and(|r| r.is_ok());
            if alive {
                reply(StatusCode::OK, TEXT, "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "the agent does not answer\n".into(),
                )
            }
        }
        "/readyz" => {
            let phase = lock(observed).phase;
            if phase == "running" {
                reply(StatusCode::OK, TEXT, "ready\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {phase}\n"),
                )
            }
        }
        "/status" => reply(StatusCode::OK, "application/json", {
            let live = live(observed, true);
            status_json(&lock(observed), &live)
        }),
        "/stacks" => {
            let Some(cache) = stacks else {
                return reply(
                    StatusCode::FORBIDDEN,
                    TEXT,
                    "/stacks shows the workers' stacks and command lines: it answers clients on this machine (loopback) only; --open-stacks serves it to the network\n".into(),
                );
            };
            // One capture at a time, at most one a second: a request
            // during or just after a capture gets that capture. It runs in
            // a task of its own from the first poll, so a client that goes
            // away stops neither it nor the requests waiting for it.
            let (cache, observed) = (cache.clone(), observed.clone());
            let out = crate::background::spawn(async move {
                let mut last = cache.lock().await;
                if let Some((at, text)) = last.as_ref() {
                    if at.elapsed() < STACKS_EVERY {
                        return text.clone();
                    }
                }
                let running: Vec<(u32, i32)> = lock(&observed)
                    .workers
                    .iter()
                    .filter(|w| w.state == "running")
                    .map(|w| (w.local_rank, w.pid))
                    .collect();
                let mut out = String::new();
                for (local_rank, pid) in running {
                    out.push_str(&format!("== local rank {local_rank} (pid {pid})\n"));
                    match crate::observe::stacks::capture(pid).await {
                        Ok(s) => out.push_str(&s.text),
                        Err(e) => out.push_str(&format!("no stack: {e}\n")),
                    }
                }
                // Measured from the end: however long a capture takes, the
                // workers run undisturbed for a second before the next.
                *last = Some((tokio::time::Instant::now(), out.clone()));
                out
            })
            .await
            .unwrap_or_else(|_| "no stacks: the capture failed (internal error)\n".into());
            reply(StatusCode::OK, TEXT, out)
        }
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            {
                let live = live(observed, false);
                metrics_text(&lock(observed), &live)
            },
        ),
        other => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            format!("no {other}: try /healthz, /readyz, /status, /metrics or /stacks\n"),
        ),
    }
}

fn lock(o: &SharedObserved) -> std::sync::MutexGuard<'_, Observed> {
    o.lock().unwrap_or_else(|p| p.into_inner())
}

fn num<T: Into<f64>>(v: Option<T>) -> Json {
    v.map_or(Json::Null, |n| Json::Num(n.into()))
}

/// The workers as `/proc` and their output show them now, read without
/// holding the observed state, which the agent's loop updates: a log file
/// on a slow file system must not hold up the loop.
struct Live {
    workers: Vec<WorkerStatus>,
    /// Each running worker's resident memory and CPU seconds, counting its
    /// whole process group, by pid (an exited one's is not read: its
    /// group may be another's by now), from one pass over `/proc`.
    usage: HashMap<i32, Usage>,
    /// Each worker's quiet time and (when asked for) last line.
    seen: Vec<Seen>,
}

fn live(observed: &SharedObserved, last_lines: bool) -> Live {
    let workers = lock(observed).workers.clone();
    let running: Vec<i32> = workers
        .iter()
        .filter(|w| w.state == "running")
        .map(|w| w.pid)
        .collect();
    let usage = crate::process::proc_stats::of_groups(&running);
    let seen = workers.iter().map(|w| w.output.seen(last_lines)).collect();
    Live {
        workers,
        usage,
        seen,
    }
}

impl Live {
    fn workers(&self) -> impl Iterator<Item = (&WorkerStatus, Option<&Usage>, &Seen)> {
        self.workers.iter().zip(&self.seen).map(|(w, seen)| {
            let used = self.usage.get(&w.pid).filter(|_| w.state == "running");
            (w, used, seen)
        })
    }
}

fn status_json(o: &Observed, live: &Live) -> String {
    let workers = live
        .workers()
        .map(|(w, used, seen)| {
            Json::Object(vec![
                ("local_rank".into(), Json::Num(w.local_rank.into())),
                ("rank".into(), Json::Num(w.rank.into())),
                ("pid".into(), Json::Num(w.pid.into())),
                ("state".into(), Json::Str(w.state.into())),
                ("exit_code".into(), num(w.exit_code)),
                ("signal".into(), num(w.signal)),
                (
                    "seconds_since_output".into(),
                    seen.quiet
                        .map_or(Json::Null, |d| Json::Float(d.as_secs_f64())),
                ),
                ("rss_bytes".into(), num(used.map(|u| u.rss_bytes as f64))),
                (
                    "cpu_seconds".into(),
                    used.map_or(Json::Null, |u| Json::Float(u.cpu_seconds)),
                ),
                ("processes".into(), num(used.map(|u| u.processes))),
                (
                    "last_line".into(),
                    seen.last_line.clone().map_or(Json::Null, Json::Str),
                ),
            ])
        })
        .collect();
    Json::Object(vec![
        ("phase".into(), Json::Str(o.phase.into())),
        ("role".into(), Json::Str(o.role.clone())),
        ("attempt".into(), Json::Num(o.attempt.into())),
        (
            "restarts_left".into(),
            Json::Num((o.max_restarts - o.attempt.min(o.max_restarts)).into()),
        ),
        ("rendezvous_rounds".into(), Json::Num(o.rounds as f64)),
        ("group_rank".into(), num(o.group_rank)),
        ("group_world_size".into(), num(o.group_world_size)),
        ("world_size".into(), num(o.world_size)),
        ("workers".into(), Json::Array(workers)),
        (
            "node_check_failures".into(),
            Json::Num(o.node_check_failures.into()),
        ),
        (
            "node_failures".into(),
            Json::Object(
                o.node_failures
                    .counts
                    .iter()
                    .map(|(a, n)| (a.clone(), Json::Num((*n).into())))
                    .collect(),
            ),
        ),
        (
            "excluded_nodes".into(),
            Json::Array(
                o.node_failures
                    .excluded
                    .iter()
                    .map(|a| Json::Str(a.clone()))
                    .collect(),
            ),
        ),
        (
            "seconds_since_watchdog_request".into(),
            o.watchdog_beat
                .as_ref()
                .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
                .filter(|&ms| ms > 0)
                .map_or(Json::Null, |ms| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    Json::Float(now.saturating_sub(ms) as f64 / 1000.0)
                }),
        ),
    ])
    .to_string()
        + "\n"
}

fn metrics_text(o: &Observed, live: &Live) -> String {
    let mut reg = Registry::default();
    let role = vec![("role".to_string(), o.role.clone())];
    // torch's names (group `torchelastic`), sanitized.
    let remaining = Family::<Vec<(String, String)>, Gauge>::default();
    remaining
        .get_or_create(&role)
        .set(i64::from(o.max_restarts - o.attempt.min(o.max_restarts)));
    reg.register(
        "torchelastic_workers_remaining_restarts",
        "Restarts left (torch: workers.<role>.remaining_restarts)",
        remaining,
    );
    let state = Family::<Vec<(String, String)>, Gauge>::default();
    for s in ["running", "succeeded", "failed", "stopped"] {
        let n = o.workers.iter().filter(|w| w.state == s).count();
        let mut labels = role.clone();
        labels.push(("state".into(), s.into()));
        state.get_or_create(&labels).set(n as i64);
    }
    reg.register("torchrun_rs_workers", "Local workers by state", state);
    let rounds = Gauge::<i64>::default();
    rounds.set(o.rounds as i64);
    reg.register(
        "torchrun_rs_rendezvous_rounds",
        "Rendezvous rounds completed by this agent",
        rounds,
    );
    let took = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    took.set(o.round_seconds);
    reg.register(
        "torchrun_rs_rendezvous_last_round_seconds",
        "How long the last rendezvous round took",
        took,
    );
    let restarts = Family::<Vec<(String, String)>, Gauge>::default();
    for cause in ["worker_failed", "membership_changed"] {
        restarts
            .get_or_create(&vec![("cause".into(), cause.into())])
            .set(*o.restarts_by_cause.get(cause).unwrap_or(&0) as i64);
    }
    reg.register(
        "torchrun_rs_restarts",
        "Worker group restarts by cause",
        restarts,
    );
    let exits = Family::<Vec<(String, String)>, Gauge>::default();
    for reason in ["succeeded", "failed", "stopped"] {
        exits
            .get_or_create(&vec![("reason".into(), reason.into())])
            .set(*o.exits_by_reason.get(reason).unwrap_or(&0) as i64);
    }
    reg.register("torchrun_rs_worker_exits", "Worker exits by reason", exits);
    let quiet =
        Family::<Vec<(String, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for (w, _, seen) in live.workers() {
        if let Some(d) = seen.quiet {
            quiet
                .get_or_create(&vec![("local_rank".into(), w.local_rank.to_string())])
                .set(d.as_secs_f64());
        }
    }
    let rss = Family::<Vec<(String, String)>, Gauge>::default();
    let cpu = Family::<Vec<(String, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for (w, used, _) in live.workers() {
        if let Some(u) = used {
            let labels = vec![("local_rank".into(), w.local_rank.to_string())];
            rss.get_or_create(&labels).set(u.rss_bytes as i64);
            cpu.get_or_create(&labels).set(u.cpu_seconds);
        }
    }
    reg.register(
        "torchrun_rs_worker_resident_bytes",
        "Resident memory of each running local rank's processes (its process group, summed)",
        rss,
    );
    reg.register(
        "torchrun_rs_worker_cpu_seconds",
        "CPU time (user and system) of each running local rank's processes (its process group, reaped descendants included)",
        cpu,
    );
    reg.register(
        "torchrun_rs_seconds_since_output",
        "Seconds since each local rank last wrote to stdout or stderr (when the launcher carries or logs it)",
        quiet,
    );
    let checks = Gauge::<i64>::default();
    checks.set(o.node_check_failures.into());
    reg.register(
        "torchrun_rs_node_check_failures",
        "--node-check runs that failed on this node",
        checks,
    );
    let failures = Family::<Vec<(String, String)>, Gauge>::default();
    let excluded = Family::<Vec<(String, String)>, Gauge>::default();
    for (addr, n) in &o.node_failures.counts {
        failures
            .get_or_create(&vec![("node".into(), addr.clone())])
            .set(i64::from(*n));
    }
    for addr in &o.node_failures.excluded {
        excluded
            .get_or_create(&vec![("node".into(), addr.clone())])
            .set(1);
    }
    reg.register(
        "torchrun_rs_node_failures",
        "Failures the job counts against each host (rounds it failed first, failed node checks)",
        failures,
    );
    reg.register(
        "torchrun_rs_node_excluded",
        "Hosts excluded for the rest of the run (--max-node-failures)",
        excluded,
    );
    if let Some(st) = &o.store {
        use std::sync::atomic::Ordering::Relaxed;
        let conns = Gauge::<i64>::default();
        conns.set(st.connections.load(Relaxed) as i64);
        reg.register(
            "torchrun_rs_store_connections",
            "Connections open to the workers' store this agent hosts",
            conns,
        );
        let reqs = Gauge::<i64>::default();
        reqs.set(st.requests.load(Relaxed) as i64);
        reg.register(
            "torchrun_rs_store_requests",
            "Requests the workers' store this agent hosts has served",
            reqs,
        );
    }
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}
