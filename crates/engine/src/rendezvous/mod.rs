//! Rendezvous: which store the job uses, who hosts it, and each node's ranks.
//!
//! - `static` (spec §8.1): the node with `--node-rank 0` hosts the store at
//!   `--master-addr:--master-port`; every node connects, waits for all
//!   `max_nodes` nodes within `timeout`, then ranks are assigned.
//! - `c10d` on one node (`--standalone`, and plain single-node runs): this
//!   launcher hosts the store at the endpoint (port 0 picks a free one).
//!
//! Rank assignment follows torch's `_assign_worker_ranks` (§4.2) through the
//! store, with the same keys and JSON values, so heterogeneous
//! `--nproc-per-node` and several roles rank exactly as with torchrun.

pub mod c10d;
pub mod dynamic;
pub mod task;

use std::time::Duration;

use tcpstore::{BindAddr, Client, ConnectOptions, Server, ServerHandle};

use crate::config::LaunchConfig;
use crate::rdzv_settings::{Backend, RdzvSettings};

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
    #[error("timed out joining the rendezvous (join_timeout in --rdzv-conf)")]
    JoinTimeout,
    /// This node was a spare and the job ended: not an error for the user.
    #[error("the job ended while this node waited as a spare")]
    GracefulExit,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Static,
    C10dLocal,
    /// c10d across nodes: the dynamic rendezvous.
    C10d,
}

pub struct Rendezvous {
    kind: Kind,
    /// The store this launcher hosts, if it is the host.
    server: Option<ServerHandle>,
    client: Client,
    group_rank: u32,
    group_world_size: u32,
    master_addr: String,
    master_port: u16,
    round: u32,
    run_id: String,
    /// Key prefix of the current round.
    round_prefix: String,
    /// c10d across nodes: the rendezvous state machine's driver.
    dynamic: Option<c10d::DynamicRdzv>,
    /// c10d across nodes: this agent's store for its workers, published as
    /// MASTER_ADDR:MASTER_PORT in the rounds where it has group rank 0.
    worker_store: Option<ServerHandle>,
    poll_interval: Option<Duration>,
    /// How long a node that finished waits for the others (exit barrier).
    exit_barrier_timeout: Duration,
}

/// One node's role info, as torch serialises it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleInfo {
    pub role: String,
    pub rank: u32,
    pub local_world_size: u32,
}

impl RoleInfo {
    /// Python `json.dumps` with default separators.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"role\": {}, \"rank\": {}, \"local_world_size\": {}}}",
            crate::failure::Json::Str(self.role.clone()),
            self.rank,
            self.local_world_size
        )
    }

    pub fn from_json(s: &str) -> Option<RoleInfo> {
        let j = crate::failure::json::parse(s).ok()?;
        let num = |k: &str| match j.get(k) {
            Some(crate::failure::Json::Num(n)) => Some(*n as u32),
            _ => None,
        };
        Some(RoleInfo {
            role: j.get("role")?.as_str()?.to_string(),
            rank: num("rank")?,
            local_world_size: num("local_world_size")?,
        })
    }
}

/// torch's assignment (§4.2): for each node in group-rank order, `[base_global,
/// global_size, base_role, role_size]`.
pub fn assign_ranks(infos: &[RoleInfo]) -> Vec<[u32; 4]> {
    let mut role_size = std::collections::BTreeMap::<&str, u32>::new();
    let mut global = 0;
    for i in infos {
        *role_size.entry(&i.role).or_default() += i.local_world_size;
        global += i.local_world_size;
    }
    let mut role_base = std::collections::BTreeMap::<&str, u32>::new();
    let mut base_global = 0;
    infos
        .iter()
        .map(|i| {
            let rb = role_base.entry(&i.role).or_default();
            let v = [base_global, global, *rb, role_size[i.role.as_str()]];
            base_global += i.local_world_size;
            *rb += i.local_world_size;
            v
        })
        .collect()
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
    Client::connect(host, port, opts)
        .await
        .map_err(|source| RendezvousError::Connect {
            addr: format!("{host}:{port}"),
            source,
        })
}

