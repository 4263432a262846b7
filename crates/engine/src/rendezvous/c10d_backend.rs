//! `c10d` across nodes: torch's dynamic rendezvous (spec §8.2), its state
//! kept in a TCPStore at the endpoint, hosted by the agent on that machine.
//! The state machine is [`super::dynamic`]; [`super::c10d`] drives it over
//! the store. Each agent also hosts a store for its workers, used in the
//! rounds where it has group rank 0 (MASTER_ADDR/MASTER_PORT).

use std::time::Duration;

use tcpstore::{BindAddr, Server, ServerHandle};

use super::assign::RoundStore;
use super::{c10d, connect_store, dynamic, hosts, Assignment, RendezvousBackend, RendezvousError};
use crate::config::rdzv_settings::RdzvSettings;
use crate::config::LaunchConfig;

/// How long a store host that ends after a failure waits for every node to
/// read the job's root cause (they do at their next membership check).
const FAILURE_SEEN_WITHIN: Duration = Duration::from_secs(10);

/// How often a node assigning ranks polls its round's membership when the
/// store's change key has not spoken.
const ASSIGN_POLL: Duration = Duration::from_secs(2);

pub struct C10dBackend {
    store: RoundStore,
    /// The rendezvous store, if this agent hosts it.
    server: Option<ServerHandle>,
    /// The rendezvous state machine's driver.
    dynamic: c10d::DynamicRdzv,
    /// This agent's store for its workers, published as
    /// MASTER_ADDR:MASTER_PORT in the rounds where it has group rank 0.
    worker_store: ServerHandle,
    poll_interval: Duration,
    run_id: String,
    /// This node ended after it was evicted: it neither shares its failure
    /// nor closes the rendezvous.
    evicted_out: bool,
}

impl C10dBackend {
    pub async fn create(
        config: &LaunchConfig,
        settings: &RdzvSettings,
        local_addr: &str,
        host: &str,
        port: u16,
        explicit_host: Option<bool>,
    ) -> Result<C10dBackend, RendezvousError> {
        let read_timeout = settings.read_timeout;
        // The store lives on the endpoint's machine. With --local-addr given
        // (several agents on one machine, each with its own address), only
        // the agent at the endpoint's address hosts it.
        let hosting = match explicit_host {
            Some(h) => h,
            // Address lookups may block on DNS: off the runtime's threads.
            None => {
                let (local, host) = (config.local_addr.clone(), host.to_string());
                tokio::task::spawn_blocking(move || match local {
                    Some(addr) => hosts::same_host(&addr, &host),
                    None => hosts::host_is_local(&host),
                })
                .await
                .unwrap_or(false)
            }
        };
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
        let mut heartbeat_client = connect_store(&chost, cport, read_timeout).await?;
        // torch's `heartbeat_timeout`: the deadline of one keep-alive write.
        heartbeat_client.set_request_timeout(settings.heartbeat_timeout);
        let cfg = dynamic::Settings {
            min_nodes: config.min_nodes,
            max_nodes: config.max_nodes,
            last_call_timeout: settings.last_call_timeout.as_secs_f64(),
            keep_alive_interval: settings.keep_alive_interval.as_secs_f64(),
            keep_alive_max_attempt: settings.keep_alive_max_attempt,
            max_node_failures: config.max_node_failures,
        };
        let node = super::this_node(settings.node_index, local_addr);
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
        if server.is_some() {
            dynamic.announce_hosting().await?;
        }
        dynamic
            .publish_master(local_addr, worker_store.port())
            .await?;
        let keep_alive = settings.keep_alive_interval / 2;
        Ok(C10dBackend {
            store: RoundStore::new(client, settings.exit_barrier_timeout),
            server,
            dynamic,
            worker_store,
            poll_interval: config
                .monitor_interval
                .max(Duration::from_millis(200))
                .min(keep_alive),
            run_id: config.run_id.clone(),
            evicted_out: false,
        })
    }

    /// c10d across nodes: joins the next round, whose workers use the store
    /// of the round's rank-0 agent (every agent published its own when it
    /// started). Returns the round's key prefix and the job's restarts.
    async fn join_dynamic(
        &mut self,
    ) -> Result<(String, u32, super::dynamic::NodeFailures), RendezvousError> {
        let joined = self.dynamic.next_rendezvous().await?;
        self.store.group_rank = joined.rank;
        self.store.group_world_size = joined.world_size;
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
            self.worker_store.retain_keys(|_| false);
        }
        self.store.master_addr = joined.master_addr;
        self.store.master_port = joined.master_port;
        Ok((prefix, joined.restarts, joined.failures))
    }
}

