//! `c10d` on one node (`--standalone`, and plain single-node runs): this
//! launcher hosts a private store (port 0: any free port) and is always
//! group rank 0 of a world of one node; no rendezvous traffic to speak of.

use tcpstore::ServerHandle;

use super::assign::RoundStore;
use super::{Assignment, RendezvousBackend, RendezvousError};
use crate::config::rdzv_settings::RdzvSettings;
use crate::config::LaunchConfig;

pub struct LocalBackend {
    store: RoundStore,
    server: ServerHandle,
    run_id: String,
    /// Rounds started so far.
    round: u32,
}

impl LocalBackend {
    pub async fn create(
        config: &LaunchConfig,
        settings: &RdzvSettings,
        local_addr: &str,
        port: u16,
    ) -> Result<LocalBackend, RendezvousError> {
        let (server, client) = super::host_store(port).await?;
        let mut store = RoundStore::new(client, settings.exit_barrier_timeout);
        store.master_addr = local_addr.to_string();
        store.master_port = server.port();
        Ok(LocalBackend {
            store,
            server,
            run_id: config.run_id.clone(),
            round: 0,
        })
    }
}

impl RendezvousBackend for LocalBackend {
    fn store_stats(&self) -> Option<std::sync::Arc<tcpstore::ServerStats>> {
        Some(self.server.stats())
    }

    async fn next_round(&mut self, config: &LaunchConfig) -> Result<Assignment, RendezvousError> {
        if self.round > 0 {
            super::wipe_worker_keys(&self.server, &self.run_id);
        }
        let prefix = format!("torch.rendezvous.{}.{}", self.run_id, self.round);
        self.round += 1;
        let s = &mut self.store;
        let (addr, port) = (s.master_addr.clone(), s.master_port.to_string());
        s.client
            .set(&format!("{prefix}/MASTER_ADDR"), addr.as_bytes())
            .await?;
        s.client
            .set(&format!("{prefix}/MASTER_PORT"), port.as_bytes())
            .await?;
        self.store.assign(config, prefix).await
    }

    async fn finish(&mut self, _success: bool) {}

    async fn shutdown(self) {
        self.server.shutdown().await;
    }
}
