//! The rendezvous part of a [`LaunchConfig`], typed once: the backend with
//! its endpoint, and every `--rdzv-conf` value converted and checked. Every
//! mistake in them is found here, before anything touches the disk or the
//! network; the rendezvous code reads only these fields.

use std::time::Duration;

use crate::config::{parse_endpoint, ConfigError, LaunchConfig};

/// How to reach etcd.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// `host:port` of each endpoint, tried in this order.
    pub endpoints: Vec<String>,
    pub https: bool,
    /// PEM files: the CA that signed etcd's certificate, and this client's
    /// certificate and key.
    pub ca_cert: Option<std::path::PathBuf>,
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Per request (and how long connecting keeps trying at start).
    pub timeout: std::time::Duration,
}

impl std::fmt::Debug for EtcdOptions {
    /// Never shows the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("https", &self.https)
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The default port of a c10d endpoint given without one (torch's).
pub const C10D_DEFAULT_PORT: u16 = 29400;

/// The default port of an etcd endpoint given without one.
pub const ETCD_DEFAULT_PORT: u16 = 2379;

/// Where the credentials for etcd may come from instead of `--rdzv-conf`
/// (which other users of the machine can read in the process list).
pub const ETCD_USERNAME_ENV: &str = "TORCHRUN_RS_ETCD_USERNAME";
pub const ETCD_PASSWORD_ENV: &str = "TORCHRUN_RS_ETCD_PASSWORD";

/// The dynamic rendezvous with its state in etcd (v3 API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    pub options: EtcdOptions,
    /// Keys live under `<prefix>/rendezvous/<run_id>/` (`etcd_prefix`).
    pub prefix: String,
    /// How long a run's keys outlive its last agent (`run_ttl`, 7200 s).
    pub run_ttl: Duration,
    /// torch's name for its v2-API backends (`etcd`, `etcd-v2`) when the
    /// user gave one: the v3 backend serves it, with a notice.
    pub torch_name: Option<String>,
}

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
    /// torch's dynamic rendezvous with its state in etcd.
    Etcd(Box<EtcdSettings>),
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
    /// c10d: how long one heartbeat may take (`heartbeat_timeout`, 5 s, as
    /// torch's keep-alive operation's deadline).
    pub heartbeat_timeout: Duration,
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
                // torch's c10d backend reads both, standalone included.
                let is_host = match conf.get("is_host") {
                    None => None,
                    Some(v) => {
                        Some(parse_bool(v).ok_or_else(|| bad("is_host", v, "true or false"))?)
                    }
                };
                match conf.get("store_type").map(|v| v.trim().to_ascii_lowercase()) {
                    None => {}
                    Some(t) if t == "tcp" => {}
                    Some(t) if t == "file" => {
                        return Err(ConfigError::new(
                            "--rdzv-conf",
                            "store_type=file: torchrun-rs keeps the c10d rendezvous in a TCP store only (expected tcp)",
                        ))
                    }
                    Some(_) => {
                        return Err(bad(
                            "store_type",
                            &conf["store_type"],
                            "tcp (or torch's file, which torchrun-rs does not offer)",
                        ))
                    }
                }
                if c.max_nodes == 1 && port == 0 {
                    Backend::Local { port }
                } else {
                    Backend::C10d {
                        host,
                        port,
                        is_host,
                    }
                }
            }
            name @ ("etcd-v3" | "etcd" | "etcd-v2") => {
                Backend::Etcd(Box::new(etcd_settings(c, name)?))
            }
            other => {
                return Err(ConfigError::new(
                    "--rdzv-backend",
                    format!(
                    "'{other}' is not supported by torchrun-rs (expected static, c10d or etcd-v3)"
                ),
                ))
            }
        };
        // Only the keys the chosen backend reads are checked, as torch
        // converts a value only when it reads it: any other key, whatever
        // its value, is accepted (torch's own tests pass
        // `'join_timeout=5,...,timeout=5'` with the quotes inside).
        let dynamic = !matches!(backend, Backend::Static { .. });
        let reads = |key: &str| match key {
            "timeout" => !matches!(backend, Backend::C10d { .. } | Backend::Local { .. }),
            "read_timeout"
            | "join_timeout"
            | "last_call_timeout"
            | "close_timeout"
            | "heartbeat_timeout"
            | "keep_alive_interval"
            | "keep_alive_max_attempt" => dynamic,
            _ => true,
        };
        let secs = |key: &str, default: u64| {
            if reads(key) {
                c.rdzv_secs(key, default)
            } else {
                Ok(Duration::from_secs(default))
            }
        };
        let keep_alive_max_attempt = match conf.get("keep_alive_max_attempt").filter(|_| dynamic) {
            None => 3,
            Some(v) => v
                .trim()
                .parse()
                .ok()
                .filter(|&n: &u32| n > 0)
                .ok_or_else(|| bad("keep_alive_max_attempt", v, "a positive integer"))?,
        };
        // Read by torch's dynamic rendezvous (its maximum random delay
        // after a lost state write): checked as torch checks it. torchrun-rs
        // needs no such delay (a lost write returns the state that won, in
        // the same round trip), so a valid value changes nothing.
        if let Some(v) = conf.get("cas_backoff_max_seconds").filter(|_| dynamic) {
            if !v
                .trim()
                .parse::<f64>()
                .is_ok_and(|d| d.is_finite() && d >= 0.0)
            {
                return Err(bad(
                    "cas_backoff_max_seconds",
                    v,
                    "a finite, non-negative number of seconds",
                ));
            }
        }
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
            timeout: secs("timeout", 900)?,
            read_timeout: secs("read_timeout", 60)?,
            join_timeout: match (c.rdzv_backend.as_str(), c.rdzv_configs.get("join_timeout")) {
                // torch's legacy etcd backend bounds the whole rendezvous
                // with `timeout` instead.
                ("etcd", None) => secs("timeout", 600)?,
                _ => secs("join_timeout", 600)?,
            },
            last_call_timeout: secs("last_call_timeout", 30)?,
            close_timeout: secs("close_timeout", 30)?,
            keep_alive_interval: secs("keep_alive_interval", 5)?,
            keep_alive_max_attempt,
            heartbeat_timeout: secs("heartbeat_timeout", 5)?,
            backend,
            exit_barrier_timeout: c.rdzv_secs("exit_barrier_timeout", 300)?,
        })
    }
}

