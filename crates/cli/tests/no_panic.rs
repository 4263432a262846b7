//! Bad input gets a clear answer, never a panic: arbitrary command lines and
//! `PET_*` values give a launch configuration or a one-line usage error, and
//! every configuration that passes is fully checked (rendezvous values
//! included) before anything is started.

use std::collections::BTreeMap;

use proptest::prelude::*;

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

/// Option spellings, abbreviations and one-character options.
const OPTIONS: &[&str] = &[
    "--nnodes",
    "--nproc-per-node",
    "--nproc_per_node",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--rdzv-id",
    "--rdzv-conf",
    "--standalone",
    "--max-restarts",
    "--monitor-interval",
    "--start-method",
    "--event-log-handler",
    "--role",
    "-m",
    "--no-python",
    "--run-path",
    "--log-dir",
    "-r",
    "-t",
    "--log-line-prefix-template",
    "--local-ranks-filter",
    "--duplicate-stdout-filters",
    "--node-rank",
    "--master-addr",
    "--master-port",
    "--local-addr",
    "--logs-specs",
    "--numa-binding",
    "--signals-to-handle",
    "--shutdown-timeout",
    "--virtual-local-rank",
    "--forward-signals",
    "--nproc",
    "--rdzv",
    "-h",
    "-x",
    "-é",
    "--",
    "-",
];

/// Values that have broken parsers before: huge, NaN, inf, negative zero,
/// separators, non-ASCII.
const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "-0",
    "-0.0",
    "1e20",
    "1e308",
    "inf",
    "-inf",
    "NaN",
    "nan",
    "0.0",
    "18446744073709551616",
    "4294967296",
    "65536",
    "2:1",
    "1:1000000000",
    ":",
    "a=b",
    "timeout=1e20",
    "join_timeout=NaN",
    "keep_alive_max_attempt=0",
    "is_host=maybe",
    "last_call_timeout=-1",
    "read_timeout=inf",
    "exit_barrier_timeout=1e9",
    "keep_alive_interval=0.000001",
    "rank=99",
    "localhost:0",
    "[::1]:29400",
    "h:99999",
    "c10d",
    "static",
    "etcd",
    "etcd-v3",
    "https",
    "HTTP",
    "/etc/hostname",
    "/nonexistent.pem",
    "gpu",
    "cpu",
    "auto",
    "xpu",
    "SIGTERM,SIGBOGUS",
    "SIGUSR1",
    "0:1,1:2",
    "é",
    "\u{fffd}",
    "",
    " ",
    ",",
    "/dev/null",
];

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(OPTIONS).prop_map(str::to_string),
        proptest::sample::select(VALUES).prop_map(str::to_string),
        (
            proptest::sample::select(OPTIONS),
            proptest::sample::select(VALUES)
        )
            .prop_map(|(o, v)| format!("{o}={v}")),
        any::<String>(),
    ]
}

fn pet_env() -> impl Strategy<Value = BTreeMap<String, String>> {
    let names = proptest::sample::select(
        &[
            "PET_NNODES",
            "PET_NPROC_PER_NODE",
            "PET_RDZV_BACKEND",
            "PET_RDZV_ENDPOINT",
            "PET_RDZV_CONF",
            "PET_STANDALONE",
            "PET_MAX_RESTARTS",
            "PET_MONITOR_INTERVAL",
            "PET_NODE_RANK",
            "PET_MASTER_PORT",
            "PET_SHUTDOWN_TIMEOUT",
            "PET_REDIRECTS",
            "PET_TEE",
            "PET_NO_PYTHON",
            "PET_VIRTUAL_LOCAL_RANK",
            "PET_LOCAL_RANKS_FILTER",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
            "CUDA_VISIBLE_DEVICES",
        ][..],
    );
    let value = prop_oneof![
        proptest::sample::select(VALUES).prop_map(str::to_string),
        any::<String>()
    ];
    proptest::collection::btree_map(names.prop_map(str::to_string), value, 0..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_command_line_gives_a_config_or_one_usage_line(
        mut argv in proptest::collection::vec(token(), 0..8),
        env in pet_env(),
    ) {
        argv.push("train.py".to_string());
        let get = |k: &str| env.get(k).cloned();
        let outcome = cli::args::parse(&argv, &get)
            .and_then(|raw| cli::resolve::resolve(&raw, &get))
            .and_then(|r| r.config.validate().map(|_| r).map_err(Into::into));
        if let Err(e) = outcome {
            prop_assert!(!e.0.is_empty() && !e.0.contains('\n'), "{:?}", e.0);
        }
    }

    #[test]
    fn any_rdzv_conf_is_checked_before_launch(
        pairs in proptest::collection::vec(
            (proptest::sample::select(&[
                "timeout", "join_timeout", "last_call_timeout", "close_timeout",
                "keep_alive_interval", "keep_alive_max_attempt", "heartbeat_timeout",
                "read_timeout", "exit_barrier_timeout", "is_host", "rank", "other",
                "protocol", "ca_cert", "cacert", "ssl_cert", "cert", "ssl_cert_key", "key",
                "username", "password", "etcd_prefix", "run_ttl",
            ][..]), prop_oneof![proptest::sample::select(VALUES).prop_map(str::to_string), any::<String>()]),
            1..4),
        backend in proptest::sample::select(&["c10d", "static", "etcd-v3", "etcd", "etcd-v2"][..]),
    ) {
        let conf: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let argv = vec![
            format!("--rdzv-backend={backend}"),
            "--rdzv-endpoint=localhost:29400".to_string(),
            "--nnodes=2".to_string(),
            format!("--rdzv-conf={}", conf.join(",")),
            "train.py".to_string(),
        ];
        let none = |_: &str| None;
        let outcome = cli::args::parse(&argv, &none)
            .and_then(|raw| cli::resolve::resolve(&raw, &none))
            .and_then(|r| r.config.validate().map(|_| r).map_err(Into::into));
        match outcome {
            Ok(r) => {
                // What passed is usable as is.
                let s = engine::rdzv_settings::RdzvSettings::from_config(&r.config);
                prop_assert!(s.is_ok());
            }
            Err(e) => prop_assert!(!e.0.contains('\n'), "{:?}", e.0),
        }
    }
}

/// The real binary with arguments that are not even UTF-8: exit 2 and one
/// error line, no backtrace.
#[test]
fn the_binary_answers_bytes_that_are_not_text_with_one_line() {
    use std::os::unix::ffi::OsStrExt;
    for bad in [&b"-\xff"[..], b"--nnodes=\xff\xfe", b"-\xc3", b"--\xe9"] {
        let out = std::process::Command::new(BIN)
            .arg(std::ffi::OsStr::from_bytes(bad))
            .arg("train.py")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(stderr.starts_with("torchrun-rs: error: "), "{stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
}