impl RendezvousBackend for C10dBackend {
    /// This agent's workers' store (used in the rounds where it is rank 0).
    fn store_stats(&self) -> Option<std::sync::Arc<tcpstore::ServerStats>> {
        Some(self.worker_store.stats())
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(self.poll_interval)
    }

    fn change_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        Some(self.dynamic.change.clone())
    }

    /// Joins the next round and assigns ranks. The assignment waits on the
    /// round's other nodes (their role infos, rank 0's answer): a node that
    /// dies or is evicted meanwhile must not hold the others until the
    /// store's timeout, so the membership is checked while it waits, and a
    /// round that lost a member is given up for the next one.
    async fn next_round(&mut self, config: &LaunchConfig) -> Result<Assignment, RendezvousError> {
        loop {
            let (prefix, restarts, failures) = self.join_dynamic().await?;
            let (store, dynamic) = (&mut self.store, &mut self.dynamic);
            let assign = store.assign(config, prefix);
            tokio::pin!(assign);
            // The store says when the round changes (its change key); a
            // slow poll covers a watch that could not connect. (Polling at
            // the agent's interval made a thousand assigning nodes read the
            // whole state again and again.)
            let mut check = tokio::time::interval(self.poll_interval.max(ASSIGN_POLL));
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            check.tick().await;
            let change = dynamic.change.clone();
            let assigned = loop {
                tokio::select! {
                    a = &mut assign => break Some(a?),
                    () = change.notified() => {
                        if dynamic.membership_changed().await? {
                            break None;
                        }
                    }
                    _ = check.tick() => {
                        if dynamic.membership_changed().await? {
                            break None;
                        }
                    }
                }
            };
            match assigned {
                Some(mut a) => {
                    a.restarts = Some(restarts);
                    a.node_failures = failures;
                    a.state_lost = dynamic.state_lost.take();
                    return Ok(a);
                }
                None => tracing::warn!(
                    "rendezvous: the round changed while its ranks were being assigned; joining the next"
                ),
            }
        }
    }

    fn note_failure(&mut self) {
        self.dynamic.note_failure();
    }

    async fn publish_failure(&mut self, line: String) {
        if self.dynamic.fenced_now().await {
            // Its workers ran in a round that went on without it: their
            // failure is not the job's, and it must not end the job.
            tracing::warn!(
                "this node was evicted from the rendezvous while its workers ran; their failure is not shared with the job, which goes on without this node"
            );
            self.evicted_out = true;
            return;
        }
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
        self.store.share(&report, super::HANG_SHARE_TIMEOUT).await
    }

    /// The exit barrier on success, then the rendezvous is closed for
    /// everyone (later joiners fail, spares exit 0).
    async fn finish(&mut self, success: bool) {
        self.dynamic.stop_watching_peers();
        if self.evicted_out {
            // Not this node's job to end (see publish_failure).
            return;
        }
        self.store.finish(success).await;
        if let Err(e) = self.dynamic.close().await {
            if success {
                // After the exit barrier the store's host may be gone
                // already: the job is over either way.
                tracing::debug!("could not close the rendezvous: {e}");
            } else {
                tracing::warn!("could not close the rendezvous: {e}");
            }
        }
        if !success && self.server.is_some() {
            // The others learn of the failure from this node's store.
            let _ = self.dynamic.job_failure().await;
            self.dynamic.wait_failure_seen(FAILURE_SEEN_WITHIN).await;
        }
    }

    /// Takes this node out of the rendezvous (without closing it), so the
    /// other nodes re-form at once rather than after the heartbeat window.
    /// Bounded: a store that does not answer does not hold the exit.
    async fn leave(&mut self) {
        let dynamic = &mut self.dynamic;
        let quit = async move {
            dynamic.quit().await?;
            dynamic.forget_self().await
        };
        super::leave_within(quit, "the store").await;
    }

    async fn shutdown(self) {
        if let Some(s) = self.server {
            s.shutdown().await;
        }
        self.worker_store.shutdown().await;
    }
}
