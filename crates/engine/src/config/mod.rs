//! The resolved launch configuration (torch's `LaunchConfig`) and the small
//! grammars its fields come in: `-r`/`-t` specs, `--rdzv-conf`, endpoints,
//! `--signals-to-handle`.

pub mod preview;
pub mod rdzv_settings;
pub mod worker_env;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

/// A configuration value that cannot be used; `flag` names where it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{flag}: {message}")]
pub struct ConfigError {
    pub flag: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(flag: &str, message: impl Into<String>) -> Self {
        ConfigError {
            flag: flag.to_string(),
            message: message.into(),
        }
    }
}

/// Which of a worker's streams go to files (`-r`) or files plus the console (`-t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Std {
    pub stdout: bool,
    pub stderr: bool,
}

impl Std {
    pub const NONE: Std = Std {
        stdout: false,
        stderr: false,
    };
    fn from_digit(d: u8) -> Std {
        Std {
            stdout: d & 1 != 0,
            stderr: d & 2 != 0,
        }
    }
    pub fn union(self, other: Std) -> Std {
        Std {
            stdout: self.stdout || other.stdout,
            stderr: self.stderr || other.stderr,
        }
    }
}

/// `-r`/`-t` value: one digit for every local rank, or `rank:digit,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdSpec {
    All(Std),
    PerRank(BTreeMap<u32, Std>),
}

impl Default for StdSpec {
    fn default() -> Self {
        StdSpec::All(Std::NONE)
    }
}

impl StdSpec {
    /// Parses torch's grammar: `^[0123]$` or `^(\d:[0123],)*(\d:[0123])$`
    /// (local-rank keys are a single digit, as in torch).
    pub fn parse(flag: &str, v: &str) -> Result<StdSpec, ConfigError> {
        let err = || {
            ConfigError::new(
                flag,
                format!("invalid value '{v}': expected 0, 1, 2 or 3 (none, stdout, stderr, both), or per local rank like 0:1,1:2"),
            )
        };
        // Python's `$` also matches before a final line break: torch takes
        // "1\n" as 1.
        let v = v.strip_suffix('\n').unwrap_or(v);
        let b = v.as_bytes();
        if b.len() == 1 && (b'0'..=b'3').contains(&b[0]) {
            return Ok(StdSpec::All(Std::from_digit(b[0] - b'0')));
        }
        let mut map = BTreeMap::new();
        for item in v.split(',') {
            let ib = item.as_bytes();
            if ib.len() != 3
                || !ib[0].is_ascii_digit()
                || ib[1] != b':'
                || !(b'0'..=b'3').contains(&ib[2])
            {
                return Err(err());
            }
            map.insert(u32::from(ib[0] - b'0'), Std::from_digit(ib[2] - b'0'));
        }
        Ok(StdSpec::PerRank(map))
    }

    pub fn for_rank(&self, local_rank: u32) -> Std {
        match self {
            StdSpec::All(s) => *s,
            StdSpec::PerRank(m) => m.get(&local_rank).copied().unwrap_or(Std::NONE),
        }
    }
}

/// Parses `--rdzv-conf`: `k=v,k=v`; values stay strings and unknown keys are
/// kept (consumers convert what they use).
pub fn parse_rdzv_conf(v: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    let v = v.trim();
    if v.is_empty() {
        return Ok(out);
    }
    for item in v.split(',') {
        let (key, value) = match item.split_once('=') {
            Some((k, val)) => (k.trim(), val.trim()),
            None => (item.trim(), ""),
        };
        if key.is_empty() {
            return Err(ConfigError::new(
                "--rdzv-conf",
                format!("invalid value '{v}': expected <key1>=<value1>,...,<keyN>=<valueN>"),
            ));
        }
        if value.is_empty() {
            return Err(ConfigError::new(
                "--rdzv-conf",
                format!("option '{key}' must have a value specified"),
            ));
        }
        out.insert(key.to_string(), value.to_string());
    }
    Ok(out)
}