impl Rendezvous {
    /// A rendezvous of `kind` with nothing assigned yet.
    fn with(kind: Kind, server: Option<ServerHandle>, client: Client, run_id: &str) -> Rendezvous {
        Rendezvous {
            kind,
            server,
            client,
            group_rank: 0,
            group_world_size: 1,
            master_addr: String::new(),
            master_port: 0,
            round: 0,
            run_id: run_id.to_string(),
            round_prefix: String::new(),
            dynamic: None,
            worker_store: None,
            poll_interval: None,
            exit_barrier_timeout: Duration::from_secs(300),
        }
    }

    /// Sets up the store for `config`: hosts it or connects to it.
    pub async fn create(
        config: &LaunchConfig,
        local_addr: &str,
    ) -> Result<Rendezvous, RendezvousError> {
        let settings = RdzvSettings::from_config(config)?;
        let mut r = match &settings.backend {
            Backend::Static { host, port, rank } => {
                Self::create_static(config, &settings, host, *port, *rank).await?
            }
            Backend::Local { port } => Self::create_c10d_local(config, local_addr, *port).await?,
            Backend::C10d {
                host,
                port,
                is_host,
            } => Self::create_c10d(config, &settings, local_addr, host, *port, *is_host).await?,
        };
        r.exit_barrier_timeout = settings.exit_barrier_timeout;
        Ok(r)
    }

    async fn host(port: u16) -> Result<(ServerHandle, Client), RendezvousError> {
        let server = Server::bind(BindAddr::Any(port))
            .map_err(|source| RendezvousError::Bind { port, source })?;
        let handle = server.spawn();
        let bound = handle.port();
        let client = connect_store("127.0.0.1", bound, Duration::from_secs(30)).await?;
        Ok((handle, client))
    }

    async fn create_c10d_local(
        config: &LaunchConfig,
        local_addr: &str,
        port: u16,
    ) -> Result<Rendezvous, RendezvousError> {
        let (server, client) = Self::host(port).await?;
        let master_port = server.port();
        Ok(Rendezvous {
            master_addr: local_addr.to_string(),
            master_port,
            ..Self::with(Kind::C10dLocal, Some(server), client, &config.run_id)
        })
    }

    async fn create_c10d(
        config: &LaunchConfig,
        settings: &RdzvSettings,
        local_addr: &str,
        host: &str,
        port: u16,
        explicit_host: Option<bool>,
    ) -> Result<Rendezvous, RendezvousError> {
        let read_timeout = settings.read_timeout;
        // The store lives on the endpoint's machine. With --local-addr given
        // (several agents on one machine, each with its own address), only
        // the agent at the endpoint's address hosts it.
        let hosting = explicit_host.unwrap_or_else(|| match &config.local_addr {
            Some(addr) => same_host(addr, host),
            None => host_is_local(host),
        });
        let mut server = None;
        if hosting {
            match Server::bind(BindAddr::Any(port)) {
                Ok(s) => server = Some(s.spawn()),
                // Several agents on one machine share one endpoint: the
                // first hosts, the others are clients (as torch does).
                Err(e) if explicit_host.is_none() => {
                    tracing::info!("not hosting the rendezvous store ({e}); joining it as a client")
                }
                Err(source) => return Err(RendezvousError::Bind { port, source }),
            }
        }
        let (chost, cport) = match &server {
            Some(s) => ("127.0.0.1".to_string(), s.port()),
            None => (host.to_string(), port),
        };
        let client = connect_store(&chost, cport, read_timeout).await?;
        let state_client = connect_store(&chost, cport, read_timeout).await?;
        let heartbeat_client = connect_store(&chost, cport, read_timeout).await?;
        let cfg = dynamic::Settings {
            min_nodes: config.min_nodes,
            max_nodes: config.max_nodes,
            last_call_timeout: settings.last_call_timeout.as_secs_f64(),
            keep_alive_interval: settings.keep_alive_interval.as_secs_f64(),
            keep_alive_max_attempt: settings.keep_alive_max_attempt,
        };
        let node = dynamic::Node {
            addr: local_addr.to_string(),
            pid: std::process::id(),
            local_id: 0,
        };
        let dynamic = c10d::DynamicRdzv::new(
            state_client,
            heartbeat_client,
            &config.run_id,
            node,
            cfg,
            settings.join_timeout.as_secs_f64(),
            settings.close_timeout.as_secs_f64(),
        );
        let worker_store = Server::bind(BindAddr::Any(0))
            .map_err(|source| RendezvousError::Bind { port: 0, source })?
            .spawn();
        let mut dynamic = dynamic;
        dynamic
            .publish_master(local_addr, worker_store.port())
            .await?;
        let keep_alive = settings.keep_alive_interval / 2;
        Ok(Rendezvous {
            dynamic: Some(dynamic),
            worker_store: Some(worker_store),
            poll_interval: Some(
                config
                    .monitor_interval
                    .max(Duration::from_millis(200))
                    .min(keep_alive),
            ),
            ..Self::with(Kind::C10d, server, client, &config.run_id)
        })
    }

