//! Cluster auto-configuration: what a Slurm step or a Kubernetes job
//! (Kubeflow PyTorchJob v1, Kubeflow Trainer v2, LeaderWorkerSet, JobSet)
//! already says about the job, used for the values that neither a flag nor
//! a `PET_*` variable gives. Precedence: flag > `PET_*` > detected cluster >
//! torchrun's default. `--no-auto-config` or `TORCHRUN_RS_NO_AUTO_CONFIG=1`
//! turns it off.

use crate::args::{RawArgs, UsageError};
use crate::hostlist;

/// What was derived, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// For the one-line notice, e.g. "Slurm job 4242 step 0".
    pub source: String,
    /// Option dests and the values derived for them.
    pub values: Vec<(&'static str, String)>,
    /// `--rdzv-conf` entries added (`is_host`, `node_index`).
    pub rdzv_conf: Vec<(&'static str, String)>,
}

impl Detected {
    fn new(source: String) -> Detected {
        Detected {
            source,
            values: Vec::new(),
            rdzv_conf: Vec::new(),
        }
    }
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn get(env: Env, k: &str) -> Option<String> {
    env(k).filter(|v| !v.trim().is_empty())
}

fn number(env: Env, k: &str) -> Result<Option<u64>, UsageError> {
    match get(env, k) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            UsageError(format!(
                "auto-configuration: {k}={v}: expected a non-negative integer (turn it off with --no-auto-config)"
            ))
        }),
    }
}

/// A port for a Slurm step's rendezvous, the same on every node of the step:
/// derived from the job and step ids, in 10000..30000 (below the Linux
/// ephemeral range, so no outgoing connection holds it by chance).
pub fn slurm_port(job: u64, step: u64) -> u16 {
    (10_000 + (job.wrapping_mul(31).wrapping_add(step)) % 20_000) as u16
}