/// Parses `host[:port]` as torch's `parse_rendezvous_endpoint` does: split at
/// the last `:`, brackets around IPv6 hosts removed, `[v6]` alone has no port.
pub fn parse_endpoint(
    ep: &str,
    default_port: Option<u16>,
) -> Result<(String, Option<u16>), ConfigError> {
    let ep = ep.trim();
    if ep.is_empty() {
        return Ok(("localhost".to_string(), default_port));
    }
    let (host, port) = if ep.starts_with('[') && ep.ends_with(']') {
        (ep, None)
    } else {
        match ep.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (ep, None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => {
            let ok = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
            match p.parse::<u32>() {
                Ok(n) if ok && n < 65536 => Some(n as u16),
                _ => {
                    return Err(ConfigError::new(
                        "--rdzv-endpoint",
                        format!("the port number of the rendezvous endpoint '{ep}' must be an integer between 0 and 65535"),
                    ))
                }
            }
        }
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '.' || c == ':' || c == '-');
    if !host_ok {
        return Err(ConfigError::new(
            "--rdzv-endpoint",
            format!("the hostname of the rendezvous endpoint '{ep}' must be a dot-separated list of labels, an IPv4 address, or an IPv6 address"),
        ));
    }
    Ok((host.to_string(), port))
}

/// Parses `--nnodes`: `N` or `MIN:MAX` with `0 < MIN <= MAX`.
pub fn parse_nnodes(v: &str) -> Result<(u32, u32), ConfigError> {
    let parts: Vec<&str> = v.split(':').collect();
    let num = |s: &str| -> Result<u32, ConfigError> {
        s.trim().parse::<u32>().map_err(|_| {
            ConfigError::new(
                "--nnodes",
                format!("invalid value '{v}': expected N or MIN:MAX with 0 < MIN <= MAX"),
            )
        })
    };
    let (min, max) = match parts.as_slice() {
        [n] => {
            let n = num(n)?;
            (n, n)
        }
        [a, b] => (num(a)?, num(b)?),
        _ => {
            return Err(ConfigError::new(
                "--nnodes",
                format!("invalid value '{v}': expected N or MIN:MAX"),
            ))
        }
    };
    if min == 0 || min > max {
        return Err(ConfigError::new(
            "--nnodes",
            format!("invalid value '{v}': expected 0 < MIN <= MAX"),
        ));
    }
    Ok((min, max))
}

/// Rendezvous settings shared by all backends.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchConfig {
    pub min_nodes: u32,
    pub max_nodes: u32,
    pub nproc_per_node: u32,
    pub run_id: String,
    pub role: String,
    pub rdzv_endpoint: String,
    pub rdzv_backend: String,
    /// `--rdzv-conf` plus `rank` (static) and `timeout` (always, default 900).
    pub rdzv_configs: BTreeMap<String, String>,
    pub max_restarts: u32,
    pub monitor_interval: Duration,
    pub start_method: String,
    pub log_dir: Option<PathBuf>,
    pub redirects: StdSpec,
    pub tee: StdSpec,
    pub local_ranks_filter: Option<BTreeSet<u32>>,
    pub log_line_prefix_template: Option<String>,
    pub local_addr: Option<String>,
    pub event_log_handler: String,
    /// Comma list as given, e.g. `SIGTERM,SIGINT,SIGHUP,SIGQUIT`; exported to
    /// workers as `TORCHELASTIC_SIGNALS_TO_HANDLE`.
    pub signals_to_handle: String,
    pub duplicate_stdout_filters: Vec<String>,
    pub duplicate_stderr_filters: Vec<String>,
    pub virtual_local_rank: bool,
    /// `--metrics-port` (or torch's TORCHELASTIC_HEALTH_CHECK_PORT): health,
    /// status and metrics over HTTP; 0 picks a free port.
    pub metrics_port: Option<u16>,
    /// `--metrics-addr`: where that server listens (all interfaces).
    pub metrics_addr: std::net::IpAddr,
    /// `--require-same-nodes` (beyond torch): nodes whose fingerprints
    /// differ (script, versions, numerics variables) stop before starting
    /// workers.
    pub require_same_nodes: bool,
    /// `--dedup-output` (beyond torch): identical console lines of several
    /// local ranks are printed once, naming the ranks.
    pub dedup_output: bool,
    /// `--open-stacks`: serve `/stacks` (stacks, command lines) to any
    /// client, not only to loopback ones.
    pub open_stacks: bool,
    /// `--hang-timeout` (beyond torch): no output from any rank for this
    /// long is a hang: every rank's stack is dumped and `on_hang` applies.
    pub hang_timeout: Option<Duration>,
    pub on_hang: OnHang,
    /// `--restart-backoff` (beyond torch): the wait before restart n is
    /// `min(max, min·2^n)` plus up to 25 % jitter; zero (torch) by default.
    pub restart_backoff: (Duration, Duration),
    /// `--fatal-exit-codes` (beyond torch): a worker exiting with one of
    /// these ends the job at once, without using a restart.
    pub fatal_exit_codes: Vec<i32>,
    /// `--max-node-failures` (beyond torch): a host that is the root cause
    /// of this many failed rounds is excluded for the rest of the run
    /// (c10d, etcd-v3).
    pub max_node_failures: Option<u32>,
    /// `--node-check` (beyond torch): a shell command run before each
    /// round; a failure keeps the node out of it and counts as one of its
    /// failures.
    pub node_check: Option<String>,
    /// `--events-file` (beyond torch): every lifecycle fact as JSON Lines.
    pub events_file: Option<PathBuf>,
    /// `--numa-binding`: pin each local rank's CPUs near its GPU.
    pub numa_binding: Option<crate::process::numa::AffinityMode>,
    /// Grace between forwarding a signal and SIGKILL on shutdown.
    pub shutdown_timeout: Duration,
    /// Static backend: the store every agent and worker uses.
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    /// Signals forwarded to the workers without stopping the job
    /// (`--forward-signals`, beyond torchrun).
    pub forward_signals: String,
}

