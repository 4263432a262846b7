//! The environment each worker gets: the launcher's own, plus the variables
//! torchrun 2.15 sets, with the same names and value formats (spec §3.2).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

use crate::config::ConfigError;

/// An environment as the kernel holds it: bytes, not necessarily UTF-8.
/// torchrun passes every variable through unchanged, and so do we: a value
/// that is not UTF-8 reaches the workers byte for byte.
pub type Env = BTreeMap<OsString, OsString>;

/// The value of `key` in `env`, when it is UTF-8 (the variables the
/// launcher reads are all text).
pub fn get<'e>(env: &'e Env, key: &str) -> Option<&'e str> {
    env.get(OsStr::new(key)).and_then(|v| v.to_str())
}

/// Sets `key` to `value` in `env`.
pub fn set(env: &mut Env, key: &str, value: impl Into<OsString>) {
    env.insert(key.into(), value.into());
}

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
    base: &Env,
    group: &GroupInfo,
    w: &WorkerRanks,
    error_file: &OsStr,
    virtual_local_rank: bool,
) -> Result<Env, ConfigError> {
    let mut env = base.clone();
    let mut set = |k: &str, v: OsString| {
        env.insert(k.into(), v);
    };
    set(
        "LOCAL_RANK",
        if virtual_local_rank { 0 } else { w.local_rank }
            .to_string()
            .into(),
    );
    set("RANK", w.global_rank.to_string().into());
    set("GROUP_RANK", group.group_rank.to_string().into());
    set("ROLE_RANK", w.role_rank.to_string().into());
    set("ROLE_NAME", group.role.clone().into());
    set(
        "LOCAL_WORLD_SIZE",
        group.local_world_size.to_string().into(),
    );
    set("WORLD_SIZE", w.world_size.to_string().into());
    set(
        "GROUP_WORLD_SIZE",
        group.group_world_size.to_string().into(),
    );
    set("ROLE_WORLD_SIZE", w.role_world_size.to_string().into());
    set("MASTER_ADDR", group.master_addr.clone().into());
    set("MASTER_PORT", group.master_port.to_string().into());
    set(
        "TORCHELASTIC_RESTART_COUNT",
        group.restart_count.to_string().into(),
    );
    set(
        "TORCHELASTIC_MAX_RESTARTS",
        group.max_restarts.to_string().into(),
    );
    set("TORCHELASTIC_RUN_ID", group.run_id.clone().into());
    // Python's str(bool): workers compare with the exact string "True".
    set(
        "TORCHELASTIC_USE_AGENT_STORE",
        if group.use_agent_store {
            "True"
        } else {
            "False"
        }
        .to_string()
        .into(),
    );
    let nccl = base
        .get(OsStr::new("TORCH_NCCL_ASYNC_ERROR_HANDLING"))
        .cloned()
        .unwrap_or_else(|| "1".into());
    set("TORCH_NCCL_ASYNC_ERROR_HANDLING", nccl);
    set("TORCHELASTIC_ERROR_FILE", error_file.to_owned());
    if virtual_local_rank {
        apply_virtual_local_rank(base, w.local_rank, &mut env)?;
    }
    Ok(env)
}

/// `--virtual-local-rank`: each worker sees exactly one device, its own.
fn apply_virtual_local_rank(base: &Env, local_rank: u32, env: &mut Env) -> Result<(), ConfigError> {
    let hip = get(base, "HIP_VISIBLE_DEVICES").filter(|v| !v.is_empty());
    let (var, source) = match hip {
        Some(v) => ("HIP_VISIBLE_DEVICES", Some(v)),
        None => ("CUDA_VISIBLE_DEVICES", get(base, "CUDA_VISIBLE_DEVICES")),
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
    set(env, "CUDA_VISIBLE_DEVICES", device.clone());
    if var == "HIP_VISIBLE_DEVICES" {
        set(env, "HIP_VISIBLE_DEVICES", device);
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

/// [`substitute_local_rank`] for an argument as the kernel passes it: one
/// that is not UTF-8 is passed on unchanged.
pub fn substitute_local_rank_os(arg: &OsStr, local_rank: u32) -> OsString {
    match arg.to_str() {
        Some(s) => substitute_local_rank(s, local_rank).into(),
        None => arg.to_owned(),
    }
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
        let mut base = Env::new();
        set(&mut base, "PATH", "/bin");
        set(&mut base, "TORCH_NCCL_ASYNC_ERROR_HANDLING", "0");
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
        let env = worker_env(&base, &g, &w, OsStr::new("/tmp/e.json"), false).unwrap();
        assert_eq!(get(&env, "TORCHELASTIC_USE_AGENT_STORE").unwrap(), "True");
        assert_eq!(get(&env, "TORCH_NCCL_ASYNC_ERROR_HANDLING").unwrap(), "0");
        assert_eq!(get(&env, "PATH").unwrap(), "/bin");
        assert_eq!(get(&env, "LOCAL_RANK").unwrap(), "1");
        let mut vbase = base.clone();
        set(&mut vbase, "CUDA_VISIBLE_DEVICES", "4, 5");
        let env = worker_env(&vbase, &g, &w, OsStr::new(""), true).unwrap();
        assert_eq!(get(&env, "LOCAL_RANK").unwrap(), "0");
        assert_eq!(get(&env, "CUDA_VISIBLE_DEVICES").unwrap(), "5");
        set(&mut vbase, "CUDA_VISIBLE_DEVICES", "4");
        assert!(worker_env(&vbase, &g, &w, OsStr::new(""), true).is_err());
    }
}
