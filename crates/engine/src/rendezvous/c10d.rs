//! The c10d rendezvous over the store.
//!
//! Keys, all under `K = torch.rendezvous.<run_id>`:
//! - `K`: the shared [`State`], changed only by compare-and-set;
//! - `K.requests.<epoch>`: the request log; a node asks to join or leave by
//!   appending a line, and whoever writes the state next applies every
//!   pending request at once ([`dynamic::drain`]);
//! - `K.version`: bumped after every state write, so a running agent learns
//!   of a change by reading a number instead of the whole state;
//! - `K.summary`: round, completeness, closure and last-call deadline,
//!   written before the version moves: a waiting agent reads these few bytes
//!   at a change and the whole state only when they matter to it;
//! - `K.wake.<round>`: set when that round completes or the rendezvous
//!   closes; waiting agents block on it instead of polling;
//! - `K.hb.<node>`: each node's heartbeat counter, bumped by a background
//!   task. Each agent watches a few of the others (the next ones in node
//!   order) and times their counters with its own clock;
//! - `K.ack.<node>.<J|L|Q>`: set by the writer that applied the node's
//!   request, saying where the node now is (`P|W|S|- <round>`);
//! - `K.seat.<round>.<node>`: set for every participant by the writer that
//!   completed the round (rank, world size, version, a digest of the
//!   participants, and rank 0), before the round's wake key.
//!
//! The fast path, which is what lets thousands of agents rank in seconds:
//! an agent appends its request and waits (briefly) for its ack; once
//! admitted it waits for its seat. It thus reads a few short keys, never
//! the state, whose size grows with the job: only the agents that end up
//! writing it (the first whose wait ran out, and anyone the fast path cannot
//! serve: a spare, a deadline, a dead node) read it whole. Every fast-path
//! step falls back to the general loop, which is torch's state machine as
//! before.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tcpstore::{Client, ClientError};

use super::dynamic::{self, in_any_list, is_mutation, Action, Node, Request, Settings, State};
use super::RendezvousError;

/// How many other nodes each agent watches for missing heartbeats. Each node
/// is thus watched by this many others; if all of them die together, their
/// own watchers evict them first and the ring closes over the rest.
const WATCHED: usize = 3;

/// How often watched heartbeat counters are read, at most.
const WATCH_EVERY: f64 = 1.0;

/// Added to an evicted node's heartbeat counter by the node that evicted
/// it: the counter goes negative and stays so, which the evicted node's
/// next beat reads (it is fenced: it stops its workers and joins again as
/// a new node), and which no watcher can take for a live node.
const FENCED_BEAT: i64 = -(1 << 62);

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Heartbeat counters of the watched nodes and when (by this agent's
/// monotonic clock: a step of the wall clock, from NTP or a resumed VM,
/// must neither make live nodes look dead nor suspend eviction) each last
/// moved.
struct Liveness {
    seen: HashMap<Node, (i64, Instant)>,
    next_check: Instant,
    /// A watched node missed a beat: every node of the state is read while
    /// one is late, so that a rack that died together is evicted within one
    /// window, not one window per [`WATCHED`] nodes (each newly watched one
    /// would start a timer of its own).
    sweeping: bool,
    /// While sweeping: every node of the state when the sweep began.
    everyone: Vec<Node>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            seen: HashMap::new(),
            next_check: Instant::now(),
            sweeping: false,
            everyone: Vec::new(),
        }
    }
}

/// One agent's view of the dynamic rendezvous.
pub struct DynamicRdzv {
    /// Nodes this agent evicted (no heartbeat), not yet told to the agent.
    pub evicted: Vec<Node>,
    client: Client,
    key: String,
    node: Node,
    cfg: Settings,
    join_timeout: f64,
    close_timeout: f64,
    /// The raw value last read or written: the CAS token.
    token: Vec<u8>,
    state: State,
    /// `K.version` as read just before `state`.
    version: i64,
    /// When `state` was last read whole (this agent's clock).
    read_at: f64,
    /// The round this node is a participant of (with a digest of its
    /// participants and this node's rank).
    joined: Option<Membership>,
    liveness: Liveness,
    /// Connections to the watched nodes' launchers: a launcher that dies
    /// is seen at once, not after the heartbeat window.
    peers: super::peer_watch::PeerWatch,
    /// The nodes whose heartbeats this agent watches.
    watched: Vec<Node>,
    /// Whether the fast path just waited in vain for an ack (the general
    /// loop then writes without its batching pause).
    waited: Option<(Request, u64)>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    /// The running operation's deadline (join or close timeout).
    op_deadline: f64,
    /// Whether the user was told this node waits as a spare.
    spare_noted: bool,
    /// The next leave is because this node's workers failed.
    after_failure: bool,
    /// The host's failures when this node posted its last failed check.
    check_before: u32,
    /// The job's root cause, once read (the store may go with its host).
    job_failed: Option<String>,
    /// The store's address, for messages.
    endpoint: String,
    /// This node's workers' store as published (again after a store loss).
    published: Option<(String, u16)>,
    /// This node has joined a round: from then on it watches its peers'
    /// launchers.
    ranked_once: bool,
    /// Set by the heartbeat task when this node's counter reads as fenced
    /// (another node evicted it).
    fenced: Arc<AtomicBool>,
    /// The heartbeat task's key (it changes with this node's identity).
    beat_key: tokio::sync::watch::Sender<String>,
    /// Notified when the round this node runs in changes (see
    /// [`Self::watch_round`]).
    pub change: Arc<tokio::sync::Notify>,
    /// The task blocked on the running round's change key.
    round_watch: Option<tokio::task::JoinHandle<()>>,
    /// The job is ending here (exit barrier, close): other launchers that
    /// finish first and go are not deaths to judge or evict.
    finishing: bool,
    /// The job's restart count, failing and excluded hosts as this node last
    /// knew them, after the state vanished from the store: written into the
    /// first state this node writes there.
    carried: Option<(u32, BTreeMap<String, u32>, BTreeSet<String>)>,
    /// What was carried over since the last round, for the events file.
    pub state_lost: Option<(u32, usize)>,
    /// Tests: this agent's write that completes a round stops before the
    /// seats, as a completer killed at that moment would.
    #[cfg(test)]
    fail_before_seats: bool,
}

/// The round this node runs in, as far as a running agent needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Membership {
    round: u64,
    digest: u64,
    rank: u32,
}

/// What the round's completer left for each participant (`K.seat..`):
/// enough to run without ever reading the state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seat {
    rank: u32,
    world: u32,
    /// The job's restarts (the state's count when the round completed).
    restarts: u32,
    /// `K.version` right after the round completed.
    version: i64,
    digest: u64,
    rank0: Node,
    /// The nodes this participant watches for missing heartbeats.
    watched: Vec<Node>,
    failures: dynamic::NodeFailures,
}

impl Seat {
    /// `rank world version digest`, then rank 0 and the watched nodes, a
    /// line each.
    fn encode(&self) -> String {
        let mut out = format!(
            "{} {} {} {} {}\n{}",
            self.rank,
            self.world,
            self.version,
            self.digest,
            self.restarts,
            dynamic::node_text(&self.rank0)
        );
        for n in &self.watched {
            out.push('\n');
            out.push_str(&dynamic::node_text(n));
        }
        self.failures.encode(&mut out);
        out
    }

    fn parse(raw: &[u8]) -> Option<Seat> {
        let text = std::str::from_utf8(raw).ok()?;
        let mut lines = text.split('\n');
        let mut f = lines.next()?.split(' ');
        Some(Seat {
            rank: f.next()?.parse().ok()?,
            world: f.next()?.parse().ok()?,
            version: f.next()?.parse().ok()?,
            digest: f.next()?.parse().ok()?,
            restarts: f.next()?.parse().ok()?,
            rank0: dynamic::node_parse(lines.next()?)?,
            watched: Vec::new(),
            failures: Default::default(),
        })
        .and_then(|mut seat: Seat| {
            for line in lines {
                if !seat.failures.parse_line(line) {
                    seat.watched.push(dynamic::node_parse(line)?);
                }
            }
            Some(seat)
        })
    }
}

/// A digest of a round's participants and ranks (FNV-1a): whether a running
/// agent's round is still the current one, without keeping the list.
fn digest(participants: &BTreeMap<Node, u32>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (n, r) in participants {
        for b in format!("{r} {}\n", dynamic::node_text(n)).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The parsed `K.summary`.
struct Summary {
    round: u64,
    complete: bool,
    closed: bool,
    deadline: Option<f64>,
    epoch: u64,
}

impl Summary {
    fn parse(raw: &[u8]) -> Option<Summary> {
        let text = std::str::from_utf8(raw).ok()?;
        let f: Vec<&str> = text.split(' ').collect();
        let [round, complete, closed, deadline, epoch] = f[..] else {
            return None;
        };
        Some(Summary {
            round: round.parse().ok()?,
            complete: complete == "1",
            closed: closed == "1",
            deadline: deadline.parse().ok(),
            epoch: epoch.parse().ok()?,
        })
    }
}

/// How long, beyond its batching pause, an agent waits for another to apply
/// its request before it writes the state itself.
const ACK_PATIENCE: Duration = Duration::from_millis(5);

/// How long an agent waits for its ack once it saw a writer at work.
const RENEWED_PATIENCE: Duration = Duration::from_millis(500);

/// How many batches a writer applies in a row while requests keep coming.
const SERVE_WRITES: usize = 1000;

/// Per node of `max_nodes`, more patience (a larger job's writes take
/// longer), up to [`ACK_PATIENCE_MAX`].
const ACK_PATIENCE_PER_NODE: Duration = Duration::from_micros(10);
const ACK_PATIENCE_MAX: Duration = Duration::from_millis(100);

/// The outcome of joining.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub round: u64,
    pub rank: u32,
    pub world_size: u32,
    /// The job's restarts after failures, as of this round.
    pub restarts: u32,
    /// Failing and excluded hosts, as of this round.
    pub failures: dynamic::NodeFailures,
    /// Where the round's workers meet: the rank-0 agent's worker store.
    pub master_addr: String,
    pub master_port: u16,
}

impl Drop for DynamicRdzv {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if let Some(h) = self.round_watch.take() {
            h.abort();
        }
    }
}

