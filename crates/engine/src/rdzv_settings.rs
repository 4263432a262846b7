//! The rendezvous part of a [`LaunchConfig`], typed once: the backend with
//! its endpoint, and every `--rdzv-conf` value converted and checked. Every
//! mistake in them is found here, before anything touches the disk or the
//! network; the rendezvous code reads only these fields.

use std::time::Duration;

use crate::config::{parse_endpoint, ConfigError, LaunchConfig};

/// The default port of a c10d endpoint given without one (torch's).
pub const C10D_DEFAULT_PORT: u16 = 29400;

/// Which rendezvous, with what it needs to reach its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Every node knows its rank (`--node-rank`); node 0 hosts the store.
    Static { host: String, port: u16, rank: u32 },
    /// One node (`--standalone`, plain single-node runs): a private store on
    /// `port`, 0 for any free port.
    Local { port: u16 },
    /// torch's dynamic rendezvous through a TCPStore at the endpoint.
    /// `is_host`: `--rdzv-conf is_host=...`, else decided by address.
    C10d {
        host: String,
        port: u16,
        is_host: Option<bool>,
    },
}

/// Everything the rendezvous reads from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdzvSettings {
    pub backend: Backend,
    /// Static: how long to wait for every node (`timeout`, 900 s).
    pub timeout: Duration,
    /// c10d: how long to keep trying to reach the store (`read_timeout`, 60 s).
    pub read_timeout: Duration,
    /// c10d: how long a node may wait to be admitted (`join_timeout`, 600 s).
    pub join_timeout: Duration,
    /// c10d: wait for more nodes once `min` are in (`last_call_timeout`, 30 s).
    pub last_call_timeout: Duration,
    /// c10d: how long closing may take (`close_timeout`, 30 s).
    pub close_timeout: Duration,
    /// c10d: heartbeat period (`keep_alive_interval`, 5 s).
    pub keep_alive_interval: Duration,
    /// c10d: heartbeats missed before a node is dead (`keep_alive_max_attempt`, 3).
    pub keep_alive_max_attempt: u32,
    /// How long a finished node waits for the others (`exit_barrier_timeout`,
    /// 300 s as torch hard-codes it).
    pub exit_barrier_timeout: Duration,
    /// c10d: this node's index in the cluster's own order (`node_index`,
    /// beyond torch; set from Slurm's node id by auto-configuration): group
    /// ranks follow it.
    pub node_index: Option<u32>,
}

fn bad(key: &str, v: &str, expected: &str) -> ConfigError {
    ConfigError::new("--rdzv-conf", format!("{key}={v}: expected {expected}"))
}

/// torch's `get_as_bool` spellings.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" => Some(true),
        "0" | "false" | "f" | "no" | "n" => Some(false),
        _ => None,
    }
}

