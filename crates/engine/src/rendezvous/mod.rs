//! Rendezvous: which store the job uses, who hosts it, and each node's ranks.
//!
//! One type per backend, each behind [`RendezvousBackend`]; this file only
//! wires the configured one ([`start`]) into its task ([`task`]):
//!
//! - [`static_backend`] (spec §8.1): the node with `--node-rank 0` hosts the
//!   store at `--master-addr:--master-port`; every node connects, waits for
//!   all `max_nodes` nodes within `timeout`, then ranks are assigned.
//! - [`local`]: `c10d` on one node (`--standalone`, and plain single-node
//!   runs): this launcher hosts the store at the endpoint (port 0 picks a
//!   free one).
//! - [`c10d_backend`]: torch's dynamic rendezvous across nodes ([`dynamic`]
//!   is its state machine, [`c10d`] drives it over the store).
//! - [`etcd_backend`]: the same state machine with its state in etcd
//!   ([`etcd`] drives it through etcd's v3 API, [`etcd_client`] speaks it).
//!
//! Every backend assigns ranks the same way ([`assign`]). A new backend is a
//! new file implementing [`RendezvousBackend`] plus one arm in [`start`].

pub mod assign;
pub mod c10d;
pub mod c10d_backend;
pub mod dynamic;
pub mod etcd;
pub mod etcd_backend;
pub mod etcd_client;
pub(crate) mod fingerprint;
mod hosts;
pub mod local;
pub mod peer_watch;
pub mod static_backend;
pub mod task;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tcpstore::{BindAddr, Client, ConnectOptions, Server, ServerHandle};
use tokio::sync::mpsc;

use crate::config::rdzv_settings::{Backend, RdzvSettings};
use crate::config::LaunchConfig;
use task::{RdzvEvent, RendezvousTask};

/// How long group rank 0 waits for the other nodes' hang reports before it
/// prints what it has: a node that has nothing to report must not hold up
/// the report of the rest.
const HANG_SHARE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("cannot host the store on port {port}: {source} (is another job using it? pick another --master-port or --rdzv-endpoint port)")]
    Bind {
        port: u16,
        source: tcpstore::BindError,
    },
    #[error("cannot reach the rendezvous store at {addr}: {source}")]
    Connect {
        addr: String,
        source: tcpstore::ClientError,
    },
    #[error("rendezvous store operation failed: {0}")]
    Store(#[from] tcpstore::ClientError),
    #[error("timed out after {timeout:?} waiting for all {expected} nodes to join the static rendezvous; missing node ranks: {missing}")]
    StaticTimeout {
        timeout: Duration,
        expected: u32,
        missing: String,
    },
    #[error("malformed rank assignment {0:?} in the store")]
    BadAssignment(String),
    #[error("the store's key {key} does not hold a torchrun-rs rendezvous state (it starts {start:?}); a Python torchrun agent or another program uses this --rdzv-id: give this job its own")]
    BadState { key: String, start: String },
    #[error("the rendezvous is closed: the job has ended or is ending")]
    Closed,
    #[error("the nodes of this round differ (--require-same-nodes):\n  {0}")]
    NodesDiffer(String),
    #[error("the job failed and its restarts are spent; its root cause (the first failure on any node): {0}")]
    JobFailed(String),
    #[error("timed out joining the rendezvous (join_timeout in --rdzv-conf)")]
    JoinTimeout,
    /// This node was evicted under its identity (within a backend: it
    /// joins again as a new node).
    #[error("this node was evicted from the rendezvous")]
    Fenced,
    /// The round lost a member as it formed (within a backend: the next
    /// round is joined).
    #[error("the rendezvous round lost a member as it formed")]
    RoundBroken,
    #[error("the rendezvous store at {addr} did not answer for {timeout:?} (join_timeout): the node that hosted it is gone. A store that outlives any one node: a standalone torchrun-rs-store on a node that does not train (--rdzv-conf=is_host=false), or --rdzv-backend=etcd-v3")]
    StoreLost { addr: String, timeout: Duration },
    #[error("this node is excluded from the run: it caused as many failed rounds as --max-node-failures allows (its workers failed first, or it died or was evicted); the job goes on without it (a waiting spare takes its place)")]
    Excluded,
    /// This node was a spare and the job ended: not an error for the user.
    #[error("the job ended while this node waited as a spare")]
    GracefulExit,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Etcd(#[from] etcd_client::EtcdError),
}

/// This node's place in one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub group_rank: u32,
    pub group_world_size: u32,
    pub base_global_rank: u32,
    pub world_size: u32,
    pub base_role_rank: u32,
    pub role_world_size: u32,
    pub master_addr: String,
    pub master_port: u16,
    /// The job's restarts after failures, when the rendezvous keeps them
    /// (c10d, etcd-v3); else each node counts its own, as torch does.
    pub restarts: Option<u32>,
    /// Failing and excluded hosts, where the rendezvous keeps them.
    pub node_failures: dynamic::NodeFailures,
    /// The rendezvous state was found gone from its store since the last
    /// round (a store restarted empty): the restart count and the number of
    /// excluded hosts this node carried over from its memory.
    pub state_lost: Option<(u32, usize)>,
}

