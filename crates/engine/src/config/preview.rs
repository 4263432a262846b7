//! What each worker of a launch would get, without starting anything: the
//! command line and the environment (`--dry-run`). Values that only the
//! rendezvous or the start of the run decide are shown as placeholders.

use std::collections::BTreeMap;

use crate::config::rdzv_settings::{Backend, RdzvSettings};
use crate::config::worker_env::{self, Env, GroupInfo, WorkerRanks};
use crate::config::{ConfigError, LaunchConfig};

/// One local rank's worker, as it would be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPreview {
    pub local_rank: u32,
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// The variables the launcher sets or changes (on top of its own
    /// environment, which every worker inherits).
    pub env: BTreeMap<String, String>,
}

const AT_RENDEZVOUS: &str = "<assigned at rendezvous>";

/// Previews the workers of this node for `config`, with `base_env` the
/// launcher's environment.
pub fn preview_workers(
    config: &LaunchConfig,
    entrypoint: &str,
    args: &[String],
    base_env: &Env,
    local_addr: &str,
) -> Result<Vec<WorkerPreview>, ConfigError> {
    let settings = RdzvSettings::from_config(config)?;
    let nproc = config.nproc_per_node;
    // What is known before any rendezvous: (group rank, group world size,
    // master address, master port) where fixed.
    let (group_rank, nodes, master_addr, master_port) = match &settings.backend {
        Backend::Static { host, port, rank } => (
            Some(*rank),
            Some(config.max_nodes),
            host.clone(),
            (*port != 0).then(|| port.to_string()),
        ),
        Backend::Local { port } => (
            Some(0),
            Some(1),
            local_addr.to_string(),
            (*port != 0).then(|| port.to_string()),
        ),
        Backend::C10d { .. } | Backend::Etcd(_) => {
            (None, None, "<the round's rank 0 agent>".to_string(), None)
        }
    };
    let group = GroupInfo {
        role: config.role.clone(),
        run_id: config.run_id.clone(),
        group_rank: group_rank.unwrap_or(0),
        group_world_size: nodes.unwrap_or(1),
        local_world_size: nproc,
        master_addr,
        master_port: 0,
        restart_count: 0,
        max_restarts: config.max_restarts,
        use_agent_store: true,
    };
    let mut out = Vec::new();
    for local_rank in 0..nproc {
        let base_rank = group_rank.map(|g| g * nproc);
        let ranks = WorkerRanks {
            local_rank,
            global_rank: base_rank.unwrap_or(0) + local_rank,
            role_rank: base_rank.unwrap_or(0) + local_rank,
            world_size: nodes.unwrap_or(1) * nproc,
            role_world_size: nodes.unwrap_or(1) * nproc,
        };
        let error_file = match &config.log_dir {
            Some(d) if d == std::path::Path::new("/dev/null") => String::new(),
            _ => format!("<run dir>/attempt_0/{local_rank}/error.json"),
        };
        let env = worker_env::worker_env(
            base_env,
            &group,
            &ranks,
            std::ffi::OsStr::new(&error_file),
            config.virtual_local_rank,
        )?;
        // Shown as text: a byte that is not UTF-8 reads as U+FFFD here only.
        let mut env: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, v)| base_env.get(k) != Some(v))
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        env.insert(
            "MASTER_PORT".to_string(),
            master_port
                .clone()
                .unwrap_or_else(|| "<a free port, chosen at start>".to_string()),
        );
        if group_rank.is_none() {
            for k in [
                "RANK",
                "GROUP_RANK",
                "ROLE_RANK",
                "WORLD_SIZE",
                "GROUP_WORLD_SIZE",
                "ROLE_WORLD_SIZE",
            ] {
                env.insert(k.to_string(), AT_RENDEZVOUS.to_string());
            }
        } else if config.min_nodes != config.max_nodes {
            for k in ["WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE"] {
                env.insert(k.to_string(), AT_RENDEZVOUS.to_string());
            }
        }
        env.insert(
            crate::process::lifeline::MARKER_VAR.to_string(),
            "<unique to the run>".to_string(),
        );
        let mut argv = vec![entrypoint.to_string()];
        argv.extend(
            args.iter()
                .map(|a| worker_env::substitute_local_rank(a, local_rank)),
        );
        out.push(WorkerPreview {
            local_rank,
            argv,
            env,
        });
    }
    Ok(out)
}