impl DynamicRdzv {
    /// `heartbeat_client` is a connection of its own: the heartbeat task
    /// keeps this node alive in everyone's eyes whatever the agent is doing
    /// (stopping workers, writing logs) and only stops with the process.
    pub fn new(
        mut client: Client,
        heartbeat_client: Client,
        run_id: &str,
        node: Node,
        cfg: Settings,
        join_timeout: f64,
        close_timeout: f64,
    ) -> Self {
        // Heartbeat counters are read with `add(key, 0)`, which never
        // blocks; no read here waits on a key.
        client.set_timeout(Duration::from_secs(5));
        let endpoint = client
            .peer_addr()
            .map_or_else(|_| "its endpoint".to_string(), |a| a.to_string());
        let key = format!("torch.rendezvous.{run_id}");
        let fenced = Arc::new(AtomicBool::new(false));
        let (beat_key, beat_key_rx) = tokio::sync::watch::channel(hb_key(&key, &node));
        let heartbeat = tokio::spawn(beat(
            heartbeat_client,
            beat_key_rx,
            Duration::from_secs_f64(cfg.keep_alive_interval),
            fenced.clone(),
        ));
        DynamicRdzv {
            client,
            key,
            node,
            cfg,
            join_timeout,
            close_timeout,
            token: Vec::new(),
            state: State::default(),
            version: 0,
            read_at: 0.0,
            joined: None,
            liveness: Liveness::default(),
            peers: super::peer_watch::PeerWatch::default(),
            watched: Vec::new(),
            waited: None,
            heartbeat: Some(heartbeat),
            op_deadline: f64::INFINITY,
            spare_noted: false,
            after_failure: false,
            check_before: 0,
            job_failed: None,
            endpoint,
            published: None,
            ranked_once: false,
            evicted: Vec::new(),
            fenced,
            beat_key,
            change: Arc::new(tokio::sync::Notify::new()),
            round_watch: None,
            finishing: false,
            carried: None,
            state_lost: None,
            #[cfg(test)]
            fail_before_seats: false,
        }
    }

    /// Tests: the heartbeat stops, as in a process that is frozen.
    #[cfg(test)]
    fn pause_heartbeat(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }

    /// Tests: the frozen process resumes; its heartbeat goes on.
    #[cfg(test)]
    async fn resume_heartbeat(&mut self, port: u16) {
        let client = Client::connect("127.0.0.1", port, Default::default())
            .await
            .unwrap();
        self.heartbeat = Some(tokio::spawn(beat(
            client,
            self.beat_key.subscribe(),
            Duration::from_secs_f64(self.cfg.keep_alive_interval),
            self.fenced.clone(),
        )));
    }

