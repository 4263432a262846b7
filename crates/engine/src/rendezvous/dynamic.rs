//! The c10d dynamic rendezvous as a pure state machine (spec §8.3): the
//! shared state, the decision table of the join, exit and keep-alive
//! operations, the mutations, and the eviction of dead nodes. No I/O and no
//! clock of its own: the caller passes `now` (seconds since the epoch, UTC).
//!
//! The state is stored in our own text encoding, not Python pickle: Python
//! torchrun agents cannot join a torchrun-rs rendezvous.
//!
//! Joins and leaves are requests appended to a log next to the state
//! ([`Request`]); whichever agent writes the state next applies every pending
//! request at once ([`drain`]). Hundreds of agents arriving together thus
//! cost a handful of state writes, not one contended write each.
//!
//! Heartbeats are not part of the shared state: each agent observes the
//! others' heartbeat counters with its own clock and passes what it saw in
//! [`State::last_heartbeats`], so clocks that differ between nodes cannot
//! make a live node look dead.

use std::collections::{BTreeMap, BTreeSet};

/// A node: its place in the cluster's own node order (Slurm's node index,
/// say; `u32::MAX` when there is none), address, pid, and a per-process
/// counter. Ordered by that index, then address string, then pid: that
/// order gives the ranks, so global rank 0 lands on the cluster's first
/// node when it has an order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Node {
    pub order: u32,
    pub addr: String,
    pub pid: u32,
    pub local_id: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    pub round: u64,
    pub complete: bool,
    /// Last-call deadline (set once `min_nodes` participants are in).
    pub deadline: Option<f64>,
    pub closed: bool,
    /// Node → rank (0 until the round completes).
    pub participants: BTreeMap<Node, u32>,
    /// Nodes that want into the next round (they trigger a re-rendezvous).
    pub wait_list: BTreeSet<Node>,
    /// Nodes beyond `max_nodes`, waiting as spares.
    pub redundancy_list: BTreeSet<Node>,
    /// When this agent last saw each node's heartbeat move, by its own clock.
    /// Local: not encoded.
    pub last_heartbeats: BTreeMap<Node, f64>,
    /// Which request log is current, and how many of its bytes are applied.
    pub epoch: u64,
    pub applied: u64,
    /// How many nodes are re-forming the group after a membership change (the
    /// live nodes when the first participant left). A round that reaches it
    /// completes at once instead of waiting out the last call: the survivors
    /// of a lost node, or a grown group, restart promptly.
    pub expected: Option<u32>,
    /// The job's restarts after a worker failure (`--max-restarts` counts
    /// these, for the whole job): every node of a round gets the same
    /// `TORCHELASTIC_RESTART_COUNT`, and rejoining never resets it.
    pub restarts: u32,
    /// The last round whose failure was counted.
    pub failed_round: Option<u64>,
    /// Failed rounds each host was the root cause of (the first to report
    /// the round's failure), by address.
    pub node_failures: BTreeMap<String, u32>,
    /// Hosts excluded for the rest of the run (`--max-node-failures`).
    pub excluded: BTreeSet<String>,
    /// How many participants the round had when it completed (0 while it
    /// is incomplete). A complete round with fewer has lost a member: it
    /// is no longer one to run in, and a node still joining it leaves and
    /// joins the next instead of running in a world with a hole.
    pub world: u32,
    /// Evicted nodes, most recent last (at most [`FENCED_KEPT`]): an
    /// evicted node is never admitted again under the same identity, and
    /// nothing it still writes (a join, a leave, a failure) changes a round.
    /// It learns of its eviction and joins again as a new node.
    pub fenced: Vec<Node>,
    /// Who is to blame for the running round's failure, decided when the
    /// round ends (see [`Blame`]).
    pub blame: Option<Blame>,
    /// A random number given to the state when it is first written to its
    /// store: a node that finds another one knows the store lost what it
    /// knew (restarted empty) even when a fresh launcher wrote it first.
    pub generation: u64,
    /// The host of the node whose process serves the rendezvous store (c10d
    /// without a standalone store): never excluded, since the job would go
    /// with its store. Its failures are still counted.
    pub store_host: Option<String>,
}

/// The evidence of what broke a running round, kept until the round ends,
/// when every node of it has left or been evicted (a dead node is a
/// participant until it is evicted, so the round cannot end before). Only
/// then is a failure counted against a host: the
/// hosts of evicted participants if there are any (a node that died, froze
/// past the window or was cut off is the cause; its peers' workers failing
/// on a reset connection are the consequence), else the first node that
/// reported the round's failure.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Blame {
    pub round: u64,
    /// The first node to report the round's failure (store order: the
    /// request log's).
    pub first: Option<Node>,
    /// Hosts of the round's participants evicted while it ran.
    pub lost: BTreeSet<String>,
    /// A participant left the running round for good (its launcher was
    /// stopped by a signal: a preemption, a scale-down): its peers' workers
    /// failing after it is no fault of theirs, and a quit is no fault of
    /// its host either. Nobody is blamed unless a member was evicted.
    pub quit: bool,
}

/// How many evicted identities the state remembers. An identity older than
/// this that sends a request is not refused; its requests can only come
/// from a launcher frozen across this many evictions.
pub const FENCED_KEPT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub min_nodes: u32,
    pub max_nodes: u32,
    pub last_call_timeout: f64,
    pub keep_alive_interval: f64,
    pub keep_alive_max_attempt: u32,
    /// `--max-node-failures`: a host that is the root cause of this many
    /// failed rounds is excluded for the rest of the run.
    pub max_node_failures: Option<u32>,
}

impl Settings {
    /// A node without a heartbeat for this long is dead.
    pub fn dead_after(&self) -> f64 {
        self.keep_alive_interval * f64::from(self.keep_alive_max_attempt)
    }
}

/// What an operation does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    KeepAlive,
    AddToParticipants,
    AddToWaitList,
    AddToRedundancyList,
    RemoveFromParticipants,
    RemoveFromWaitList,
    RemoveFromRedundancyList,
    MarkComplete,
    MarkClosed,
    /// Nothing to change: wait for others, then look again.
    Sync,
    Finish,
    ErrorClosed,
    ErrorTimeout,
    /// This host was excluded for the rest of the run.
    ErrorExcluded,
    /// A spare learns that the job is over: exit 0.
    GracefulExit,
}

/// Within this window after the join deadline a node still undoes its
/// membership (torch's rollback period).
const ROLLBACK_WINDOW: f64 = 5.0;

/// The join operation's decision table (spec §8.3), rows in order.
pub fn join_action(s: &State, node: &Node, now: f64, join_deadline: f64, cfg: &Settings) -> Action {
    let is_participant = s.participants.contains_key(node);
    let is_waiting = s.wait_list.contains(node);
    let is_spare = s.redundancy_list.contains(node);
    let n = s.participants.len() as u32;
    if s.excluded.contains(&node.addr) {
        return Action::ErrorExcluded;
    }
    if s.closed {
        return if is_spare {
            Action::GracefulExit
        } else {
            Action::ErrorClosed
        };
    }
    if is_spare {
        if n >= cfg.max_nodes {
            return keep_alive_or_sync(s, node, now, cfg);
        }
        return Action::RemoveFromRedundancyList;
    }
    if s.complete && is_participant {
        // A round that lost a member since it completed is left, and the
        // next one joined: its world has a hole.
        return if is_whole(s) {
            Action::Finish
        } else {
            Action::RemoveFromParticipants
        };
    }
    if now > join_deadline {
        let rollback = now <= join_deadline + ROLLBACK_WINDOW;
        if rollback && is_participant {
            return Action::RemoveFromParticipants;
        }
        if rollback && is_waiting {
            return Action::RemoveFromWaitList;
        }
        return Action::ErrorTimeout;
    }
    if s.complete {
        if n < cfg.max_nodes {
            if !is_waiting {
                return Action::AddToWaitList;
            }
        } else if !is_waiting {
            return Action::AddToRedundancyList;
        }
    } else if is_participant {
        let everyone_back = s.expected.is_some_and(|e| n >= e);
        if n >= cfg.min_nodes
            && n <= cfg.max_nodes
            && (everyone_back || s.deadline.is_some_and(|d| now >= d))
        {
            return Action::MarkComplete;
        }
    } else {
        return Action::AddToParticipants;
    }
    keep_alive_or_sync(s, node, now, cfg)
}

