//! torch's dynamic rendezvous (the [`dynamic`] state machine, as with c10d)
//! with its state held in etcd, through etcd's v3 API.
//!
//! Keys, all under `P = <etcd_prefix>/rendezvous/<run_id>/`:
//! - `P/state`: the shared [`State`], written only by a transaction that
//!   compares the key's `mod_revision` with the one last read (the CAS
//!   token); a lost race returns the current value in the same round trip;
//! - `P/summary`: round, completeness, closure, last-call deadline and the
//!   size of each list, written by the same transaction whenever they
//!   change. Agents watch this small key, not the state: most changes (one
//!   more participant) concern a waiting agent not at all, and it decides
//!   that from the watch event alone, without a read;
//! - `P/~req/<node>/<J|L|Q>`: a node's pending join, leave or quit, on the
//!   node's lease. Whoever writes the state next applies every request
//!   modified after the revision the state records as applied (one write
//!   serves a whole batch of arrivals), and the author deletes its request
//!   once the state reflects it;
//! - `P/alive/<node>`: the node's worker-store address (`addr:port`), on the
//!   node's lease (TTL = `keep_alive_interval × keep_alive_max_attempt`,
//!   renewed every `keep_alive_interval`). A node is dead when its lease
//!   expires and etcd deletes the key: no timestamps are compared between
//!   machines, so clock skew cannot evict anyone;
//! - `P/lease`: the run lease's id, on the run lease itself, like `P/state`
//!   and `P/summary`. Every live agent renews it; once the last agent is
//!   gone, the run's keys expire `run_ttl` later (2 h by default), so dead
//!   runs do not pile up.
//!
//! Agents block on two watches instead of polling: `P/summary`, and the
//! deletions from `P/alive/` to `P/state` (a node's death, or the state
//! lost to an operator's delete; the requests sort after `~` to stay out of
//! that range). A watch always starts from "now" and every (re)start counts
//! as a change, so the agent re-reads: a watch can thus never fall behind a
//! compaction, and an etcd restart is a re-read.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::c10d::{now, Joined};
use super::dynamic::{self, in_any_list, is_mutation, Action, Node, Request, Settings, State};
use super::etcd_client::{op, Etcd, EtcdError, Kv};
use super::RendezvousError;

/// The keys of one run.
#[derive(Clone)]
struct Keys {
    root: String,
}

impl Keys {
    fn state(&self) -> Vec<u8> {
        format!("{}state", self.root).into_bytes()
    }
    fn lease(&self) -> Vec<u8> {
        format!("{}lease", self.root).into_bytes()
    }
    fn summary(&self) -> Vec<u8> {
        format!("{}summary", self.root).into_bytes()
    }
    fn alive_prefix(&self) -> Vec<u8> {
        format!("{}alive/", self.root).into_bytes()
    }
    fn alive(&self, n: &Node) -> Vec<u8> {
        format!("{}alive/{}", self.root, node_id(n)).into_bytes()
    }
    fn req_prefix(&self) -> Vec<u8> {
        format!("{}~req/", self.root).into_bytes()
    }
    /// The end (excluded) of the range whose deletions mean a death or a
    /// lost state: `alive/..`, `lease`, `state`.
    fn deaths_end(&self) -> Vec<u8> {
        format!("{}state\0", self.root).into_bytes()
    }
    fn failures_prefix(&self) -> Vec<u8> {
        format!("{}failures/", self.root).into_bytes()
    }
    fn req(&self, r: &Request) -> Vec<u8> {
        let (tag, n) = r.tag();
        format!("{}~req/{}/{tag}", self.root, node_id(n)).into_bytes()
    }
}

/// A node as a key segment: `order.pid.local_id.addr`.
fn node_id(n: &Node) -> String {
    format!("{}.{}.{}.{}", n.order, n.pid, n.local_id, n.addr)
}

/// The two leases an agent holds: its own, and the run's.
struct Leases {
    node: AtomicI64,
    run: AtomicI64,
}

/// Where the agent's background tasks tell it that something moved.
struct Signals {
    /// The summary as last written (`None`: unknown, after a watch
    /// (re)start or its deletion): changes at every change of it.
    summary: watch::Receiver<Option<Vec<u8>>>,
    /// Deaths and lost states, as the deletions watch reports them.
    deaths: watch::Receiver<Deaths>,
}

/// What the deletions watch has seen.
#[derive(Debug, Default)]
struct Deaths {
    /// Bumped at every deletion (and watch restart).
    count: u64,
    /// The nodes whose alive key was deleted (their ids).
    dead: HashSet<Vec<u8>>,
    /// Bumped when deletions may have been missed (a watch re-started).
    resyncs: u64,
    /// Bumped when the state key itself was deleted.
    state_lost: u64,
}

const STATE_LOST: &str =
    "the rendezvous state in etcd is gone (compacted or deleted); the nodes re-form in a new round";

/// Beyond this many candidates, the live nodes are listed whole instead
/// of each candidate's key being read.
const TARGETED_CHECKS: usize = 64;

