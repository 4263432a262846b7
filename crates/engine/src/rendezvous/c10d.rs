//! The c10d rendezvous over the store: the shared [`State`] lives under the
//! key `torch.rendezvous.<run_id>` and changes only by compare-and-set, so
//! every agent acts on the latest state or retries.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tcpstore::Client;

use super::dynamic::{self, Action, Node, Settings, State};
use super::RendezvousError;

/// How often an agent waiting for others looks at the state again.
const POLL: Duration = Duration::from_millis(100);

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One agent's view of the dynamic rendezvous.
pub struct DynamicRdzv {
    client: Client,
    key: String,
    node: Node,
    cfg: Settings,
    join_timeout: f64,
    close_timeout: f64,
    /// The raw value last read or written: the CAS token.
    token: Vec<u8>,
    state: State,
    /// The round this node is a participant of, with its participants.
    joined: Option<(u64, BTreeMap<Node, u32>)>,
}

/// The outcome of joining.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub round: u64,
    pub rank: u32,
    pub world_size: u32,
}

impl DynamicRdzv {
    pub fn new(
        client: Client,
        run_id: &str,
        node: Node,
        cfg: Settings,
        join_timeout: f64,
        close_timeout: f64,
    ) -> Self {
        DynamicRdzv {
            client,
            key: format!("torch.rendezvous.{run_id}"),
            node,
            cfg,
            join_timeout,
            close_timeout,
            token: Vec::new(),
            state: State::default(),
            joined: None,
        }
    }

    async fn read(&mut self) -> Result<(), RendezvousError> {
        let raw = self.client.get_now(&self.key).await?;
        self.adopt(raw)
    }

    fn adopt(&mut self, raw: Vec<u8>) -> Result<(), RendezvousError> {
        self.state = if raw.is_empty() {
            State::default()
        } else {
            State::decode(&String::from_utf8_lossy(&raw)).ok_or_else(|| {
                RendezvousError::BadState(String::from_utf8_lossy(&raw).into_owned())
            })?
        };
        self.token = raw;
        Ok(())
    }

    /// Writes `new` if nobody changed the state since our last read.
    async fn cas(&mut self, new: &State) -> Result<bool, RendezvousError> {
        let desired = new.encode().into_bytes();
        let got = self
            .client
            .compare_set(&self.key, &self.token, &desired)
            .await?;
        let won = got == desired;
        if won || !got.is_empty() {
            self.adopt(got)?;
        } else {
            // Key absent and our token non-empty: the store echoed our
            // expectation. Read what is really there.
            self.read().await?;
        }
        Ok(won)
    }

    /// Runs an operation until it finishes: read, evict the dead, decide,
    /// apply, compare-and-set; `Sync` waits a moment and looks again.
    async fn run_op(
        &mut self,
        op: impl Fn(&State, &Node, f64) -> Action,
    ) -> Result<Action, RendezvousError> {
        self.read().await?;
        loop {
            let t = now();
            let mut next = self.state.clone();
            let evicted = !dynamic::sanitize(&mut next, t, &self.cfg).is_empty();
            let action = op(&next, &self.node, t);
            match action {
                Action::Finish | Action::GracefulExit => {
                    if evicted {
                        let _ = self.cas(&next).await?;
                    }
                    return Ok(action);
                }
                Action::ErrorClosed => return Err(RendezvousError::Closed),
                Action::ErrorTimeout => return Err(RendezvousError::JoinTimeout),
                Action::Sync => {
                    if evicted {
                        self.cas(&next).await?;
                        continue;
                    }
                    tokio::time::sleep(POLL).await;
                    self.read().await?;
                }
                mutation => {
                    dynamic::apply(&mut next, &self.node, mutation, t, &self.cfg);
                    // Lost races just loop: the state was re-read.
                    let won = self.cas(&next).await?;
                    if won && mutation == Action::AddToRedundancyList {
                        tracing::warn!(
                            "waiting as a spare: the job already has its maximum of {} nodes",
                            self.cfg.max_nodes
                        );
                    }
                }
            }
        }
    }

    /// Leaves the current round (if in one) and joins the next. Returns this
    /// node's rank and the world of the completed round.
    pub async fn next_rendezvous(&mut self) -> Result<Joined, RendezvousError> {
        let deadline = now() + self.join_timeout;
        self.run_op(|s, n, t| dynamic::exit_action(s, n, t, deadline))
            .await?;
        let cfg = self.cfg;
        let joined = self
            .run_op(move |s, n, t| dynamic::join_action(s, n, t, deadline, &cfg))
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
        self.joined = Some((self.state.round, self.state.participants.clone()));
        Ok(Joined {
            round: self.state.round,
            rank,
            world_size: self.state.participants.len() as u32,
        })
    }

    /// While workers run: keeps this node's heartbeat fresh, evicts dead
    /// nodes, and tells whether the group must re-form (nodes waiting to
    /// join, or a participant of our round gone).
    pub async fn membership_changed(&mut self) -> Result<bool, RendezvousError> {
        self.read().await?;
        let t = now();
        let mut next = self.state.clone();
        let evicted = dynamic::sanitize(&mut next, t, &self.cfg);
        let heartbeat_due = next
            .last_heartbeats
            .get(&self.node)
            .is_none_or(|&hb| t - hb >= self.cfg.keep_alive_interval);
        if heartbeat_due && next.participants.contains_key(&self.node) {
            dynamic::apply(&mut next, &self.node, Action::KeepAlive, t, &self.cfg);
        }
        if !evicted.is_empty() || heartbeat_due {
            // A lost race is fine: the next poll tries again.
            self.cas(&next).await?;
        }
        let Some((round, members)) = &self.joined else {
            return Ok(false);
        };
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

    /// Marks the rendezvous closed: later joiners fail, spares exit 0.
    pub async fn close(&mut self) -> Result<(), RendezvousError> {
        let deadline = now() + self.close_timeout;
        self.run_op(|s, _, t| dynamic::close_action(s, t, deadline))
            .await?;
        Ok(())
    }
}