/// Whether a complete round still has every participant it completed with.
pub fn is_whole(s: &State) -> bool {
    s.complete && s.participants.len() as u32 == s.world
}

fn keep_alive_or_sync(s: &State, node: &Node, now: f64, cfg: &Settings) -> Action {
    match s.last_heartbeats.get(node) {
        Some(&hb) if now - hb < cfg.keep_alive_interval => Action::Sync,
        _ => Action::KeepAlive,
    }
}

/// Leaving the current round (before re-joining, or on the way out).
pub fn exit_action(s: &State, node: &Node, now: f64, deadline: f64) -> Action {
    if s.participants.contains_key(node) {
        if now > deadline {
            Action::ErrorTimeout
        } else {
            Action::RemoveFromParticipants
        }
    } else {
        Action::Finish
    }
}

/// Closing the rendezvous for everyone.
pub fn close_action(s: &State, now: f64, deadline: f64) -> Action {
    if s.closed {
        Action::Finish
    } else if now > deadline {
        Action::ErrorTimeout
    } else {
        Action::MarkClosed
    }
}

/// Whether acting on `a` changes the shared state. (`KeepAlive` does not:
/// heartbeats are not part of the shared state.)
pub fn is_mutation(a: Action) -> bool {
    !matches!(
        a,
        Action::Sync
            | Action::KeepAlive
            | Action::Finish
            | Action::GracefulExit
            | Action::ErrorClosed
            | Action::ErrorTimeout
            | Action::ErrorExcluded
    )
}

/// Whether `n` is in any of the state's lists.
pub fn in_any_list(s: &State, n: &Node) -> bool {
    s.participants.contains_key(n) || s.wait_list.contains(n) || s.redundancy_list.contains(n)
}

/// Applies a mutating action.
pub fn apply(s: &mut State, node: &Node, action: Action, now: f64, cfg: &Settings) {
    match action {
        Action::KeepAlive => {
            s.last_heartbeats.insert(node.clone(), now);
        }
        Action::AddToParticipants => {
            s.wait_list.remove(node);
            s.participants.insert(node.clone(), 0);
            s.last_heartbeats.insert(node.clone(), now);
            let n = s.participants.len() as u32;
            if n == cfg.min_nodes {
                s.deadline = Some(now + cfg.last_call_timeout);
            }
            if n == cfg.max_nodes {
                mark_complete(s);
            }
        }
        Action::MarkComplete => mark_complete(s),
        Action::AddToWaitList => {
            s.redundancy_list.remove(node);
            s.wait_list.insert(node.clone());
            s.last_heartbeats.insert(node.clone(), now);
        }
        Action::AddToRedundancyList => {
            s.redundancy_list.insert(node.clone());
            s.last_heartbeats.insert(node.clone(), now);
        }
        Action::RemoveFromParticipants => {
            if s.complete && s.expected.is_none() {
                // The first to leave a running group: everyone alive now is
                // expected back.
                s.expected = Some((s.participants.len() + s.wait_list.len()) as u32);
            }
            s.participants.remove(node);
            s.last_heartbeats.remove(node);
            after_participant_loss(s, cfg);
        }
        Action::RemoveFromWaitList => {
            s.wait_list.remove(node);
            s.last_heartbeats.remove(node);
        }
        Action::RemoveFromRedundancyList => {
            s.redundancy_list.remove(node);
            s.last_heartbeats.remove(node);
        }
        Action::MarkClosed => s.closed = true,
        Action::Sync
        | Action::Finish
        | Action::ErrorClosed
        | Action::ErrorTimeout
        | Action::ErrorExcluded
        | Action::GracefulExit => {}
    }
}

fn mark_complete(s: &mut State) {
    s.complete = true;
    s.deadline = None;
    s.expected = None;
    s.world = s.participants.len() as u32;
    for (rank, r) in s.participants.values_mut().enumerate() {
        *r = rank as u32;
    }
}

/// Counts the failure of the round that just ended, now that every node of
/// it has left or was evicted (the round moves on only then): excludes a
/// host at `--max-node-failures`.
fn resolve_blame(s: &mut State, cfg: &Settings) {
    let Some(b) = s.blame.take_if(|b| b.round < s.round) else {
        return;
    };
    let hosts: Vec<String> = if !b.lost.is_empty() {
        b.lost.into_iter().collect()
    } else if b.quit {
        Vec::new()
    } else {
        b.first.map(|n| n.addr).into_iter().collect()
    };
    for host in hosts {
        count_failure(s, &host, cfg);
    }
}

/// The blame record of the running round (made on first use).
fn blame_of_round(s: &mut State) -> &mut Blame {
    let round = s.round;
    if s.blame.as_ref().is_none_or(|b| b.round != round) {
        s.blame = Some(Blame {
            round,
            ..Blame::default()
        });
    }
    s.blame.get_or_insert_with(Blame::default)
}

/// An emptied complete round starts the next one; an incomplete round that
/// fell below `min_nodes` loses its last-call deadline.
fn after_participant_loss(s: &mut State, cfg: &Settings) {
    if s.complete && s.participants.is_empty() {
        s.complete = false;
        s.world = 0;
        s.round += 1;
        // Every node of the round left or was evicted: what broke it is
        // known now.
        resolve_blame(s, cfg);
    } else if !s.complete && (s.participants.len() as u32) < cfg.min_nodes {
        s.deadline = None;
    }
}

/// A change of membership that a node asks for by appending it to the
/// request log; see [`drain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Join(Node),
    Leave(Node),
    /// Leaving for good (the node's launcher was stopped by a signal): the
    /// others re-form without waiting for it to come back.
    Quit(Node),
    /// Leaving the round because its workers failed: as `Leave`, and the
    /// job's restart count moves, once per failed round whoever says so
    /// first.
    Fail(Node),
    /// The node's `--node-check` failed: it stays out of this round and
    /// the failure counts towards `--max-node-failures`.
    CheckFailed(Node),
    /// The node serves the rendezvous store in its own process (said once,
    /// when it starts).
    Hosting(Node),
}

impl Request {
    /// The request's one-letter tag (in the log, ack keys and etcd keys)
    /// and its node.
    pub fn tag(&self) -> (char, &Node) {
        match self {
            Request::Join(n) => ('J', n),
            Request::Leave(n) => ('L', n),
            Request::Quit(n) => ('Q', n),
            Request::Fail(n) => ('F', n),
            Request::CheckFailed(n) => ('C', n),
            Request::Hosting(n) => ('H', n),
        }
    }

    /// One line of the log: `J|L|Q|F|C <order> <pid> <local_id> <addr>`.
    pub fn line(&self) -> String {
        let (tag, n) = self.tag();
        format!("{tag} {}\n", node_text(n))
    }

    pub fn parse(line: &str) -> Option<Request> {
        let (tag, node) = line.split_once(' ')?;
        let node = node_parse(node)?;
        match tag {
            "J" => Some(Request::Join(node)),
            "L" => Some(Request::Leave(node)),
            "Q" => Some(Request::Quit(node)),
            "F" => Some(Request::Fail(node)),
            "C" => Some(Request::CheckFailed(node)),
            "H" => Some(Request::Hosting(node)),
            _ => None,
        }
    }
}