impl RdzvSettings {
    /// Converts and checks the rendezvous fields of `c`.
    pub fn from_config(c: &LaunchConfig) -> Result<RdzvSettings, ConfigError> {
        let conf = &c.rdzv_configs;
        let backend = match c.rdzv_backend.as_str() {
            "static" => {
                let (host, port) = match (&c.master_addr, c.master_port) {
                    (Some(a), Some(p)) => (a.clone(), p),
                    _ => {
                        let (h, p) = parse_endpoint(&c.rdzv_endpoint, None)?;
                        let p = p.ok_or_else(|| {
                            ConfigError::new(
                                "--rdzv-endpoint",
                                "the static backend needs a port (host:port)",
                            )
                        })?;
                        (h, p)
                    }
                };
                let rank: u32 = match conf.get("rank") {
                    Some(r) => r.trim().parse().map_err(|_| {
                        ConfigError::new(
                            "--node-rank",
                            format!("invalid value '{r}': expected an integer"),
                        )
                    })?,
                    None => 0,
                };
                if rank >= c.max_nodes {
                    return Err(ConfigError::new(
                        "--node-rank",
                        format!(
                            "{rank} is out of range for --nnodes={} (expected 0 to {})",
                            c.max_nodes,
                            c.max_nodes.saturating_sub(1)
                        ),
                    ));
                }
                Backend::Static { host, port, rank }
            }
            "c10d" => {
                let (host, port) = parse_endpoint(&c.rdzv_endpoint, Some(C10D_DEFAULT_PORT))?;
                let port = port.unwrap_or(C10D_DEFAULT_PORT);
                if c.max_nodes == 1 && port == 0 {
                    Backend::Local { port }
                } else {
                    let is_host = match conf.get("is_host") {
                        None => None,
                        Some(v) => {
                            Some(parse_bool(v).ok_or_else(|| bad("is_host", v, "true or false"))?)
                        }
                    };
                    Backend::C10d {
                        host,
                        port,
                        is_host,
                    }
                }
            }
            other => {
                return Err(ConfigError::new(
                    "--rdzv-backend",
                    format!("'{other}' is not supported by torchrun-rs (expected static or c10d)"),
                ))
            }
        };
        let keep_alive_max_attempt = match conf.get("keep_alive_max_attempt") {
            None => 3,
            Some(v) => v
                .trim()
                .parse()
                .ok()
                .filter(|&n: &u32| n > 0)
                .ok_or_else(|| bad("keep_alive_max_attempt", v, "a positive integer"))?,
        };
        let node_index = match conf.get("node_index") {
            None => None,
            Some(v) => Some(
                v.trim()
                    .parse()
                    .map_err(|_| bad("node_index", v, "a non-negative integer"))?,
            ),
        };
        Ok(RdzvSettings {
            node_index,
            backend,
            timeout: c.rdzv_secs("timeout", 900)?,
            read_timeout: c.rdzv_secs("read_timeout", 60)?,
            join_timeout: c.rdzv_secs("join_timeout", 600)?,
            last_call_timeout: c.rdzv_secs("last_call_timeout", 30)?,
            close_timeout: c.rdzv_secs("close_timeout", 30)?,
            keep_alive_interval: c.rdzv_secs("keep_alive_interval", 5)?,
            keep_alive_max_attempt,
            exit_barrier_timeout: c.rdzv_secs("exit_barrier_timeout", 300)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(backend: &str, endpoint: &str, nodes: u32, conf: &[(&str, &str)]) -> LaunchConfig {
        let mut c = LaunchConfig {
            rdzv_backend: backend.into(),
            rdzv_endpoint: endpoint.into(),
            max_nodes: nodes,
            ..LaunchConfig::default()
        };
        for (k, v) in conf {
            c.rdzv_configs.insert(k.to_string(), v.to_string());
        }
        c
    }

    #[test]
    fn backends_and_their_endpoints() {
        let s = RdzvSettings::from_config(&cfg("c10d", "localhost:0", 1, &[])).unwrap();
        assert_eq!(s.backend, Backend::Local { port: 0 });
        assert_eq!(s.join_timeout, Duration::from_secs(600));
        let s = RdzvSettings::from_config(&cfg("c10d", "h", 2, &[("is_host", "yes")])).unwrap();
        assert_eq!(
            s.backend,
            Backend::C10d {
                host: "h".into(),
                port: 29400,
                is_host: Some(true)
            }
        );
        let s = RdzvSettings::from_config(&cfg("static", "m:5", 3, &[("rank", "2")])).unwrap();
        assert_eq!(
            s.backend,
            Backend::Static {
                host: "m".into(),
                port: 5,
                rank: 2
            }
        );
        assert_eq!(parse_bool("Yes"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }

    #[test]
    fn each_bad_value_names_its_flag() {
        for (c, flag, needle) in [
            (
                cfg("etcd", "h:1", 2, &[]),
                "--rdzv-backend",
                "not supported",
            ),
            (
                cfg("static", "h", 2, &[]),
                "--rdzv-endpoint",
                "needs a port",
            ),
            (
                cfg("static", "h:1", 2, &[("rank", "2")]),
                "--node-rank",
                "out of range",
            ),
            (
                cfg("c10d", "h:1", 2, &[("is_host", "x")]),
                "--rdzv-conf",
                "is_host",
            ),
            (
                cfg("c10d", "h:1", 2, &[("keep_alive_max_attempt", "0")]),
                "--rdzv-conf",
                "keep_alive",
            ),
            (
                cfg("c10d", "h:1", 2, &[("join_timeout", "1e20")]),
                "--rdzv-conf",
                "join_timeout",
            ),
            (
                cfg("c10d", "h:1", 2, &[("read_timeout", "NaN")]),
                "--rdzv-conf",
                "read_timeout",
            ),
        ] {
            let e = RdzvSettings::from_config(&c).unwrap_err();
            assert_eq!(e.flag, flag, "{e}");
            assert!(e.message.contains(needle), "{e}");
        }
    }
}