/// One agent's view of the etcd rendezvous.
pub struct EtcdRdzv {
    /// Nodes this agent evicted (lease expired), not yet told to the agent.
    pub evicted: Vec<Node>,
    etcd: Arc<Etcd>,
    keys: Keys,
    node: Node,
    cfg: Settings,
    join_timeout: f64,
    close_timeout: f64,
    /// The state as last read, and its `mod_revision` (0: absent).
    state: State,
    token: i64,
    /// Whether a state was ever read (a vanished one then starts a new round).
    seen_state: bool,
    joined: Option<(u64, BTreeMap<Node, u32>)>,
    op_deadline: f64,
    spare_noted: bool,
    /// The next leave is because this node's workers failed.
    after_failure: bool,
    /// The host's failures when this node posted its last failed check.
    check_before: u32,
    leases: Arc<Leases>,
    /// This node's worker store, `addr:port`.
    master: String,
    signals: Signals,
    /// The death count and resyncs the last full read saw.
    deaths_seen: u64,
    resyncs_seen: u64,
    /// The run lease's TTL, should it need re-creating.
    run_ttl: i64,
    /// The state losses the deletions watch reported, as last seen, and
    /// whether the current loss was told to the user.
    state_lost_seen: u64,
    loss_warned: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The nodes this agent watches the launchers of (the next ones in node
    /// order among those of the state as last read): `watch_peers` holds
    /// connections to them.
    watched: watch::Sender<Vec<Node>>,
}

impl Drop for EtcdRdzv {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What `start` needs besides the client.
pub struct Params {
    pub prefix: String,
    pub run_id: String,
    pub node: Node,
    pub cfg: Settings,
    pub join_timeout: f64,
    pub close_timeout: f64,
    pub run_ttl: Duration,
    /// This node's worker store, `addr:port`.
    pub master: String,
}

impl EtcdRdzv {
    /// Registers this node (its lease and alive key), joins or creates the
    /// run lease, and starts the keep-alive and watch tasks.
    pub async fn start(etcd: Etcd, p: Params) -> Result<EtcdRdzv, RendezvousError> {
        let etcd = Arc::new(etcd);
        let keys = Keys {
            root: format!(
                "{}/rendezvous/{}/",
                p.prefix.trim_end_matches('/'),
                p.run_id
            ),
        };
        let ttl = node_ttl(&p.cfg);
        let run_ttl = p.run_ttl.as_secs().max(1) as i64;
        let run_lease = run_lease(&etcd, &keys, run_ttl).await?;
        // The alive key is the last thing written before this returns (all
        // below is synchronous): a signal that drops the start mid-way leaves
        // at most a lease with no key, not a key nobody revokes.
        let node_lease = etcd.grant(ttl).await?;
        etcd.put(&keys.alive(&p.node), p.master.as_bytes(), node_lease)
            .await?;
        let leases = Arc::new(Leases {
            node: AtomicI64::new(node_lease),
            run: AtomicI64::new(run_lease),
        });
        let (summary_tx, summary_rx) = watch::channel(None);
        let (deaths_tx, deaths_rx) = watch::channel(Deaths::default());
        let (watched, watched_rx) = watch::channel(Vec::new());
        let every = Duration::from_secs_f64(p.cfg.keep_alive_interval.max(0.1));
        let tasks = vec![
            tokio::spawn(keep_alive(
                etcd.clone(),
                keys.clone(),
                p.node.clone(),
                p.master.clone(),
                leases.clone(),
                every,
                (ttl, run_ttl),
            )),
            tokio::spawn(watch_summary(etcd.clone(), keys.summary(), summary_tx)),
            tokio::spawn(watch_deaths(
                etcd.clone(),
                keys.alive_prefix(),
                keys.deaths_end(),
                deaths_tx,
            )),
            tokio::spawn(watch_peers(etcd.clone(), keys.clone(), watched_rx)),
        ];
        Ok(EtcdRdzv {
            evicted: Vec::new(),
            etcd,
            keys,
            node: p.node,
            cfg: p.cfg,
            join_timeout: p.join_timeout,
            close_timeout: p.close_timeout,
            state: State::default(),
            token: 0,
            seen_state: false,
            joined: None,
            op_deadline: f64::INFINITY,
            spare_noted: false,
            after_failure: false,
            check_before: 0,
            leases,
            master: p.master,
            signals: Signals {
                summary: summary_rx,
                deaths: deaths_rx,
            },
            deaths_seen: 0,
            resyncs_seen: 0,
            run_ttl,
            state_lost_seen: 0,
            loss_warned: false,
            tasks,
            watched,
        })
    }

    /// The next round is joined because this node's workers failed: the
    /// job's restart count moves (once per failed round).
    pub fn note_failure(&mut self) {
        self.after_failure = true;
    }