    async fn create_static(
        config: &LaunchConfig,
        settings: &RdzvSettings,
        host: &str,
        port: u16,
        rank: u32,
    ) -> Result<Rendezvous, RendezvousError> {
        let host = host.to_string();
        let nodes = config.max_nodes;
        let timeout = settings.timeout;
        let (server, mut client) = if rank == 0 {
            let (s, c) = Self::host(port).await?;
            (Some(s), c)
        } else {
            let c = connect_store(&host, port, timeout).await?;
            (None, c)
        };
        let master_port = server.as_ref().map_or(port, |s| s.port());
        // Join: everyone counts itself in "/init/" (as torch's TCPStore does);
        // the last to arrive opens the gate everybody waits on.
        if nodes > 1 {
            let prefix = &config.run_id;
            client
                .set(&format!("{prefix}/torchrun_rs/arrived/{rank}"), b"1")
                .await?;
            let count = client.add("init/", 1).await?;
            if count == i64::from(nodes) {
                client
                    .set(&format!("{prefix}/torchrun_rs/all_arrived"), b"1")
                    .await?;
            }
            let gate = format!("{prefix}/torchrun_rs/all_arrived");
            if let Err(e) = client.wait(&[gate.as_str()], timeout).await {
                if !matches!(e, tcpstore::ClientError::WaitTimeout { .. }) {
                    return Err(e.into());
                }
                let mut missing = Vec::new();
                for r in 0..nodes {
                    if !client
                        .check(&[format!("{prefix}/torchrun_rs/arrived/{r}").as_str()])
                        .await?
                    {
                        missing.push(r.to_string());
                    }
                }
                return Err(RendezvousError::StaticTimeout {
                    timeout,
                    expected: nodes,
                    missing: missing.join(", "),
                });
            }
        } else {
            client.add("init/", 1).await?;
        }
        Ok(Rendezvous {
            group_rank: rank,
            group_world_size: nodes,
            master_addr: host,
            master_port,
            ..Self::with(Kind::Static, server, client, &config.run_id)
        })
    }

    /// How often to check membership while workers run (c10d across nodes).
    pub fn poll_interval(&self) -> Option<Duration> {
        self.poll_interval
    }

    /// While workers run: whether the group must re-form (nodes waiting to
    /// join, or a node of this round gone). Also keeps our heartbeat fresh.
    pub async fn membership_changed(&mut self) -> Result<bool, RendezvousError> {
        match &mut self.dynamic {
            Some(d) => d.membership_changed().await,
            None => Ok(false),
        }
    }

    /// c10d across nodes: joins the next round, whose workers use the store
    /// of the round's rank-0 agent (every agent published its own when it
    /// started). Returns the round's key prefix.
    async fn join_dynamic(&mut self) -> Result<String, RendezvousError> {
        let d = self.dynamic.as_mut().expect("c10d rendezvous");
        let joined = d.next_rendezvous().await?;
        self.group_rank = joined.rank;
        self.group_world_size = joined.world_size;
        let prefix = format!("torch.rendezvous.{}.{}", self.run_id, joined.round);
        tracing::info!(
            "joined round {} of rendezvous '{}' as rank {} in a world of size {}",
            joined.round,
            self.run_id,
            joined.rank,
            joined.world_size
        );
        if joined.rank == 0 {
            // Nothing of an earlier round's workers survives into this one.
            // (No worker of this round starts before rank 0 has assigned
            // the ranks, below, so none can have written here yet.)
            let store = self.worker_store.as_ref().expect("worker store");
            store.retain_keys(|_| false);
        }
        self.master_addr = joined.master_addr;
        self.master_port = joined.master_port;
        Ok(prefix)
    }