/// What the agent needs of a rendezvous backend. Each call runs in the
/// rendezvous task; a newer command may interrupt (drop) one under way.
pub trait RendezvousBackend: Send + 'static {
    /// The workers' store when this node hosts it, for metrics.
    fn store_stats(&self) -> Option<Arc<tcpstore::ServerStats>> {
        None
    }

    /// How often to check membership while workers run; `None`: never.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }

    /// Notified when the store says the running round changed (a member
    /// left, failed or was evicted; a node waits to join): the membership is
    /// checked at once, not at the next poll.
    fn change_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    /// Joins the next round and assigns this node's ranks.
    fn next_round(
        &mut self,
        config: &LaunchConfig,
    ) -> impl Future<Output = Result<Assignment, RendezvousError>> + Send;

    /// The next round is joined because this node's workers failed (the
    /// job's restart count, where the backend keeps one, moves).
    fn note_failure(&mut self) {}

    /// Shares this node's root cause with the job, before it closes.
    fn publish_failure(&mut self, _line: String) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The job's root cause, where the backend shares one (the first
    /// failure any node reported).
    fn job_failure(&mut self) -> impl Future<Output = Option<String>> + Send {
        async { None }
    }

    /// This node's `--node-check` failed: it stays out of the round and the
    /// failure counts towards `--max-node-failures`. Returns the host's
    /// failures in this run where the rendezvous keeps them (`None`: the
    /// agent counts them itself).
    fn report_check_failure(
        &mut self,
    ) -> impl Future<Output = Result<Option<u32>, RendezvousError>> + Send {
        async { Ok(None) }
    }

    /// While workers run: whether the group must re-form.
    fn membership_changed(&mut self) -> impl Future<Output = Result<bool, RendezvousError>> + Send {
        async { Ok(false) }
    }

    /// The job ended on this node: the exit barrier on success, then
    /// whatever closing the backend needs. Errors are only logged.
    fn finish(&mut self, success: bool) -> impl Future<Output = ()> + Send;

    /// Nodes evicted since the last call (`addr:pid`), for the events file.
    fn take_evicted(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Shares this node's hang report; group rank 0 gets every node's.
    fn share_hang(&mut self, _report: String) -> impl Future<Output = Option<Vec<String>>> + Send {
        async { None }
    }

    /// The launcher was stopped by a signal: leave without closing.
    fn leave(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Stops the stores this node hosts.
    fn shutdown(self) -> impl Future<Output = ()> + Send;
}

/// Sets up the rendezvous `config` names (hosting or reaching its store)
/// and starts its task; its results arrive on `events`.
pub async fn start(
    config: &LaunchConfig,
    local_addr: &str,
    events: mpsc::UnboundedSender<RdzvEvent>,
) -> Result<RendezvousTask, RendezvousError> {
    let settings = RdzvSettings::from_config(config)?;
    let cfg = Arc::new(config.clone());
    Ok(match &settings.backend {
        Backend::Static { host, port, rank } => RendezvousTask::spawn(
            static_backend::StaticBackend::create(config, &settings, host, *port, *rank).await?,
            cfg,
            events,
        ),
        Backend::Local { port } => RendezvousTask::spawn(
            local::LocalBackend::create(config, &settings, local_addr, *port).await?,
            cfg,
            events,
        ),
        Backend::C10d {
            host,
            port,
            is_host,
        } => RendezvousTask::spawn(
            c10d_backend::C10dBackend::create(config, &settings, local_addr, host, *port, *is_host)
                .await?,
            cfg,
            events,
        ),
        Backend::Etcd(etcd) => RendezvousTask::spawn(
            etcd_backend::EtcdBackend::create(config, &settings, etcd, local_addr).await?,
            cfg,
            events,
        ),
    })
}

/// This launcher as a node of the dynamic rendezvous. Host name and PID do
/// not tell launcher starts apart: a restarted container has the same host
/// name and, with the launcher as PID 1, the same PID. Taken for the old
/// participant, it would get a seat already consumed and share the old
/// heartbeat key. A random identity per start (`local_id`) keeps the two
/// apart; it only breaks ties, so rank order is unchanged.
pub fn this_node(order: Option<u32>, addr: &str) -> dynamic::Node {
    use rand::Rng;
    dynamic::Node {
        order: order.unwrap_or(u32::MAX),
        addr: addr.to_string(),
        pid: std::process::id(),
        local_id: rand::thread_rng().gen(),
    }
}

/// Where an operation of the dynamic rendezvous ends on a decision that
/// needs no write: `Some` when it is over (done, or failed), `None` when
/// the agent waits for a change and looks again.
fn settled(action: dynamic::Action) -> Option<Result<dynamic::Action, RendezvousError>> {
    use dynamic::Action;
    match action {
        Action::ErrorClosed => Some(Err(RendezvousError::Closed)),
        Action::ErrorTimeout => Some(Err(RendezvousError::JoinTimeout)),
        Action::ErrorExcluded => Some(Err(RendezvousError::Excluded)),
        Action::Finish | Action::GracefulExit => Some(Ok(action)),
        _ => None,
    }
}

/// Tells the user, once, that this node waits as a spare.
fn note_spare(noted: &mut bool, s: &dynamic::State, node: &dynamic::Node, max_nodes: u32) {
    if !*noted && s.redundancy_list.contains(node) {
        *noted = true;
        tracing::warn!("waiting as a spare: the job already has its maximum of {max_nodes} nodes");
    }
}

/// Evicted nodes as the events file names them (`addr:pid`).
fn node_names(nodes: Vec<dynamic::Node>) -> Vec<String> {
    nodes
        .into_iter()
        .map(|n| format!("{}:{}", n.addr, n.pid))
        .collect()
}

/// Leaves the rendezvous, bounded: a store or etcd that does not answer
/// does not hold the exit.
async fn leave_within(leave: impl Future<Output = Result<(), RendezvousError>>, what: &str) {
    match tokio::time::timeout(Duration::from_secs(5), leave).await {
        Ok(Ok(())) => tracing::info!("left the rendezvous"),
        Ok(Err(e)) => tracing::warn!("could not leave the rendezvous: {e}"),
        Err(_) => tracing::warn!("could not leave the rendezvous: {what} did not answer in 5 s"),
    }
}

/// Connects to a store, retrying until `timeout`.
async fn connect_store(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Client, RendezvousError> {
    let opts = ConnectOptions {
        timeout,
        // Agents start together and the host binds within milliseconds:
        // retry soon, then back off (x1.5 per try).
        initial_backoff: Duration::from_millis(10),
        ..ConnectOptions::default()
    };
    let mut client =
        Client::connect(host, port, opts)
            .await
            .map_err(|source| RendezvousError::Connect {
                addr: format!("{host}:{port}"),
                source,
            })?;
    // A store host that vanishes without a reset (power loss, a partition)
    // fails a request after this, not after the kernel's retransmissions.
    client.set_request_timeout(timeout.min(MAX_REQUEST_TIME));
    Ok(client)
}

/// The longest a rendezvous store request waits for its answer (less when
/// `read_timeout` is shorter).
const MAX_REQUEST_TIME: Duration = Duration::from_secs(30);

/// Hosts a store on `port` (0: any free port) and connects to it.
async fn host_store(port: u16) -> Result<(ServerHandle, Client), RendezvousError> {
    let server = Server::bind(BindAddr::Any(port))
        .map_err(|source| RendezvousError::Bind { port, source })?;
    let handle = server.spawn();
    let bound = handle.port();
    let client = connect_store("127.0.0.1", bound, Duration::from_secs(30)).await?;
    Ok((handle, client))
}

/// Drops the keys that the last attempt's workers wrote in a store used by
/// this node alone: torch's workers do not prefix them by attempt, and the
/// next attempt must not read them (process-group addresses, barriers).
fn wipe_worker_keys(server: &ServerHandle, run_id: &str) {
    let agent_prefix = format!("/{run_id}/");
    server.retain_keys(|k| {
        k.starts_with(b"/torch.rendezvous.") || k.starts_with(agent_prefix.as_bytes())
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_starts_of_a_launcher_with_the_same_host_and_pid_are_two_nodes() {
        let first = super::this_node(Some(3), "node-7");
        let restarted = super::this_node(Some(3), "node-7");
        assert_eq!(
            (first.order, &first.addr, first.pid),
            (restarted.order, &restarted.addr, restarted.pid)
        );
        assert_ne!(first, restarted);
        // The identity survives the state's encoding.
        let text = super::dynamic::node_text(&restarted);
        assert_eq!(super::dynamic::node_parse(&text), Some(restarted));
    }
}