    /// This node's `--node-check` failed: it leaves the round it was in
    /// and the failure counts towards its exclusion. Returns the host's
    /// failures in this run; `Excluded` once they reach the limit.
    pub async fn report_check_failure(&mut self) -> Result<u32, RendezvousError> {
        let deadline = now() + self.join_timeout;
        self.op_deadline = deadline;
        self.read().await?;
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
        // Whoever applies the request must see us alive.
        let lease = self.leases.node.load(Ordering::Relaxed);
        self.etcd
            .put(&self.keys.alive(&self.node), self.master.as_bytes(), lease)
            .await?;
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

    /// Says once per loss that the state is gone.
    fn warn_state_lost(&mut self) {
        if !std::mem::replace(&mut self.loss_warned, true) {
            tracing::warn!("{STATE_LOST}");
        }
    }

    fn adopt(&mut self, kv: Option<&Kv>) -> Result<(), RendezvousError> {
        match kv {
            None => {
                if self.token != 0 || (self.seen_state && self.state != State::default()) {
                    self.warn_state_lost();
                    // A new round number: nothing of the lost rounds' keys
                    // (in the workers' store) is taken for this one's.
                    self.state = State {
                        round: self.state.round + 1,
                        ..State::default()
                    };
                } else if !self.seen_state {
                    self.state = State::default();
                }
                self.token = 0;
            }
            Some(kv) if kv.mod_revision == self.token => {}
            Some(kv) => {
                let text = String::from_utf8_lossy(&kv.value);
                self.state = State::decode(&text).ok_or_else(|| RendezvousError::BadState {
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    start: text.chars().take(40).collect(),
                })?;
                self.token = kv.mod_revision;
                self.seen_state = true;
            }
        }
        self.watch_next_nodes();
        Ok(())
    }

    /// Tells `watch_peers` which launchers to hold connections to, once
    /// this node has joined a round (a job's first rendezvous has no
    /// launcher to lose yet, and its arriving agents need not load etcd
    /// with lookups while they rank).
    fn watch_next_nodes(&self) {
        if self.joined.is_none() {
            return;
        }
        let all = super::c10d::sorted_nodes(&self.state);
        let next = super::c10d::watched_by(&all, &self.node);
        self.watched.send_if_modified(|w| {
            let changed = *w != next;
            if changed {
                *w = next;
            }
            changed
        });
    }

    /// The job is ending here: other launchers that finish first and go
    /// are not deaths to report (nor alive keys to delete).
    pub fn stop_watching_peers(&mut self) {
        self.joined = None;
        self.watched.send_if_modified(|w| {
            let changed = !w.is_empty();
            w.clear();
            changed
        });
    }

    /// Reads the state (its value only if it changed since the last read).
    /// Changes signalled before this read are covered by it.
    async fn read(&mut self) -> Result<(), RendezvousError> {
        self.signals.summary.borrow_and_update();
        let key = self.keys.state();
        if self.token == 0 {
            let (kvs, _) = self.etcd.range(&key, false).await?;
            return self.adopt(kvs.first());
        }
        let t = self
            .etcd
            .txn(
                vec![op::mod_revision_is(&key, self.token)],
                Vec::new(),
                vec![op::get(&key)],
            )
            .await?;
        if t.succeeded {
            return Ok(());
        }
        self.adopt(t.range(0).first())
    }

    /// Reads, in one snapshot, the state (if it changed), the pending
    /// requests and whether each node that may have died is alive; returns
    /// the requests not yet applied (in order), the nodes found dead, and
    /// the snapshot's revision.
    async fn read_all(&mut self) -> Result<(Vec<Request>, HashSet<Vec<u8>>, i64), RendezvousError> {
        self.signals.summary.borrow_and_update();
        let (count, resyncs, suspects) = {
            let d = self.signals.deaths.borrow_and_update();
            if d.state_lost != self.state_lost_seen {
                // Every agent is told, not only the first to read after it.
                self.state_lost_seen = d.state_lost;
                if !self.loss_warned {
                    self.loss_warned = true;
                    tracing::warn!("{STATE_LOST}");
                }
            }
            let s = &self.state;
            let suspects: Vec<Vec<u8>> = s
                .nodes()
                .map(|n| node_id(n).into_bytes())
                .filter(|id| d.dead.contains(id))
                .collect();
            (d.count, d.resyncs, suspects)
        };
        // After a watch re-start, deaths may have gone unseen: list the live
        // nodes. Otherwise look only at the nodes reported dead.
        let list_all = resyncs != self.resyncs_seen || suspects.len() > TARGETED_CHECKS;
        let after = self.state.applied as i64;
        let key = self.keys.state();
        let mut ops = vec![op::prefix(&self.keys.req_prefix(), after, false)];
        if list_all {
            ops.push(op::prefix(&self.keys.alive_prefix(), 0, true));
        } else {
            let prefix = self.keys.alive_prefix();
            ops.extend(
                suspects
                    .iter()
                    .map(|id| op::get(&[&prefix[..], id].concat())),
            );
        }
        let mut failure = vec![op::get(&key)];
        failure.extend(ops.iter().cloned());
        // (With no token, the comparison is "the state is absent".)
        let compare = vec![op::mod_revision_is(&key, self.token)];
        let t = self.etcd.txn(compare, ops, failure).await?;
        // The state comes first when it changed.
        let first = if t.succeeded {
            0
        } else {
            self.adopt(t.range(0).first())?;
            1
        };
        self.deaths_seen = count;
        self.resyncs_seen = resyncs;
        let applied = self.state.applied as i64;
        let mut reqs: Vec<Kv> = t
            .range(first)
            .into_iter()
            .filter(|kv| kv.mod_revision > applied)
            .collect();
        reqs.sort_by_key(|kv| kv.mod_revision);
        let reqs = reqs
            .iter()
            .filter_map(|kv| Request::parse(String::from_utf8_lossy(&kv.value).trim_end()))
            .collect();
        let prefix_len = self.keys.alive_prefix().len();
        let id_of = |kv: Kv| kv.key[prefix_len.min(kv.key.len())..].to_vec();
        let dead = if list_all {
            let alive: HashSet<Vec<u8>> = t.range(first + 1).into_iter().map(id_of).collect();
            let s = &self.state;
            s.nodes()
                .map(|n| node_id(n).into_bytes())
                .filter(|id| !alive.contains(id))
                .collect()
        } else {
            suspects
                .into_iter()
                .enumerate()
                .filter(|(i, _)| t.range(first + 1 + i).is_empty())
                .map(|(_, id)| id)
                .collect()
        };
        Ok((reqs, dead, t.revision))
    }

    /// Writes `new` if the state is still the one last read; a lost race
    /// adopts the current state.
    async fn cas(&mut self, new: &State) -> Result<bool, RendezvousError> {
        let key = self.keys.state();
        let value = new.encode();
        let sum = summary(new);
        for attempt in 0..2 {
            let lease = self.leases.run.load(Ordering::Relaxed);
            let mut ops = vec![op::put(&key, value.as_bytes(), lease)];
            if self.token == 0 || sum != summary(&self.state) {
                ops.push(op::put(&self.keys.summary(), sum.as_bytes(), lease));
            }
            let t = self
                .etcd
                .txn(
                    vec![op::mod_revision_is(&key, self.token)],
                    ops,
                    vec![op::get(&key)],
                )
                .await;
            let t = match t {
                // The run lease expired (etcd lost it, or no agent renewed
                // it in time): take a new one and write again.
                Err(EtcdError::Refused(m)) if m.contains("lease not found") && attempt == 0 => {
                    let id = run_lease(&self.etcd, &self.keys, self.run_ttl).await?;
                    self.leases.run.store(id, Ordering::Relaxed);
                    continue;
                }
                other => other?,
            };
            if t.succeeded {
                self.state = new.clone();
                self.token = t.revision;
                self.seen_state = true;
                self.watch_next_nodes();
                return Ok(true);
            }
            self.adopt(t.range(0).first())?;
            return Ok(false);
        }
        Ok(false)
    }

    /// Whether this node's request is already reflected in the state.
    fn reflected(&self, r: &Request) -> bool {
        let s = &self.state;
        match r {
            Request::Join(n) => in_any_list(s, n),
            Request::Leave(n) | Request::Fail(n) => !s.participants.contains_key(n),
            Request::Quit(n) => !in_any_list(s, n),
            Request::CheckFailed(n) => dynamic::check_failure_counted(s, n, self.check_before),
            Request::Hosting(_) => true,
        }
    }

    async fn post(&mut self, r: &Request) -> Result<(), RendezvousError> {
        let lease = self.leases.node.load(Ordering::Relaxed);
        self.etcd
            .put(&self.keys.req(r), r.line().as_bytes(), lease)
            .await?;
        Ok(())
    }

    /// Whether a node died since the last full read.
    fn deaths_pending(&self) -> bool {
        self.signals.deaths.borrow().count != self.deaths_seen
    }

    /// Runs an operation until it finishes: post `request` (if any), then
    /// read, apply pending requests, evict the dead, decide, write; `Sync`
    /// waits for the next change.
    async fn run_op(
        &mut self,
        request: Option<Request>,
        op: impl Fn(&State, &Node, f64) -> Action,
    ) -> Result<Action, RendezvousError> {
        if let Some(r) = &request {
            self.post(r).await?;
        }
        self.read().await?;
        let mut jittered = false;
        let result = loop {
            let t = now();
            let action = op(&self.state, &self.node, t);
            let dead = self.deaths_pending();
            let own_pending = request.as_ref().is_some_and(|r| !self.reflected(r));
            if !dead && !own_pending && !is_mutation(action) {
                if let Some(done) = self.conclude(action, t).await? {
                    break done;
                }
                continue;
            }
            if own_pending && !dead && !jittered {
                // Give the agents that arrived with us a moment to write our
                // request with theirs: one write then serves the batch.
                jittered = true;
                tokio::time::sleep(batch_jitter(&self.cfg)).await;
                self.read().await?;
                continue;
            }
            let (reqs, dead, revision) = self.read_all().await?;
            let mut next = self.state.clone();
            if !reqs.is_empty() {
                // Everything up to the snapshot's revision is now applied.
                next.applied = revision.max(0) as u64;
            }
            for r in reqs {
                dynamic::apply_request(&mut next, r, t, &self.cfg);
            }
            let evicted = evict_dead(&mut next, &dead, &self.cfg);
            dynamic::settle(&mut next, t, &self.cfg);
            let action = op(&next, &self.node, t);
            let mutation = is_mutation(action);
            if mutation {
                dynamic::apply(&mut next, &self.node, action, t, &self.cfg);
            }
            if next != self.state || self.token == 0 {
                if !self.cas(&next).await? {
                    // Lost a race: decide again on the state as it is.
                    continue;
                }
                self.note_evicted(evicted);
                if mutation {
                    continue;
                }
            }
            if let Some(done) = self.conclude(action, t).await? {
                break done;
            }
        };
        if let Some(r) = &request {
            // Reflected (or the operation gave up): the request is spent.
            if let Err(e) = self.etcd.delete(&self.keys.req(r)).await {
                tracing::debug!("could not delete a spent rendezvous request: {e}");
            }
        }
        result
    }

    fn note_evicted(&mut self, evicted: Vec<Node>) {
        if evicted.is_empty() {
            return;
        }
        tracing::warn!(
            "rendezvous: the etcd lease of node(s) {} expired; re-forming the group",
            evicted
                .iter()
                .map(|n| format!("{}:{}", n.addr, n.pid))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.evicted.extend(evicted);
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
                self.wait_for_change(t).await;
                self.read().await?;
                None
            }
        })
    }

