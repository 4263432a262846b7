//! The `static` backend (spec §8.1): every node knows its rank
//! (`--node-rank`); node 0 hosts the store at `--master-addr:--master-port`;
//! every node connects and waits for all `max_nodes` nodes within `timeout`.
//! The world never changes: a failed group restarts with the same nodes.

use tcpstore::ServerHandle;

use super::assign::RoundStore;
use super::{connect_store, Assignment, RendezvousBackend, RendezvousError};
use crate::config::rdzv_settings::RdzvSettings;
use crate::config::LaunchConfig;

pub struct StaticBackend {
    store: RoundStore,
    /// The store, on node 0.
    server: Option<ServerHandle>,
    run_id: String,
    /// Rounds started so far.
    round: u32,
}

impl StaticBackend {
    /// Hosts (node 0) or reaches the store, and waits for every node.
    pub async fn create(
        config: &LaunchConfig,
        settings: &RdzvSettings,
        host: &str,
        port: u16,
        rank: u32,
    ) -> Result<StaticBackend, RendezvousError> {
        let host = host.to_string();
        let nodes = config.max_nodes;
        let timeout = settings.timeout;
        let (server, mut client) = if rank == 0 {
            let (s, c) = super::host_store(port).await?;
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
        let mut store = RoundStore::new(client, settings.exit_barrier_timeout);
        store.group_rank = rank;
        store.group_world_size = nodes;
        store.master_addr = host;
        store.master_port = master_port;
        Ok(StaticBackend {
            store,
            server,
            run_id: config.run_id.clone(),
            round: 0,
        })
    }
}

impl RendezvousBackend for StaticBackend {
    fn store_stats(&self) -> Option<std::sync::Arc<tcpstore::ServerStats>> {
        self.server.as_ref().map(ServerHandle::stats)
    }

    async fn next_round(&mut self, config: &LaunchConfig) -> Result<Assignment, RendezvousError> {
        if self.round > 0 && self.store.group_world_size == 1 {
            // One node: its store is used by this agent alone, so wiping the
            // last attempt's worker keys is race-free.
            if let Some(server) = &self.server {
                super::wipe_worker_keys(server, &self.run_id);
            }
        }
        self.round += 1;
        let prefix = self.run_id.clone();
        self.store.assign(config, prefix).await
    }

    async fn share_hang(&mut self, report: String) -> Option<Vec<String>> {
        self.store.share(&report, super::HANG_SHARE_TIMEOUT).await
    }

    async fn finish(&mut self, success: bool) {
        self.store.finish(success).await;
    }

    async fn shutdown(self) {
        if let Some(s) = self.server {
            s.shutdown().await;
        }
    }
}
