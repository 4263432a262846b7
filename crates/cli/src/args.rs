//! torchrun's command line, flag for flag, parsed the way Python's argparse
//! parses it: `--opt v` and `--opt=v`, `-r3`, unique-prefix abbreviations,
//! `PET_*` environment defaults, `--`, and everything after the script passed
//! through untouched.

use std::collections::BTreeMap;

/// A usage error: one line, exit status 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Takes a value.
    Value,
    /// A switch; its PET variable is read as an integer (`bool(int(v))`).
    Flag,
    /// `-h/--help`.
    Help,
    /// `--version`.
    Version,
}

struct Spec {
    /// Canonical name without dashes; also the key in [`RawArgs`].
    dest: &'static str,
    names: &'static [&'static str],
    kind: Kind,
    /// Reads `PET_<DEST>` as its default.
    pet: bool,
    help: &'static str,
}

const fn v(dest: &'static str, names: &'static [&'static str], help: &'static str) -> Spec {
    Spec {
        dest,
        names,
        kind: Kind::Value,
        pet: true,
        help,
    }
}
const fn f(dest: &'static str, names: &'static [&'static str], help: &'static str) -> Spec {
    Spec {
        dest,
        names,
        kind: Kind::Flag,
        pet: true,
        help,
    }
}

/// Every flag of torchrun 2.15 (spec §1.3), then torchrun-rs's own.
///
/// `PET_<DEST>` only gives a default to a flag that configures a launch:
/// torch's, and torchrun-rs's own launch options (the Python API, whose
/// parser has torch's options only, reaches those through their `PET_*`
/// variables). A flag that turns the command into something other than a
/// launch (`--status`, `--watch`, `--dry-run`, `--print-completion`,
/// `--version`) never reads one: a variable left in a job's environment
/// must not stop the job from starting.
static SPECS: &[Spec] = &[
    Spec { dest: "help", names: &["-h", "--help"], kind: Kind::Help, pet: false, help: "show this help message and exit" },
    v("nnodes", &["--nnodes"], "Number of nodes, or MIN_SIZE:MAX_SIZE (default 1:1)"),
    v("nproc_per_node", &["--nproc-per-node", "--nproc_per_node"], "Workers per node: an integer, cpu, gpu, xpu or auto (default 1)"),
    v("rdzv_backend", &["--rdzv-backend", "--rdzv_backend"], "Rendezvous backend: static, c10d or etcd-v3 (torch's etcd and etcd-v2 names too; default static)"),
    v("rdzv_endpoint", &["--rdzv-endpoint", "--rdzv_endpoint"], "Rendezvous backend endpoint, host:port"),
    v("rdzv_id", &["--rdzv-id", "--rdzv_id"], "User-defined group id (default none)"),
    v("rdzv_conf", &["--rdzv-conf", "--rdzv_conf"], "Additional rendezvous configuration (k1=v1,k2=v2)"),
    f("standalone", &["--standalone"], "Single-node job on a local store on a free port"),
    v("max_restarts", &["--max-restarts", "--max_restarts"], "Maximum number of worker group restarts before failing (default 0)"),
    v("monitor_interval", &["--monitor-interval", "--monitor_interval"], "Accepted for compatibility: worker exits are seen at once (default 0.1)"),
    v("start_method", &["--start-method", "--start_method"], "spawn, fork or forkserver: accepted; binaries are always exec'd"),
    v("event_log_handler", &["--event-log-handler", "--event_log_handler"], "Where torch's agent events go: null (default), console (one JSON line each on stderr) or dynamic_rendezvous"),
    v("role", &["--role"], "User-defined role for the workers (default default)"),
    f("module", &["-m", "--module"], "Run the script as a Python module (python -m)"),
    f("no_python", &["--no-python", "--no_python"], "Run the script directly instead of through Python"),
    f("run_path", &["--run-path", "--run_path"], "Run the script through runpy.run_path in a Python worker"),
    v("log_dir", &["--log-dir", "--log_dir"], "Base directory for log files (/dev/null: none)"),
    v("redirects", &["-r", "--redirects"], "Redirect std streams to log files: 0-3, or per local rank like 0:1,1:2"),
    v("tee", &["-t", "--tee"], "Redirect to log files and also prefix onto the console: 0-3 or per local rank"),
    v("log_line_prefix_template", &["--log-line-prefix-template", "--log_line_prefix_template"], "Tee line prefix, with ${role_name} ${rank} ${local_rank} ${hostname}"),
    v("local_ranks_filter", &["--local-ranks-filter", "--local_ranks_filter"], "Only these local ranks reach the console, e.g. 0,1"),
    v("duplicate_stdout_filters", &["--duplicate-stdout-filters", "--duplicate_stdout_filters"], "Copy tee'd stdout lines containing these strings to filtered_stdout.log"),
    v("duplicate_stderr_filters", &["--duplicate-stderr-filters", "--duplicate_stderr_filters"], "Copy tee'd stderr lines containing these strings to filtered_stderr.log"),
    v("node_rank", &["--node-rank", "--node_rank"], "Rank of this node (static backend, default 0)"),
    v("master_addr", &["--master-addr", "--master_addr"], "Address of the rank 0 node (static backend, default 127.0.0.1)"),
    v("master_port", &["--master-port", "--master_port"], "Port of the store on the rank 0 node (static backend)"),
    v("local_addr", &["--local-addr", "--local_addr"], "This node's address (default: the fully qualified host name)"),
    Spec { dest: "logs_specs", names: &["--logs-specs", "--logs_specs"], kind: Kind::Value, pet: false, help: "Accepted for compatibility; torchrun-rs uses its built-in log layout" },
    Spec { dest: "numa_binding", names: &["--numa-binding", "--numa_binding"], kind: Kind::Value, pet: false, help: "Pin each local rank's CPUs near its GPU: node, socket, exclusive or core-complex (no numactl needed)" },
    v("signals_to_handle", &["--signals-to-handle", "--signals_to_handle"], "Signals forwarded to workers before shutdown (default SIGTERM,SIGINT,SIGHUP,SIGQUIT)"),
    v("shutdown_timeout", &["--shutdown-timeout", "--shutdown_timeout"], "Seconds between forwarding a signal and SIGKILL (default $TORCH_ELASTIC_SHUTDOWN_TIMEOUT or 30)"),
    f("virtual_local_rank", &["--virtual-local-rank", "--virtual_local_rank"], "LOCAL_RANK=0 and one visible device per worker"),
    Spec { dest: "print_completion", names: &["--print-completion", "--print_completion"], kind: Kind::Value, pet: false, help: "Print a shell completion script (bash, zsh or fish) and exit" },
    v("forward_signals", &["--forward-signals", "--forward_signals"], "torchrun-rs: signals forwarded to workers while the job keeps running, e.g. SIGUSR1"),
    v("events_file", &["--events-file", "--events_file"], "torchrun-rs: append every lifecycle fact (rendezvous, workers, restarts, signals, the end) to this file as JSON Lines"),
    v("metrics_port", &["--metrics-port", "--metrics_port"], "torchrun-rs: serve /healthz, /readyz, /status and /metrics on this port (0: any; also TORCHELASTIC_HEALTH_CHECK_PORT)"),
    v("metrics_addr", &["--metrics-addr", "--metrics_addr"], "torchrun-rs: the address the metrics port listens on (default: all interfaces)"),
    f("require_same_nodes", &["--require-same-nodes", "--require_same_nodes"], "torchrun-rs: stop every node before its workers start when the nodes of a round differ in script, torchrun-rs, Python or torch version, or NCCL_/TORCH_/CUDA_/OMP_... variables (without it, node 0 prints what differs)"),
    f("dedup_output", &["--dedup-output", "--dedup_output"], "torchrun-rs: print a line that several local ranks print alike once, as [default0-7]:line; a line waits at most 1 s for the other ranks' copies (implies --tee 3 unless -t is given; log files keep every line; also TORCHRUN_RS_DEDUP_OUTPUT=1)"),
    f("open_stacks", &["--open-stacks", "--open_stacks"], "torchrun-rs: serve /stacks (every worker's stack and command line) to any client of the metrics port, not only to this machine's"),
    Spec { dest: "status", names: &["--status"], kind: Kind::Value, pet: false, help: "torchrun-rs: print the state of the launcher whose metrics port is ADDR:PORT (phase, restarts, each rank's pid, memory, CPU, last line) and exit" },
    Spec { dest: "watch", names: &["--watch"], kind: Kind::Flag, pet: false, help: "torchrun-rs: with --status, refresh the table every second until interrupted" },
    v("hang_timeout", &["--hang-timeout", "--hang_timeout"], "torchrun-rs: when no rank writes any output for this long (300, 90s, 5m, 1h), dump every rank's stack (py-spy) and report where each is"),
    v("on_hang", &["--on-hang", "--on_hang"], "torchrun-rs: after a hang report: report (default), fail, or restart"),
    v("restart_backoff", &["--restart-backoff", "--restart_backoff"], "torchrun-rs: wait before each restart after a failure: MIN or MIN:MAX (10, 30s, 5m), doubling up to MAX, plus up to 25 % jitter (default 0)"),
    v("fatal_exit_codes", &["--fatal-exit-codes", "--fatal_exit_codes"], "torchrun-rs: worker exit codes that end the job at once, without a restart, e.g. 2,64"),
    v("max_node_failures", &["--max-node-failures", "--max_node_failures"], "torchrun-rs: exclude a node for the rest of the run once it has caused this many failed rounds (its workers failed first, or it died or was evicted) (c10d, etcd-v3; default: never)"),
    v("node_check", &["--node-check", "--node_check"], "torchrun-rs: a shell command run before each rendezvous round (a GPU or NIC check); a non-zero exit keeps this node out of the round and counts as one of its failures"),
    Spec { dest: "gpus", names: &["--gpus"], kind: Kind::Value, pet: false, help: "torchrun-rs: run on these GPUs only, e.g. 0,2,5 or 0-3 (sets CUDA_VISIBLE_DEVICES; gpu and auto count them)" },
    Spec { dest: "no_auto_config", names: &["--no-auto-config", "--no_auto_config"], kind: Kind::Flag, pet: false, help: "torchrun-rs: do not derive unset values from a Slurm or Kubernetes environment (also TORCHRUN_RS_NO_AUTO_CONFIG=1)" },
    Spec { dest: "dry_run", names: &["--dry-run", "--dry_run"], kind: Kind::Flag, pet: false, help: "torchrun-rs: print the resolved configuration and each worker's command and environment, start nothing" },
    Spec { dest: "version", names: &["--version"], kind: Kind::Version, pet: false, help: "torchrun-rs: print the version and the torchrun release it follows, and exit" },
];

/// One row of the flag table, for generated material (completions).
pub struct FlagInfo {
    pub dest: &'static str,
    pub names: &'static [&'static str],
    pub takes_value: bool,
    pub help: &'static str,
}

/// Every flag, in `-h` order.
pub fn flag_table() -> impl Iterator<Item = FlagInfo> {
    SPECS.iter().map(|s| FlagInfo {
        dest: s.dest,
        names: s.names,
        takes_value: s.kind == Kind::Value,
        help: s.help,
    })
}

/// How torch 2.15's own parser declares one of its options: the default
/// (JSON, before `PET_*`), argparse's `type` (`str`, `int`, `float`,
/// `comma_separated_list`; `null` for switches) and its choices. `None`:
/// not one of torch's options (torchrun-rs's own, reached from Python
/// through their `PET_*` variables).
pub struct TorchContract {
    pub default: &'static str,
    pub py_type: Option<&'static str>,
    pub choices: &'static [&'static str],
}