    /// Runs one round: publishes the master address (c10d) and assigns ranks.
    pub async fn next_round(
        &mut self,
        config: &LaunchConfig,
    ) -> Result<Assignment, RendezvousError> {
        if self.kind == Kind::C10d {
            let prefix = self.join_dynamic().await?;
            return self.assign(config, prefix).await;
        }
        if self.round > 0 && self.group_world_size == 1 {
            // The workers' keys of the last attempt (process-group addresses,
            // barriers) must not be read by the next one: torch's workers do
            // not prefix them by attempt. Only this node's agent uses the
            // store, so wiping between attempts is race-free.
            if let Some(server) = &self.server {
                let agent_prefix = format!("/{}/", self.run_id);
                server.retain_keys(|k| {
                    k.starts_with(b"/torch.rendezvous.") || k.starts_with(agent_prefix.as_bytes())
                });
            }
        }
        let prefix = match self.kind {
            Kind::C10dLocal => format!("torch.rendezvous.{}.{}", self.run_id, self.round),
            _ => self.run_id.clone(),
        };
        self.round += 1;
        if self.kind == Kind::C10dLocal {
            let c = &mut self.client;
            c.set(
                &format!("{prefix}/MASTER_ADDR"),
                self.master_addr.as_bytes(),
            )
            .await?;
            c.set(
                &format!("{prefix}/MASTER_PORT"),
                self.master_port.to_string().as_bytes(),
            )
            .await?;
        }
        self.assign(config, prefix).await
    }

