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
//!   order) and times their counters with its own clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tcpstore::{Client, ClientError};

use super::dynamic::{self, Action, Node, Request, Settings, State};
use super::RendezvousError;

/// How many other nodes each agent watches for missing heartbeats. Each node
/// is thus watched by this many others; if all of them die together, their
/// own watchers evict them first and the ring closes over the rest.
const WATCHED: usize = 3;

/// How often watched heartbeat counters are read, at most.
const WATCH_EVERY: f64 = 1.0;

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Heartbeat counters of the watched nodes and when (by this agent's clock)
/// each last moved.
#[derive(Default)]
struct Liveness {
    seen: HashMap<Node, (i64, f64)>,
    next_check: f64,
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
    /// The round this node is a participant of, with its participants.
    joined: Option<(u64, BTreeMap<Node, u32>)>,
    liveness: Liveness,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    /// The running operation's deadline (join or close timeout).
    op_deadline: f64,
    /// Whether the user was told this node waits as a spare.
    spare_noted: bool,
}

/// The outcome of joining.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub round: u64,
    pub rank: u32,
    pub world_size: u32,
    /// Where the round's workers meet: the rank-0 agent's worker store.
    pub master_addr: String,
    pub master_port: u16,
}

impl Drop for DynamicRdzv {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
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
        let key = format!("torch.rendezvous.{run_id}");
        let heartbeat = tokio::spawn(beat(
            heartbeat_client,
            hb_key(&key, &node),
            Duration::from_secs_f64(cfg.keep_alive_interval),
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
            heartbeat: Some(heartbeat),
            op_deadline: f64::INFINITY,
            spare_noted: false,
            evicted: Vec::new(),
        }
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

    /// Publishes this node's worker store; call once, before joining.
    pub async fn publish_master(&mut self, addr: &str, port: u16) -> Result<(), RendezvousError> {
        let k = self.master_key(&self.node);
        self.client
            .set(&k, format!("{addr}:{port}").as_bytes())
            .await?;
        Ok(())
    }

    async fn master_of(&mut self, n: &Node) -> Result<(String, u16), RendezvousError> {
        let k = self.master_key(n);
        let raw = String::from_utf8_lossy(&self.client.get(&k).await?).into_owned();
        raw.rsplit_once(':')
            .and_then(|(a, p)| Some((a.to_string(), p.parse().ok()?)))
            .ok_or(RendezvousError::BadAssignment(format!(
                "master address {raw:?}"
            )))
    }

    fn wake_key(&self, round: u64) -> String {
        format!("{}.wake.{round}", self.key)
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
        self.state = if raw.is_empty() {
            State::default()
        } else {
            State::decode(&String::from_utf8_lossy(&raw)).ok_or_else(|| {
                RendezvousError::BadState {
                    key: self.key.clone(),
                    start: String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned(),
                }
            })?
        };
        self.token = raw;
        Ok(())
    }

    /// Writes `new` if nobody changed the state since our last read, then
    /// tells the others: the version moves, and a round that completed or a
    /// rendezvous that closed wakes those blocked on it.
    async fn cas(&mut self, new: &State) -> Result<bool, RendezvousError> {
        let desired = new.encode().into_bytes();
        let got = self
            .client
            .compare_set(&self.key, &self.token, &desired)
            .await?;
        if got != desired {
            if got.is_empty() {
                // Key absent and our token non-empty: the store echoed our
                // expectation. Read what is really there.
                self.read().await?;
            } else {
                self.adopt(got)?;
            }
            return Ok(false);
        }
        let old = std::mem::take(&mut self.state);
        self.adopt(got)?;
        let k = self.summary_key();
        let sum = summary(&self.state);
        self.client.set(&k, sum.as_bytes()).await?;
        let k = self.version_key();
        self.client.add(&k, 1).await?;
        let s = &self.state;
        let mut wake = Vec::new();
        if s.complete && !(old.complete && old.round == s.round) {
            wake.push(s.round);
        }
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
        }
        Ok(true)
    }

    /// Nodes this agent watches: the next [`WATCHED`] after it, in node
    /// order, among every node the state knows.
    fn watch_set(&self) -> Vec<Node> {
        let s = &self.state;
        let all: BTreeSet<&Node> = s
            .participants
            .keys()
            .chain(&s.wait_list)
            .chain(&s.redundancy_list)
            .filter(|n| **n != self.node)
            .collect();
        let after = all.iter().filter(|n| ***n > self.node);
        let before = all.iter().filter(|n| ***n < self.node);
        after
            .chain(before)
            .take(WATCHED)
            .map(|n| (*n).clone())
            .collect()
    }