    /// Blocks until the summary changes in a way that matters to this node,
    /// a node dies, or a deadline this node waits for (the last call, the
    /// operation's) passes.
    async fn wait_for_change(&mut self, t: f64) {
        let s = &self.state;
        let in_round = s.participants.contains_key(&self.node) && !s.complete;
        let mut until = self.op_deadline;
        if let Some(d) = s.deadline.filter(|_| in_round) {
            until = until.min(d);
        }
        let pause = Duration::from_secs_f64((until - t).clamp(0.0, 3600.0));
        // A participant waiting for its round to complete does not care how
        // many others joined; everyone else (the wait list, spares) does.
        let relevant = |v: &str| -> String {
            if in_round {
                v.splitn(5, ' ').take(4).collect::<Vec<_>>().join(" ")
            } else {
                v.to_string()
            }
        };
        let known = relevant(&summary(s));
        let deaths_seen = self.deaths_seen;
        let deaths = &mut self.signals.deaths;
        let sums = &mut self.signals.summary;
        tokio::select! {
            _ = async {
                loop {
                    if sums.changed().await.is_err() {
                        return;
                    }
                    match &*sums.borrow_and_update() {
                        Some(v) if relevant(&String::from_utf8_lossy(v)) == known => {}
                        _ => return,
                    }
                }
            } => {}
            _ = async {
                loop {
                    if deaths.changed().await.is_err() || deaths.borrow().count != deaths_seen {
                        return;
                    }
                }
            } => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }

    /// Leaves the current round (if in one) and joins the next. Returns this
    /// node's rank and the world of the completed round.
    pub async fn next_rendezvous(&mut self) -> Result<Joined, RendezvousError> {
        let deadline = now() + self.join_timeout;
        self.op_deadline = deadline;
        self.read().await?;
        let after_failure = std::mem::take(&mut self.after_failure);
        if self.state.participants.contains_key(&self.node) {
            let leave = if after_failure {
                Request::Fail(self.node.clone())
            } else {
                Request::Leave(self.node.clone())
            };
            self.run_op(Some(leave), |s, n, t| {
                dynamic::exit_action(s, n, t, deadline)
            })
            .await?;
        }
        // Whoever applies our join must see us alive (the key may be gone if
        // our lease once expired).
        let lease = self.leases.node.load(Ordering::Relaxed);
        self.etcd
            .put(&self.keys.alive(&self.node), self.master.as_bytes(), lease)
            .await?;
        let cfg = self.cfg;
        let join = Request::Join(self.node.clone());
        let action = self
            .run_op(Some(join), move |s, n, t| {
                dynamic::join_action(s, n, t, deadline, &cfg)
            })
            .await?;
        if action == Action::GracefulExit {
            return Err(RendezvousError::GracefulExit);
        }
        let s = &self.state;
        let rank = *s
            .participants
            .get(&self.node)
            .ok_or(RendezvousError::JoinTimeout)?;
        let rank0 = s
            .participants
            .iter()
            .find(|(_, &r)| r == 0)
            .map(|(n, _)| n.clone())
            .ok_or(RendezvousError::JoinTimeout)?;
        self.joined = Some((s.round, s.participants.clone()));
        self.watch_next_nodes();
        // A later loss of the state is a new one to tell.
        self.loss_warned = false;
        let (master_addr, master_port) = self.master_of(&rank0).await?;
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

    async fn master_of(&self, n: &Node) -> Result<(String, u16), RendezvousError> {
        let (kvs, _) = self.etcd.range(&self.keys.alive(n), false).await?;
        let raw = kvs
            .first()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default();
        raw.rsplit_once(':')
            .and_then(|(a, p)| Some((a.to_string(), p.parse().ok()?)))
            .ok_or(RendezvousError::BadAssignment(format!(
                "master address {raw:?} of the round's rank 0 ({}:{}), which may have died",
                n.addr, n.pid
            )))
    }

    /// While workers run: evicts dead nodes and tells whether the group must
    /// re-form. Costs nothing (no request to etcd) until a watch reported a
    /// change.
    pub async fn membership_changed(&mut self) -> Result<bool, RendezvousError> {
        let dead = self.deaths_pending();
        if !dead {
            if !self.signals.summary.has_changed().unwrap_or(false) {
                return Ok(false);
            }
            let same = self.signals.summary.borrow_and_update().as_deref()
                == Some(summary(&self.state).as_bytes());
            if same {
                // Our own write, seen through the watch.
                return Ok(false);
            }
        }
        if dead {
            let (_, dead, _) = self.read_all().await?;
            let mut next = self.state.clone();
            let evicted = evict_dead(&mut next, &dead, &self.cfg);
            if !evicted.is_empty() {
                dynamic::settle(&mut next, now(), &self.cfg);
                // A lost race is fine: the winner evicted them, or the next
                // check tries again.
                if self.cas(&next).await? {
                    self.note_evicted(evicted);
                }
            }
        } else {
            self.read().await?;
        }
        if self.joined.is_none() {
            return Ok(false);
        }
        if self.state.closed {
            // Closed while this node's workers run: after a failure whose
            // restarts are spent, the job is over on every node (the next
            // round tells why). A success closes only after the exit
            // barrier, when every node's workers are done.
            return Ok(self.job_failure().await?.is_some());
        }
        let Some((round, members)) = &self.joined else {
            return Ok(false);
        };
        let s = &self.state;
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

    /// Takes this node out of the rendezvous for good, without closing it.
    pub async fn quit(&mut self) -> Result<(), RendezvousError> {
        self.op_deadline = now() + self.close_timeout;
        let quit = Request::Quit(self.node.clone());
        self.run_op(Some(quit), |s, n, _| {
            if in_any_list(s, n) {
                Action::RemoveFromParticipants
            } else {
                Action::Finish
            }
        })
        .await?;
        self.release().await;
        Ok(())
    }

    /// Marks the rendezvous closed: later joiners fail, spares exit 0.
    /// Shares this node's root cause with the job (before it closes); the
    /// key lives as long as the run's lease.
    pub async fn publish_failure(&mut self, line: &str) -> Result<(), RendezvousError> {
        let mut k = self.keys.failures_prefix();
        k.extend_from_slice(node_id(&self.node).as_bytes());
        let lease = self.leases.run.load(Ordering::Relaxed);
        self.etcd.put(&k, line.as_bytes(), lease).await?;
        Ok(())
    }

    /// The job's root cause, as the nodes that ended in failure shared it.
    pub async fn job_failure(&mut self) -> Result<Option<String>, RendezvousError> {
        let (mut kvs, _) = self.etcd.range(&self.keys.failures_prefix(), true).await?;
        // In the order etcd took them: the first node to share its failure
        // is the job's root cause on every node.
        kvs.sort_by_key(|kv| (kv.create_revision, kv.mod_revision));
        let lines: Vec<String> = kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .collect();
        Ok(dynamic::first_failure(lines.iter().map(String::as_str)))
    }

    pub async fn close(&mut self) -> Result<(), RendezvousError> {
        let deadline = now() + self.close_timeout;
        self.op_deadline = deadline;
        self.run_op(None, |s, _, t| dynamic::close_action(s, t, deadline))
            .await?;
        Ok(())
    }

    /// Gives this node's lease back: its keys go at once. (The run lease is
    /// left to expire: other agents may still renew it.)
    pub async fn release(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let lease = self.leases.node.load(Ordering::Relaxed);
        if let Err(e) = self.etcd.revoke(lease).await {
            tracing::debug!("could not revoke this node's etcd lease: {e}");
        }
    }
}

/// Takes the `dead` nodes (by id) out of `s`; returns the participants
/// among them.
fn evict_dead(s: &mut State, dead: &HashSet<Vec<u8>>, cfg: &Settings) -> Vec<Node> {
    let dead: Vec<Node> = s
        .nodes()
        .filter(|n| dead.contains(node_id(n).as_bytes()))
        .cloned()
        .collect();
    dead.into_iter()
        // (etcd: a node whose lease expired registers again under its own
        // identity, with a new lease; it is not fenced here.)
        .filter(|n| dynamic::evict(s, n, cfg, false))
        .collect()
}

/// A random pause before writing the state for our own request: longer for
/// a larger job.
fn batch_jitter(cfg: &Settings) -> Duration {
    use rand::Rng;
    let span = (f64::from(cfg.max_nodes.min(100_000)) * 100e-6).min(0.1);
    Duration::from_secs_f64(rand::thread_rng().gen_range(0.0..=span))
}

/// A node's lease TTL: the dead-node window, in whole seconds (etcd's
/// minimum is about 2 s).
fn node_ttl(cfg: &Settings) -> i64 {
    (cfg.dead_after().ceil() as i64).max(2)
}

/// The run lease: the one recorded at `P/lease` if there is one, else a new
/// one recorded there (a transaction decides between agents racing).
async fn run_lease(etcd: &Etcd, keys: &Keys, ttl: i64) -> Result<i64, RendezvousError> {
    let key = keys.lease();
    loop {
        let (kvs, _) = etcd.range(&key, false).await?;
        if let Some(id) = kvs
            .first()
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<i64>().ok())
        {
            if etcd.keep_alive(id).await? > 0 {
                return Ok(id);
            }
        }
        let mine = etcd.grant(ttl).await?;
        let rev = kvs.first().map_or(0, |kv| kv.mod_revision);
        let t = etcd
            .txn(
                vec![op::mod_revision_is(&key, rev)],
                vec![op::put(&key, mine.to_string().as_bytes(), mine)],
                Vec::new(),
            )
            .await?;
        if t.succeeded {
            return Ok(mine);
        }
        // Our own commit, whose reply was lost and which the client sent
        // again (the compare then fails on it), is not another agent's:
        // revoking `mine` would delete what is written on it.
        let (now, _) = etcd.range(&key, false).await?;
        if now
            .first()
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<i64>().ok())
            == Some(mine)
        {
            return Ok(mine);
        }
        // Another agent recorded its lease first: use that one.
        let _ = etcd.revoke(mine).await;
    }
}

/// Holds a connection to the launcher of each node in `watched` (at the
/// worker-store address its alive key holds). A launcher found gone (its
/// port refuses connections) has its alive key deleted at once: every
/// agent learns of the death from the deletions watch, as after its lease
/// expired, without waiting out the lease's TTL.
async fn watch_peers(etcd: Arc<Etcd>, keys: Keys, mut watched: watch::Receiver<Vec<Node>>) {
    let mut peers = super::peer_watch::PeerWatch::default();
    let news = peers.news.clone();
    loop {
        // Armed before looking, so that a death meanwhile is not missed.
        let died = news.notified();
        tokio::pin!(died);
        died.as_mut().enable();
        let now: Vec<Node> = watched.borrow_and_update().clone();
        peers.retain(&now);
        for n in &now {
            if peers.watches(n) {
                continue;
            }
            if let Ok((kvs, _)) = etcd.range(&keys.alive(n), false).await {
                if let Some(kv) = kvs.first() {
                    peers.watch(n.clone(), String::from_utf8_lossy(&kv.value).into_owned());
                }
            }
        }
        for n in peers.dead() {
            match etcd.delete(&keys.alive(&n)).await {
                Ok(_) => peers.forget(&n),
                Err(e) => tracing::debug!("cannot delete a dead node's alive key yet: {e}"),
            }
        }
        tokio::select! {
            changed = watched.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = died => {}
            // A node not found at first (its alive key not yet written), or
            // a deletion that failed: look again.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Renews both leases every `every`. A node lease that expired anyway (etcd
/// unreachable for longer than the dead-node window) is replaced and the
/// alive key put again; the others have evicted this node meanwhile, and
/// the agent re-joins when it sees that.
async fn keep_alive(
    etcd: Arc<Etcd>,
    keys: Keys,
    node: Node,
    master: String,
    leases: Arc<Leases>,
    every: Duration,
    (node_ttl, run_ttl): (i64, i64),
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let result: Result<(), EtcdError> = async {
            let id = leases.node.load(Ordering::Relaxed);
            if etcd.keep_alive(id).await? <= 0 {
                tracing::warn!("this node's etcd lease expired (etcd unreachable for longer than the dead-node window?); registering again");
                let id = etcd.grant(node_ttl).await?;
                etcd.put(&keys.alive(&node), master.as_bytes(), id).await?;
                leases.node.store(id, Ordering::Relaxed);
            }
            let id = leases.run.load(Ordering::Relaxed);
            if etcd.keep_alive(id).await? <= 0 {
                match run_lease(&etcd, &keys, run_ttl).await {
                    Ok(id) => leases.run.store(id, Ordering::Relaxed),
                    Err(e) => tracing::debug!("could not renew the run lease: {e}"),
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) if failing => {
                failing = false;
                tracing::warn!("etcd answers again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("cannot renew this node's etcd lease: {e}");
            }
            Err(_) => {}
        }
    }
}

/// Publishes each new value of the summary key; `None` when a watch
/// (re)starts (the agent then re-reads: changes may have been missed) or the
/// key is deleted.
async fn watch_summary(etcd: Arc<Etcd>, key: Vec<u8>, tx: watch::Sender<Option<Vec<u8>>>) {
    let mut pause = Duration::from_millis(50);
    loop {
        match etcd.watch(&key, None, 0, false).await {
            Ok(mut w) => {
                pause = Duration::from_millis(50);
                tx.send_replace(None);
                loop {
                    match w.next().await {
                        Ok(Some(b)) => {
                            let last = b.events.last().filter(|e| !e.deleted);
                            tx.send_replace(last.map(|e| e.kv.value.clone()));
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!("etcd watch ended: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!("cannot watch etcd: {e}"),
        }
        tx.send_replace(None);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Reports the deletions in `[from, end)`: an alive key's names a dead
/// node. A watch that re-starts may have missed some: a resync.
async fn watch_deaths(etcd: Arc<Etcd>, from: Vec<u8>, end: Vec<u8>, tx: watch::Sender<Deaths>) {
    let mut pause = Duration::from_millis(50);
    let mut first = true;
    loop {
        match etcd.watch(&from, Some(&end), 0, true).await {
            Ok(mut w) => {
                pause = Duration::from_millis(50);
                if !std::mem::take(&mut first) {
                    tx.send_modify(|d| {
                        d.count += 1;
                        d.resyncs += 1;
                    });
                }
                loop {
                    match w.next().await {
                        Ok(Some(b)) => tx.send_modify(|d| {
                            d.count += 1;
                            for e in &b.events {
                                if let Some(id) = e.kv.key.strip_prefix(&from[..]) {
                                    d.dead.insert(id.to_vec());
                                } else if e.kv.key == end[..end.len() - 1] {
                                    d.state_lost += 1;
                                }
                            }
                        }),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!("etcd watch ended: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!("cannot watch etcd: {e}"),
        }
        tx.send_modify(|d| {
            d.count += 1;
            d.resyncs += 1;
        });
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// What agents watch of the state: `round complete closed deadline
/// participants waiting spares`.
fn summary(s: &State) -> String {
    format!(
        "{} {} {} {} {} {} {}",
        s.round,
        u8::from(s.complete),
        u8::from(s.closed),
        s.deadline
            .map_or_else(|| "-".to_string(), |d| d.to_string()),
        s.participants.len(),
        s.wait_list.len(),
        s.redundancy_list.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A proxy in front of etcd that forwards everything, but answers the
    /// first transaction with a closed connection once etcd has applied
    /// it (a reply lost on the way back). Counts the lease grants.
    async fn lossy_proxy(upstream: u16, grants: Arc<AtomicUsize>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let (grants, lost) = (grants.clone(), lost.clone());
                tokio::spawn(async move {
                    let mut up = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                        .await
                        .unwrap();
                    let (mut cr, mut cw) = client.split();
                    let (mut ur, mut uw) = up.split();
                    let mut from_client = [0u8; 65536];
                    let mut from_up = [0u8; 65536];
                    loop {
                        tokio::select! {
                            n = cr.read(&mut from_client) => {
                                let Ok(n @ 1..) = n else { return };
                                let chunk = &from_client[..n];
                                let text = String::from_utf8_lossy(chunk);
                                if text.contains("/v3/lease/grant") {
                                    grants.fetch_add(1, Ordering::SeqCst);
                                }
                                if uw.write_all(chunk).await.is_err() {
                                    return;
                                }
                                if text.contains("/v3/kv/txn") && !lost.swap(true, Ordering::SeqCst) {
                                    // Let etcd apply it, then lose the reply.
                                    tokio::time::sleep(Duration::from_millis(300)).await;
                                    return;
                                }
                            }
                            n = ur.read(&mut from_up) => {
                                let Ok(n @ 1..) = n else { return };
                                if cw.write_all(&from_up[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        port
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_lease_whose_commit_reply_was_lost_is_kept_not_revoked() {
        let etcd = testkit::EtcdServer::start();
        let grants = Arc::new(AtomicUsize::new(0));
        let proxy = lossy_proxy(etcd.port, grants.clone()).await;
        let client = Etcd::connect(&super::super::etcd_client::EtcdOptions {
            endpoints: vec![format!("127.0.0.1:{proxy}")],
            https: false,
            ca_cert: None,
            client_cert: None,
            username: None,
            password: None,
            timeout: Duration::from_secs(10),
        })
        .await
        .unwrap();
        let keys = Keys {
            root: "/torch/elastic/rendezvous/lost-reply/".into(),
        };
        let lease = run_lease(&client, &keys, 30).await.unwrap();
        // The lease its own (re-sent) transaction recorded is the one used:
        // granted once, alive, and the one recorded.
        assert_eq!(
            grants.load(Ordering::SeqCst),
            1,
            "a second lease was granted"
        );
        assert!(
            client.keep_alive(lease).await.unwrap() > 0,
            "the lease was revoked"
        );
        let (kvs, _) = client.range(&keys.lease(), false).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&kvs[0].value).unwrap(),
            lease.to_string()
        );
    }
}