/// The first of `names` (torch's two spellings of one key) that is set.
fn either<'a>(c: &'a LaunchConfig, names: &[&str]) -> Option<(&'a str, String)> {
    names.iter().find_map(|k| {
        c.rdzv_configs
            .get_key_value(*k)
            .map(|(k, v)| (k.as_str(), v.trim().to_string()))
    })
}

fn etcd_settings(c: &LaunchConfig, name: &str) -> Result<EtcdSettings, ConfigError> {
    let mut endpoints = Vec::new();
    // etcd users often write endpoints as URLs (`https://etcd-0:2379`, as
    // etcdctl takes them): the scheme says the protocol.
    let mut schemes = std::collections::BTreeSet::new();
    for ep in c.rdzv_endpoint.split(',').map(str::trim) {
        if ep.is_empty() && !endpoints.is_empty() {
            continue;
        }
        let lower = ep.to_ascii_lowercase();
        let ep = match ["http://", "https://"]
            .iter()
            .find(|p| lower.starts_with(*p))
        {
            Some(p) => {
                schemes.insert(p.trim_end_matches("://"));
                ep[p.len()..].trim_end_matches('/')
            }
            None => ep,
        };
        let (host, port) = parse_endpoint(ep, Some(ETCD_DEFAULT_PORT))?;
        let port = port.unwrap_or(ETCD_DEFAULT_PORT);
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        endpoints.push(format!("{host}:{port}"));
    }
    let file = |names: &[&str]| -> Result<Option<std::path::PathBuf>, ConfigError> {
        match either(c, names) {
            None => Ok(None),
            Some((k, v)) => {
                let p = std::path::PathBuf::from(&v);
                if p.is_file() {
                    Ok(Some(p))
                } else {
                    Err(bad(k, &v, "a readable PEM file"))
                }
            }
        }
    };
    let ca_cert = file(&["ca_cert", "cacert"])?;
    let cert = file(&["ssl_cert", "cert"])?;
    let key = file(&["ssl_cert_key", "key"])?;
    let client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(ConfigError::new(
                "--rdzv-conf",
                "a client certificate needs both ssl_cert (or cert) and ssl_cert_key (or key)",
            ))
        }
    };
    let protocol = match either(c, &["protocol"]) {
        None => None,
        Some((_, v)) => match v.to_ascii_lowercase().as_str() {
            "http" => Some(false),
            "https" => Some(true),
            _ => return Err(bad("protocol", &v, "http or https")),
        },
    };
    let scheme = match schemes.len() {
        0 => None,
        1 => Some(schemes.contains("https")),
        _ => {
            return Err(ConfigError::new(
                "--rdzv-endpoint",
                "the etcd endpoints mix http:// and https://: expected one protocol for all",
            ))
        }
    };
    let https = match (protocol, scheme) {
        (Some(p), Some(s)) if p != s => {
            return Err(ConfigError::new(
                "--rdzv-conf",
                "protocol= contradicts the scheme of the etcd endpoints in --rdzv-endpoint",
            ))
        }
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => ca_cert.is_some() || client_cert.is_some(),
    };
    let from_env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let username = either(c, &["username", "user"])
        .map(|(_, v)| v)
        .or_else(|| from_env(ETCD_USERNAME_ENV));
    let password = c
        .rdzv_configs
        .get("password")
        .cloned()
        .or_else(|| from_env(ETCD_PASSWORD_ENV));
    if password.is_some() && username.is_none() {
        return Err(ConfigError::new(
            "--rdzv-conf",
            format!("an etcd password needs a user name (username=... or {ETCD_USERNAME_ENV})"),
        ));
    }
    let prefix = match either(c, &["etcd_prefix"]) {
        None => "/torch/elastic".to_string(),
        Some((_, v)) if v.is_empty() || v.contains(['\n', '\0']) => {
            return Err(bad(
                "etcd_prefix",
                &v,
                "a key prefix such as /torch/elastic",
            ))
        }
        Some((_, v)) => v,
    };
    Ok(EtcdSettings {
        options: EtcdOptions {
            endpoints,
            https,
            ca_cert,
            client_cert,
            username,
            password,
            timeout: c.rdzv_secs("read_timeout", 60)?,
        },
        prefix,
        run_ttl: c.rdzv_secs("run_ttl", 7200)?,
        torch_name: (name != "etcd-v3").then(|| name.to_string()),
    })
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
    fn keys_a_backend_does_not_read_are_accepted_whatever_their_value() {
        // torch's test_launch_elastic: the quotes end up inside the keys
        // and values; c10d reads neither `'join_timeout` nor `timeout`.
        let conf = [
            ("'join_timeout", "5"),
            ("last_call_timeout", "1"),
            ("timeout", "5'"),
        ];
        let s = RdzvSettings::from_config(&cfg("c10d", "localhost:0", 2, &conf)).unwrap();
        assert_eq!(s.last_call_timeout, Duration::from_secs(1));
        assert_eq!(s.join_timeout, Duration::from_secs(600));
        // The static backend reads none of the dynamic rendezvous's keys.
        let conf = [("join_timeout", "soon"), ("keep_alive_max_attempt", "-1")];
        assert!(RdzvSettings::from_config(&cfg("static", "h:1", 2, &conf)).is_ok());
        // A key the backend reads is still checked.
        let bad = RdzvSettings::from_config(&cfg("c10d", "h:1", 2, &[("join_timeout", "soon")]));
        assert!(bad.unwrap_err().to_string().contains("join_timeout=soon"));
        let bad = RdzvSettings::from_config(&cfg("static", "h:1", 2, &[("timeout", "5'")]));
        assert!(bad.is_err());
    }

    #[test]
    fn every_key_torchs_dynamic_rendezvous_reads_is_checked_and_heartbeat_timeout_is_kept() {
        let err = |backend: &str, nodes: u32, conf: &[(&str, &str)]| {
            RdzvSettings::from_config(&cfg(backend, "localhost:29400", nodes, conf))
                .err()
                .map(|e| e.to_string())
        };
        // torch 2.15's create_handler reads heartbeat_timeout and
        // cas_backoff_max_seconds; its c10d backend reads store_type.
        for backend in ["c10d", "etcd-v3", "etcd-v2"] {
            let e = err(backend, 2, &[("heartbeat_timeout", "1e20")]);
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("heartbeat_timeout=1e20")),
                "{backend}: {e:?}"
            );
            assert!(
                err(backend, 2, &[("heartbeat_timeout", "0")]).is_some(),
                "{backend}"
            );
            for v in ["-1", "inf", "NaN", "soon"] {
                let e = err(backend, 2, &[("cas_backoff_max_seconds", v)]);
                assert!(
                    e.as_deref()
                        .is_some_and(|e| e.contains("cas_backoff_max_seconds")),
                    "{backend} {v}: {e:?}"
                );
            }
            assert_eq!(err(backend, 2, &[("cas_backoff_max_seconds", "0.5")]), None);
        }
        // Standalone (c10d on one node) reads them too.
        let standalone = |conf: &[(&str, &str)]| {
            RdzvSettings::from_config(&cfg("c10d", "localhost:0", 1, conf)).err()
        };
        assert!(standalone(&[("heartbeat_timeout", "1e20")]).is_some());
        assert!(standalone(&[("is_host", "maybe")]).is_some());
        assert!(standalone(&[("store_type", "file")]).is_some());
        for v in ["file", "redis"] {
            let e = err("c10d", 2, &[("store_type", v)]);
            assert!(
                e.as_deref().is_some_and(|e| e.contains("store_type")),
                "{v}: {e:?}"
            );
        }
        assert_eq!(err("c10d", 2, &[("store_type", " TCP ")]), None);
        // The static backend reads none of them.
        let conf = [
            ("heartbeat_timeout", "1e20"),
            ("cas_backoff_max_seconds", "-1"),
            ("store_type", "x"),
        ];
        assert_eq!(err("static", 2, &conf).map(|_| ()), None);
        // A valid value is kept: the heartbeat's deadline.
        let s = RdzvSettings::from_config(&cfg("c10d", "h:1", 2, &[("heartbeat_timeout", "2")]))
            .unwrap();
        assert_eq!(s.heartbeat_timeout, Duration::from_secs(2));
        let s = RdzvSettings::from_config(&cfg("c10d", "h:1", 2, &[])).unwrap();
        assert_eq!(s.heartbeat_timeout, Duration::from_secs(5));
    }

    #[test]
    fn etcd_settings_take_both_of_torchs_naming_families() {
        let dir = tempfile::tempdir().unwrap();
        let pem = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, "-----BEGIN CERTIFICATE-----").unwrap();
            p.display().to_string()
        };
        let (ca, cert, key) = (pem("ca.pem"), pem("c.pem"), pem("k.pem"));
        let get = |backend: &str, endpoint: &str, conf: &[(&str, &str)]| {
            let s = RdzvSettings::from_config(&cfg(backend, endpoint, 2, conf)).unwrap();
            let Backend::Etcd(e) = s.backend else {
                panic!("{backend}: not the etcd backend")
            };
            (e, s.join_timeout)
        };
        let (v2, _) = get(
            "etcd-v2",
            "a:1,b, [::1]:3",
            &[
                ("ca_cert", &ca),
                ("ssl_cert", &cert),
                ("ssl_cert_key", &key),
            ],
        );
        let (legacy, legacy_join) = get(
            "etcd",
            "a:1,b, [::1]:3",
            &[
                ("cacert", &ca),
                ("cert", &cert),
                ("key", &key),
                ("timeout", "77"),
            ],
        );
        assert_eq!(v2.options, legacy.options);
        assert_eq!(v2.options.endpoints, ["a:1", "b:2379", "[::1]:3"]);
        // TLS files given and no protocol: https.
        assert!(v2.options.https);
        assert_eq!(v2.torch_name.as_deref(), Some("etcd-v2"));
        // The legacy backend bounds the rendezvous with `timeout`.
        assert_eq!(legacy_join, Duration::from_secs(77));
        let (v3, join) = get(
            "etcd-v3",
            "",
            &[
                ("etcd_prefix", "/mine"),
                ("run_ttl", "60"),
                ("username", "u"),
                ("password", "p"),
            ],
        );
        assert_eq!(v3.options.endpoints, ["localhost:2379"]);
        assert!(!v3.options.https);
        assert_eq!(
            (v3.prefix.as_str(), v3.run_ttl),
            ("/mine", Duration::from_secs(60))
        );
        assert_eq!(join, Duration::from_secs(600));
        assert_eq!(v3.torch_name, None);
        // The password never shows in a debug print.
        let shown = format!("{:?}", v3.options);
        assert!(
            shown.contains("<hidden>") && !shown.contains("\"p\""),
            "{shown}"
        );
    }

    #[test]
    fn etcd_endpoints_may_be_urls() {
        let get = |endpoint: &str, conf: &[(&str, &str)]| {
            let s = RdzvSettings::from_config(&cfg("etcd-v3", endpoint, 2, conf))?;
            let Backend::Etcd(e) = s.backend else {
                panic!("not the etcd backend")
            };
            Ok::<_, ConfigError>((e.options.endpoints, e.options.https))
        };
        assert_eq!(
            get("https://a:1, HTTPS://b/", &[]).unwrap(),
            (vec!["a:1".to_string(), "b:2379".to_string()], true)
        );
        assert_eq!(
            get("http://a", &[("protocol", "http")]).unwrap(),
            (vec!["a:2379".to_string()], false)
        );
        let mixed = get("http://a,https://b", &[]).unwrap_err();
        assert!(
            mixed.to_string().contains("mix http:// and https://"),
            "{mixed}"
        );
        let contradicts = get("https://a", &[("protocol", "http")]).unwrap_err();
        assert!(
            contradicts.to_string().contains("contradicts"),
            "{contradicts}"
        );
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
                cfg("zookeeper", "h:1", 2, &[]),
                "--rdzv-backend",
                "not supported",
            ),
            (
                cfg("etcd-v3", "h", 2, &[("protocol", "ftp")]),
                "--rdzv-conf",
                "protocol=ftp: expected http or https",
            ),
            (
                cfg("etcd-v3", "h", 2, &[("ssl_cert", "/etc/hostname")]),
                "--rdzv-conf",
                "needs both ssl_cert (or cert) and ssl_cert_key (or key)",
            ),
            (
                cfg("etcd", "h", 2, &[("cacert", "/nonexistent.pem")]),
                "--rdzv-conf",
                "cacert=/nonexistent.pem: expected a readable PEM file",
            ),
            (
                cfg("etcd-v3", "h", 2, &[("password", "x")]),
                "--rdzv-conf",
                "needs a user name",
            ),
            (
                cfg("etcd-v3", "h:2379,g:x", 2, &[]),
                "--rdzv-endpoint",
                "must be an integer",
            ),
            (
                cfg("etcd-v2", "h", 2, &[("read_timeout", "0")]),
                "--rdzv-conf",
                "read_timeout=0",
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