    /// Reads the watched heartbeat counters if due. Returns whether one of
    /// them has not moved for the dead-node window.
    async fn check_liveness(&mut self, t: f64) -> Result<bool, RendezvousError> {
        if t >= self.liveness.next_check {
            self.liveness.next_check = t + WATCH_EVERY.min(self.cfg.keep_alive_interval);
            let watched = self.watch_set();
            let mut seen = HashMap::with_capacity(watched.len());
            for n in watched {
                let count = self.client.add(&hb_key(&self.key, &n), 0).await?;
                let since = match self.liveness.seen.get(&n) {
                    Some(&(c, at)) if c == count => at,
                    _ => t,
                };
                seen.insert(n, (count, since));
            }
            self.liveness.seen = seen;
        }
        Ok(self
            .liveness
            .seen
            .values()
            .any(|&(_, at)| t - at > self.cfg.dead_after()))
    }

    /// Fills the state's heartbeat times from what this agent saw of the
    /// nodes it watches. Only those can be evicted here: the others are
    /// their own watchers' to judge.
    fn observe(&self, s: &mut State) {
        s.last_heartbeats = self
            .liveness
            .seen
            .iter()
            .map(|(n, &(_, at))| (n.clone(), at))
            .collect();
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
            Request::Leave(n) => !s.participants.contains_key(n),
            Request::Quit(n) => !in_any_list(s, n),
        }
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
        let mut posted = match &request {
            Some(r) => Some((r.clone(), self.append(r).await?)),
            None => None,
        };
        let mut jittered = false;
        loop {
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
            let dead = self.check_liveness(t).await?;
            // Most wake-ups change nothing for this node (another joined,
            // say): decide on the state as read, without copying it.
            let action = op(&self.state, &self.node, t);
            if !dead && !is_mutation(action) {
                if let Some(done) = self.conclude(action, t).await? {
                    return done;
                }
                continue;
            }
            let own_pending = posted.as_ref().is_some_and(|(r, _)| !self.reflected(r));
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
            dynamic::drain(&mut next, &log, t, &self.cfg);
            self.observe(&mut next);
            if !dynamic::sanitize(&mut next, t, &self.cfg).is_empty() {
                dynamic::settle(&mut next, t, &self.cfg);
            }
            let action = op(&next, &self.node, t);
            let mutation = is_mutation(action);
            if mutation {
                dynamic::apply(&mut next, &self.node, action, t, &self.cfg);
            }
            if next.encode().as_bytes() != self.token.as_slice() {
                // A lost race re-read the state: decide again on it.
                if !self.cas(&next).await? || mutation {
                    continue;
                }
            }
            if let Some(done) = self.conclude(action, t).await? {
                return done;
            }
        }
    }

    /// A random pause before writing the state for our own request: longer
    /// for a larger job (a few milliseconds at 512 nodes), nothing to speak
    /// of for a few nodes.
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
        if !self.spare_noted && self.state.redundancy_list.contains(&self.node) {
            self.spare_noted = true;
            tracing::warn!(
                "waiting as a spare: the job already has its maximum of {} nodes",
                self.cfg.max_nodes
            );
        }
        Ok(match action {
            Action::ErrorClosed => Some(Err(RendezvousError::Closed)),
            Action::ErrorTimeout => Some(Err(RendezvousError::JoinTimeout)),
            Action::Finish | Action::GracefulExit => Some(Ok(action)),
            _ => {
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
            let mut until = self.liveness.next_check.max(t0).min(self.op_deadline);
            if let Some(d) = deadline {
                until = until.min(d);
            }
            let timeout = Duration::from_secs_f64((until - t).clamp(0.01, 5.0));
            match self.client.wait(&[key.as_str()], timeout).await {
                Ok(()) => return Ok(()),
                Err(ClientError::WaitTimeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let t = now();
            if self.check_liveness(t).await?
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
    pub async fn next_rendezvous(&mut self) -> Result<Joined, RendezvousError> {
        let deadline = now() + self.join_timeout;
        self.op_deadline = deadline;
        if self.state.participants.contains_key(&self.node) {
            let leave = Request::Leave(self.node.clone());
            self.run_op(Some(leave), |s, n, t| {
                dynamic::exit_action(s, n, t, deadline)
            })
            .await?;
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
        let rank = *self
            .state
            .participants
            .get(&self.node)
            .ok_or(RendezvousError::JoinTimeout)?;
        let rank0 = self
            .state
            .participants
            .iter()
            .find(|(_, &r)| r == 0)
            .map(|(n, _)| n.clone())
            .ok_or(RendezvousError::JoinTimeout)?;
        self.joined = Some((self.state.round, self.state.participants.clone()));
        let (master_addr, master_port) = self.master_of(&rank0).await?;
        Ok(Joined {
            round: self.state.round,
            rank,
            world_size: self.state.participants.len() as u32,
            master_addr,
            master_port,
        })
    }

    /// While workers run: evicts dead watched nodes, and tells whether the
    /// group must re-form (nodes waiting to join, or a participant of our
    /// round gone). Reads the whole state only when its version moved.
    pub async fn membership_changed(&mut self) -> Result<bool, RendezvousError> {
        let t = now();
        let dead = self.check_liveness(t).await?;
        if !dead && self.read_version().await? == self.version {
            return Ok(false);
        }
        self.read().await?;
        let mut evicted = Vec::new();
        if dead {
            let mut next = self.state.clone();
            self.observe(&mut next);
            evicted = dynamic::sanitize(&mut next, t, &self.cfg);
            if !evicted.is_empty() {
                dynamic::settle(&mut next, t, &self.cfg);
                // A lost race is fine: the next check tries again.
                self.cas(&next).await?;
            }
        }
        let Some((round, members)) = &self.joined else {
            return Ok(false);
        };
        let s = &self.state;
        self.evicted.extend(evicted.iter().cloned());
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
        let changed = s.round != *round
            || !s.complete
            || &s.participants != members
            || !s.wait_list.is_empty();
        if changed && !s.wait_list.is_empty() {
            tracing::warn!(
                "Detected {} new nodes from group_rank={}; will restart worker group",
                s.wait_list.len(),
                members.get(&self.node).copied().unwrap_or(0)
            );
        }
        Ok(changed)
    }

    /// Takes this node out of the rendezvous for good, without closing it:
    /// the others re-form at once instead of after the heartbeat window.
    pub async fn quit(&mut self) -> Result<(), RendezvousError> {
        self.op_deadline = now() + self.close_timeout;
        let quit = Request::Quit(self.node.clone());
        // While this node is in a list the decision is a write (the drained
        // request takes it out); once it is out, the operation is done.
        self.run_op(Some(quit), |s, n, _| {
            if in_any_list(s, n) {
                Action::RemoveFromParticipants
            } else {
                Action::Finish
            }
        })
        .await?;
        Ok(())
    }

    /// Marks the rendezvous closed: later joiners fail, spares exit 0.
    pub async fn close(&mut self) -> Result<(), RendezvousError> {
        let deadline = now() + self.close_timeout;
        self.op_deadline = deadline;
        self.run_op(None, |s, _, t| dynamic::close_action(s, t, deadline))
            .await?;
        Ok(())
    }
}

fn in_any_list(s: &State, n: &Node) -> bool {
    s.participants.contains_key(n) || s.wait_list.contains(n) || s.redundancy_list.contains(n)
}

/// What a waiting node watches of the state (see `K.summary`).
fn summary(s: &State) -> String {
    format!(
        "{} {} {} {}",
        s.round,
        u8::from(s.complete),
        u8::from(s.closed),
        s.deadline
            .map_or_else(|| "-".to_string(), |d| d.to_string())
    )
}

/// Whether acting on `a` changes the shared state. (`KeepAlive` does not:
/// heartbeats live in keys of their own.)
fn is_mutation(a: Action) -> bool {
    !matches!(
        a,
        Action::Sync
            | Action::KeepAlive
            | Action::Finish
            | Action::GracefulExit
            | Action::ErrorClosed
            | Action::ErrorTimeout
    )
}

fn hb_key(key: &str, n: &Node) -> String {
    format!("{key}.hb.{}.{}.{}", n.addr, n.pid, n.local_id)
}

/// Bumps this node's heartbeat counter every `every` until aborted. A lost
/// connection is re-opened at the next beat: a node must not be evicted
/// (and evicted again after every re-join) for one dropped connection.
async fn beat(mut client: Client, key: String, every: Duration) {
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
        broken = match client.add(&key, 1).await {
            Ok(_) => false,
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
        let cfg = Settings {
            min_nodes: n,
            max_nodes: n,
            last_call_timeout: 30.0,
            keep_alive_interval: 5.0,
            keep_alive_max_attempt: 3,
        };
        let mut d = DynamicRdzv::new(c, hb, "many", node, cfg, 60.0, 30.0);
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
        // RDZV_N=2000 (with --release) makes it a stress test.
        let n: u32 = std::env::var("RDZV_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let mut agents = Vec::new();
        for i in 0..n {
            agents.push(agent(server.port(), i, n).await);
        }
        let run = async {
            let (agents, joined) = all_join(agents).await;
            assert_one_world(&joined, 0);
            // Everyone leaves and re-joins at once (a restart): 600 more
            // requests, enough to move the log to its next epoch midway.
            let (mut agents, joined) = all_join(agents).await;
            assert_one_world(&joined, 1);
            agents[0].read().await.unwrap();
            assert!(agents[0].state.epoch >= 1, "the log was compacted");
        };
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("every agent re-formed within 120 s");
        server.shutdown().await;
    }
}