pub fn torch_contract(dest: &str) -> Option<TorchContract> {
    let c = |default, py_type, choices| {
        Some(TorchContract {
            default,
            py_type,
            choices,
        })
    };
    let s = Some("str");
    match dest {
        "help" => c("null", None, &[]),
        "nnodes" => c("\"1:1\"", s, &[]),
        "nproc_per_node" => c("\"1\"", s, &[]),
        "rdzv_backend" => c("\"static\"", s, &[]),
        "rdzv_endpoint" | "rdzv_conf" | "log_line_prefix_template" | "local_ranks_filter" => {
            c("\"\"", s, &[])
        }
        "rdzv_id" => c("\"none\"", s, &[]),
        "standalone" | "module" | "no_python" | "run_path" | "virtual_local_rank" => {
            c("false", None, &[])
        }
        "max_restarts" | "node_rank" => c("0", Some("int"), &[]),
        "monitor_interval" => c("0.1", Some("float"), &[]),
        "start_method" => c("\"spawn\"", s, &["spawn", "fork", "forkserver"]),
        "event_log_handler" => c("\"null\"", s, &[]),
        "role" => c("\"default\"", s, &[]),
        "log_dir" | "local_addr" | "logs_specs" => c("null", s, &[]),
        "redirects" | "tee" => c("\"0\"", s, &[]),
        "duplicate_stdout_filters" | "duplicate_stderr_filters" => {
            c("[]", Some("comma_separated_list"), &[])
        }
        "master_addr" => c("\"127.0.0.1\"", s, &[]),
        "master_port" | "shutdown_timeout" => c("null", Some("int"), &[]),
        "numa_binding" => c("null", s, &["node", "socket", "exclusive", "core-complex"]),
        "signals_to_handle" => c("\"SIGTERM,SIGINT,SIGHUP,SIGQUIT\"", s, &[]),
        // The shells the generator writes (torch's shtab offers tcsh
        // instead of fish).
        "print_completion" => c("null", None, crate::completions::SHELLS),
        _ => None,
    }
}

