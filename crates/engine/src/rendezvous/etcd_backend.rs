//! `etcd-v3` (and torch's names `etcd`, `etcd-v2`): the dynamic rendezvous
//! with its state in etcd ([`super::etcd`]). As with c10d, each agent hosts
//! a store for its workers, used in the rounds where it has group rank 0;
//! etcd never carries worker traffic. The agents' own per-round keys (rank
//! assignment, exit barrier, hang reports) go to that same store.

use std::time::Duration;

use tcpstore::{BindAddr, Server, ServerHandle};

use super::assign::RoundStore;
use super::etcd::{EtcdRdzv, Params};
use super::etcd_client::Etcd;
use super::{connect_store, dynamic, Assignment, RendezvousBackend, RendezvousError};
use crate::config::rdzv_settings::{EtcdSettings, RdzvSettings};
use crate::config::LaunchConfig;

pub struct EtcdBackend {
    dynamic: EtcdRdzv,
    /// The current round's agent keys, in its rank-0 agent's store.
    store: Option<RoundStore>,
    worker_store: ServerHandle,
    run_id: String,
    read_timeout: Duration,
    exit_barrier_timeout: Duration,
    poll_interval: Duration,
}

impl EtcdBackend {
    pub async fn create(
        config: &LaunchConfig,
        settings: &RdzvSettings,
        etcd: &EtcdSettings,
        local_addr: &str,
    ) -> Result<EtcdBackend, RendezvousError> {
        if let Some(name) = &etcd.torch_name {
            tracing::warn!(
                "--rdzv-backend={name}: served by torchrun-rs's etcd-v3 backend (etcd's v3 API, etcd 3.4 or newer); torch's v2-API keys are not spoken, so Python torchrun agents cannot join this rendezvous"
            );
        }
        let client = Etcd::connect(&etcd.options).await?;
        let worker_store = Server::bind(BindAddr::Any(0))
            .map_err(|source| RendezvousError::Bind { port: 0, source })?
            .spawn();
        let node = super::this_node(settings.node_index, local_addr);
        let cfg = dynamic::Settings {
            min_nodes: config.min_nodes,
            max_nodes: config.max_nodes,
            last_call_timeout: settings.last_call_timeout.as_secs_f64(),
            keep_alive_interval: settings.keep_alive_interval.as_secs_f64(),
            keep_alive_max_attempt: settings.keep_alive_max_attempt,
            max_node_failures: config.max_node_failures,
        };
        let dynamic = EtcdRdzv::start(
            client,
            Params {
                prefix: etcd.prefix.clone(),
                run_id: config.run_id.clone(),
                node,
                cfg,
                join_timeout: settings.join_timeout.as_secs_f64(),
                close_timeout: settings.close_timeout.as_secs_f64(),
                run_ttl: etcd.run_ttl,
                master: format!("{local_addr}:{}", worker_store.port()),
            },
        )
        .await?;
        Ok(EtcdBackend {
            dynamic,
            store: None,
            worker_store,
            run_id: config.run_id.clone(),
            read_timeout: settings.read_timeout,
            exit_barrier_timeout: settings.exit_barrier_timeout,
            // Checking membership costs nothing until a watch fires.
            poll_interval: config.monitor_interval.max(Duration::from_millis(100)),
        })
    }
}

impl RendezvousBackend for EtcdBackend {
    fn store_stats(&self) -> Option<std::sync::Arc<tcpstore::ServerStats>> {
        Some(self.worker_store.stats())
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(self.poll_interval)
    }

    async fn next_round(&mut self, config: &LaunchConfig) -> Result<Assignment, RendezvousError> {
        let joined = self.dynamic.next_rendezvous().await?;
        let prefix = format!("torch.rendezvous.{}.{}", self.run_id, joined.round);
        tracing::info!(
            "joined round {} of rendezvous '{}' as rank {} in a world of size {}",
            joined.round,
            self.run_id,
            joined.rank,
            joined.world_size
        );
        if joined.rank == 0 {
            // Nothing of an earlier round survives into this one; this
            // round's agent keys (other nodes may already be writing them)
            // stay.
            // (The store client writes keys with a leading '/'.)
            let keep = format!("/{prefix}/");
            self.worker_store
                .retain_keys(|k| k.starts_with(keep.as_bytes()));
        }
        let client =
            connect_store(&joined.master_addr, joined.master_port, self.read_timeout).await?;
        let mut store = RoundStore::new(client, self.exit_barrier_timeout);
        store.group_rank = joined.rank;
        store.group_world_size = joined.world_size;
        store.master_addr = joined.master_addr;
        store.master_port = joined.master_port;
        let store = self.store.insert(store);
        let mut a = store.assign(config, prefix).await?;
        a.restarts = Some(joined.restarts);
        a.node_failures = joined.failures;
        Ok(a)
    }

    fn note_failure(&mut self) {
        self.dynamic.note_failure();
    }

    async fn publish_failure(&mut self, line: String) {
        if let Err(e) = self.dynamic.publish_failure(&line).await {
            tracing::warn!("could not share this node's root cause with the job: {e}");
        }
    }

    async fn job_failure(&mut self) -> Option<String> {
        self.dynamic.job_failure().await.ok().flatten()
    }

    async fn report_check_failure(&mut self) -> Result<Option<u32>, RendezvousError> {
        self.dynamic.report_check_failure().await.map(Some)
    }

    fn take_evicted(&mut self) -> Vec<String> {
        super::node_names(std::mem::take(&mut self.dynamic.evicted))
    }

    async fn membership_changed(&mut self) -> Result<bool, RendezvousError> {
        self.dynamic.membership_changed().await
    }

    async fn share_hang(&mut self, report: String) -> Option<Vec<String>> {
        self.store
            .as_mut()?
            .share(&report, super::HANG_SHARE_TIMEOUT)
            .await
    }

    /// The exit barrier on success, then the rendezvous is closed for
    /// everyone (later joiners fail, spares exit 0).
    async fn finish(&mut self, success: bool) {
        self.dynamic.stop_watching_peers();
        if let Some(store) = &mut self.store {
            store.finish(success).await;
        }
        if let Err(e) = self.dynamic.close().await {
            tracing::warn!("could not close the rendezvous: {e}");
        }
    }

    /// Takes this node out of the rendezvous (without closing it); bounded.
    async fn leave(&mut self) {
        super::leave_within(self.dynamic.quit(), "etcd").await;
    }

    async fn shutdown(mut self) {
        // This node's keys go with its lease; the run's keys expire with the
        // run lease once no agent renews it.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.dynamic.release()).await;
        self.worker_store.shutdown().await;
    }
}