pub const DEFAULT_SIGNALS: &str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT";

/// What `--on-hang` does once a hang is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHang {
    /// Report it and let the job run.
    Report,
    /// Stop the job as failed (no restart).
    Fail,
    /// Stop the group as failed; the restart budget applies.
    Restart,
}

/// The longest duration a user may give, in seconds (about 31 years): longer
/// ones would overflow the clocks that deadlines are computed on.
pub const MAX_SECONDS: f64 = 1e9;

/// A positive number of seconds, at most [`MAX_SECONDS`] (`None` for
/// anything else: text, zero, negative, NaN, infinite, too large).
pub fn parse_seconds(v: &str) -> Option<Duration> {
    let s = v.trim().parse::<f64>().ok()?;
    (s > 0.0 && s <= MAX_SECONDS).then(|| Duration::from_secs_f64(s))
}

impl Default for LaunchConfig {
    fn default() -> Self {
        let mut rdzv_configs = BTreeMap::new();
        rdzv_configs.insert("timeout".to_string(), "900".to_string());
        LaunchConfig {
            min_nodes: 1,
            max_nodes: 1,
            nproc_per_node: 1,
            run_id: String::new(),
            role: "default".to_string(),
            rdzv_endpoint: String::new(),
            rdzv_backend: "c10d".to_string(),
            rdzv_configs,
            max_restarts: 0,
            monitor_interval: Duration::from_millis(100),
            start_method: "spawn".to_string(),
            log_dir: None,
            redirects: StdSpec::default(),
            tee: StdSpec::default(),
            local_ranks_filter: None,
            log_line_prefix_template: None,
            local_addr: None,
            event_log_handler: "null".to_string(),
            signals_to_handle: DEFAULT_SIGNALS.to_string(),
            duplicate_stdout_filters: Vec::new(),
            duplicate_stderr_filters: Vec::new(),
            virtual_local_rank: false,
            numa_binding: None,
            events_file: None,
            hang_timeout: None,
            on_hang: OnHang::Report,
            restart_backoff: (Duration::ZERO, Duration::ZERO),
            fatal_exit_codes: Vec::new(),
            max_node_failures: None,
            node_check: None,
            metrics_port: None,
            metrics_addr: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            open_stacks: false,
            dedup_output: false,
            require_same_nodes: false,
            shutdown_timeout: Duration::from_secs(30),
            master_addr: None,
            master_port: None,
            forward_signals: String::new(),
        }
    }
}

impl LaunchConfig {
    /// Checks what the library API's caller may have set by hand, before
    /// anything touches the disk or the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.nproc_per_node == 0 {
            return Err(ConfigError::new(
                "--nproc-per-node",
                "must be a positive integer",
            ));
        }
        if self.min_nodes == 0 || self.min_nodes > self.max_nodes {
            return Err(ConfigError::new(
                "--nnodes",
                format!(
                    "min_nodes={} max_nodes={}: expected 0 < min_nodes <= max_nodes",
                    self.min_nodes, self.max_nodes
                ),
            ));
        }
        let max = Duration::from_secs_f64(MAX_SECONDS);
        if self.monitor_interval.is_zero() || self.monitor_interval > max {
            return Err(ConfigError::new(
                "--monitor-interval",
                format!("must be greater than 0 and at most {MAX_SECONDS:e} seconds"),
            ));
        }
        if self.shutdown_timeout > max {
            return Err(ConfigError::new(
                "--shutdown-timeout",
                format!("must be at most {MAX_SECONDS:e} seconds"),
            ));
        }
        // The rendezvous settings check the keys the backend reads.
        crate::config::rdzv_settings::RdzvSettings::from_config(self)?;
        check_event_handler(&self.event_log_handler)?;
        if self.virtual_local_rank {
            // Each worker gets one entry of the visible-device list (the
            // launcher's environment is the workers' base).
            for var in ["HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"] {
                if let Some(list) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
                    let n = list.split(',').count() as u32;
                    if n < self.nproc_per_node {
                        return Err(ConfigError::new(
                            "--virtual-local-rank",
                            format!(
                                "local_rank {n} exceeds available GPUs in {var}={list} (--nproc-per-node={} needs one each)",
                                self.nproc_per_node
                            ),
                        ));
                    }
                    break;
                }
            }
        }
        Ok(())
    }

    /// A rendezvous setting as an integer number of seconds.
    pub fn rdzv_secs(&self, key: &str, default: u64) -> Result<Duration, ConfigError> {
        match self.rdzv_configs.get(key) {
            None => Ok(Duration::from_secs(default)),
            Some(v) => parse_seconds(v).ok_or_else(|| {
                ConfigError::new(
                    "--rdzv-conf",
                    format!(
                        "{key}={v}: expected a positive number of seconds, at most {MAX_SECONDS:e}"
                    ),
                )
            }),
        }
    }
}