    /// torch's `_assign_worker_ranks` through the store under `prefix`.
    async fn assign(
        &mut self,
        config: &LaunchConfig,
        prefix: String,
    ) -> Result<Assignment, RendezvousError> {
        self.round_prefix = prefix.clone();
        let c = &mut self.client;
        let me = RoleInfo {
            role: config.role.clone(),
            rank: self.group_rank,
            local_world_size: config.nproc_per_node,
        };
        c.set(
            &format!("{prefix}/torchelastic/role_info/{}", self.group_rank),
            me.to_json().as_bytes(),
        )
        .await?;
        let assigned_key = |g: u32| format!("{prefix}/torchelastic/assigned_ranks/{g}");
        if self.group_rank == 0 {
            let keys: Vec<String> = (0..self.group_world_size)
                .map(|g| format!("{prefix}/torchelastic/role_info/{g}"))
                .collect();
            let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let values = c.multi_get(&key_refs).await?;
            let infos = values
                .iter()
                .map(|v| {
                    let s = String::from_utf8_lossy(v);
                    RoleInfo::from_json(&s)
                        .ok_or_else(|| RendezvousError::BadAssignment(s.into_owned()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let ranks = assign_ranks(&infos);
            let encoded: Vec<(String, Vec<u8>)> = ranks
                .iter()
                .enumerate()
                .map(|(g, r)| {
                    (
                        assigned_key(g as u32),
                        format!("[{}, {}, {}, {}]", r[0], r[1], r[2], r[3]).into_bytes(),
                    )
                })
                .collect();
            let pairs: Vec<(&str, &[u8])> = encoded
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            c.multi_set(&pairs).await?;
        }
        let raw = c.get(&assigned_key(self.group_rank)).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let nums: Vec<u32> = text
            .trim_matches(|ch| ch == '[' || ch == ']')
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        let [base_global_rank, world_size, base_role_rank, role_world_size] = nums[..] else {
            return Err(RendezvousError::BadAssignment(text));
        };
        Ok(Assignment {
            group_rank: self.group_rank,
            group_world_size: self.group_world_size,
            base_global_rank,
            world_size,
            base_role_rank,
            role_world_size,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
        })
    }

    /// After the workers finished: on success, the exit barrier keeps the
    /// store's host alive until every node is done (errors only logged);
    /// then (c10d across nodes) the rendezvous is closed for everyone.
    pub async fn finish(&mut self, success: bool) {
        if success && self.group_world_size > 1 {
            self.exit_barrier().await;
        }
        if let Some(d) = &mut self.dynamic {
            if let Err(e) = d.close().await {
                tracing::warn!("could not close the rendezvous: {e}");
            }
        }
    }

    /// The launcher was stopped by a signal: take this node out of the
    /// rendezvous (without closing it), so the other nodes re-form at once
    /// rather than after the heartbeat window. Bounded: a store that does not
    /// answer does not hold the launcher's exit.
    pub async fn leave(&mut self) {
        let Some(d) = &mut self.dynamic else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(5), d.quit()).await {
            Ok(Ok(())) => tracing::info!("left the rendezvous"),
            Ok(Err(e)) => tracing::warn!("could not leave the rendezvous: {e}"),
            Err(_) => {
                tracing::warn!("could not leave the rendezvous: the store did not answer in 5 s")
            }
        }
    }

    async fn exit_barrier(&mut self) {
        let prefix = format!("{}/torchelastic/agent/terminal_state", self.round_prefix);
        let timeout = self.exit_barrier_timeout;
        let result: Result<(), tcpstore::ClientError> = async {
            let n = self.client.add(&format!("{prefix}/num_members"), 1).await?;
            if n == i64::from(self.group_world_size) {
                self.client
                    .set(&format!("{prefix}/last_member"), b"<val_ignored>")
                    .await?;
            }
            self.client
                .wait(&[format!("{prefix}/last_member").as_str()], timeout)
                .await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!("Error waiting on exit barrier: {e}");
        }
    }

    /// Stops hosting the stores (if hosted here).
    pub async fn shutdown(self) {
        if let Some(s) = self.server {
            s.shutdown().await;
        }
        if let Some(s) = self.worker_store {
            s.shutdown().await;
        }
    }
}

/// Whether two host names or addresses name the same host (by their
/// addresses, no reverse DNS).
fn same_host(a: &str, b: &str) -> bool {
    use std::net::ToSocketAddrs;
    if a == b {
        return true;
    }
    let ips = |h: &str| -> Vec<std::net::IpAddr> {
        (h, 0)
            .to_socket_addrs()
            .map(|it| it.map(|s| s.ip()).collect())
            .unwrap_or_default()
    };
    let (x, y) = (ips(a), ips(b));
    x.iter().any(|ip| y.contains(ip))
}

/// Whether `host` names this machine: `localhost`, this host's names, or an
/// address that a socket can be bound to here. No reverse DNS.
fn host_is_local(host: &str) -> bool {
    use std::net::ToSocketAddrs;
    if host == "localhost" || host == crate::host::hostname() {
        return true;
    }
    let Ok(addrs) = (host, 0).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| a.ip().is_loopback() || std::net::UdpSocket::bind((a.ip(), 0)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hosts() {
        assert!(host_is_local("localhost"));
        assert!(host_is_local("127.0.0.1"));
        assert!(host_is_local("127.0.0.3"));
        assert!(!host_is_local("192.0.2.1"));
        assert!(same_host("127.0.0.2", "127.0.0.2"));
        assert!(!same_host("127.0.0.2", "127.0.0.3"));
        assert!(same_host("localhost", "127.0.0.1"));
    }

    fn ri(role: &str, rank: u32, n: u32) -> RoleInfo {
        RoleInfo {
            role: role.into(),
            rank,
            local_world_size: n,
        }
    }

    #[test]
    fn upstream_rank_table() {
        // spec §4.2: (ps,0,4),(trainer,1,1),(trainer,2,2),(trainer,3,3),(ps,4,5)
        let infos = [
            ri("ps", 0, 4),
            ri("trainer", 1, 1),
            ri("trainer", 2, 2),
            ri("trainer", 3, 3),
            ri("ps", 4, 5),
        ];
        let r = assign_ranks(&infos);
        assert_eq!(
            r,
            vec![
                [0, 15, 0, 9],
                [4, 15, 0, 6],
                [5, 15, 1, 6],
                [7, 15, 3, 6],
                [10, 15, 4, 9]
            ]
        );
    }

    #[test]
    fn role_info_json_matches_python() {
        let r = ri("default", 0, 2);
        assert_eq!(
            r.to_json(),
            r#"{"role": "default", "rank": 0, "local_world_size": 2}"#
        );
        assert_eq!(RoleInfo::from_json(&r.to_json()), Some(r));
    }
}
