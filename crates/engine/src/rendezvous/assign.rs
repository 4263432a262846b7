//! What every backend shares once a round is known: torch's rank
//! assignment through the store (`_assign_worker_ranks`, spec §4.2, same keys
//! and JSON values, so heterogeneous `--nproc-per-node` and several roles
//! rank exactly as with torchrun), and the exit barrier.

use std::time::Duration;

use tcpstore::Client;

use super::{Assignment, RendezvousError};
use crate::config::LaunchConfig;

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
            crate::logs::failure::Json::Str(self.role.clone()),
            self.rank,
            self.local_world_size
        )
    }

    pub fn from_json(s: &str) -> Option<RoleInfo> {
        let j = crate::logs::failure::json::parse(s).ok()?;
        let num = |k: &str| match j.get(k) {
            Some(crate::logs::failure::Json::Num(n)) => Some(*n as u32),
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

/// This node's place in the current round, and the store client that
/// carries the rank assignment and the exit barrier.
pub(crate) struct RoundStore {
    pub client: Client,
    pub group_rank: u32,
    pub group_world_size: u32,
    pub master_addr: String,
    pub master_port: u16,
    /// Key prefix of the current round.
    round_prefix: String,
    /// How long a node that finished waits for the others.
    exit_barrier_timeout: Duration,
    /// The key prefixes of this node's recent rounds and its group rank in
    /// each: what it wrote there is deleted two rounds later (nobody reads
    /// a round that old), so the store does not grow with every restart.
    recent: std::collections::VecDeque<(String, u32)>,
}

/// How long a round waits for this launcher's fingerprint (computed from
/// its start; a Python probe takes tens of milliseconds).
const FINGERPRINT_WAIT: Duration = Duration::from_secs(5);

/// How long the store's host, refusing a round whose nodes differ, waits
/// for the others to have read why before it goes.
const READ_BEFORE_LEAVING: Duration = Duration::from_secs(30);

/// How many rounds' keys a node keeps (its current round and the one
/// before, which a slow node may still be reading).
const ROUNDS_KEPT: usize = 2;

impl RoundStore {
    pub fn new(client: Client, exit_barrier_timeout: Duration) -> RoundStore {
        RoundStore {
            client,
            group_rank: 0,
            group_world_size: 1,
            master_addr: String::new(),
            master_port: 0,
            round_prefix: String::new(),
            exit_barrier_timeout,
            recent: std::collections::VecDeque::new(),
        }
    }

    /// torch's `_assign_worker_ranks` through the store under `prefix`.
    pub async fn assign(
        &mut self,
        config: &LaunchConfig,
        prefix: String,
    ) -> Result<Assignment, RendezvousError> {
        self.round_prefix = prefix.clone();
        self.forget_old_rounds(&prefix).await?;
        let c = &mut self.client;
        // Published before the role info: when rank 0 has every node's role
        // info, it has every fingerprint too.
        let fp_key = |g: u32| format!("{prefix}/torchrun_rs/fingerprint/{g}");
        let compare = self.group_world_size > 1;
        if compare {
            // Only a node that must refuse differences waits for its whole
            // fingerprint (the Python probe); the others publish what is
            // ready, so the round is not held up.
            let wait = if config.require_same_nodes {
                FINGERPRINT_WAIT
            } else {
                Duration::ZERO
            };
            let fp = crate::rendezvous::fingerprint::this_node(wait);
            c.set(&fp_key(self.group_rank), fp.as_bytes()).await?;
        }
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
        if compare && config.require_same_nodes {
            // Every node compares before any rank is assigned: with every
            // role info present, every fingerprint is. Nobody leaves before
            // all have read them (the store's host would take the store
            // away from a node still reading); 30 s at most.
            let infos: Vec<String> = (0..self.group_world_size)
                .map(|g| format!("{prefix}/torchelastic/role_info/{g}"))
                .collect();
            let refs: Vec<&str> = infos.iter().map(String::as_str).collect();
            c.multi_get(&refs).await?;
            let nodes = Self::fingerprints(c, self.group_world_size, &fp_key).await?;
            let diffs = crate::rendezvous::fingerprint::differences(&nodes);
            let seen = format!("{prefix}/torchrun_rs/fingerprints_read");
            let everyone = i64::from(self.group_world_size);
            let mut read = c.add(&seen, 1).await?;
            if !diffs.is_empty() {
                let until = std::time::Instant::now() + READ_BEFORE_LEAVING;
                while self.group_rank == 0 && read < everyone && std::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    read = c.add(&seen, 0).await?;
                }
                return Err(RendezvousError::NodesDiffer(diffs.join("\n  ")));
            }
        }
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
        if compare && self.group_rank == 0 && !config.require_same_nodes {
            let nodes = Self::fingerprints(c, self.group_world_size, &fp_key).await?;
            let diffs = crate::rendezvous::fingerprint::differences(&nodes);
            if !diffs.is_empty() {
                eprint!(
                    "torchrun-rs: the nodes of this round differ (--require-same-nodes makes this fatal):\n  {}\n",
                    diffs.join("\n  ")
                );
            }
        }
        Ok(Assignment {
            group_rank: self.group_rank,
            group_world_size: self.group_world_size,
            base_global_rank,
            world_size,
            base_role_rank,
            role_world_size,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
            restarts: None,
            node_failures: Default::default(),
            state_lost: None,
        })
    }

    /// Every node's fingerprint of this round, by group rank.
    async fn fingerprints(
        c: &mut Client,
        world: u32,
        key: &impl Fn(u32) -> String,
    ) -> Result<Vec<(u32, String)>, RendezvousError> {
        let keys: Vec<String> = (0..world).map(key).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        Ok(c.multi_get(&refs)
            .await?
            .iter()
            .enumerate()
            .map(|(g, v)| (g as u32, String::from_utf8_lossy(v).into_owned()))
            .collect())
    }

    /// Deletes the keys this node wrote in the round before last.
    async fn forget_old_rounds(&mut self, prefix: &str) -> Result<(), RendezvousError> {
        if self.recent.back().is_some_and(|(p, _)| p == prefix) {
            return Ok(());
        }
        self.recent.push_back((prefix.to_string(), self.group_rank));
        while self.recent.len() > ROUNDS_KEPT {
            let Some((old, g)) = self.recent.pop_front() else {
                break;
            };
            for k in [
                format!("{old}/torchelastic/role_info/{g}"),
                format!("{old}/torchelastic/assigned_ranks/{g}"),
                format!("{old}/torchrun_rs/hang/{g}"),
                format!("{old}/torchrun_rs/fingerprint/{g}"),
                format!("{old}/torchrun_rs/fingerprints_read"),
            ] {
                self.client.delete_key(&k).await?;
            }
        }
        Ok(())
    }

    /// A hang report across nodes: every node writes its `report` for this
    /// round; group rank 0 waits (up to `timeout`) for every node's and
    /// returns them all (the others return `None`).
    pub async fn share(&mut self, report: &str, timeout: Duration) -> Option<Vec<String>> {
        if self.group_world_size <= 1 {
            return None;
        }
        let key = |g: u32| format!("{}/torchrun_rs/hang/{g}", self.round_prefix);
        self.client
            .set(&key(self.group_rank), report.as_bytes())
            .await
            .ok()?;
        if self.group_rank != 0 {
            return None;
        }
        let keys: Vec<String> = (0..self.group_world_size).map(key).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        // Whoever answers within the timeout; a node whose workers were not
        // quiet has nothing to say.
        let _ = self.client.wait(&refs, timeout).await;
        let mut out = Vec::new();
        for k in &refs {
            if self.client.check(&[k]).await.unwrap_or(false) {
                if let Ok(v) = self.client.get(k).await {
                    out.push(String::from_utf8_lossy(&v).into_owned());
                }
            }
        }
        Some(out)
    }

    /// On success, the exit barrier keeps the store's host alive until
    /// every node is done (errors only logged).
    pub async fn finish(&mut self, success: bool) {
        if success && self.group_world_size > 1 {
            self.exit_barrier().await;
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
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn a_nodes_keys_of_old_rounds_are_deleted() {
        let server = tcpstore::Server::bind(tcpstore::BindAddr::Any(0))
            .unwrap()
            .spawn();
        let connect = || {
            tcpstore::Client::connect(
                "127.0.0.1",
                server.port(),
                tcpstore::ConnectOptions::default(),
            )
        };
        let mut store = RoundStore::new(connect().await.unwrap(), Duration::from_secs(5));
        let mut counter = connect().await.unwrap();
        let config = LaunchConfig::default();
        let mut sizes = Vec::new();
        for round in 0..10 {
            store
                .assign(&config, format!("torch.rendezvous.x.{round}"))
                .await
                .unwrap();
            let _ = store.share("rank 0", Duration::from_millis(1)).await;
            sizes.push(counter.num_keys().await.unwrap());
        }
        assert!(sizes[9] <= sizes[2], "keys per round: {sizes:?}");
        server.shutdown().await;
    }
}