/// The destinations torch's `--event-log-handler` knows.
pub const EVENT_HANDLERS: &[&str] = &["null", "console", "dynamic_rendezvous"];

/// Checks a handler name at start-up (torch fails only at the first event,
/// with a `KeyError`).
pub fn check_event_handler(name: &str) -> Result<(), ConfigError> {
    if EVENT_HANDLERS.contains(&name) {
        return Ok(());
    }
    Err(ConfigError::new(
        "--event-log-handler",
        format!(
            "unknown handler '{name}' (choose from {})",
            EVENT_HANDLERS
                .iter()
                .map(|h| format!("'{h}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_spec_grammar() {
        assert_eq!(
            StdSpec::parse("-r", "3").unwrap(),
            StdSpec::All(Std {
                stdout: true,
                stderr: true
            })
        );
        let m = StdSpec::parse("-r", "0:1,1:2").unwrap();
        assert_eq!(
            m.for_rank(0),
            Std {
                stdout: true,
                stderr: false
            }
        );
        assert_eq!(
            m.for_rank(1),
            Std {
                stdout: false,
                stderr: true
            }
        );
        assert_eq!(m.for_rank(2), Std::NONE);
        for bad in ["0:1,", "11", "0:1,1", "1,0:1", "4", "", "a"] {
            assert!(StdSpec::parse("-r", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rdzv_conf_grammar() {
        let c = parse_rdzv_conf(" join_timeout=5, last_call_timeout = 1 ,x=a=b/c").unwrap();
        assert_eq!(c["join_timeout"], "5");
        assert_eq!(c["last_call_timeout"], "1");
        assert_eq!(c["x"], "a=b/c");
        // Unknown and odd keys are kept, as torch's own tests rely on.
        let c = parse_rdzv_conf("'join_timeout=5,timeout=5'").unwrap();
        assert_eq!(c["'join_timeout"], "5");
        assert!(parse_rdzv_conf("a=1,").is_err());
        assert!(parse_rdzv_conf("=v").is_err());
        assert!(parse_rdzv_conf("a")
            .unwrap_err()
            .message
            .contains("'a' must have a value"));
        assert!(parse_rdzv_conf("a=").is_err());
        assert!(parse_rdzv_conf("").unwrap().is_empty());
    }

    #[test]
    fn endpoint_grammar() {
        assert_eq!(
            parse_endpoint("", Some(29400)).unwrap(),
            ("localhost".into(), Some(29400))
        );
        assert_eq!(
            parse_endpoint("h:123", None).unwrap(),
            ("h".into(), Some(123))
        );
        assert_eq!(
            parse_endpoint("h", Some(29400)).unwrap(),
            ("h".into(), Some(29400))
        );
        assert_eq!(
            parse_endpoint("[2001:db8::1]:123", None).unwrap(),
            ("2001:db8::1".into(), Some(123))
        );
        assert_eq!(
            parse_endpoint("[2001:db8::1]", Some(1)).unwrap(),
            ("2001:db8::1".into(), Some(1))
        );
        assert_eq!(
            parse_endpoint("localhost:0", None).unwrap(),
            ("localhost".into(), Some(0))
        );
        for bad in [
            "host:",
            "host:-1",
            "host:abc",
            "host:65536",
            "~",
            ":123",
            "dummy.com :123",
        ] {
            assert!(parse_endpoint(bad, Some(1)).is_err(), "{bad}");
        }
    }

    #[test]
    fn nnodes_grammar() {
        assert_eq!(parse_nnodes("1").unwrap(), (1, 1));
        assert_eq!(parse_nnodes("2:20").unwrap(), (2, 20));
        assert!(parse_nnodes("2:20:30").is_err());
        assert!(parse_nnodes("0").is_err());
        assert!(parse_nnodes("3:2").is_err());
        assert!(parse_nnodes("x").is_err());
    }
}
