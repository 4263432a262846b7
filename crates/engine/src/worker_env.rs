//! The environment each worker gets: the launcher's own, plus the variables
//! torchrun 2.15 sets, with the same names and value formats (spec §3.2).

use std::collections::BTreeMap;

use crate::config::ConfigError;

/// What all workers of one node share in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub role: String,
    pub run_id: String,
    pub group_rank: u32,
    pub group_world_size: u32,
    pub local_world_size: u32,
    pub master_addr: String,
    pub master_port: u16,
    pub restart_count: u32,
    pub max_restarts: u32,
    /// Whether workers use the launcher's store (always, for our backends).
    pub use_agent_store: bool,
}

/// One worker's ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerRanks {
    pub local_rank: u32,
    pub global_rank: u32,
    pub role_rank: u32,
    pub world_size: u32,
    pub role_world_size: u32,
}

/// Builds one worker's environment on top of `base` (the launcher's
/// environment, including what the launcher itself exported).
pub fn worker_env(
    base: &BTreeMap<String, String>,
    group: &GroupInfo,
    w: &WorkerRanks,
    error_file: &str,
    virtual_local_rank: bool,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut env = base.clone();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    set(
        "LOCAL_RANK",
        if virtual_local_rank { 0 } else { w.local_rank }.to_string(),
    );
    set("RANK", w.global_rank.to_string());
    set("GROUP_RANK", group.group_rank.to_string());
    set("ROLE_RANK", w.role_rank.to_string());
    set("ROLE_NAME", group.role.clone());
    set("LOCAL_WORLD_SIZE", group.local_world_size.to_string());
    set("WORLD_SIZE", w.world_size.to_string());
    set("GROUP_WORLD_SIZE", group.group_world_size.to_string());
    set("ROLE_WORLD_SIZE", w.role_world_size.to_string());
    set("MASTER_ADDR", group.master_addr.clone());
    set("MASTER_PORT", group.master_port.to_string());
    set(
        "TORCHELASTIC_RESTART_COUNT",
        group.restart_count.to_string(),
    );
    set("TORCHELASTIC_MAX_RESTARTS", group.max_restarts.to_string());
    set("TORCHELASTIC_RUN_ID", group.run_id.clone());
    // Python's str(bool): workers compare with the exact string "True".
    set(
        "TORCHELASTIC_USE_AGENT_STORE",
        if group.use_agent_store {
            "True"
        } else {
            "False"
        }
        .to_string(),
    );
    let nccl = base
        .get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        .cloned()
        .unwrap_or_else(|| "1".to_string());
    set("TORCH_NCCL_ASYNC_ERROR_HANDLING", nccl);
    set("TORCHELASTIC_ERROR_FILE", error_file.to_string());
    if virtual_local_rank {
        apply_virtual_local_rank(base, w.local_rank, &mut env)?;
    }
    Ok(env)
}

/// `--virtual-local-rank`: each worker sees exactly one device, its own.
fn apply_virtual_local_rank(
    base: &BTreeMap<String, String>,
    local_rank: u32,
    env: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    let hip = base.get("HIP_VISIBLE_DEVICES").filter(|v| !v.is_empty());
    let (var, source) = match hip {
        Some(v) => ("HIP_VISIBLE_DEVICES", Some(v)),
        None => ("CUDA_VISIBLE_DEVICES", base.get("CUDA_VISIBLE_DEVICES")),
    };
    let device = match source {
        Some(list) => list
            .split(',')
            .nth(local_rank as usize)
            .map(|d| d.trim().to_string())
            .ok_or_else(|| {
                ConfigError::new(
                    "--virtual-local-rank",
                    format!("local_rank {local_rank} exceeds available GPUs in {var}={list}"),
                )
            })?,
        None => local_rank.to_string(),
    };
    env.insert("CUDA_VISIBLE_DEVICES".to_string(), device.clone());
    if var == "HIP_VISIBLE_DEVICES" {
        env.insert("HIP_VISIBLE_DEVICES".to_string(), device);
    }
    Ok(())
}