/// `SLURM_TASKS_PER_NODE`'s format, `2(x3),1`: the largest count.
fn most_tasks_per_node(v: &str) -> Option<u64> {
    v.split(',')
        .map(|item| {
            item.split('(')
                .next()
                .unwrap_or("")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .collect::<Option<Vec<u64>>>()?
        .into_iter()
        .max()
}

fn slurm(env: Env) -> Result<Option<Detected>, UsageError> {
    let (Some(step), Some(nodes)) = (
        number(env, "SLURM_STEP_ID")?,
        number(env, "SLURM_STEP_NUM_NODES")?,
    ) else {
        return Ok(None);
    };
    let job = number(env, "SLURM_JOB_ID")?
        .or(number(env, "SLURM_JOBID")?)
        .unwrap_or(0);
    let mut d = Detected::new(format!("Slurm job {job} step {step}"));
    let tasks = get(env, "SLURM_STEP_TASKS_PER_NODE").or_else(|| get(env, "SLURM_TASKS_PER_NODE"));
    if let Some(t) = tasks {
        let many = most_tasks_per_node(&t).is_none_or(|n| n > 1);
        let allowed = get(env, "TORCHRUN_RS_LAUNCHERS_PER_NODE").is_some();
        if many && !allowed {
            return Err(UsageError(format!(
                "auto-configuration: the Slurm step runs more than one task per node (SLURM_STEP_TASKS_PER_NODE={t}), so several launchers would each start every worker of the node; run one per node with `srun --ntasks-per-node=1`, or set TORCHRUN_RS_LAUNCHERS_PER_NODE=1 if that is what you want"
            )));
        }
    }
    let node_id = number(env, "SLURM_NODEID")?;
    d.values.push(("nnodes", nodes.to_string()));
    // The node's place: Slurm's node order gives the group ranks (global
    // rank 0 on the first node), and the first node hosts the store (by
    // index, not by matching host names).
    if let Some(n) = node_id.filter(|_| nodes > 1) {
        d.rdzv_conf.push(("is_host", (n == 0).to_string()));
        d.rdzv_conf.push(("node_index", n.to_string()));
    }
    if nodes > 1 {
        let list = get(env, "SLURM_STEP_NODELIST")
            .or_else(|| get(env, "SLURM_JOB_NODELIST"))
            .or_else(|| get(env, "SLURM_NODELIST"));
        if let Some(list) = list {
            let hosts = hostlist::expand(&list)
                .map_err(|e| UsageError(format!("auto-configuration: SLURM_STEP_NODELIST: {e}")))?;
            d.values.push(("rdzv_backend", "c10d".to_string()));
            d.values.push((
                "rdzv_endpoint",
                format!("{}:{}", hosts[0], slurm_port(job, step)),
            ));
        }
        let mut id = format!("{job}.{step}");
        if let Some(a) = get(env, "SLURM_ARRAY_TASK_ID") {
            id.push_str(&format!("_{a}"));
        }
        d.values.push(("rdzv_id", id));
    }
    if let Some(g) = number(env, "SLURM_GPUS_ON_NODE")?.filter(|&g| g > 0) {
        d.values.push(("nproc_per_node", g.to_string()));
    }
    Ok(Some(d))
}

/// LeaderWorkerSet: one group of pods, the leader's address known to all.
fn leader_worker_set(env: Env) -> Result<Option<Detected>, UsageError> {
    let Some(leader) = get(env, "LWS_LEADER_ADDRESS") else {
        return Ok(None);
    };
    let mut d = Detected::new("LeaderWorkerSet".to_string());
    if let Some(n) = number(env, "LWS_GROUP_SIZE")? {
        d.values.push(("nnodes", n.to_string()));
    }
    if let Some(i) = number(env, "LWS_WORKER_INDEX")? {
        d.values.push(("node_rank", i.to_string()));
    }
    d.values.push(("master_addr", leader));
    d.values.push(("master_port", "29500".to_string()));
    Ok(Some(d))
}

/// Kubeflow PyTorchJob v1 without `elasticPolicy`: one launcher per pod,
/// `WORLD_SIZE` pods, `RANK` the pod's index, the master pod's address.
fn pytorchjob(env: Env) -> Result<Option<Detected>, UsageError> {
    let (Some(addr), Some(world), Some(rank)) = (
        get(env, "MASTER_ADDR"),
        number(env, "WORLD_SIZE")?,
        number(env, "RANK")?,
    ) else {
        return Ok(None);
    };
    let mut d = Detected::new("Kubeflow PyTorchJob".to_string());
    d.values.push(("nnodes", world.to_string()));
    d.values.push(("node_rank", rank.to_string()));
    d.values.push(("master_addr", addr));
    d.values.push((
        "master_port",
        get(env, "MASTER_PORT").unwrap_or_else(|| "23456".to_string()),
    ));
    Ok(Some(d))
}

/// JobSet or an indexed Job: the completion index is the node rank; the
/// first pod's address follows from this pod's own name
/// (`<jobset>-<job>-<jobIndex>-<podIndex>`, in the same subdomain). The
/// number of nodes is not in the environment: `--nnodes` must say it.
fn jobset(env: Env, hosts_file: &str) -> Result<Option<Detected>, UsageError> {
    let Some(index) = number(env, "JOB_COMPLETION_INDEX")? else {
        return Ok(None);
    };
    let mut d = Detected::new("JobSet (indexed Job)".to_string());
    d.values.push(("node_rank", index.to_string()));
    if let Some(host) = get(env, "HOSTNAME") {
        let parts: Vec<&str> = host.rsplitn(3, '-').collect();
        if let [pod, job, prefix] = parts[..] {
            if pod.parse::<u64>().is_ok() && job.parse::<u64>().is_ok() {
                // The pod's full name, from the hosts file the kubelet writes.
                let domain = std::fs::read_to_string(hosts_file)
                    .unwrap_or_default()
                    .lines()
                    .flat_map(|l| l.split_whitespace().skip(1))
                    .find_map(|name| name.strip_prefix(&format!("{host}.")).map(str::to_string));
                let first = match domain {
                    Some(dom) => format!("{prefix}-0-0.{dom}"),
                    None => format!("{prefix}-0-0"),
                };
                d.values.push(("master_addr", first));
                d.values.push(("master_port", "29500".to_string()));
            }
        }
    }
    Ok(Some(d))
}

/// Detects the cluster and fills in what `raw` leaves unset. Returns the
/// notice to print, if anything was derived.
pub fn apply(raw: &mut RawArgs, env: Env, hosts_file: &str) -> Result<Option<String>, UsageError> {
    if raw.flag("no_auto_config")
        || get(env, "TORCHRUN_RS_NO_AUTO_CONFIG").is_some_and(|v| v != "0")
    {
        return Ok(None);
    }
    // Inside a torchrun worker (a nested launch) RANK and friends are the
    // outer job's: nothing to derive.
    if get(env, "TORCHELASTIC_RUN_ID").is_some() || get(env, "LOCAL_RANK").is_some() {
        return Ok(None);
    }
    // Kubeflow Trainer v2 sets every PET_* value itself.
    if get(env, "PET_NNODES").is_some() && get(env, "PET_MASTER_ADDR").is_some() {
        return Ok(None);
    }
    let found = match slurm(env)? {
        Some(d) => Some(d),
        None => match leader_worker_set(env)? {
            Some(d) => Some(d),
            None => match pytorchjob(env)? {
                Some(d) => Some(d),
                None => jobset(env, hosts_file)?,
            },
        },
    };
    let Some(d) = found else {
        return Ok(None);
    };
    let mut said = Vec::new();
    // A static-rendezvous value given by hand means the user chose the
    // rendezvous: leave the c10d endpoint alone, and vice versa.
    let user_chose_rdzv = [
        "rdzv_backend",
        "rdzv_endpoint",
        "master_addr",
        "master_port",
        "standalone",
    ]
    .iter()
    .any(|k| raw.is_set(k));
    for (dest, value) in &d.values {
        let rdzv = matches!(
            *dest,
            "rdzv_backend" | "rdzv_endpoint" | "master_addr" | "master_port"
        );
        if raw.is_set(dest) || (rdzv && user_chose_rdzv) {
            continue;
        }
        said.push(format!("{dest}={value}"));
        raw.set(dest, value.clone());
    }
    let conf = raw.get("rdzv_conf").unwrap_or("").to_string();
    let mut added = Vec::new();
    for (k, v) in &d.rdzv_conf {
        let present = conf
            .split(',')
            .any(|item| item.split('=').next().is_some_and(|ik| ik.trim() == *k));
        // Who hosts the store is the user's call when they chose the
        // rendezvous themselves.
        let users_call = *k == "is_host" && user_chose_rdzv;
        if !present && !users_call {
            added.push(format!("{k}={v}"));
        }
    }
    if !added.is_empty() {
        said.push(format!("rdzv_conf+={}", added.join(",")));
        let joined = if conf.trim().is_empty() {
            added.join(",")
        } else {
            format!("{conf},{}", added.join(","))
        };
        raw.set("rdzv_conf", joined);
    }
    if said.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "auto-configured from {}: {} (--no-auto-config turns this off)",
        d.source,
        said.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stable_and_below_the_ephemeral_range() {
        assert_eq!(slurm_port(4242, 0), slurm_port(4242, 0));
        assert_ne!(slurm_port(4242, 0), slurm_port(4242, 1));
        for j in [0, 1, 99_999, u64::MAX] {
            let p = slurm_port(j, 3);
            assert!((10_000..30_000).contains(&p), "{p}");
        }
        assert_eq!(most_tasks_per_node("1(x4)"), Some(1));
        assert_eq!(most_tasks_per_node("2(x3),1"), Some(2));
        assert_eq!(most_tasks_per_node("x"), None);
    }
}