/// A log this long, once fully applied, is replaced by a fresh one (the next
/// epoch), so that reading it stays cheap however long the job runs.
/// Larger jobs get a longer log (128 bytes per node of `max_nodes`: room
/// for every node's leave and join), so that the wave of a whole job
/// arriving or restarting does not retire it midway (a line appended to a
/// log as it is retired is lost, and its author must notice and append it
/// again).
pub const LOG_COMPACT_BYTES: u64 = 16 * 1024;

pub fn log_compact_bytes(cfg: &Settings) -> u64 {
    LOG_COMPACT_BYTES.max(u64::from(cfg.max_nodes) * 128)
}

/// Applies the requests of `log` (the current epoch's log as read) that the
/// state has not applied yet, in order, then [`settle`]s. Malformed lines are
/// skipped. Returns the requests applied.
pub fn drain(s: &mut State, log: &[u8], now: f64, cfg: &Settings) -> Vec<Request> {
    // Requests are appended whole; read up to the last complete line.
    let end = log.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) as u64;
    let start = s.applied.min(end);
    let mut applied = Vec::new();
    for line in log[start as usize..end as usize].split(|&b| b == b'\n') {
        let Some(req) = std::str::from_utf8(line).ok().and_then(Request::parse) else {
            continue;
        };
        applied.push(req.clone());
        apply_request(s, req, now, cfg);
    }
    s.applied = end;
    if end >= log_compact_bytes(cfg) {
        s.epoch += 1;
        s.applied = 0;
    }
    settle(s, now, cfg);
    applied
}

/// Applies one request (without [`settle`]ing): a join goes as far as the
/// join table allows without waiting, a leave leaves the round, a quit
/// leaves every list.
pub fn apply_request(s: &mut State, req: Request, now: f64, cfg: &Settings) {
    if s.fenced.contains(req.tag().1) {
        // From an evicted identity: it joins again under a new one.
        return;
    }
    match req {
        Request::Hosting(n) => s.store_host = Some(n.addr),
        Request::Join(n) if s.excluded.contains(&n.addr) => {}
        Request::Join(n) => admit(s, &n, now, cfg),
        Request::Leave(n) => {
            if exit_action(s, &n, now, f64::INFINITY) == Action::RemoveFromParticipants {
                apply(s, &n, Action::RemoveFromParticipants, now, cfg);
            }
        }
        Request::Quit(n) => {
            if s.complete && s.participants.contains_key(&n) {
                blame_of_round(s).quit = true;
            }
            remove_for_good(s, &n, cfg);
        }
        Request::Fail(n) => {
            if s.complete && s.participants.contains_key(&n) && s.failed_round != Some(s.round) {
                s.restarts += 1;
                s.failed_round = Some(s.round);
                // The first to report the round's failure is its root
                // cause unless a member was lost meanwhile; decided when
                // the round ends.
                blame_of_round(s).first = Some(n.clone());
            }
            apply_request(s, Request::Leave(n), now, cfg);
        }
        Request::CheckFailed(n) => {
            // A failed check is this node's own: counted at once.
            if count_failure(s, &n.addr, cfg) {
                return;
            }
            // Out of the round it was in (the check runs between rounds).
            apply_request(s, Request::Leave(n), now, cfg);
        }
    }
}

/// Counts one failure against `host`; at `--max-node-failures` the host is
/// excluded and every node of it leaves for good (a spare may take its
/// place). Returns whether it was excluded.
fn count_failure(s: &mut State, host: &str, cfg: &Settings) -> bool {
    let count = s.node_failures.entry(host.to_string()).or_default();
    *count += 1;
    let serves_the_store = s.store_host.as_deref() == Some(host);
    if cfg.max_node_failures.is_some_and(|k| *count >= k) && !serves_the_store {
        s.excluded.insert(host.to_string());
        let on_host: Vec<Node> = s.nodes().filter(|n| n.addr == host).cloned().collect();
        for n in on_host {
            remove_for_good(s, &n, cfg);
        }
        return true;
    }
    false
}

/// What a node that reported a failed check waits for: its failure in the
/// state (or its exclusion).
pub fn check_failure_op(before: u32) -> impl Fn(&State, &Node, f64) -> Action {
    move |s, n, _| {
        if s.excluded.contains(&n.addr) {
            Action::ErrorExcluded
        } else if check_failure_counted(s, n, before) {
            Action::Finish
        } else {
            Action::Sync
        }
    }
}

/// The rendezvous's record of failing hosts, as a round's nodes learn it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFailures {
    /// Failures (rounds it failed first, failed checks) by host.
    pub counts: BTreeMap<String, u32>,
    /// Hosts excluded for the rest of the run.
    pub excluded: BTreeSet<String>,
}

impl NodeFailures {
    pub fn of(s: &State) -> NodeFailures {
        NodeFailures {
            counts: s.node_failures.clone(),
            excluded: s.excluded.clone(),
        }
    }

    /// Lines `X <count> <addr>` and `E <addr>` (a seat's tail).
    pub fn encode(&self, out: &mut String) {
        for (addr, count) in &self.counts {
            out.push_str(&format!("\nX {count} {addr}"));
        }
        for addr in &self.excluded {
            out.push_str(&format!("\nE {addr}"));
        }
    }

    /// Takes one line of [`encode`](Self::encode); false if it is not one.
    pub fn parse_line(&mut self, line: &str) -> bool {
        if let Some(rest) = line.strip_prefix("X ") {
            if let Some((count, addr)) = rest.split_once(' ') {
                if let Ok(c) = count.parse() {
                    self.counts.insert(addr.to_string(), c);
                    return true;
                }
            }
            false
        } else if let Some(addr) = line.strip_prefix("E ") {
            self.excluded.insert(addr.to_string());
            true
        } else {
            false
        }
    }
}

/// A node's root cause as the job shares it: `<timestamp> <seq>\t<text>`,
/// one line.
pub fn failure_line(timestamp: u64, seq: u64, text: &str) -> String {
    format!("{timestamp} {seq}\t{}\n", text.replace('\n', " "))
}

/// The job's root cause among the nodes' shared lines, given in the order
/// the store took them (a c10d store's append order, etcd's revisions):
/// the first. Not by timestamp: nodes' clocks differ, and two failures in
/// one second would be ordered by each node's own counter.
pub fn first_failure<'a>(mut lines: impl Iterator<Item = &'a str>) -> Option<String> {
    lines.find_map(|l| {
        let (key, text) = l.split_once('\t')?;
        let (ts, seq) = key.split_once(' ')?;
        ts.parse::<u64>().ok()?;
        seq.parse::<u64>().ok()?;
        Some(text.trim_end().to_string())
    })
}

/// Whether `n`'s check failure, posted when its host had `before`
/// failures, is in the state.
pub fn check_failure_counted(s: &State, n: &Node, before: u32) -> bool {
    s.excluded.contains(&n.addr) || s.node_failures.get(&n.addr).copied().unwrap_or(0) > before
}

/// Takes `n` as far into the rendezvous as the join table allows without
/// waiting: participant, waiting for the next round, or spare.
fn admit(s: &mut State, n: &Node, now: f64, cfg: &Settings) {
    // A spare may step to the wait list and on into the round: three moves.
    for _ in 0..3 {
        match join_action(s, n, now, f64::INFINITY, cfg) {
            a @ (Action::AddToParticipants
            | Action::AddToWaitList
            | Action::AddToRedundancyList
            | Action::RemoveFromRedundancyList) => apply(s, n, a, now, cfg),
            _ => return,
        }
    }
}