/// The flag table as JSON, for the Python package (`torchrun_rs.run`
/// builds torch's `argparse` parser from it: one source of truth).
pub fn flag_table_json() -> String {
    let flags: Vec<serde_json::Value> = SPECS
        .iter()
        .map(|s| {
            let torch = torch_contract(s.dest);
            serde_json::json!({
                "dest": s.dest,
                "names": s.names,
                "kind": match s.kind {
                    Kind::Value => "value",
                    Kind::Flag => "flag",
                    Kind::Help => "help",
                    Kind::Version => "version",
                },
                "pet": s.pet,
                "help": s.help,
                "torch": torch.as_ref().map(|t| serde_json::json!({
                    "default": serde_json::from_str::<serde_json::Value>(t.default)
                        .unwrap_or(serde_json::Value::Null),
                    "type": t.py_type,
                    "choices": t.choices,
                })),
            })
        })
        .collect();
    serde_json::Value::Array(flags).to_string()
}

/// Parsed command line: option values by dest, the script and its arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawArgs {
    /// Values given on the command line or through `PET_*` (flags: "1"/"0").
    pub values: BTreeMap<&'static str, String>,
    /// Dests given explicitly (command line or PET), for "was it set" rules.
    pub explicit: std::collections::BTreeSet<&'static str>,
    pub help: bool,
    pub version: bool,
    /// One-line notices about how values were read.
    pub notes: Vec<String>,
    pub script: Option<String>,
    pub script_args: Vec<String>,
}