    /// Whether this node was evicted, asking the store (its heartbeat
    /// counter) if the beat has not said so yet: a node that comes back
    /// from a pause may see its stale workers' exit before its next beat.
    pub async fn fenced_now(&mut self) -> bool {
        if self.is_fenced() {
            return true;
        }
        let k = hb_key(&self.key, &self.node);
        if matches!(self.client.get_now(&k).await, Ok(v) if v.first() == Some(&b'-')) {
            self.fenced.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Whether this node was evicted under its current identity (its
    /// heartbeat counter fenced, or the state lists it as evicted).
    fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst) || self.state.fenced.contains(&self.node)
    }

    /// This node was evicted: it takes a new identity (the old one is
    /// refused for good) and starts afresh, as a node that never joined.
    /// Its old keys are its own to delete.
    async fn rotate_identity(&mut self) -> Result<(), RendezvousError> {
        use rand::Rng;
        let old = self.node.clone();
        let mut local_id = rand::thread_rng().gen();
        while local_id == old.local_id {
            local_id = rand::thread_rng().gen();
        }
        self.node.local_id = local_id;
        tracing::warn!(
            "rendezvous: this node was evicted (the others saw no heartbeat from it for {:.1} s: a pause, a stall or a cut link); its workers stop and it joins again as a new node",
            self.cfg.dead_after()
        );
        self.evicted.push(old.clone());
        let _ = self.beat_key.send(hb_key(&self.key, &self.node));
        self.fenced.store(false, Ordering::SeqCst);
        self.joined = None;
        self.token.clear();
        self.state = State::default();
        self.version = 0;
        self.waited = None;
        self.after_failure = false;
        self.spare_noted = false;
        self.liveness = Liveness::default();
        self.peers = super::peer_watch::PeerWatch::default();
        self.watched.clear();
        self.forget_nodes(&[old]).await?;
        if let Some((addr, port)) = self.published.clone() {
            self.publish_master(&addr, port).await?;
        }
        Ok(())
    }

    fn log_key(&self, epoch: u64) -> String {
        format!("{}.requests.{epoch}", self.key)
    }

    fn summary_key(&self) -> String {
        format!("{}.summary", self.key)
    }

    fn version_key(&self) -> String {
        format!("{}.version", self.key)
    }

    /// Where `n`'s workers' store listens (`addr:port`), published by `n`
    /// before it first joins: knowing a round's rank 0 is enough to know
    /// its master address, without waiting for that agent to say it.
    fn master_key(&self, n: &Node) -> String {
        format!("{}.master.{}.{}.{}", self.key, n.addr, n.pid, n.local_id)
    }

    /// The next round is joined because this node's workers failed: the
    /// job's restart count moves (once per failed round).
    pub fn note_failure(&mut self) {
        self.after_failure = true;
    }

    /// This node's process serves the rendezvous store: said in the request
    /// log (the next writer records it), so that the job never excludes
    /// the host its store lives on. Call once, before joining.
    pub async fn announce_hosting(&mut self) -> Result<(), RendezvousError> {
        let r = Request::Hosting(self.node.clone());
        self.append_to(0, &r).await
    }

    /// Publishes this node's worker store; call once, before joining.
    pub async fn publish_master(&mut self, addr: &str, port: u16) -> Result<(), RendezvousError> {
        self.published = Some((addr.to_string(), port));
        let k = self.master_key(&self.node);
        self.client
            .set(&k, format!("{addr}:{port}").as_bytes())
            .await?;
        Ok(())
    }

    /// Where `n`'s workers' store listens. Its key is written before `n`
    /// first joins; a missing key means `n` left or was evicted since the
    /// round formed: the round is broken, and the next one is joined.
    async fn master_of(&mut self, n: &Node) -> Result<(String, u16), RendezvousError> {
        if *n == self.node {
            if let Some(own) = self.published.clone() {
                return Ok(own);
            }
        }
        let k = self.master_key(n);
        let mut raw = self.client.get_now(&k).await?;
        if raw.is_empty() {
            // Not there yet: a node that came back to a store restarted
            // empty publishes it again at once; an evicted one never will
            // (its heartbeat counter reads as fenced).
            let hb = self.client.get_now(&hb_key(&self.key, n)).await?;
            if hb.first() == Some(&b'-') {
                return Err(RendezvousError::RoundBroken);
            }
            match self
                .client
                .wait(&[k.as_str()], Duration::from_secs(5))
                .await
            {
                Ok(()) => raw = self.client.get_now(&k).await?,
                Err(ClientError::WaitTimeout { .. }) => return Err(RendezvousError::RoundBroken),
                Err(e) => return Err(e.into()),
            }
        }
        let raw = String::from_utf8_lossy(&raw).into_owned();
        raw.rsplit_once(':')
            .and_then(|(a, p)| Some((a.to_string(), p.parse().ok()?)))
            .ok_or(RendezvousError::BadAssignment(format!(
                "master address {raw:?}"
            )))
    }

    /// Set by the writer whose write changed a running round (a member
    /// left, failed or was evicted, a node waits, the rendezvous closed).
    fn changed_key(&self, round: u64) -> String {
        format!("{}.changed.{round}", self.key)
    }

    /// While this node runs in `round`: a task of its own, on a connection of
    /// its own, blocks on the round's change key and notifies
    /// [`Self::change`] when it is set. A worker failure on another node thus
    /// reaches this one through the store at once, not at its next poll.
    fn watch_round(&mut self, round: u64) {
        if let Some(h) = self.round_watch.take() {
            h.abort();
        }
        let Ok(peer) = self.client.peer_addr() else {
            return;
        };
        let key = self.changed_key(round);
        let notify = self.change.clone();
        // Not while the round's ranks are assigned and its workers start: a
        // large job's nodes would all connect to the store at that moment.
        let settle = {
            use rand::Rng;
            let spread = f64::from(self.cfg.max_nodes.min(100_000)) * 0.5e-3;
            Duration::from_secs_f64(0.2 + rand::thread_rng().gen_range(0.0..=spread))
        };
        self.round_watch = Some(tokio::spawn(async move {
            tokio::time::sleep(settle).await;
            let opts = tcpstore::ConnectOptions {
                timeout: Duration::from_secs(3600),
                ..Default::default()
            };
            let Ok(mut client) = Client::connect(&peer.ip().to_string(), peer.port(), opts).await
            else {
                // The poll still sees the change.
                return;
            };
            loop {
                match client
                    .wait(&[key.as_str()], Duration::from_secs(3600))
                    .await
                {
                    Ok(()) => {
                        notify.notify_one();
                        return;
                    }
                    Err(ClientError::WaitTimeout { .. }) => {}
                    Err(_) => return,
                }
            }
        }));
    }

    fn wake_key(&self, round: u64) -> String {
        format!("{}.wake.{round}", self.key)
    }

    fn ack_key(&self, r: &Request) -> String {
        let (tag, n) = r.tag();
        format!("{}.ack.{}.{}.{}.{tag}", self.key, n.addr, n.pid, n.local_id)
    }

    fn seat_key(&self, round: u64, n: &Node) -> String {
        format!(
            "{}.seat.{round}.{}.{}.{}",
            self.key, n.addr, n.pid, n.local_id
        )
    }

    /// Sets every key in one request.
    async fn set_all(&mut self, kvs: &[(String, Vec<u8>)]) -> Result<(), RendezvousError> {
        let pairs: Vec<(&str, &[u8])> = kvs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        self.client.multi_set(&pairs).await?;
        Ok(())
    }

    /// Tells the authors of `applied` requests (just written into the state)
    /// where they now are.
    async fn ack(&mut self, applied: &[Request]) -> Result<(), RendezvousError> {
        let s = &self.state;
        let acks: Vec<(String, Vec<u8>)> = applied
            .iter()
            .map(|r| {
                let place = match r {
                    Request::Join(n) if s.participants.contains_key(n) => 'P',
                    Request::Join(n) if s.wait_list.contains(n) => 'W',
                    Request::Join(n) if s.redundancy_list.contains(n) => 'S',
                    _ => '-',
                };
                (self.ack_key(r), format!("{place} {}", s.round).into_bytes())
            })
            .collect();
        self.set_all(&acks).await
    }

    /// Posts `r` and waits briefly for the writer that applies it to say
    /// where this node now is: `(P|W|S|-, round)`. `None`: nobody did (or
    /// the rendezvous is closed): the caller runs the general loop, which
    /// writes the state itself.
    async fn post_fast(&mut self, r: &Request) -> Result<Option<(char, u64)>, RendezvousError> {
        let raw = self.client.get_now(&self.summary_key()).await?;
        // No summary yet: nobody has written the state, round 0 starts.
        let sum = if raw.is_empty() {
            Summary {
                round: 0,
                complete: false,
                closed: false,
                deadline: None,
                epoch: 0,
            }
        } else {
            match Summary::parse(&raw) {
                Some(sum) if !sum.closed => sum,
                _ => return Ok(None),
            }
        };
        let key = self.ack_key(r);
        self.client.delete_key(&key).await?;
        let mut version = self.read_version().await?;
        let mut epoch = sum.epoch;
        self.append_to(epoch, r).await?;
        // The first agents whose patience runs out write the state for
        // everyone who arrived before; the others are acknowledged. While
        // writes keep landing (the version moves), patience is renewed.
        let mut patience = self.batch_jitter() + self.ack_patience();
        let mut stalls = 0;
        loop {
            match self.client.wait(&[key.as_str()], patience).await {
                Ok(()) => break,
                Err(ClientError::WaitTimeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let v = self.read_version().await?;
            if v != version {
                // The log our line went to may have been retired before a
                // writer read the line: then post it again, to the new one.
                let raw = self.client.get_now(&self.summary_key()).await?;
                if let Some(now_epoch) = Summary::parse(&raw).map(|s| s.epoch) {
                    if now_epoch != epoch {
                        epoch = now_epoch;
                        self.append_to(epoch, r).await?;
                    }
                }
            }
            if v == version && stalls < 2 && now() < self.op_deadline {
                // Nobody wrote since: one agent per version claims the
                // write, the others give it time (a writer that died is
                // replaced after two more waits).
                let claim = self
                    .client
                    .add(&format!("{}.writing.{v}", self.key), 1)
                    .await?;
                if claim > 1 {
                    stalls += 1;
                    patience = self.ack_patience() * 2;
                    continue;
                }
            }
            if v == version || now() >= self.op_deadline {
                // Nobody is writing: this agent will, without pausing again.
                self.waited = Some((r.clone(), epoch));
                return Ok(None);
            }
            stalls = 0;
            version = v;
            // A writer is at work and will get to us: check on it seldom.
            patience = RENEWED_PATIENCE;
        }
        let ack = self.client.get_now(&key).await?;
        let ack = String::from_utf8_lossy(&ack);
        let Some((place, round)) = ack
            .split_once(' ')
            .and_then(|(p, r)| Some((p.chars().next()?, r.parse::<u64>().ok()?)))
        else {
            return Ok(None);
        };
        // An ack of an older request of ours, applied late: not this one.
        if round < sum.round {
            return Ok(None);
        }
        Ok(Some((place, round)))
    }

    /// A participant of `round` (or a node waiting for it) waits for its
    /// seat, set when the round completes. `None` when something else needs the general loop: the
    /// round moved on or closed, its last call is due, the operation's
    /// deadline passed.
    async fn wait_seat(&mut self, round: u64) -> Result<Option<Seat>, RendezvousError> {
        let key = self.seat_key(round, &self.node);
        // The round was seen complete without this node's seat: once more
        // and its completer died between its write and the seats (or this
        // node is not in it): the state says what happened.
        let mut seatless = false;
        // Heartbeats are read from the start: a node that died with the
        // workers that brought us here is timed from now, not from the
        // first wait's end.
        if self.check_liveness().await? {
            return Ok(None);
        }
        loop {
            let t = now();
            if t >= self.op_deadline {
                return Ok(None);
            }
            let timeout = Duration::from_secs_f64((self.op_deadline - t).clamp(0.01, 1.0));
            match self.wait_or_death(&key, timeout).await {
                Ok(()) => {
                    let raw = self.client.get_now(&key).await?;
                    // Read once: nobody else needs it.
                    self.client.delete_key(&key).await?;
                    return Ok(Seat::parse(&raw));
                }
                Err(ClientError::WaitTimeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            // A watched node that died (its launcher killed, say) may be
            // what keeps the round from forming: the general loop, which
            // evicts it, takes over. Nobody else would: its other watchers
            // may be waiting here too.
            if self.check_liveness().await? {
                return Ok(None);
            }
            let raw = self.client.get_now(&self.summary_key()).await?;
            let Some(sum) = Summary::parse(&raw) else {
                return Ok(None);
            };
            // (A node on the wait list waits for the next round: the
            // summary may still show the current one.)
            let due = sum.round == round && sum.deadline.is_some_and(|d| now() >= d);
            if sum.round > round || sum.closed || due {
                return Ok(None);
            }
            if sum.round == round && sum.complete {
                if seatless {
                    return Ok(None);
                }
                seatless = true;
            }
        }
    }

    /// Waits for `key` up to `timeout`, or until a watched launcher is
    /// found gone (then as if the wait timed out: the caller looks again).
    /// The store client is safe to interrupt.
    async fn wait_or_death(&mut self, key: &str, timeout: Duration) -> Result<(), ClientError> {
        let news = self.peers.news.clone();
        let died = news.notified();
        tokio::pin!(died);
        died.as_mut().enable();
        if self.peers.dead().iter().any(|n| self.present(n)) {
            return Err(ClientError::WaitTimeout {
                timeout,
                keys: vec![key.to_string()],
            });
        }
        let keys = [key];
        tokio::select! {
            r = self.client.wait(&keys, timeout) => r,
            _ = died => Err(ClientError::WaitTimeout { timeout, keys: vec![key.to_string()] }),
        }
    }

    async fn read_version(&mut self) -> Result<i64, RendezvousError> {
        let k = self.version_key();
        Ok(self.client.add(&k, 0).await?)
    }

    async fn read(&mut self) -> Result<(), RendezvousError> {
        self.version = self.read_version().await?;
        self.read_at = now();
        let raw = self.client.get_now(&self.key).await?;
        self.adopt(raw)
    }

    fn adopt(&mut self, raw: Vec<u8>) -> Result<(), RendezvousError> {
        if raw == self.token && !raw.is_empty() {
            // Unchanged: keep the decoded copy.
            return Ok(());
        }
        let next = if raw.is_empty() {
            State::default()
        } else {
            State::decode(&String::from_utf8_lossy(&raw)).ok_or_else(|| {
                RendezvousError::BadState {
                    key: self.key.clone(),
                    start: String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned(),
                }
            })?
        };
        // Gone, or another state in its place (a store restarted empty, a
        // fresh launcher of its host wrote first): what this node knew of
        // the job would be lost.
        if !self.token.is_empty() && (raw.is_empty() || next.generation != self.state.generation) {
            self.remember_for_a_new_store();
        }
        self.state = next;
        self.token = raw;
        if !self.finishing {
            self.watched = watched_by(&sorted_nodes(&self.state), &self.node);
        }
        Ok(())
    }

    /// The state this node knew is gone from the store (a store restarted
    /// empty at the same address, a deleted key): the job's restart count and
    /// failing hosts would silently start from zero. This node carries them
    /// into the first state it writes, and says so.
    fn remember_for_a_new_store(&mut self) {
        let s = &self.state;
        if s.restarts == 0 && s.node_failures.is_empty() && s.excluded.is_empty() {
            return;
        }
        tracing::warn!(
            "rendezvous: the state is gone from the store at {} (a new, empty store?); this node carries the job's restart count ({}) and {} excluded host(s) over from its own memory",
            self.endpoint,
            s.restarts,
            s.excluded.len()
        );
        let (mut restarts, mut failures, mut excluded) = self.carried.take().unwrap_or_default();
        restarts = restarts.max(s.restarts);
        for (h, c) in &s.node_failures {
            let e = failures.entry(h.clone()).or_default();
            *e = (*e).max(*c);
        }
        excluded.extend(s.excluded.iter().cloned());
        self.state_lost = Some((restarts, excluded.len()));
        self.carried = Some((restarts, failures, excluded));
    }

    /// Writes `new` if nobody changed the state since our last read, then
    /// tells the others: the version moves, and a round that completed or a
    /// rendezvous that closed wakes those blocked on it.
    async fn cas(&mut self, new: &State) -> Result<bool, RendezvousError> {
        let carried;
        let new = match self.carried.clone() {
            // The next state written to a store that lost it (merged: a
            // node that wrote first carried what it knew).
            Some((restarts, failures, excluded)) => {
                let mut n = new.clone();
                n.restarts = n.restarts.max(restarts);
                for (h, c) in failures {
                    let e = n.node_failures.entry(h).or_default();
                    *e = (*e).max(c);
                }
                n.excluded.extend(excluded);
                carried = n;
                &carried
            }
            None => new,
        };
        let fresh;
        let new = if self.token.is_empty() && new.generation == 0 {
            // The first state this store holds.
            use rand::Rng;
            let mut n = new.clone();
            n.generation = rand::thread_rng().gen_range(1..u64::MAX);
            fresh = n;
            &fresh
        } else {
            new
        };
        let desired = new.encode().into_bytes();
        let got = self
            .client
            .compare_set(&self.key, &self.token, &desired)
            .await?;
        if got != desired {
            if got.is_empty() || got == self.token {
                // The key is absent: the store answers a compare-and-set on
                // a missing key with the expected value. Read what is
                // really there.
                self.read().await?;
            } else {
                self.adopt(got)?;
            }
            return Ok(false);
        }
        self.carried = None;
        let old = std::mem::take(&mut self.state);
        self.adopt(got)?;
        let k = self.summary_key();
        let sum = summary(&self.state);
        self.client.set(&k, sum.as_bytes()).await?;
        let k = self.version_key();
        let version = self.client.add(&k, 1).await?;
        // The write claims of the version this write replaced are spent,
        // and so is the one before: an agent that read that version late
        // may have added its claim again after it was deleted.
        for v in [version - 1, version - 2] {
            let claim = format!("{}.writing.{v}", self.key);
            self.client.delete_key(&claim).await?;
        }
        let s = &self.state;
        let running_changed = old.complete
            && (s.round != old.round
                || s.participants != old.participants
                || s.wait_list.len() > old.wait_list.len()
                || s.closed);
        if running_changed {
            let k = self.changed_key(old.round);
            self.client.set(&k, b"1").await?;
            if let Some(r) = old.round.checked_sub(2) {
                let k = self.changed_key(r);
                self.client.delete_key(&k).await?;
            }
        }
        let mut wake = Vec::new();
        let s = &self.state;
        if s.complete && !(old.complete && old.round == s.round) {
            #[cfg(test)]
            if self.fail_before_seats {
                return Err(RendezvousError::Closed);
            }
            wake.push(s.round);
            self.seat_everyone(version).await?;
        }
        let s = &self.state;
        if s.closed && !old.closed {
            wake.extend([s.round, s.round + 1]);
        }
        if s.epoch != old.epoch {
            // Best effort: a late append to the old log is noticed by its
            // author, who appends again.
            let k = self.log_key(old.epoch);
            self.client.delete_key(&k).await?;
        }
        for r in wake {
            let k = self.wake_key(r);
            self.client.set(&k, b"1").await?;
            // Nobody waits for a round two behind this one.
            if let Some(old) = r.checked_sub(2) {
                let k = self.wake_key(old);
                self.client.delete_key(&k).await?;
            }
        }
        Ok(true)
    }

    /// Leaves every participant of the round just completed its seat.
    async fn seat_everyone(&mut self, version: i64) -> Result<(), RendezvousError> {
        let s = &self.state;
        let all = sorted_nodes(s);
        let Some(rank0) = s.participants.iter().find(|(_, &r)| r == 0).map(|(n, _)| n) else {
            return Ok(());
        };
        let world = s.participants.len() as u32;
        let digest = digest(&s.participants);
        let seats: Vec<(String, Vec<u8>)> = s
            .participants
            .iter()
            .map(|(n, &rank)| {
                let seat = Seat {
                    rank,
                    world,
                    restarts: s.restarts,
                    version,
                    digest,
                    rank0: rank0.clone(),
                    watched: watched_by(&all, n),
                    failures: dynamic::NodeFailures::of(s),
                };
                (self.seat_key(s.round, n), seat.encode().into_bytes())
            })
            .collect();
        self.set_all(&seats).await
    }

    /// Nodes this agent watches: the next [`WATCHED`] after it, in node
    /// order, among every node the state knows (as last read, or as the
    /// seat said).
    fn watch_set(&self) -> Vec<Node> {
        self.watched.clone()
    }

    /// Reads the watched heartbeat counters if due (every node's while
    /// sweeping). Returns whether one of them has not moved for the
    /// dead-node window, by the monotonic clock.
    async fn check_liveness(&mut self) -> Result<bool, RendezvousError> {
        if self.finishing {
            return Ok(false);
        }
        // Once this node has run in a round: a job's first rendezvous has
        // no launcher to lose yet, and thousands of arriving agents need not
        // connect to each other while they rank.
        if self.ranked_once {
            self.hold_peers().await?;
        }
        if self.peers.dead().iter().any(|n| self.present(n)) {
            return Ok(true);
        }
        let now = Instant::now();
        // One beat missed: suspicion enough to look at everyone (a few
        // reads, no eviction: that still takes the whole window).
        let late_after = Duration::from_secs_f64(self.cfg.keep_alive_interval);
        let dead_after = Duration::from_secs_f64(self.cfg.dead_after());
        if now >= self.liveness.next_check {
            self.liveness.next_check =
                now + Duration::from_secs_f64(WATCH_EVERY.min(self.cfg.keep_alive_interval));
            let late = self
                .liveness
                .seen
                .iter()
                .any(|(n, &(_, at))| now.duration_since(at) > late_after && self.present(n));
            if late != self.liveness.sweeping {
                self.liveness.sweeping = late;
                self.liveness.everyone = if late {
                    // Who else is there: the state as it is now (read
                    // aside: the caller's view and CAS token stay as
                    // they are).
                    let raw = self.client.get_now(&self.key).await?;
                    State::decode(&String::from_utf8_lossy(&raw))
                        .map(|st| st.nodes().cloned().collect())
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
            }
            let mut watched = self.watch_set();
            if late {
                let known: BTreeSet<Node> = watched.iter().cloned().collect();
                watched.extend(
                    self.liveness
                        .everyone
                        .iter()
                        .filter(|n| **n != self.node && !known.contains(*n))
                        .cloned(),
                );
            }
            let mut seen = HashMap::with_capacity(watched.len());
            for n in watched {
                let count = self.client.add(&hb_key(&self.key, &n), 0).await?;
                if count < 0 {
                    // Fenced: another watcher evicted it; nothing to time.
                    self.watched.retain(|w| *w != n);
                    continue;
                }
                let since = match self.liveness.seen.get(&n) {
                    Some(&(c, at)) if c == count => at,
                    _ => now,
                };
                seen.insert(n, (count, since));
            }
            self.liveness.seen = seen;
        }
        Ok(self
            .liveness
            .seen
            .iter()
            .any(|(n, &(_, at))| now.duration_since(at) > dead_after && self.present(n)))
    }

    /// Holds a connection to each watched node's launcher (at the store
    /// address it published when it started), and to no other.
    async fn hold_peers(&mut self) -> Result<(), RendezvousError> {
        let watched = self.watch_set();
        self.peers.retain(&watched);
        for n in watched {
            if self.peers.watches(&n) {
                continue;
            }
            let k = self.master_key(&n);
            let addr = String::from_utf8_lossy(&self.client.get_now(&k).await?).into_owned();
            if !addr.is_empty() {
                self.peers.watch(n, addr);
            }
        }
        Ok(())
    }

    /// Whether `n` is still in the rendezvous as this agent knows it: a
    /// node already evicted (by us or another watcher) is no reason to act.
    fn present(&self, n: &Node) -> bool {
        self.watched.contains(n) || in_any_list(&self.state, n)
    }

    /// Fills the state's heartbeat times (wall clock, as of `t`) from what
    /// this agent saw of the nodes it watches (of every node, while it
    /// sweeps). Only those can be evicted here: the others are their own
    /// watchers' to judge.
    fn observe(&self, s: &mut State, t: f64) {
        let now = Instant::now();
        s.last_heartbeats = self
            .liveness
            .seen
            .iter()
            .map(|(n, &(_, at))| (n.clone(), t - now.duration_since(at).as_secs_f64()))
            .collect();
        // A launcher found gone is as dead as one silent for the window.
        for n in self.peers.dead() {
            s.last_heartbeats.insert(n, t - self.cfg.dead_after() - 1.0);
        }
    }

    /// When the next heartbeat check is due, as a wall time.
    fn next_liveness_check(&self, t: f64) -> f64 {
        t + self
            .liveness
            .next_check
            .saturating_duration_since(Instant::now())
            .as_secs_f64()
    }

    /// Whether this node's request is already reflected in the state.
    fn reflected(&self, r: &Request) -> bool {
        let s = &self.state;
        match r {
            Request::Join(n) => {
                s.participants.contains_key(n)
                    || s.wait_list.contains(n)
                    || s.redundancy_list.contains(n)
            }
            Request::Leave(n) | Request::Fail(n) => !s.participants.contains_key(n),
            Request::Quit(n) => !in_any_list(s, n),
            Request::CheckFailed(n) => dynamic::check_failure_counted(s, n, self.check_before),
            Request::Hosting(_) => true,
        }
    }

    /// This node's `--node-check` failed: it leaves the round it was in
    /// and the failure counts towards its exclusion. Returns the host's
    /// failures in this run; `Excluded` once they reach the limit.
    pub async fn report_check_failure(&mut self) -> Result<u32, RendezvousError> {
        let deadline = now() + self.join_timeout;
        self.op_deadline = deadline;
        self.read().await?;
        if self.is_fenced() {
            self.rotate_identity().await?;
            self.read().await?;
        }
        if std::mem::take(&mut self.after_failure)
            && self.state.participants.contains_key(&self.node)
        {
            // This node's workers failed before its check did: the round's
            // failure counts (once for the job) before the check's.
            let fail = Request::Fail(self.node.clone());
            self.run_op(Some(fail), move |s, n, t| {
                dynamic::exit_action(s, n, t, deadline)
            })
            .await?;
        }
        self.joined = None;
        let before = self
            .state
            .node_failures
            .get(&self.node.addr)
            .copied()
            .unwrap_or(0);
        self.check_before = before;
        let request = Request::CheckFailed(self.node.clone());
        self.run_op(Some(request), dynamic::check_failure_op(before))
            .await?;
        Ok(self
            .state
            .node_failures
            .get(&self.node.addr)
            .copied()
            .unwrap_or(0))
    }

    async fn append_to(&mut self, epoch: u64, r: &Request) -> Result<(), RendezvousError> {
        let k = self.log_key(epoch);
        self.client.append(&k, r.line().as_bytes()).await?;
        Ok(())
    }

    async fn append(&mut self, r: &Request) -> Result<u64, RendezvousError> {
        let epoch = self.state.epoch;
        let k = self.log_key(epoch);
        self.client.append(&k, r.line().as_bytes()).await?;
        Ok(epoch)
    }

    /// Runs an operation until it finishes: post `request` (if any), then
    /// read, apply pending requests, evict the dead, decide, write; `Sync`
    /// blocks until the state may have moved on.
    async fn run_op(
        &mut self,
        request: Option<Request>,
        op: impl Fn(&State, &Node, f64) -> Action,
    ) -> Result<Action, RendezvousError> {
        self.read().await?;
        // A request the fast path already posted is not posted again (the
        // loop below re-posts it if its log was retired unread); an agent
        // that already waited for its ack writes at once.
        let waited = self.waited.take();
        let mut jittered = waited.is_some();
        let mut posted = match (&request, waited) {
            (Some(r), Some((w, epoch))) if *r == w => Some((w, epoch)),
            (Some(r), _) => Some((r.clone(), self.append(r).await?)),
            (None, _) => None,
        };
        loop {
            if posted.is_some() && self.is_fenced() {
                // Evicted: nothing this identity asks for counts any more.
                return Err(RendezvousError::Fenced);
            }
            if let Some((r, epoch)) = &posted {
                // Appended to a log that was retired before anyone read our
                // line: append again to the current one.
                if self.state.epoch != *epoch && !self.reflected(r) {
                    let r = r.clone();
                    let epoch = self.append(&r).await?;
                    posted = Some((r, epoch));
                }
            }
            let t = now();
            // Judge the watched nodes on fresh counters, not on what was
            // seen before a long pause (stopping workers, say).
            let dead = self.check_liveness().await?;
            // Most wake-ups change nothing for this node (another joined,
            // say): decide on the state as read, without copying it.
            let action = op(&self.state, &self.node, t);
            let own_pending = posted.as_ref().is_some_and(|(r, _)| !self.reflected(r));
            if !dead && !own_pending && !is_mutation(action) {
                if let Some(done) = self.conclude(action, t).await? {
                    return done;
                }
                continue;
            }
            if own_pending && !dead && !jittered {
                // Only our own request needs writing: give the agents that
                // arrived with us a moment to write it for us (one write
                // then serves a whole batch of arrivals).
                jittered = true;
                tokio::time::sleep(self.batch_jitter()).await;
                self.read().await?;
                continue;
            }
            let log_key = self.log_key(self.state.epoch);
            let log = self.client.get_now(&log_key).await?;
            let mut next = self.state.clone();
            let applied = dynamic::drain(&mut next, &log, t, &self.cfg);
            self.observe(&mut next, t);
            let before = next.clone();
            if !dynamic::sanitize(&mut next, t, &self.cfg).is_empty() {
                dynamic::settle(&mut next, t, &self.cfg);
            }
            let dead_gone = gone(&before, &next);
            let action = op(&next, &self.node, t);
            let mutation = is_mutation(action);
            if mutation {
                dynamic::apply(&mut next, &self.node, action, t, &self.cfg);
            }
            if next.encode().as_bytes() != self.token.as_slice() || self.carried.is_some() {
                // A lost race re-read the state: decide again on it. (A node
                // carrying the job's count over from a lost store writes it
                // even when nothing else changed.)
                let fenced_before = self.state.fenced.clone();
                let won = self.cas(&next).await?;
                if won {
                    self.fence_nodes(&dead_gone, &fenced_before).await?;
                }
                if won && !applied.is_empty() {
                    self.ack(&applied).await?;
                    self.serve_pending().await?;
                    // Decide again on the state as served.
                    continue;
                }
                if !won || mutation {
                    continue;
                }
            }
            if let Some(done) = self.conclude(action, t).await? {
                return done;
            }
        }
    }

    /// After a write that applied requests: while more keep arriving (an
    /// arrival wave), apply them too. One agent thus serves the wave, and the
    /// others, seeing the version move, keep waiting for their acks instead
    /// of contending to write.
    async fn serve_pending(&mut self) -> Result<(), RendezvousError> {
        for _ in 0..SERVE_WRITES {
            // A pause lets the next batch gather: each write costs in
            // proportion to the job's size, so a larger job batches longer.
            tokio::time::sleep(self.ack_patience() - ACK_PATIENCE).await;
            let log = self.client.get_now(&self.log_key(self.state.epoch)).await?;
            let t = now();
            let mut next = self.state.clone();
            let applied = dynamic::drain(&mut next, &log, t, &self.cfg);
            if applied.is_empty() || !self.cas(&next).await? {
                // Nothing new, or another agent writes now.
                return Ok(());
            }
            self.ack(&applied).await?;
        }
        Ok(())
    }

    /// A random pause before writing the state for our own request: longer
    /// for a larger job (a few milliseconds at 512 nodes), nothing to speak
    /// of for a few nodes.
    fn ack_patience(&self) -> Duration {
        (ACK_PATIENCE + ACK_PATIENCE_PER_NODE * self.cfg.max_nodes.min(100_000))
            .min(ACK_PATIENCE_MAX)
    }

    fn batch_jitter(&self) -> Duration {
        use rand::Rng;
        let span = (f64::from(self.cfg.max_nodes.min(100_000)) * 20e-6).min(0.05);
        Duration::from_secs_f64(rand::thread_rng().gen_range(0.0..=span))
    }

    /// Acts on a decision that needs no write: finishes the operation
    /// (`Some`), or waits for the state to move and re-reads it (`None`).
    async fn conclude(
        &mut self,
        action: Action,
        t: f64,
    ) -> Result<Option<Result<Action, RendezvousError>>, RendezvousError> {
        super::note_spare(
            &mut self.spare_noted,
            &self.state,
            &self.node,
            self.cfg.max_nodes,
        );
        Ok(match super::settled(action) {
            Some(done) => Some(done),
            None => {
                self.wait_for_change(t).await?;
                self.read().await?;
                None
            }
        })
    }

    /// Blocks until the state may need this node again: the round it waits
    /// for completes or the rendezvous closes (store-pushed), a watched node
    /// dies, the last call or join deadline passes, the summary moves (a new
    /// round, a deadline), or a heartbeat interval passed since the last
    /// whole read (which would show this node evicted).
    async fn wait_for_change(&mut self, t0: f64) -> Result<(), RendezvousError> {
        let known = summary(&self.state);
        let summary_key = self.summary_key();
        let s = &self.state;
        let in_round = s.participants.contains_key(&self.node) && !s.complete;
        let round = if in_round { s.round } else { s.round + 1 };
        let deadline = s.deadline.filter(|_| in_round);
        let key = self.wake_key(round);
        loop {
            let t = now();
            let mut until = self.next_liveness_check(t).max(t0).min(self.op_deadline);
            if let Some(d) = deadline {
                until = until.min(d);
            }
            let timeout = Duration::from_secs_f64((until - t).clamp(0.01, 5.0));
            match self.wait_or_death(&key, timeout).await {
                Ok(()) => return Ok(()),
                Err(ClientError::WaitTimeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let t = now();
            if self.check_liveness().await?
                || deadline.is_some_and(|d| t >= d)
                || t >= self.op_deadline
                || t - self.read_at >= self.cfg.keep_alive_interval
            {
                return Ok(());
            }
            let v = self.read_version().await?;
            if v != self.version {
                // Others joined, say: nothing this node waits for, unless
                // the summary moved.
                if self.client.get_now(&summary_key).await? != known.as_bytes() {
                    return Ok(());
                }
                self.version = v;
            }
        }
    }

    /// Leaves the current round (if in one) and joins the next. Returns this
    /// node's rank and the world of the completed round.
    ///
    /// A store that stops answering (its host died) is waited for, until
    /// the join deadline: a store restarted at the same address (a pod
    /// restarted behind its service name) lets the job re-form; then this
    /// node's view starts afresh and its store address is published again.
    pub async fn next_rendezvous(&mut self) -> Result<Joined, RendezvousError> {
        if self.job_failed.is_some() {
            // The job failed and its restarts are spent (read while the
            // workers ran): there is no next round, and the store may
            // already be gone with its host.
            return Err(RendezvousError::Closed);
        }
        let deadline = now() + self.join_timeout;
        let mut waiting = false;
        loop {
            match self.join_once(deadline).await {
                Err(RendezvousError::Store(e)) => {
                    if now() >= deadline {
                        return Err(RendezvousError::StoreLost {
                            addr: self.endpoint.clone(),
                            timeout: Duration::from_secs_f64(self.join_timeout),
                        });
                    }
                    if !std::mem::replace(&mut waiting, true) {
                        tracing::warn!(
                            "the rendezvous store at {} does not answer ({e}); waiting up to join_timeout for a store there",
                            self.endpoint
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    // Whatever comes back there knows nothing of us: the
                    // job's count goes into the state we write there.
                    if !self.token.is_empty() {
                        self.remember_for_a_new_store();
                    }
                    self.token.clear();
                    self.state = State::default();
                    self.version = 0;
                    self.waited = None;
                    self.liveness.everyone.clear();
                    if let Some((addr, port)) = self.published.clone() {
                        let _ = self.publish_master(&addr, port).await;
                    }
                }
                // Evicted (a pause past the window, say): joins again as a
                // new node, as torch admits any newcomer.
                Err(RendezvousError::Fenced) if now() < deadline => {
                    self.rotate_identity().await?;
                }
                // The round lost a member as it formed (its rank 0's
                // store address is gone): the next one is joined.
                Err(RendezvousError::RoundBroken) if now() < deadline => {
                    tracing::info!(
                        "rendezvous: round {} lost a member as it formed; joining the next",
                        self.state.round
                    );
                }
                Err(RendezvousError::RoundBroken) => return Err(RendezvousError::JoinTimeout),
                other => return other,
            }
        }
    }

    async fn join_once(&mut self, deadline: f64) -> Result<Joined, RendezvousError> {
        self.op_deadline = deadline;
        if self.is_fenced() {
            return Err(RendezvousError::Fenced);
        }
        // A store that came back empty while this node's workers ran (it
        // never went through the store-loss wait) lacks this node's store
        // address: the others would wait for it as rank 0's.
        if let Some((addr, port)) = self.published.clone() {
            let k = self.master_key(&self.node);
            if self.client.get_now(&k).await?.is_empty() {
                self.publish_master(&addr, port).await?;
            }
        }
        // Spent here whether or not there is a round to leave (a failed
        // node check already left it): it never marks a later leave.
        let after_failure = std::mem::take(&mut self.after_failure);
        if self.joined.take().is_some() || self.state.participants.contains_key(&self.node) {
            let leave = if after_failure {
                Request::Fail(self.node.clone())
            } else {
                Request::Leave(self.node.clone())
            };
            if self.post_fast(&leave).await?.is_none() {
                self.run_op(Some(leave), |s, n, t| {
                    dynamic::exit_action(s, n, t, deadline)
                })
                .await?;
            }
        }
        let join = Request::Join(self.node.clone());
        // Admitted to the round, or waiting for the next (the group
        // re-forms): a seat will come. (A node carrying the job's count
        // over from a lost store writes the state itself.)
        let fast = if self.carried.is_none() {
            self.post_fast(&join).await?
        } else {
            None
        };
        let admitted = match fast {
            Some(('P', round)) => Some(round),
            Some(('W', round)) => Some(round + 1),
            _ => None,
        };
        if let Some(round) = admitted {
            if let Some(seat) = self.wait_seat(round).await? {
                return self.seated(round, seat).await;
            }
        }
        let cfg = self.cfg;
        let join = Request::Join(self.node.clone());
        let joined = self
            .run_op(Some(join), move |s, n, t| {
                dynamic::join_action(s, n, t, deadline, &cfg)
            })
            .await;
        let action = match joined {
            // The finishing nodes closed the rendezvous and the store's host
            // is gone: for a spare that is the end of the job, not an error.
            Err(RendezvousError::Store(e)) if self.state.redundancy_list.contains(&self.node) => {
                tracing::warn!(
                    "the rendezvous store is gone ({e}); a spare takes that as the end of the job"
                );
                return Err(RendezvousError::GracefulExit);
            }
            other => other?,
        };
        if action == Action::GracefulExit {
            return Err(RendezvousError::GracefulExit);
        }
        // (Finish means a whole round with this node in it; anything else
        // is a round that broke meanwhile: the next one is joined.)
        let rank = *self
            .state
            .participants
            .get(&self.node)
            .ok_or(RendezvousError::RoundBroken)?;
        let rank0 = self
            .state
            .participants
            .iter()
            .find(|(_, &r)| r == 0)
            .map(|(n, _)| n.clone())
            .ok_or(RendezvousError::RoundBroken)?;
        self.joined = Some(Membership {
            round: self.state.round,
            digest: digest(&self.state.participants),
            rank,
        });
        // The completer left a seat for every participant; this one joined
        // from the state and will not read it.
        let seat = self.seat_key(self.state.round, &self.node);
        self.client.delete_key(&seat).await?;
        let (master_addr, master_port) = self.master_of(&rank0).await?;
        self.ranked_once = true;
        self.watch_round(self.state.round);
        Ok(Joined {
            round: self.state.round,
            rank,
            world_size: self.state.participants.len() as u32,
            restarts: self.state.restarts,
            failures: dynamic::NodeFailures::of(&self.state),
            master_addr,
            master_port,
        })
    }

    /// Joins `round` from the seat its completer left: no state read.
    async fn seated(&mut self, round: u64, seat: Seat) -> Result<Joined, RendezvousError> {
        self.joined = Some(Membership {
            round,
            digest: seat.digest,
            rank: seat.rank,
        });
        // The state this agent holds is older than the round: the version
        // says so, and the first change after it brings a fresh read.
        self.version = seat.version;
        self.watched = seat.watched;
        let (master_addr, master_port) = self.master_of(&seat.rank0).await?;
        self.ranked_once = true;
        self.watch_round(round);
        Ok(Joined {
            round,
            rank: seat.rank,
            world_size: seat.world,
            restarts: seat.restarts,
            failures: seat.failures,
            master_addr,
            master_port,
        })
    }

    /// While workers run: evicts dead watched nodes, and tells whether the
    /// group must re-form (nodes waiting to join, or a participant of our
    /// round gone). Reads the whole state only when its version moved.
    pub async fn membership_changed(&mut self) -> Result<bool, RendezvousError> {
        if self.fenced.load(Ordering::SeqCst) {
            return Ok(true);
        }
        let t = now();
        let dead = self.check_liveness().await?;
        if !dead && self.read_version().await? == self.version {
            return Ok(false);
        }
        self.read().await?;
        let mut evicted = Vec::new();
        if dead {
            let mut next = self.state.clone();
            self.observe(&mut next, t);
            let before = next.clone();
            evicted = dynamic::sanitize(&mut next, t, &self.cfg);
            if !evicted.is_empty() {
                dynamic::settle(&mut next, t, &self.cfg);
                // A lost race is fine: the next check tries again.
                let fenced_before = self.state.fenced.clone();
                if self.cas(&next).await? {
                    self.fence_nodes(&gone(&before, &next), &fenced_before)
                        .await?;
                } else {
                    evicted.clear();
                }
            }
        }
        if self.is_fenced() {
            // This node was evicted while its workers ran: they stop, and
            // it joins again as a new node.
            return Ok(true);
        }
        let Some(m) = self.joined else {
            return Ok(false);
        };
        if self.state.closed {
            // Closed while this node's workers run: after a failure whose
            // restarts are spent, the job is over on every node (the next
            // round tells why). A success closes only after the exit
            // barrier, when every node's workers are done.
            return Ok(self.job_failure().await?.is_some());
        }
        let s = &self.state;
        if !evicted.is_empty() {
            tracing::warn!(
                "rendezvous: node(s) {} stopped sending heartbeats; re-forming the group",
                evicted
                    .iter()
                    .map(|n| format!("{}:{}", n.addr, n.pid))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let changed = s.round != m.round
            || !s.complete
            || digest(&s.participants) != m.digest
            || !s.wait_list.is_empty();
        if changed && !s.wait_list.is_empty() {
            tracing::warn!(
                "Detected {} new nodes from group_rank={}; will restart worker group",
                s.wait_list.len(),
                m.rank
            );
        }
        Ok(changed)
    }

    /// Deletes the keys of nodes that left the rendezvous for good (evicted
    /// or quit): heartbeat counter, published store, acks. A job whose
    /// launchers come and go does not grow the store with each one.
    async fn forget_nodes(&mut self, nodes: &[Node]) -> Result<(), RendezvousError> {
        for n in nodes {
            self.peers.forget(n);
            let mut keys = vec![hb_key(&self.key, n), self.master_key(n)];
            for r in [
                Request::Join(n.clone()),
                Request::Leave(n.clone()),
                Request::Quit(n.clone()),
                Request::Fail(n.clone()),
                Request::CheckFailed(n.clone()),
            ] {
                keys.push(self.ack_key(&r));
            }
            for k in keys {
                self.client.delete_key(&k).await?;
            }
        }
        Ok(())
    }

    /// After this node's write evicted `nodes`: each one's heartbeat counter
    /// is fenced (its owner, should it come back, reads that it was
    /// evicted; watchers never take it for alive), its published store and
    /// acks go. The heartbeat counters of evicted nodes the state no longer
    /// remembers (beyond [`dynamic::FENCED_KEPT`]) go too.
    async fn fence_nodes(
        &mut self,
        nodes: &[Node],
        fenced_before: &[Node],
    ) -> Result<(), RendezvousError> {
        for n in nodes {
            self.peers.forget(n);
            self.client.add(&hb_key(&self.key, n), FENCED_BEAT).await?;
            let mut keys = vec![self.master_key(n)];
            for r in [
                Request::Join(n.clone()),
                Request::Leave(n.clone()),
                Request::Quit(n.clone()),
                Request::Fail(n.clone()),
                Request::CheckFailed(n.clone()),
            ] {
                keys.push(self.ack_key(&r));
            }
            for k in keys {
                self.client.delete_key(&k).await?;
            }
        }
        self.evicted.extend(nodes.iter().cloned());
        let dropped: Vec<Node> = fenced_before
            .iter()
            .filter(|n| !self.state.fenced.contains(n))
            .cloned()
            .collect();
        for n in dropped {
            self.client.delete_key(&hb_key(&self.key, &n)).await?;
        }
        Ok(())
    }

    /// Takes this node out of the rendezvous for good, without closing it:
    /// the others re-form at once instead of after the heartbeat window.
    pub async fn quit(&mut self) -> Result<(), RendezvousError> {
        self.op_deadline = now() + self.close_timeout;
        let quit = Request::Quit(self.node.clone());
        if self.post_fast(&quit).await?.is_some() {
            return Ok(());
        }
        // While this node is in a list the decision is a write (the drained
        // request takes it out); once it is out, the operation is done.
        let quit = self
            .run_op(Some(quit), |s, n, _| {
                if in_any_list(s, n) {
                    Action::RemoveFromParticipants
                } else {
                    Action::Finish
                }
            })
            .await;
        match quit {
            // Evicted already: out of every list.
            Ok(_) | Err(RendezvousError::Fenced) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// After a quit: this node's own keys go too (its heartbeat stops
    /// with the process).
    pub async fn forget_self(&mut self) -> Result<(), RendezvousError> {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let me = self.node.clone();
        self.forget_nodes(&[me]).await
    }

    /// Marks the rendezvous closed: later joiners fail, spares exit 0.
    /// The job is ending here: other launchers that finish first and go
    /// are not deaths to report.
    pub fn stop_watching_peers(&mut self) {
        // For good: a state read while closing must not start it again
        // (the launchers that passed the exit barrier first are gone, and
        // a thousand nodes evicting them at once would contend to write).
        self.finishing = true;
        self.peers.retain(&[]);
        self.watched.clear();
        // Nor does it need to hear of its round's changes: a job of a
        // thousand nodes closing must not wake a thousand finished agents
        // into reading the state.
        if let Some(h) = self.round_watch.take() {
            h.abort();
        }
    }

    /// Shares this node's root cause with the job (before it closes).
    pub async fn publish_failure(&mut self, line: &str) -> Result<(), RendezvousError> {
        let k = format!("{}.failures", self.key);
        self.client.append(&k, line.as_bytes()).await?;
        Ok(())
    }

    /// The job's root cause, as the nodes that ended in failure shared it.
    /// Reading it is acknowledged, for a store host waiting to go.
    pub async fn job_failure(&mut self) -> Result<Option<String>, RendezvousError> {
        if let Some(line) = &self.job_failed {
            return Ok(Some(line.clone()));
        }
        let raw = self
            .client
            .get_now(&format!("{}.failures", self.key))
            .await?;
        let line = dynamic::first_failure(String::from_utf8_lossy(&raw).lines());
        if line.is_some() {
            self.client
                .add(&format!("{}.failures_seen", self.key), 1)
                .await?;
            self.job_failed.clone_from(&line);
        }
        Ok(line)
    }

    /// The store's host, ending after a failure: waits (at most `within`)
    /// until every node of the last round has read the job's root cause,
    /// so that none is left to find the store gone instead.
    pub async fn wait_failure_seen(&mut self, within: Duration) {
        let everyone = self.state.participants.len().max(1) as i64;
        let key = format!("{}.failures_seen", self.key);
        let until = std::time::Instant::now() + within;
        while std::time::Instant::now() < until {
            match self.client.add(&key, 0).await {
                Ok(n) if n < everyone => {}
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!(
            "not every node learned the job's root cause within {within:?}; the store goes now"
        );
    }

    pub async fn close(&mut self) -> Result<(), RendezvousError> {
        // Every node closes at the end: most find it done.
        let closed = |raw: &[u8]| Summary::parse(raw).is_some_and(|s| s.closed);
        let raw = self.client.get_now(&self.summary_key()).await?;
        if closed(&raw) {
            return Ok(());
        }
        if let Some(m) = self.joined.filter(|m| m.rank != 0) {
            // The round's rank 0 closes it; the others wait for that (one
            // blocked request each) and close it themselves only if it does
            // not come. A thousand nodes leaving the exit barrier together
            // would otherwise each read the whole state and contend to
            // write the same close.
            let key = self.wake_key(m.round + 1);
            let _ = self
                .client
                .wait(&[key.as_str()], Duration::from_secs(2))
                .await;
            let raw = self.client.get_now(&self.summary_key()).await?;
            if closed(&raw) {
                return Ok(());
            }
        }
        let deadline = now() + self.close_timeout;
        self.op_deadline = deadline;
        self.run_op(None, |s, _, t| dynamic::close_action(s, t, deadline))
            .await?;
        Ok(())
    }
}

/// The nodes `before` lists and `after` does not.
fn gone(before: &State, after: &State) -> Vec<Node> {
    before
        .nodes()
        .filter(|n| !in_any_list(after, n))
        .cloned()
        .collect()
}

/// Every node the state lists, in node order.
pub(super) fn sorted_nodes(s: &State) -> Vec<&Node> {
    s.nodes().collect::<BTreeSet<_>>().into_iter().collect()
}

/// The next [`WATCHED`] nodes after `me` in `all` (sorted, distinct),
/// wrapping around; `me` itself excluded.
pub(super) fn watched_by(all: &[&Node], me: &Node) -> Vec<Node> {
    let start = all.partition_point(|n| *n <= me);
    (0..all.len())
        .map(|k| all[(start + k) % all.len()])
        .filter(|n| *n != me)
        .take(WATCHED)
        .cloned()
        .collect()
}

/// What a waiting node watches of the state (see `K.summary`).
fn summary(s: &State) -> String {
    format!(
        "{} {} {} {} {}",
        s.round,
        u8::from(s.complete),
        u8::from(s.closed),
        s.deadline
            .map_or_else(|| "-".to_string(), |d| d.to_string()),
        s.epoch
    )
}

fn hb_key(key: &str, n: &Node) -> String {
    format!("{key}.hb.{}.{}.{}", n.addr, n.pid, n.local_id)
}

/// Bumps this node's heartbeat counter every `every` until aborted. A lost
/// connection is re-opened at the next beat: a node must not be evicted
/// (and evicted again after every re-join) for one dropped connection. A
/// counter that reads negative was fenced by the node that evicted this
/// one: `fenced` is set, and the counter is left alone until the agent
/// gives this node a new identity (a new `key`).
async fn beat(
    mut client: Client,
    mut key: tokio::sync::watch::Receiver<String>,
    every: Duration,
    fenced: Arc<AtomicBool>,
) {
    let peer = client.peer_addr().ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut broken = false;
    loop {
        tick.tick().await;
        if broken {
            let Some(peer) = peer else { return };
            let opts = tcpstore::ConnectOptions {
                timeout: every,
                ..Default::default()
            };
            match Client::connect(&peer.ip().to_string(), peer.port(), opts).await {
                Ok(c) => client = c,
                Err(_) => continue,
            }
        }
        if fenced.load(Ordering::SeqCst) && !key.has_changed().unwrap_or(false) {
            continue;
        }
        let k = key.borrow_and_update().clone();
        broken = match client.add(&k, 1).await {
            Ok(count) => {
                if count < 0 && *key.borrow() == k {
                    fenced.store(true, Ordering::SeqCst);
                }
                false
            }
            Err(e) => {
                if !broken {
                    tracing::debug!("heartbeat not sent: {e}");
                }
                true
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcpstore::{BindAddr, ConnectOptions, Server};

    async fn agent(port: u16, i: u32, n: u32) -> DynamicRdzv {
        let cfg = Settings {
            min_nodes: n,
            max_nodes: n,
            last_call_timeout: 30.0,
            keep_alive_interval: 5.0,
            keep_alive_max_attempt: 3,
            max_node_failures: None,
        };
        agent_with(port, i, cfg, 60.0).await
    }

    async fn agent_with(port: u16, i: u32, cfg: Settings, join_timeout: f64) -> DynamicRdzv {
        let connect = || Client::connect("127.0.0.1", port, ConnectOptions::default());
        let (c, hb) = (connect().await.unwrap(), connect().await.unwrap());
        let node = Node {
            order: u32::MAX,
            // Host names as long as real ones: the requests of the two
            // rounds (about 30 KB) outgrow one log.
            addr: format!("node-{i:04}.cluster.example.com"),
            pid: 1000 + i,
            local_id: 0,
        };
        let mut d = DynamicRdzv::new(c, hb, "many", node, cfg, join_timeout, 30.0);
        d.publish_master(&format!("10.1.{}.{}", i / 250, i % 250), 29500)
            .await
            .unwrap();
        d
    }

    /// Every agent of a round: distinct ranks 0..n, one world, one round.
    async fn all_join(agents: Vec<DynamicRdzv>) -> (Vec<DynamicRdzv>, Vec<Joined>) {
        let tasks: Vec<_> = agents
            .into_iter()
            .map(|mut a| {
                tokio::spawn(async move {
                    let j = a.next_rendezvous().await.unwrap();
                    (a, j)
                })
            })
            .collect();
        let mut out = (Vec::new(), Vec::new());
        for t in tasks {
            let (a, j) = t.await.unwrap();
            out.0.push(a);
            out.1.push(j);
        }
        out
    }

    fn assert_one_world(joined: &[Joined], round: u64) {
        let n = joined.len() as u32;
        // Rank 0 is the first node in address order: node-0000.
        assert!(joined
            .iter()
            .all(|j| (j.master_addr.as_str(), j.master_port) == ("10.1.0.0", 29500)));
        let mut ranks: Vec<u32> = joined.iter().map(|j| j.rank).collect();
        ranks.sort_unstable();
        assert_eq!(ranks, (0..n).collect::<Vec<_>>());
        assert!(joined.iter().all(|j| j.world_size == n && j.round == round));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hundreds_of_agents_join_and_re_form_through_the_request_log() {
        let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
        // RDZV_N=4096 (with --release) makes it a stress test
        // (bench/rendezvous_scale.sh).
        let n: u32 = std::env::var("RDZV_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let mut agents = Vec::new();
        for i in 0..n {
            agents.push(agent(server.port(), i, n).await);
        }
        let t0 = std::time::Instant::now();
        let run = async {
            let (agents, joined) = all_join(agents).await;
            assert_one_world(&joined, 0);
            // Shown with --nocapture: bench/rendezvous_scale.sh reads it.
            eprintln!("{n} agents ranked in {:.2} s", t0.elapsed().as_secs_f64());
            let t1 = std::time::Instant::now();
            // Everyone leaves and re-joins at once (a restart): 600 more
            // requests, enough to move the log to its next epoch midway.
            let (mut agents, joined) = all_join(agents).await;
            assert_one_world(&joined, 1);
            eprintln!(
                "{n} agents re-formed in {:.2} s",
                t1.elapsed().as_secs_f64()
            );
            agents[0].read().await.unwrap();
            assert!(agents[0].state.epoch >= 1, "the log was compacted");
        };
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("every agent re-formed within 120 s");
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_survivors_of_a_dead_node_re_form_instead_of_timing_out() {
        let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
        let n = 16;
        let cfg = Settings {
            min_nodes: 2,
            max_nodes: n,
            last_call_timeout: 1.0,
            keep_alive_interval: 1.0,
            keep_alive_max_attempt: 2,
            max_node_failures: None,
        };
        let mut agents = Vec::new();
        for i in 0..n {
            agents.push(agent_with(server.port(), i, cfg, 30.0).await);
        }
        let (mut agents, joined) = all_join(agents).await;
        assert_one_world(&joined, 0);
        // Node 8's launcher dies: no leave, no more heartbeats.
        drop(agents.remove(8));
        let t0 = std::time::Instant::now();
        let run = async {
            let (_, joined) = all_join(agents).await;
            let mut ranks: Vec<u32> = joined.iter().map(|j| j.rank).collect();
            ranks.sort_unstable();
            assert_eq!(ranks, (0..n - 1).collect::<Vec<_>>());
            assert!(joined.iter().all(|j| j.world_size == n - 1));
        };
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("the 15 survivors re-formed within 20 s (join timeout 30 s)");
        eprintln!(
            "15 survivors re-formed in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_completer_that_dies_before_the_seats_does_not_hold_up_the_others() {
        let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
        let cfg = Settings {
            min_nodes: 2,
            max_nodes: 9,
            last_call_timeout: 30.0,
            keep_alive_interval: 1.0,
            keep_alive_max_attempt: 30,
            max_node_failures: None,
        };
        // Eight arrive together: one writes for the batch, the others wait
        // for their seats; the round waits for the ninth or the last call.
        let mut first = Vec::new();
        for i in 0..8 {
            first.push(agent_with(server.port(), i, cfg, 60.0).await);
        }
        let t0 = std::time::Instant::now();
        let waiting: Vec<_> = first
            .into_iter()
            .map(|mut a| tokio::spawn(async move { a.next_rendezvous().await.map(|j| (a, j)) }))
            .collect();
        // The ninth completes the round and dies before writing any seat.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut ninth = agent_with(server.port(), 8, cfg, 60.0).await;
        ninth.fail_before_seats = true;
        assert!(ninth.next_rendezvous().await.is_err());
        for w in waiting {
            let r = tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("joined within 10 s of the round completing (last call: 30 s)");
            let (_, j) = r.unwrap().unwrap();
            assert_eq!((j.round, j.world_size), (0, 9));
        }
        eprintln!(
            "eight joined {:.1} s after the start",
            t0.elapsed().as_secs_f64()
        );
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rack_of_dead_nodes_is_evicted_within_about_one_window() {
        let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
        let n = 20;
        let cfg = Settings {
            min_nodes: 2,
            max_nodes: n,
            last_call_timeout: 1.0,
            keep_alive_interval: 1.0,
            keep_alive_max_attempt: 2,
            max_node_failures: None,
        };
        let mut agents = Vec::new();
        for i in 0..n {
            agents.push(agent_with(server.port(), i, cfg, 60.0).await);
        }
        let (mut agents, joined) = all_join(agents).await;
        assert_one_world(&joined, 0);
        // Twelve consecutive nodes (a rack) die together.
        let survivors: Vec<DynamicRdzv> = {
            let mut keep = agents.split_off(16);
            agents.truncate(4);
            agents.append(&mut keep);
            agents
        };
        let t0 = std::time::Instant::now();
        let (_, joined) = tokio::time::timeout(Duration::from_secs(30), all_join(survivors))
            .await
            .expect("re-formed");
        let took = t0.elapsed().as_secs_f64();
        assert!(joined.iter().all(|j| j.world_size == 8));
        eprintln!("12 dead of 20 evicted and the 8 re-formed in {took:.1} s (window 2 s)");
        // One window (2 s), a late beat (1 s) and the checks' period (1 s),
        // with room for a loaded machine: not one window per three dead
        // nodes (12 s here before).
        assert!(took < 8.0, "took {took:.1} s");
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_does_not_grow_with_every_restart() {
        let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
        let n = 4;
        let mut agents = Vec::new();
        for i in 0..n {
            agents.push(agent(server.port(), i, n).await);
        }
        let mut counter = Client::connect("127.0.0.1", server.port(), ConnectOptions::default())
            .await
            .unwrap();
        let mut sizes = Vec::new();
        for round in 0..12 {
            let (a, joined) = all_join(agents).await;
            assert_one_world(&joined, round);
            agents = a;
            sizes.push(counter.num_keys().await.unwrap());
        }
        // A few rounds in, every kind of key exists; after that the count
        // stays put, whatever the number of restarts (give or take one key
        // in flight: a write claim, a round's change key). A key left per
        // round would be eight more by now.
        let settled = *sizes[3..6].iter().max().unwrap();
        assert!(sizes[11] <= settled + 1, "keys per round: {sizes:?}");
        server.shutdown().await;
    }

    fn fast(n: u32) -> Settings {
        Settings {
            min_nodes: 2,
            max_nodes: n,
            last_call_timeout: 1.0,
            keep_alive_interval: 0.5,
            keep_alive_max_attempt: 2,
            max_node_failures: None,
        }
    }

    /// Until `a` sees its round change (a watched node evicted, say).
    async fn until_changed(a: &mut DynamicRdzv) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !a.membership_changed().await.unwrap() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the round changed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_evicted_agent_that_resumes_learns_it_and_joins_again_as_a_new_node() {
        let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
        let port = server.port();
        let mut agents = Vec::new();
        for i in 0..3 {
            agents.push(agent_with(port, i, fast(3), 60.0).await);
        }
        let (mut agents, joined) = all_join(agents).await;
        assert_one_world(&joined, 0);
        let mut frozen = agents.pop().unwrap();
        let old_identity = frozen.node.clone();
        frozen.pause_heartbeat();
        for a in agents.iter_mut() {
            until_changed(a).await;
        }
        let (mut agents, joined) = all_join(agents).await;
        assert!(joined.iter().all(|j| j.world_size == 2), "{joined:?}");
        // It resumes: its first beat reads that it was fenced.
        frozen.resume_heartbeat(port).await;
        until_changed(&mut frozen).await;
        let rejoin = tokio::spawn(async move {
            let j = frozen.next_rendezvous().await.unwrap();
            (frozen, j)
        });
        // The others see a newcomer waiting and re-form with it.
        for a in agents.iter_mut() {
            until_changed(a).await;
        }
        let (_agents, mut joined) = all_join(agents).await;
        let (frozen, j) = rejoin.await.unwrap();
        joined.push(j);
        assert_one_world(&joined, joined[0].round);
        assert_eq!(joined[0].world_size, 3);
        assert_ne!(frozen.node, old_identity, "it joined under a new identity");
        assert!(frozen.state.fenced.contains(&old_identity));
        assert_eq!(frozen.evicted, vec![old_identity]);
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_key_that_vanished_is_read_again_and_the_count_carried_over() {
        let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
        let port = server.port();
        let mut a = agent_with(port, 0, fast(2), 60.0).await;
        let b = agent_with(port, 1, fast(2), 60.0).await;
        let (mut agents, _) = all_join(vec![a, b]).await;
        a = agents.remove(0);
        a.read().await.unwrap();
        let mut next = a.state.clone();
        next.restarts = 2;
        next.excluded.insert("bad-host".into());
        assert!(a.cas(&next).await.unwrap());
        // An operator deletes the state (or a store restarts empty at the
        // same address): a compare-and-set against it is answered with the
        // expected value, which must not be taken for the state.
        let mut admin = Client::connect("127.0.0.1", port, Default::default())
            .await
            .unwrap();
        admin.delete_key(&a.key).await.unwrap();
        let mut later = a.state.clone();
        later.deadline = Some(1.0);
        let mut won = false;
        for _ in 0..3 {
            if a.cas(&later).await.unwrap() {
                won = true;
                break;
            }
        }
        assert!(won, "the compare-and-set never re-read the missing key");
        let raw = admin.get_now(&a.key).await.unwrap();
        let stored = State::decode(&String::from_utf8_lossy(&raw))
            .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&raw)));
        assert_eq!(stored.restarts, 2, "the job's restart count was lost");
        assert!(stored.excluded.contains("bad-host"));
        // Said in the events file with the next round.
        assert_eq!(a.state_lost, Some((2, 1)));
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_whose_check_fails_after_its_workers_did_still_spends_a_restart() {
        let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
        let port = server.port();
        let mut agents = Vec::new();
        for i in 0..2 {
            agents.push(agent_with(port, i, fast(2), 60.0).await);
        }
        let (mut agents, joined) = all_join(agents).await;
        assert!(joined.iter().all(|j| j.restarts == 0));
        let a = &mut agents[0];
        a.note_failure();
        a.report_check_failure().await.unwrap();
        a.read().await.unwrap();
        assert_eq!(a.state.restarts, 1, "the failed round was not counted");
        assert_eq!(a.state.node_failures.get(&a.node.addr), Some(&1));
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_replaced_by_a_fresh_one_still_gets_the_jobs_count() {
        // The store's host restarts: its fresh launcher writes a new state
        // (restarts 0) before the others come back to it.
        let server = Server::bind(BindAddr::Any(0)).unwrap().spawn();
        let port = server.port();
        let a = agent_with(port, 0, fast(2), 60.0).await;
        let b = agent_with(port, 1, fast(2), 60.0).await;
        let (mut agents, _) = all_join(vec![a, b]).await;
        let mut a = agents.remove(0);
        a.read().await.unwrap();
        let mut next = a.state.clone();
        next.restarts = 3;
        assert!(a.cas(&next).await.unwrap());
        let mut fresh = State {
            generation: 42,
            ..State::default()
        };
        fresh.wait_list.insert(a.node.clone());
        let mut admin = Client::connect("127.0.0.1", port, Default::default())
            .await
            .unwrap();
        admin.set(&a.key, fresh.encode().as_bytes()).await.unwrap();
        a.read().await.unwrap();
        assert_eq!(a.state.restarts, 0);
        assert_eq!(a.state_lost, Some((3, 0)));
        let same = a.state.clone();
        let mut won = false;
        for _ in 0..3 {
            if a.cas(&same).await.unwrap() {
                won = true;
                break;
            }
        }
        assert!(won);
        let raw = admin.get_now(&a.key).await.unwrap();
        let stored = State::decode(&String::from_utf8_lossy(&raw)).unwrap();
        assert_eq!(stored.restarts, 3, "the job's restart count was reset");
        server.shutdown().await;
    }
}