/// After any change: nodes waiting for a round (and spares, when the round
/// has room) move in, and a round that has everyone it expects completes.
pub fn settle(s: &mut State, now: f64, cfg: &Settings) {
    admit_waiting(s, now, cfg);
    let n = s.participants.len() as u32;
    if !s.complete
        && !s.closed
        && n >= cfg.min_nodes
        && n <= cfg.max_nodes
        && (s.expected.is_some_and(|e| n >= e) || s.deadline.is_some_and(|d| now >= d))
    {
        mark_complete(s);
    }
}

/// Nodes waiting for a round, and spares when the round has room, move in.
fn admit_waiting(s: &mut State, now: f64, cfg: &Settings) {
    let waiting: Vec<Node> = s
        .wait_list
        .iter()
        .chain(&s.redundancy_list)
        .cloned()
        .collect();
    for n in &waiting {
        admit(s, n, now, cfg);
    }
}

/// Evicts every node whose last heartbeat is older than the dead-node
/// window. Returns the evicted participants.
pub fn sanitize(s: &mut State, now: f64, cfg: &Settings) -> Vec<Node> {
    let dead: Vec<Node> = s
        .last_heartbeats
        .iter()
        .filter(|(_, &hb)| now - hb > cfg.dead_after())
        .map(|(n, _)| n.clone())
        .collect();
    dead.into_iter()
        .filter(|n| evict(s, n, cfg, true))
        .collect()
}

/// Evicts `n` (dead, frozen past the window, cut off): out of every list
/// for good, its identity fenced where the backend gives a returning node
/// a new identity (`fence`), and, if it ran in a running round, its host is
/// that round's cause. Returns whether it was a participant.
pub fn evict(s: &mut State, n: &Node, cfg: &Settings, fence_it: bool) -> bool {
    if !in_any_list(s, n) {
        return false;
    }
    let running = s.complete && s.participants.contains_key(n);
    if running {
        blame_of_round(s).lost.insert(n.addr.clone());
    }
    if fence_it {
        fence(s, n);
    }
    remove_for_good(s, n, cfg)
}

/// Remembers `n` as evicted (see [`State::fenced`]).
pub fn fence(s: &mut State, n: &Node) {
    if !s.fenced.contains(n) {
        s.fenced.push(n.clone());
        if s.fenced.len() > FENCED_KEPT {
            s.fenced.remove(0);
        }
    }
}

/// Takes a node that will not come back (dead, or quitting) out of every
/// list; the others are not expected to wait for it. Returns whether it was
/// a participant.
pub fn remove_for_good(s: &mut State, n: &Node, cfg: &Settings) -> bool {
    s.last_heartbeats.remove(n);
    let was_waiting = s.wait_list.remove(n);
    s.redundancy_list.remove(n);
    let was_participant = s.participants.remove(n).is_some();
    if was_participant || was_waiting {
        // A re-forming group no longer waits for it: the round completes as
        // soon as every other live node is back, not at the last call.
        if let Some(e) = &mut s.expected {
            *e = e.saturating_sub(1);
        }
    }
    if was_participant {
        after_participant_loss(s, cfg);
    }
    was_participant
}

/// `<order> <pid> <local_id> <addr>`: the address last, so that it may hold any
/// character but a line break.
pub fn node_text(n: &Node) -> String {
    format!("{} {} {} {}", n.order, n.pid, n.local_id, n.addr)
}

pub fn node_parse(text: &str) -> Option<Node> {
    let mut f = text.splitn(4, ' ');
    let order = f.next()?.parse().ok()?;
    let pid = f.next()?.parse().ok()?;
    let local_id = f.next()?.parse().ok()?;
    let addr = f.next().filter(|a| !a.is_empty() && !a.contains('\n'))?;
    Some(Node {
        order,
        addr: addr.to_string(),
        pid,
        local_id,
    })
}

/// First line of an encoded state; a format change gets a new tag.
const STATE_TAG: &str = "torchrun-rs-rdzv/4";