impl RawArgs {
    pub fn get(&self, dest: &str) -> Option<&str> {
        self.values.get(dest).map(String::as_str)
    }
    pub fn flag(&self, dest: &str) -> bool {
        self.get(dest) == Some("1")
    }
    pub fn is_set(&self, dest: &str) -> bool {
        self.explicit.contains(dest)
    }
    /// Sets a value that was not given (derived, e.g. from the cluster).
    pub fn set(&mut self, dest: &str, value: String) {
        if let Some(s) = SPECS.iter().find(|s| s.dest == dest) {
            self.values.insert(s.dest, value);
        }
    }
}

fn display_names(s: &Spec) -> String {
    s.names.join("/")
}

/// ` (did you mean --x?)` for the long option closest to `name`, as Python
/// 3.14's argparse suggests; empty when none is close.
fn did_you_mean(name: &str) -> String {
    SPECS
        .iter()
        .flat_map(|s| s.names.iter())
        .filter(|n| n.starts_with("--"))
        .map(|n| (strsim::normalized_damerau_levenshtein(name, n), *n))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map_or(String::new(), |(_, n)| format!(" (did you mean {n}?)"))
}

/// Resolves a long option (possibly abbreviated) to its spec.
fn lookup_long(name: &str) -> Result<&'static Spec, UsageError> {
    if let Some(s) = SPECS.iter().find(|s| s.names.contains(&name)) {
        return Ok(s);
    }
    let mut matches: Vec<(&'static Spec, &'static str)> = Vec::new();
    for s in SPECS {
        for n in s
            .names
            .iter()
            .filter(|n| n.starts_with("--") && n.starts_with(name))
        {
            matches.push((s, n));
        }
    }
    // Prefixes of both spellings of one flag are not ambiguous.
    let mut dests: Vec<&str> = matches.iter().map(|(s, _)| s.dest).collect();
    dests.dedup();
    // A prefix that is unique among torch's own options means what it
    // means in torch (`--h`: help, `--no-`: --no-python), whatever flags
    // torchrun-rs adds.
    let mut torch: Vec<&(&'static Spec, &'static str)> = matches
        .iter()
        .filter(|(s, _)| torch_contract(s.dest).is_some())
        .collect();
    torch.dedup_by_key(|(s, _)| s.dest);
    if dests.len() > 1 && torch.len() == 1 {
        return Ok(torch[0].0);
    }
    match dests.len() {
        0 => Err(UsageError(format!(
            "unrecognized arguments: {name}{}",
            did_you_mean(name)
        ))),
        1 => Ok(matches[0].0),
        _ => Err(UsageError(format!(
            "ambiguous option: {name} could match {}",
            matches
                .iter()
                .map(|(_, n)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Parses `args` (without the program name) with `env` for `PET_*` defaults.
pub fn parse(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<RawArgs, UsageError> {
    let mut raw = RawArgs::default();
    for s in SPECS.iter().filter(|s| s.pet) {
        let var = format!("PET_{}", s.dest.to_uppercase());
        if let Some(v) = env(&var) {
            let v = if s.kind == Kind::Flag && v.trim().is_empty() {
                // Kubeflow writes PET_STANDALONE="" for `standalone: true`;
                // torch crashes on it. We take it as set, and say so.
                raw.notes.push(format!(
                    "{var} is empty: taken as set (torchrun fails on it: bool(int(''))"
                ));
                "1".to_string()
            } else if s.kind == Kind::Flag {
                // torch: bool(int(value)).
                match v.trim().parse::<i64>() {
                    Ok(n) => if n != 0 { "1" } else { "0" }.to_string(),
                    Err(_) => {
                        return Err(UsageError(format!(
                            "{var}: invalid value '{v}': expected an integer (1 to enable {}, 0 to disable)",
                            s.names.last().unwrap()
                        )))
                    }
                }
            } else {
                v
            };
            raw.values.insert(s.dest, v);
            raw.explicit.insert(s.dest);
        }
    }
    let mut i = 0;
    // Combined short options (`-mr3`): what follows a switch, read next.
    let mut pending: Option<String> = None;
    while i < args.len() || pending.is_some() {
        let a = match pending.take() {
            Some(p) => p,
            None => {
                i += 1;
                args[i - 1].clone()
            }
        };
        let a = &a;
        if a == "--" {
            if raw.script.is_none() && i < args.len() {
                raw.script = Some(args[i].clone());
                raw.script_args = args[i + 1..].to_vec();
            }
            break;
        }
        if !a.starts_with('-') || a == "-" {
            raw.script = Some(a.clone());
            // argparse drops one `--` right after the script (when none
            // came before it): `x.py -- --lr 1` gives the script `--lr 1`.
            let skip = usize::from(args.get(i).is_some_and(|n| n == "--"));
            raw.script_args = args[i + skip..].to_vec();
            break;
        }
        let (spec, inline): (&Spec, Option<String>) = if a.starts_with("--") {
            let (name, inline) = match a.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (a.as_str(), None),
            };
            (lookup_long(name)?, inline)
        } else {
            // Short option: -r3, -r 3, -m, -h. The option is the dash and
            // the next character, which may take more than one byte.
            let cut = a.char_indices().nth(2).map_or(a.len(), |(i, _)| i);
            let short = &a[..cut];
            let spec = SPECS
                .iter()
                .find(|s| s.names.contains(&short))
                .ok_or_else(|| UsageError(format!("unrecognized arguments: {a}")))?;
            let rest = &a[cut..];
            let inline = if rest.is_empty() {
                None
            } else if spec.kind == Kind::Value {
                Some(rest.strip_prefix('=').unwrap_or(rest).to_string())
            } else if !rest.starts_with('=') && spec.kind == Kind::Flag {
                // `-mr3`: the switch, then `-r3`.
                pending = Some(format!("-{rest}"));
                None
            } else {
                return Err(UsageError(format!(
                    "argument {}: ignored explicit argument '{rest}'",
                    display_names(spec)
                )));
            };
            (spec, inline)
        };
        match spec.kind {
            Kind::Help => raw.help = true,
            Kind::Version => raw.version = true,
            Kind::Flag => {
                if let Some(v) = inline {
                    return Err(UsageError(format!(
                        "argument {}: ignored explicit argument '{v}'",
                        display_names(spec)
                    )));
                }
                raw.values.insert(spec.dest, "1".to_string());
                raw.explicit.insert(spec.dest);
            }
            Kind::Value => {
                let value = match inline {
                    Some(v) => v,
                    // A value never swallows the next option (argparse).
                    None if i < args.len() && !looks_like_option(&args[i]) => {
                        i += 1;
                        args[i - 1].clone()
                    }
                    None => {
                        return Err(UsageError(format!(
                            "argument {}: expected one argument",
                            display_names(spec)
                        )))
                    }
                };
                // Every occurrence is checked, as argparse converts each.
                check_torch_value(spec, &value)?;
                raw.values.insert(spec.dest, value);
                raw.explicit.insert(spec.dest);
            }
        }
    }
    Ok(raw)
}

/// Whether argparse takes `a` for an option rather than a value: it
/// starts with `-` and is not `-` alone, a negative number, or words with
/// a space.
fn looks_like_option(a: &str) -> bool {
    let negative_number = a.strip_prefix('-').is_some_and(|n| {
        let (int, frac) = n.split_once('.').unwrap_or((n, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        (!int.is_empty() && digits(int) && !n.contains('.'))
            || (n.contains('.') && digits(int) && !frac.is_empty() && digits(frac))
    });
    a.starts_with('-') && a != "-" && !negative_number && !a.contains(' ')
}

/// argparse's `type` and `choices` for torch's options, at each occurrence.
fn check_torch_value(spec: &Spec, v: &str) -> Result<(), UsageError> {
    let Some(t) = torch_contract(spec.dest) else {
        return Ok(());
    };
    let bad = |what: String| {
        Err(UsageError(format!(
            "argument {}: {what}",
            display_names(spec)
        )))
    };
    match t.py_type {
        Some("int") if v.trim().parse::<i128>().is_err() => {
            return bad(format!("invalid int value: '{v}'"))
        }
        Some("float") if v.trim().parse::<f64>().is_err() => {
            return bad(format!("invalid float value: '{v}'"))
        }
        _ => {}
    }
    if !t.choices.is_empty() && !t.choices.contains(&v) {
        let choices: Vec<String> = t.choices.iter().map(|c| format!("'{c}'")).collect();
        return bad(format!(
            "invalid choice: '{v}' (choose from {})",
            choices.join(", ")
        ));
    }
    Ok(())
}

/// `-h` text.
pub fn help_text() -> String {
    let mut s = String::from(
        "usage: torchrun-rs [options] training_script [training_script_args ...]\n\n\
         A drop-in replacement for torchrun (torch.distributed.run). Every option\n\
         can also be given as PET_<OPTION> in the environment.\n\noptions:\n",
    );
    for spec in SPECS {
        let names = spec.names.join(", ");
        let value = if spec.kind == Kind::Value {
            " VALUE"
        } else {
            ""
        };
        s.push_str(&format!("  {names}{value}\n      {}\n", spec.help));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<RawArgs, UsageError> {
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse(&a, &|_| None)
    }

    #[test]
    fn argparse_details_torch_users_can_hit() {
        // One `--` right after the script is dropped (none before it).
        let r = p(&["x.py", "--", "--lr", "1"]).unwrap();
        assert_eq!(r.script_args, ["--lr", "1"]);
        let r = p(&["--", "x.py", "--", "a"]).unwrap();
        assert_eq!(r.script_args, ["--", "a"]);
        let r = p(&["x.py", "a", "--", "b"]).unwrap();
        assert_eq!(r.script_args, ["a", "--", "b"]);
        // A missing value never swallows the next option...
        for v in [
            &["--log-dir", "--tee", "3", "t.py"][..],
            &["--role", "-x", "t.py"],
        ] {
            assert!(
                p(v).unwrap_err().0.contains("expected one argument"),
                "{v:?}"
            );
        }
        // ...but a negative number, `-` and words with a space are values.
        assert_eq!(
            p(&["--local-ranks-filter", "-1", "x"])
                .unwrap()
                .get("local_ranks_filter"),
            Some("-1")
        );
        assert_eq!(
            p(&["--role", "-1.5", "x"]).unwrap().get("role"),
            Some("-1.5")
        );
        assert_eq!(
            p(&["--log-dir", "-", "x"]).unwrap().get("log_dir"),
            Some("-")
        );
        assert_eq!(
            p(&["--role", "-a b", "x"]).unwrap().get("role"),
            Some("-a b")
        );
        // Prefixes unique among torch's options mean what they mean there.
        assert!(p(&["--h"]).unwrap().help);
        assert!(p(&["--no-", "x"]).unwrap().flag("no_python"));
        assert!(p(&["--v", "x"]).unwrap().flag("virtual_local_rank"));
        // Every occurrence is checked.
        let e = p(&["--max-restarts", "1.0", "--max-restarts", "2", "x"]).unwrap_err();
        assert!(e.0.contains("invalid int value: '1.0'"), "{}", e.0);
        let e = p(&["--start-method=SPAWN", "--start-method=fork", "x"]).unwrap_err();
        assert!(e.0.contains("invalid choice: 'SPAWN'"), "{}", e.0);
        // An unknown flag close to a known one gets a suggestion.
        let e = p(&["--nproc-per-nodes=2", "x"]).unwrap_err();
        assert_eq!(
            e.0,
            "unrecognized arguments: --nproc-per-nodes (did you mean --nproc-per-node?)"
        );
        assert_eq!(
            p(&["--frobnicate", "x"]).unwrap_err().0,
            "unrecognized arguments: --frobnicate"
        );
        // Combined short options.
        let r = p(&["-mr3", "x"]).unwrap();
        assert!(r.flag("module"));
        assert_eq!(r.get("redirects"), Some("3"));
        assert_eq!(p(&["-rm", "x"]).unwrap().get("redirects"), Some("m"));
    }

    #[test]
    fn forms_of_values() {
        let r = p(&[
            "--nproc-per-node",
            "4",
            "--max_restarts=2",
            "-r3",
            "-t",
            "1",
            "x.py",
            "a",
        ])
        .unwrap();
        assert_eq!(r.get("nproc_per_node"), Some("4"));
        assert_eq!(r.get("max_restarts"), Some("2"));
        assert_eq!(r.get("redirects"), Some("3"));
        assert_eq!(r.get("tee"), Some("1"));
        assert_eq!(r.script.as_deref(), Some("x.py"));
        assert_eq!(r.script_args, vec!["a"]);
    }

    #[test]
    fn abbreviations_and_ambiguity() {
        let r = p(&["--stand", "--redirect=3", "--nproc", "2", "x.py"]).unwrap();
        assert!(r.flag("standalone"));
        assert_eq!(r.get("redirects"), Some("3"));
        assert_eq!(r.get("nproc_per_node"), Some("2"));
        let e = p(&["--r", "x.py"]).unwrap_err();
        assert!(e.0.starts_with("ambiguous option: --r could match"), "{e}");
        assert!(p(&["--bogus", "x.py"]).unwrap_err().0.contains("--bogus"));
    }

    #[test]
    fn remainder_is_untouched() {
        let r = p(&["x.py", "--nproc-per-node", "5", "-m"]).unwrap();
        assert_eq!(r.get("nproc_per_node"), None);
        assert_eq!(r.script_args, vec!["--nproc-per-node", "5", "-m"]);
        let r = p(&["--", "x.py", "--foo"]).unwrap();
        assert_eq!(r.script.as_deref(), Some("x.py"));
        assert_eq!(r.script_args, vec!["--foo"]);
    }

    #[test]
    fn pet_defaults() {
        let env = |k: &str| match k {
            "PET_NPROC_PER_NODE" => Some("3".to_string()),
            "PET_STANDALONE" => Some("1".to_string()),
            "PET_NO_PYTHON" => Some("0".to_string()),
            _ => None,
        };
        let a: Vec<String> = vec!["--nproc-per-node=5".into(), "x".into()];
        let r = parse(&a, &env).unwrap();
        assert_eq!(r.get("nproc_per_node"), Some("5"), "command line wins");
        assert!(r.flag("standalone"));
        assert!(!r.flag("no_python"));
        // torchrun-rs's query flags are not launch options: their PET_
        // names are not read (torch has no such flags either).
        let query = |k: &str| match k {
            "PET_STATUS" => Some("localhost:1".to_string()),
            "PET_WATCH" => Some("1".to_string()),
            "PET_DRY_RUN" => Some("1".to_string()),
            _ => None,
        };
        let r = parse(&a, &query).unwrap();
        assert_eq!(r.get("status"), None);
        assert!(!r.flag("watch") && !r.flag("dry_run"));
        let bad = |k: &str| (k == "PET_STANDALONE").then(|| "true".to_string());
        let e = parse(&a, &bad).unwrap_err();
        assert!(e.0.contains("PET_STANDALONE"), "{e}");
    }

    #[test]
    fn missing_value_and_flag_with_value() {
        assert!(p(&["--nnodes"])
            .unwrap_err()
            .0
            .contains("expected one argument"));
        assert!(p(&["--standalone=1", "x"])
            .unwrap_err()
            .0
            .contains("ignored explicit argument"));
    }
}