/// Expands `$local_rank`, `${local_rank}` and `$$` in a script argument the
/// way Python's `string.Template.safe_substitute` does; other `$names` stay.
pub fn substitute_local_rank(arg: &str, local_rank: u32) -> String {
    template_substitute(arg, |name| {
        (name == "local_rank").then(|| local_rank.to_string())
    })
}

/// Python's `string.Template.safe_substitute`: `$$` → `$`, `$name` and
/// `${name}` replaced when `lookup` knows the name, left literal otherwise.
pub fn template_substitute(s: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let ident_start = |c: u8| c == b'_' || c.is_ascii_alphabetic();
    let ident_char = |c: u8| c == b'_' || c.is_ascii_alphanumeric();
    while i < b.len() {
        if b[i] != b'$' {
            let next = s[i..].find('$').map_or(s.len(), |j| i + j);
            out.push_str(&s[i..next]);
            i = next;
            continue;
        }
        // b[i] == '$'
        if i + 1 < b.len() && b[i + 1] == b'$' {
            out.push('$');
            i += 2;
        } else if i + 1 < b.len() && b[i + 1] == b'{' {
            let end = s[i + 2..].find('}').map(|j| i + 2 + j);
            let name = end.map(|e| &s[i + 2..e]);
            match (name, end) {
                (Some(n), Some(e))
                    if !n.is_empty()
                        && ident_start(n.as_bytes()[0])
                        && n.bytes().all(ident_char) =>
                {
                    match lookup(n) {
                        Some(v) => out.push_str(&v),
                        None => out.push_str(&s[i..=e]),
                    }
                    i = e + 1;
                }
                _ => {
                    out.push('$');
                    i += 1;
                }
            }
        } else if i + 1 < b.len() && ident_start(b[i + 1]) {
            let mut e = i + 1;
            while e < b.len() && ident_char(b[e]) {
                e += 1;
            }
            match lookup(&s[i + 1..e]) {
                Some(v) => out.push_str(&v),
                None => out.push_str(&s[i..e]),
            }
            i = e;
        } else {
            out.push('$');
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_rank_macros() {
        assert_eq!(substitute_local_rank("--rank=${local_rank}", 3), "--rank=3");
        assert_eq!(substitute_local_rank("$local_rank", 1), "1");
        assert_eq!(substitute_local_rank("a$$b", 0), "a$b");
        assert_eq!(substitute_local_rank("$HOME/${x}/$", 0), "$HOME/${x}/$");
        assert_eq!(
            substitute_local_rank("${local_rank}x$local_rankx", 2),
            "2x$local_rankx"
        );
    }

    #[test]
    fn env_contract() {
        let mut base = BTreeMap::new();
        base.insert("PATH".to_string(), "/bin".to_string());
        base.insert(
            "TORCH_NCCL_ASYNC_ERROR_HANDLING".to_string(),
            "0".to_string(),
        );
        let g = GroupInfo {
            role: "default".into(),
            run_id: "none".into(),
            group_rank: 0,
            group_world_size: 1,
            local_world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            restart_count: 0,
            max_restarts: 0,
            use_agent_store: true,
        };
        let w = WorkerRanks {
            local_rank: 1,
            global_rank: 1,
            role_rank: 1,
            world_size: 2,
            role_world_size: 2,
        };
        let env = worker_env(&base, &g, &w, "/tmp/e.json", false).unwrap();
        assert_eq!(env["TORCHELASTIC_USE_AGENT_STORE"], "True");
        assert_eq!(env["TORCH_NCCL_ASYNC_ERROR_HANDLING"], "0");
        assert_eq!(env["PATH"], "/bin");
        assert_eq!(env["LOCAL_RANK"], "1");
        let mut vbase = base.clone();
        vbase.insert("CUDA_VISIBLE_DEVICES".into(), "4, 5".into());
        let env = worker_env(&vbase, &g, &w, "", true).unwrap();
        assert_eq!(env["LOCAL_RANK"], "0");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "5");
        vbase.insert("CUDA_VISIBLE_DEVICES".into(), "4".into());
        assert!(worker_env(&vbase, &g, &w, "", true).is_err());
    }
}