impl State {
    /// Every node the state lists: participants, wait list, spares.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.participants
            .keys()
            .chain(&self.wait_list)
            .chain(&self.redundancy_list)
    }

    /// A compact line format (hundreds of agents read it at every change):
    /// a header line of `name=value` fields, then one line per node, `P
    /// <rank> <node>` for participants, `W <node>` waiting, `S <node>` spare.
    pub fn encode(&self) -> String {
        use std::fmt::Write;
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let mut out = format!(
            "{STATE_TAG} round={} complete={} closed={} deadline={} expected={} epoch={} applied={} restarts={} failed={} world={} blame={} gen={}\n",
            self.round,
            u8::from(self.complete),
            u8::from(self.closed),
            opt(self.deadline.map(|d| d.to_string())),
            opt(self.expected.map(|e| e.to_string())),
            self.epoch,
            self.applied,
            self.restarts,
            opt(self.failed_round.map(|r| r.to_string())),
            self.world,
            opt(self.blame.as_ref().map(|b| b.round.to_string())),
            self.generation,
        );
        for (n, r) in &self.participants {
            let _ = writeln!(out, "P {r} {}", node_text(n));
        }
        for n in &self.wait_list {
            let _ = writeln!(out, "W {}", node_text(n));
        }
        for n in &self.redundancy_list {
            let _ = writeln!(out, "S {}", node_text(n));
        }
        for (addr, count) in &self.node_failures {
            let _ = writeln!(out, "X {count} {addr}");
        }
        for addr in &self.excluded {
            let _ = writeln!(out, "E {addr}");
        }
        for n in &self.fenced {
            let _ = writeln!(out, "T {}", node_text(n));
        }
        if let Some(h) = &self.store_host {
            let _ = writeln!(out, "H {h}");
        }
        if let Some(b) = &self.blame {
            if let Some(n) = &b.first {
                let _ = writeln!(out, "BF {}", node_text(n));
            }
            for addr in &b.lost {
                let _ = writeln!(out, "BL {addr}");
            }
            if b.quit {
                let _ = writeln!(out, "BQ 1");
            }
        }
        out
    }

    pub fn decode(text: &str) -> Option<State> {
        let mut lines = text.lines();
        let mut header = lines.next()?.split(' ');
        if header.next()? != STATE_TAG {
            return None;
        }
        let mut s = State::default();
        let mut seen = 0;
        for field in header {
            let (k, v) = field.split_once('=')?;
            let opt = v != "-";
            match k {
                "round" => s.round = v.parse().ok()?,
                "complete" => s.complete = v == "1",
                "closed" => s.closed = v == "1",
                "deadline" => s.deadline = if opt { Some(v.parse().ok()?) } else { None },
                "expected" => s.expected = if opt { Some(v.parse().ok()?) } else { None },
                "epoch" => s.epoch = v.parse().ok()?,
                "applied" => s.applied = v.parse().ok()?,
                "restarts" => s.restarts = v.parse().ok()?,
                "failed" => s.failed_round = if opt { Some(v.parse().ok()?) } else { None },
                "world" => s.world = v.parse().ok()?,
                "blame" if opt => {
                    s.blame = Some(Blame {
                        round: v.parse().ok()?,
                        ..Blame::default()
                    })
                }
                "blame" => s.blame = None,
                "gen" => s.generation = v.parse().ok()?,
                _ => return None,
            }
            seen += 1;
        }
        if seen != 12 {
            return None;
        }
        for line in lines {
            let (tag, rest) = line.split_once(' ')?;
            match tag {
                "P" => {
                    let (rank, node) = rest.split_once(' ')?;
                    s.participants.insert(node_parse(node)?, rank.parse().ok()?);
                }
                "W" => {
                    s.wait_list.insert(node_parse(rest)?);
                }
                "S" => {
                    s.redundancy_list.insert(node_parse(rest)?);
                }
                "X" => {
                    let (count, addr) = rest.split_once(' ')?;
                    s.node_failures
                        .insert(addr.to_string(), count.parse().ok()?);
                }
                "E" => {
                    s.excluded.insert(rest.to_string());
                }
                "T" => s.fenced.push(node_parse(rest)?),
                "H" => s.store_host = Some(rest.to_string()),
                "BF" => s.blame.as_mut()?.first = Some(node_parse(rest)?),
                "BL" => {
                    s.blame.as_mut()?.lost.insert(rest.to_string());
                }
                "BQ" => s.blame.as_mut()?.quit = true,
                _ => return None,
            }
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addr: &str, pid: u32) -> Node {
        Node {
            order: u32::MAX,
            addr: addr.into(),
            pid,
            local_id: 0,
        }
    }

    fn cfg(min: u32, max: u32) -> Settings {
        Settings {
            min_nodes: min,
            max_nodes: max,
            last_call_timeout: 30.0,
            keep_alive_interval: 5.0,
            keep_alive_max_attempt: 3,
            max_node_failures: None,
        }
    }

    fn with_participants(nodes: &[&Node], complete: bool, now: f64) -> State {
        let mut s = State::default();
        for (i, n) in nodes.iter().enumerate() {
            s.participants.insert((*n).clone(), i as u32);
            s.last_heartbeats.insert((*n).clone(), now);
        }
        s.complete = complete;
        if complete {
            s.world = nodes.len() as u32;
        }
        s
    }

    const NOW: f64 = 1000.0;
    const JOIN_DEADLINE: f64 = 1600.0;

    #[test]
    fn row1_closed() {
        let a = node("a", 1);
        let mut s = State {
            closed: true,
            ..State::default()
        };
        assert_eq!(
            join_action(&s, &a, NOW, JOIN_DEADLINE, &cfg(1, 2)),
            Action::ErrorClosed
        );
        s.redundancy_list.insert(a.clone());
        assert_eq!(
            join_action(&s, &a, NOW, JOIN_DEADLINE, &cfg(1, 2)),
            Action::GracefulExit
        );
    }

    #[test]
    fn row2_spare() {
        let (a, b, c) = (node("a", 1), node("b", 1), node("c", 1));
        let mut s = with_participants(&[&a, &b], true, NOW);
        s.redundancy_list.insert(c.clone());
        s.last_heartbeats.insert(c.clone(), NOW - 1.0);
        assert_eq!(
            join_action(&s, &c, NOW, JOIN_DEADLINE, &cfg(1, 2)),
            Action::Sync
        );
        s.last_heartbeats.insert(c.clone(), NOW - 6.0);
        assert_eq!(
            join_action(&s, &c, NOW, JOIN_DEADLINE, &cfg(1, 2)),
            Action::KeepAlive
        );
        s.participants.remove(&b);
        assert_eq!(
            join_action(&s, &c, NOW, JOIN_DEADLINE, &cfg(1, 2)),
            Action::RemoveFromRedundancyList
        );
    }

    #[test]
    fn row3_complete_participant_finishes() {
        let a = node("a", 1);
        let s = with_participants(&[&a], true, NOW);
        assert_eq!(
            join_action(&s, &a, NOW, JOIN_DEADLINE, &cfg(1, 2)),
            Action::Finish
        );
    }

    #[test]
    fn row4_join_deadline_with_rollback() {
        let (a, b) = (node("a", 1), node("b", 1));
        let mut s = with_participants(&[&a], false, NOW);
        s.wait_list.insert(b.clone());
        let c = cfg(2, 2);
        assert_eq!(
            join_action(&s, &a, 1002.0, 1000.0, &c),
            Action::RemoveFromParticipants
        );
        assert_eq!(
            join_action(&s, &b, 1002.0, 1000.0, &c),
            Action::RemoveFromWaitList
        );
        assert_eq!(
            join_action(&s, &a, 1006.0, 1000.0, &c),
            Action::ErrorTimeout
        );
        assert_eq!(
            join_action(&s, &node("z", 1), 1002.0, 1000.0, &c),
            Action::ErrorTimeout
        );
    }

    #[test]
    fn row5_complete_round_newcomers_wait_or_are_spares() {
        let (a, b, c) = (node("a", 1), node("b", 1), node("c", 1));
        let s = with_participants(&[&a], true, NOW);
        assert_eq!(
            join_action(&s, &b, NOW, JOIN_DEADLINE, &cfg(1, 2)),
            Action::AddToWaitList
        );
        let s = with_participants(&[&a, &b], true, NOW);
        assert_eq!(
            join_action(&s, &c, NOW, JOIN_DEADLINE, &cfg(1, 2)),
            Action::AddToRedundancyList
        );
        let mut s = with_participants(&[&a], true, NOW);
        s.wait_list.insert(b.clone());
        s.last_heartbeats.insert(b.clone(), NOW);
        assert_eq!(
            join_action(&s, &b, NOW, JOIN_DEADLINE, &cfg(1, 2)),
            Action::Sync
        );
    }

    #[test]
    fn row6_last_call_completes() {
        let (a, b) = (node("a", 1), node("b", 1));
        let mut s = with_participants(&[&a, &b], false, NOW);
        s.deadline = Some(NOW + 1.0);
        let c = cfg(2, 3);
        assert_eq!(join_action(&s, &a, NOW, JOIN_DEADLINE, &c), Action::Sync);
        assert_eq!(
            join_action(&s, &a, NOW + 1.0, JOIN_DEADLINE, &c),
            Action::MarkComplete
        );
    }

    #[test]
    fn row7_newcomer_joins_incomplete_round() {
        let s = State::default();
        assert_eq!(
            join_action(&s, &node("a", 1), NOW, JOIN_DEADLINE, &cfg(1, 2)),
            Action::AddToParticipants
        );
    }

    #[test]
    fn row8_keep_alive_when_due() {
        let (a, b) = (node("a", 1), node("b", 1));
        let mut s = with_participants(&[&a, &b], false, NOW);
        s.last_heartbeats.insert(a.clone(), NOW - 6.0);
        assert_eq!(
            join_action(&s, &a, NOW, JOIN_DEADLINE, &cfg(3, 3)),
            Action::KeepAlive
        );
        assert_eq!(
            join_action(&s, &b, NOW, JOIN_DEADLINE, &cfg(3, 3)),
            Action::Sync
        );
    }

    #[test]
    fn joining_max_completes_with_ranks_by_address_then_pid() {
        let c = cfg(1, 3);
        let mut s = State::default();
        for n in [
            node("127.0.0.3", 5),
            node("127.0.0.2", 9),
            node("127.0.0.2", 7),
        ] {
            let a = join_action(&s, &n, NOW, JOIN_DEADLINE, &c);
            apply(&mut s, &n, a, NOW, &c);
        }
        assert!(s.complete && s.deadline.is_none());
        let ranks: Vec<(String, u32, u32)> = s
            .participants
            .iter()
            .map(|(n, r)| (n.addr.clone(), n.pid, *r))
            .collect();
        assert_eq!(
            ranks,
            vec![
                ("127.0.0.2".into(), 7, 0),
                ("127.0.0.2".into(), 9, 1),
                ("127.0.0.3".into(), 5, 2)
            ]
        );
    }

    #[test]
    fn min_nodes_sets_the_last_call_deadline() {
        let c = cfg(2, 4);
        let mut s = State::default();
        apply(&mut s, &node("a", 1), Action::AddToParticipants, NOW, &c);
        assert_eq!(s.deadline, None);
        apply(&mut s, &node("b", 1), Action::AddToParticipants, NOW, &c);
        assert_eq!(s.deadline, Some(NOW + 30.0));
    }

    #[test]
    fn leaving_an_emptied_complete_round_starts_the_next() {
        let a = node("a", 1);
        let c = cfg(1, 1);
        let mut s = with_participants(&[&a], true, NOW);
        assert_eq!(
            exit_action(&s, &a, NOW, JOIN_DEADLINE),
            Action::RemoveFromParticipants
        );
        apply(&mut s, &a, Action::RemoveFromParticipants, NOW, &c);
        assert_eq!((s.round, s.complete), (1, false));
        assert_eq!(exit_action(&s, &a, NOW, JOIN_DEADLINE), Action::Finish);
    }

    #[test]
    fn a_regrouping_round_completes_once_everyone_is_back() {
        let (a, b, c) = (node("a", 1), node("b", 1), node("c", 1));
        let cf = cfg(2, 3);
        // a and b run; c died and was evicted.
        let mut s = with_participants(&[&a, &b], true, NOW);
        apply(&mut s, &a, Action::RemoveFromParticipants, NOW, &cf);
        assert_eq!(s.expected, Some(2));
        apply(&mut s, &b, Action::RemoveFromParticipants, NOW, &cf);
        assert_eq!((s.round, s.complete), (1, false));
        apply(&mut s, &a, Action::AddToParticipants, NOW, &cf);
        apply(&mut s, &b, Action::AddToParticipants, NOW, &cf);
        // Both survivors are back: no 30 s last call.
        assert_eq!(
            join_action(&s, &a, NOW, JOIN_DEADLINE, &cf),
            Action::MarkComplete
        );
        apply(&mut s, &a, Action::MarkComplete, NOW, &cf);
        assert_eq!(s.expected, None);
        // A late joiner waiting makes the leaver expect it too.
        let mut s = with_participants(&[&a, &b], true, NOW);
        s.wait_list.insert(c.clone());
        apply(&mut s, &a, Action::RemoveFromParticipants, NOW, &cf);
        assert_eq!(s.expected, Some(3));
    }

    #[test]
    fn dead_nodes_are_evicted() {
        let (a, b, w) = (node("a", 1), node("b", 1), node("w", 1));
        let c = cfg(1, 3);
        let mut s = with_participants(&[&a, &b], true, NOW);
        s.wait_list.insert(w.clone());
        s.last_heartbeats.insert(w.clone(), NOW - 100.0);
        s.last_heartbeats.insert(b.clone(), NOW - 16.0);
        let lost = sanitize(&mut s, NOW, &c);
        assert_eq!(lost, vec![b.clone()]);
        assert!(s.wait_list.is_empty());
        assert_eq!(s.participants.len(), 1);
        assert!(
            s.complete,
            "survivors keep their round; the agent restarts them"
        );
        s.last_heartbeats.insert(a.clone(), NOW - 16.0);
        sanitize(&mut s, NOW, &c);
        assert_eq!((s.round, s.complete), (1, false));
    }

    #[test]
    fn close() {
        let s = State::default();
        assert_eq!(close_action(&s, NOW, JOIN_DEADLINE), Action::MarkClosed);
        assert_eq!(
            close_action(&s, JOIN_DEADLINE + 1.0, JOIN_DEADLINE),
            Action::ErrorTimeout
        );
        let s = State {
            closed: true,
            ..State::default()
        };
        assert_eq!(close_action(&s, NOW, JOIN_DEADLINE), Action::Finish);
    }

    #[test]
    fn state_round_trips_through_its_encoding() {
        let (a, b, c) = (node("127.0.0.2", 1), node("host_x", 2), node("::1", 3));
        let mut s = with_participants(&[&a, &b], true, NOW);
        s.wait_list.insert(c.clone());
        s.redundancy_list.insert(node("z", 9));
        s.deadline = Some(1234.5);
        s.round = 7;
        s.expected = Some(3);
        s.epoch = 2;
        s.applied = 77;
        s.restarts = 4;
        s.failed_round = Some(6);
        s.node_failures.insert("host_x".into(), 2);
        s.excluded.insert("bad-node".into());
        let back = State::decode(&s.encode()).unwrap();
        // Heartbeats are each agent's own observation, not shared.
        s.last_heartbeats.clear();
        assert_eq!(back, s);
        assert!(State::decode("{}").is_none());
        assert!(State::decode("garbage").is_none());
        let text = s.encode();
        assert!(State::decode(&text.replace("round=7", "round=x")).is_none());
        assert!(State::decode(&text.replace("epoch=2 ", "")).is_none());
        assert!(State::decode(&format!("{text}Q 1 0 a\n")).is_none());
    }

    fn log(reqs: &[Request]) -> Vec<u8> {
        reqs.iter()
            .map(Request::line)
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn requests_round_trip_through_log_lines() {
        for r in [
            Request::Join(node("127.0.0.2", 42)),
            Request::Leave(node("::1", 7)),
            Request::Quit(node("h", 9)),
        ] {
            let line = r.line();
            assert!(line.ends_with('\n'));
            assert_eq!(Request::parse(line.trim_end()), Some(r));
        }
        assert_eq!(Request::parse("X 1 0 a"), None);
        assert_eq!(Request::parse("J 1 0 "), None);
        assert_eq!(Request::parse("garbage"), None);
    }

    #[test]
    fn one_drain_admits_every_pending_join_and_completes_the_round() {
        let c = cfg(3, 3);
        let nodes = [
            node("127.0.0.4", 1),
            node("127.0.0.2", 1),
            node("127.0.0.3", 1),
        ];
        let mut s = State::default();
        let l = log(&nodes.iter().cloned().map(Request::Join).collect::<Vec<_>>());
        assert_eq!(drain(&mut s, &l, NOW, &c).len(), 3);
        assert!(s.complete);
        assert_eq!(s.applied, l.len() as u64);
        let ranks: Vec<(&str, u32)> = s
            .participants
            .iter()
            .map(|(n, r)| (n.addr.as_str(), *r))
            .collect();
        assert_eq!(
            ranks,
            vec![("127.0.0.2", 0), ("127.0.0.3", 1), ("127.0.0.4", 2)]
        );
        // Draining the same log again changes nothing.
        let before = s.clone();
        assert_eq!(drain(&mut s, &l, NOW, &c).len(), 0);
        assert_eq!(s, before);
    }

    #[test]
    fn drain_skips_applied_bytes_malformed_lines_and_a_torn_tail() {
        let c = cfg(1, 4);
        let (a, b) = (node("a", 1), node("b", 1));
        let mut s = State::default();
        let mut l = log(&[Request::Join(a.clone())]);
        drain(&mut s, &l, NOW, &c);
        l.extend_from_slice(b"not json\n");
        l.extend(log(&[Request::Join(b.clone())]));
        let torn = b"J 12";
        l.extend_from_slice(torn);
        assert_eq!(drain(&mut s, &l, NOW, &c).len(), 1);
        assert!(s.participants.contains_key(&b));
        assert!(!s.participants.contains_key(&node("c", 0)));
        assert_eq!(s.applied as usize, l.len() - torn.len());
    }

    #[test]
    fn drained_leaves_start_the_next_round_and_promote_the_wait_list() {
        let c = cfg(2, 3);
        let (a, b, w) = (node("a", 1), node("b", 1), node("w", 1));
        let mut s = with_participants(&[&a, &b], true, NOW);
        s.wait_list.insert(w.clone());
        let l = log(&[Request::Leave(a.clone()), Request::Leave(b.clone())]);
        drain(&mut s, &l, NOW, &c);
        assert_eq!((s.round, s.complete, s.expected), (1, false, Some(3)));
        assert!(
            s.participants.contains_key(&w),
            "the waiting node moves into round 1"
        );
        let mut l2 = l.clone();
        l2.extend(log(&[Request::Join(a.clone()), Request::Join(b.clone())]));
        drain(&mut s, &l2, NOW, &c);
        assert!(s.complete && s.participants.len() == 3);
    }

    #[test]
    fn a_join_to_a_running_round_waits_and_beyond_max_is_a_spare() {
        let c = cfg(1, 2);
        let (a, b, x, y) = (node("a", 1), node("b", 1), node("x", 1), node("y", 1));
        let mut s = with_participants(&[&a], true, NOW);
        drain(&mut s, &log(&[Request::Join(x.clone())]), NOW, &c);
        assert!(s.wait_list.contains(&x));
        let mut s = with_participants(&[&a, &b], true, NOW);
        drain(&mut s, &log(&[Request::Join(y.clone())]), NOW, &c);
        assert!(s.redundancy_list.contains(&y));
        // A participant evicted: the spare steps to the wait list.
        s.participants.remove(&b);
        settle(&mut s, NOW, &c);
        assert!(s.wait_list.contains(&y) && s.redundancy_list.is_empty());
    }

    #[test]
    fn a_long_log_moves_to_the_next_epoch() {
        let c = cfg(1, 100);
        let reqs: Vec<Request> = (0..1000)
            .map(|i| Request::Join(node("127.0.0.9", i)))
            .collect();
        let l = log(&reqs);
        assert!(l.len() as u64 >= log_compact_bytes(&c));
        let mut s = State::default();
        drain(&mut s, &l, NOW, &c);
        assert_eq!((s.epoch, s.applied, s.participants.len()), (1, 0, 100));
    }

    #[test]
    fn a_re_forming_round_does_not_wait_for_a_node_evicted_meanwhile() {
        // min 2, max 3: a, b and c run; a and b fail and come back at +12 s;
        // c is dead and evicted at +26 s. The round completes then, not
        // after a last call counted from the eviction (+56 s).
        let cf = cfg(2, 3);
        let (a, b, c) = (node("a", 1), node("b", 1), node("c", 1));
        let mut s = with_participants(&[&a, &b, &c], true, NOW);
        apply_request(&mut s, Request::Leave(a.clone()), NOW, &cf);
        apply_request(&mut s, Request::Leave(b.clone()), NOW, &cf);
        settle(&mut s, NOW, &cf);
        apply_request(&mut s, Request::Join(a.clone()), NOW + 12.0, &cf);
        apply_request(&mut s, Request::Join(b.clone()), NOW + 12.0, &cf);
        settle(&mut s, NOW + 12.0, &cf);
        assert!(
            !s.complete || s.participants.contains_key(&c),
            "c still holds the old round"
        );
        s.last_heartbeats.insert(c.clone(), NOW);
        let evicted = sanitize(&mut s, NOW + 26.0, &cf);
        assert_eq!(evicted, vec![c.clone()]);
        settle(&mut s, NOW + 26.0, &cf);
        assert!(s.complete, "complete at the eviction: {s:?}");
        assert_eq!(s.participants.len(), 2);
        assert!(s.participants.contains_key(&a) && s.participants.contains_key(&b));
    }

    #[test]
    fn a_failed_round_counts_one_restart_whoever_reports_it() {
        let c = cfg(2, 3);
        let (a, b, x) = (node("a", 1), node("b", 1), node("x", 1));
        let mut s = with_participants(&[&a, &b, &x], true, NOW);
        // Every node's workers failed: three reports, one restart.
        for n in [&a, &b, &x] {
            apply_request(&mut s, Request::Fail(n.clone()), NOW, &c);
        }
        assert_eq!((s.round, s.restarts), (1, 1));
        for n in [&a, &b, &x] {
            apply_request(&mut s, Request::Join(n.clone()), NOW, &c);
        }
        settle(&mut s, NOW, &c);
        assert!(s.complete);
        // A membership change (a plain leave) is free; the next failure
        // counts again.
        apply_request(&mut s, Request::Leave(x.clone()), NOW, &c);
        assert_eq!(s.restarts, 1);
        apply_request(&mut s, Request::Fail(a.clone()), NOW, &c);
        apply_request(&mut s, Request::Fail(b.clone()), NOW, &c);
        assert_eq!(s.restarts, 2);
        let line = Request::Fail(a.clone()).line();
        assert_eq!(Request::parse(line.trim_end()), Some(Request::Fail(a)));
    }

    #[test]
    fn a_host_that_keeps_failing_is_excluded_and_a_spare_takes_its_place() {
        let mut c = cfg(2, 2);
        c.max_node_failures = Some(2);
        let (a, b, spare) = (node("a", 1), node("b", 1), node("spare", 1));
        let mut s = with_participants(&[&a, &b], true, NOW);
        apply_request(&mut s, Request::Join(spare.clone()), NOW, &c);
        assert!(s.redundancy_list.contains(&spare));
        // a fails first twice (b's workers fail after it, as victims).
        for _ in 0..2 {
            apply_request(&mut s, Request::Fail(a.clone()), NOW, &c);
            apply_request(&mut s, Request::Fail(b.clone()), NOW, &c);
            for n in [&a, &b] {
                apply_request(&mut s, Request::Join(n.clone()), NOW, &c);
            }
            settle(&mut s, NOW, &c);
        }
        assert_eq!(s.node_failures.get("a"), Some(&2));
        assert_eq!(s.node_failures.get("b"), None);
        assert!(s.excluded.contains("a") && !in_any_list(&s, &a));
        // The spare took its place; a rejoining a is refused.
        assert!(s.complete && s.participants.contains_key(&spare));
        assert!(s.participants.contains_key(&b));
        apply_request(&mut s, Request::Join(a.clone()), NOW, &c);
        assert!(!in_any_list(&s, &a));
        assert_eq!(
            join_action(&s, &a, NOW, NOW + 60.0, &c),
            Action::ErrorExcluded
        );
        // A restarted launcher on that host (another pid) is refused too.
        assert_eq!(
            join_action(&s, &node("a", 2), NOW, NOW + 60.0, &c),
            Action::ErrorExcluded
        );
    }

    #[test]
    fn failed_node_checks_keep_a_node_out_and_count_towards_its_exclusion() {
        let mut c = cfg(2, 3);
        c.max_node_failures = Some(2);
        let (a, b, x) = (node("a", 1), node("b", 1), node("x", 1));
        let mut s = with_participants(&[&a, &b, &x], true, NOW);
        // x's check fails between rounds: it leaves the round it was in.
        apply_request(&mut s, Request::CheckFailed(x.clone()), NOW, &c);
        assert!(check_failure_counted(&s, &x, 0));
        assert!(!check_failure_counted(&s, &x, 1));
        assert!(!s.participants.contains_key(&x) && !s.excluded.contains("x"));
        // A worker failure it causes later is its second: out for the run.
        apply_request(&mut s, Request::Join(x.clone()), NOW, &c);
        settle(&mut s, NOW, &c);
        assert!(in_any_list(&s, &x));
        apply_request(&mut s, Request::CheckFailed(x.clone()), NOW, &c);
        assert_eq!(s.node_failures.get("x"), Some(&2));
        assert!(s.excluded.contains("x") && !in_any_list(&s, &x));
        assert!(check_failure_counted(&s, &x, 7));
        // The line round-trips through the log.
        let line = Request::CheckFailed(x.clone()).line();
        assert_eq!(
            Request::parse(line.trim_end()),
            Some(Request::CheckFailed(x))
        );
    }

    #[test]
    fn settle_completes_at_the_last_call_or_when_everyone_expected_is_back() {
        let c = cfg(2, 4);
        let (a, b) = (node("a", 1), node("b", 1));
        let mut s = with_participants(&[&a, &b], false, NOW);
        s.deadline = Some(NOW + 30.0);
        settle(&mut s, NOW, &c);
        assert!(!s.complete);
        settle(&mut s, NOW + 30.0, &c);
        assert!(s.complete);
        let mut s = with_participants(&[&a, &b], false, NOW);
        s.expected = Some(2);
        settle(&mut s, NOW, &c);
        assert!(s.complete);
    }

    #[test]
    fn a_survivor_whose_workers_fail_after_a_peer_died_is_not_blamed() {
        let mut c = cfg(2, 3);
        c.max_node_failures = Some(1);
        let (a, b, x) = (node("a", 1), node("b", 1), node("x", 1));
        // b's failure reaches the state before x's eviction, and after it.
        for fail_first in [true, false] {
            let mut s = with_participants(&[&a, &b, &x], true, NOW);
            let evict_x = |s: &mut State| {
                s.last_heartbeats.insert(a.clone(), NOW);
                s.last_heartbeats.insert(b.clone(), NOW);
                s.last_heartbeats.insert(x.clone(), NOW - 16.0);
                assert_eq!(sanitize(s, NOW, &c), vec![x.clone()]);
            };
            if fail_first {
                apply_request(&mut s, Request::Fail(b.clone()), NOW, &c);
                evict_x(&mut s);
            } else {
                evict_x(&mut s);
                apply_request(&mut s, Request::Fail(b.clone()), NOW, &c);
            }
            apply_request(&mut s, Request::Leave(a.clone()), NOW, &c);
            assert_eq!(s.round, 1, "the round ended");
            assert_eq!(s.node_failures.get("b"), None, "fail_first={fail_first}");
            assert_eq!(s.node_failures.get("x"), Some(&1));
            assert!(s.excluded.contains("x") && !s.excluded.contains("b"));
            // The failed round still counts one restart.
            assert_eq!(s.restarts, 1);
            for n in [&a, &b] {
                apply_request(&mut s, Request::Join(n.clone()), NOW, &c);
            }
            settle(&mut s, NOW, &c);
            assert!(s.complete && s.participants.len() == 2);
        }
    }

    #[test]
    fn the_first_to_fail_is_blamed_only_once_the_round_has_ended() {
        let mut c = cfg(2, 3);
        c.max_node_failures = Some(1);
        let (a, b) = (node("a", 1), node("b", 1));
        let mut s = with_participants(&[&a, &b], true, NOW);
        apply_request(&mut s, Request::Fail(a.clone()), NOW, &c);
        // b has not left yet: it may still turn out that it died first.
        assert!(s.node_failures.is_empty());
        apply_request(&mut s, Request::Fail(b.clone()), NOW, &c);
        assert_eq!(s.node_failures.get("a"), Some(&1));
        assert!(s.excluded.contains("a"));
        assert_eq!(s.restarts, 1);
    }

    #[test]
    fn an_evicted_identity_is_never_admitted_again() {
        let c = cfg(1, 3);
        let (a, x) = (node("a", 1), node("x", 1));
        let mut s = with_participants(&[&a, &x], true, NOW);
        s.last_heartbeats.insert(a.clone(), NOW);
        s.last_heartbeats.insert(x.clone(), NOW - 16.0);
        sanitize(&mut s, NOW, &c);
        assert_eq!(s.fenced, vec![x.clone()]);
        // What the evicted identity still sends changes nothing.
        for r in [
            Request::Join(x.clone()),
            Request::Fail(x.clone()),
            Request::CheckFailed(x.clone()),
        ] {
            apply_request(&mut s, r, NOW, &c);
            assert!(!in_any_list(&s, &x));
        }
        assert!(s.node_failures.get("x").is_none_or(|&n| n <= 1));
        // The same launcher under a new identity is a newcomer.
        let x2 = Node {
            local_id: 7,
            ..x.clone()
        };
        apply_request(&mut s, Request::Join(x2.clone()), NOW, &c);
        assert!(in_any_list(&s, &x2));
        // Only the most recent evictions are remembered.
        for i in 0..(FENCED_KEPT as u32 + 5) {
            fence(&mut s, &node("y", i));
        }
        assert_eq!(s.fenced.len(), FENCED_KEPT);
        assert!(!s.fenced.contains(&x));
    }

    #[test]
    fn a_round_that_lost_a_member_since_it_completed_is_left_not_run() {
        let c = cfg(2, 3);
        let (a, b, x) = (node("a", 1), node("b", 1), node("x", 1));
        let mut s = with_participants(&[&a, &b, &x], true, NOW);
        assert_eq!(join_action(&s, &a, NOW, JOIN_DEADLINE, &c), Action::Finish);
        remove_for_good(&mut s, &x, &c);
        // a was still joining: it must not run in a world with a hole.
        assert_eq!(
            join_action(&s, &a, NOW, JOIN_DEADLINE, &c),
            Action::RemoveFromParticipants
        );
    }

    #[test]
    fn the_first_failure_is_the_first_the_store_took_whatever_the_clocks_say() {
        let lines = ["1700000005 0\tnode b failed", "1700000004 9\tnode a failed"];
        assert_eq!(
            first_failure(lines.iter().copied()).as_deref(),
            Some("node b failed")
        );
        assert_eq!(
            first_failure(["torn", "1 2\tok"].iter().copied()).as_deref(),
            Some("ok")
        );
    }

    #[test]
    fn fencing_and_blame_round_trip_through_the_encoding() {
        let c = cfg(2, 3);
        let (a, b, x) = (node("a", 1), node("b b", 2), node("x", 3));
        let mut s = with_participants(&[&a, &b, &x], true, NOW);
        apply_request(&mut s, Request::Fail(a.clone()), NOW, &c);
        s.last_heartbeats.insert(x.clone(), NOW - 16.0);
        sanitize(&mut s, NOW, &c);
        s.last_heartbeats.clear();
        let back = State::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.world, 3);
        assert!(back.blame.as_ref().unwrap().lost.contains("x"));
    }

    #[test]
    fn a_survivor_whose_workers_fail_after_a_peer_quit_is_not_blamed() {
        let mut c = cfg(2, 3);
        c.max_node_failures = Some(1);
        let (a, b, x) = (node("a", 1), node("b", 1), node("x", 1));
        let mut s = with_participants(&[&a, &b, &x], true, NOW);
        // x is preempted (SIGTERM: it quits); b's worker fails on the
        // connection x's worker closed.
        apply_request(&mut s, Request::Fail(b.clone()), NOW, &c);
        apply_request(&mut s, Request::Quit(x.clone()), NOW, &c);
        apply_request(&mut s, Request::Leave(a.clone()), NOW, &c);
        assert_eq!(s.round, 1);
        assert!(s.node_failures.is_empty(), "{:?}", s.node_failures);
        assert!(s.excluded.is_empty());
        let back = State::decode(&with_blame_quit().encode()).unwrap();
        assert!(back.blame.unwrap().quit);
    }

    fn with_blame_quit() -> State {
        let mut s = with_participants(&[&node("a", 1), &node("x", 1)], true, NOW);
        apply_request(&mut s, Request::Quit(node("x", 1)), NOW, &cfg(1, 3));
        s
    }

    #[test]
    fn the_host_that_serves_the_store_is_counted_but_never_excluded() {
        let mut c = cfg(2, 3);
        c.max_node_failures = Some(1);
        let (a, b) = (node("a", 1), node("b", 1));
        let mut s = with_participants(&[&a, &b], true, NOW);
        apply_request(&mut s, Request::Hosting(a.clone()), NOW, &c);
        apply_request(&mut s, Request::Fail(a.clone()), NOW, &c);
        apply_request(&mut s, Request::Fail(b.clone()), NOW, &c);
        assert_eq!(s.node_failures.get("a"), Some(&1));
        assert!(s.excluded.is_empty(), "the job would go with its store");
        let back = State::decode(&s.encode()).unwrap();
        assert_eq!(back.store_host.as_deref(), Some("a"));
    }
}
