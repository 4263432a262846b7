//! From parsed flags to a [`LaunchConfig`] and the worker command, following
//! torch 2.15's `run.py` (spec §1.4–§1.7, §6.1).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::config::{parse_nnodes, parse_rdzv_conf, ConfigError, LaunchConfig, StdSpec};

use crate::args::{RawArgs, UsageError};

/// What to launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub config: LaunchConfig,
    /// The program every worker runs (the Python interpreter, or the binary).
    pub entrypoint: String,
    /// Its arguments (`-u script args...`).
    pub args: Vec<String>,
    /// One-line notices for the user (options accepted but handled differently).
    pub notices: Vec<String>,
    /// Whether `OMP_NUM_THREADS=1` must be exported (and the banner shown).
    pub set_omp_threads: bool,
    /// `CUDA_VISIBLE_DEVICES` for the workers, from `--gpus`.
    pub cuda_visible_devices: Option<String>,
    /// The failure summary's title when it is not derived from the command
    /// (`run_script_path` for `--run-path`, as torch names its function).
    pub entrypoint_name: Option<String>,
}

/// The `--run-path` worker: torch's `run_script_path` function entrypoint,
/// run under torch's `@record` when torch is importable so that an exception
/// lands in the error file and the failure summary, as with torchrun.
const RUN_PATH_PROGRAM: &str = "import runpy, sys
sys.argv = sys.argv[1:]
def run_script_path():
    runpy.run_path(sys.argv[0], run_name='__main__')
try:
    from torch.distributed.elastic.multiprocessing.errors import record
except ImportError:
    record = lambda f: f
record(run_script_path)()
";

fn usage(flag: &str, msg: impl std::fmt::Display) -> UsageError {
    UsageError(format!("argument {flag}: {msg}"))
}

impl From<ConfigError> for UsageError {
    fn from(e: ConfigError) -> Self {
        UsageError(format!("argument {}: {}", e.flag, e.message))
    }
}

fn parse_int<T: std::str::FromStr>(
    raw: &RawArgs,
    dest: &str,
    flag: &str,
    default: T,
) -> Result<T, UsageError> {
    match raw.get(dest) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| {
            usage(
                flag,
                format!("invalid int value: '{v}' (expected a non-negative integer)"),
            )
        }),
    }
}

fn uuid4() -> String {
    use rand::Rng;
    let mut b: [u8; 16] = rand::thread_rng().gen();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// CPUs this process may run on (`sched_getaffinity`), like torch 2.15's `cpu`.
pub fn cpu_count() -> u32 {
    // SAFETY: sched_getaffinity fills the local set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let n = libc::CPU_COUNT(&set);
            if n > 0 {
                return n as u32;
            }
        }
    }
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Physical NVIDIA GPUs, from the driver's /proc entries or `nvidia-smi -L`
/// (under `TORCHRUN_RS_SYSFS_ROOT`, a test hook: the fake machine's PCI
/// devices).
fn physical_gpus() -> u32 {
    if let Some(root) = std::env::var_os("TORCHRUN_RS_SYSFS_ROOT") {
        return engine::numa::Topology::new(std::path::Path::new(&root), Default::default(), None)
            .map_or(0, |t| t.gpu_count() as u32);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/driver/nvidia/gpus") {
        let n = dir.count() as u32;
        if n > 0 {
            return n;
        }
    }
    std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or(0, |o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count() as u32
        })
}

/// GPUs visible to CUDA: the physical ones, narrowed by CUDA_VISIBLE_DEVICES
/// as CUDA does (an invalid entry ends the list).
pub fn visible_gpus(physical: u32, cuda_visible: Option<&str>) -> u32 {
    let Some(list) = cuda_visible else {
        return physical;
    };
    let mut n = 0;
    for item in list.split(',').map(str::trim) {
        let valid = match item.parse::<i64>() {
            Ok(i) => i >= 0 && (i as u64) < u64::from(physical),
            Err(_) => item.starts_with("GPU-") || item.starts_with("MIG-"),
        };
        if !valid {
            break;
        }
        n += 1;
    }
    n.min(physical)
}

/// `--gpus 0,2,5` or `0-3` (or a mix), in the order given.
pub fn parse_gpus(v: &str) -> Result<Vec<u32>, UsageError> {
    let bad = || {
        usage(
            "--gpus",
            format!("invalid value '{v}': expected GPU indices like 0,2,5 or 0-3"),
        )
    };
    let mut out: Vec<u32> = Vec::new();
    for part in v.split(',').map(str::trim) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if b < a || b - a > 4096 {
            return Err(bad());
        }
        for g in a..=b {
            if out.contains(&g) {
                return Err(usage("--gpus", format!("GPU {g} is listed twice in '{v}'")));
            }
            out.push(g);
        }
    }
    Ok(out)
}

fn determine_nproc(v: &str, cuda_visible: Option<&str>) -> Result<u32, UsageError> {
    let gpus = || visible_gpus(physical_gpus(), cuda_visible);
    // torch: int(v) (which allows surrounding spaces), else the names
    // exactly: ' cpu' is an error there.
    let name = if v.trim().parse::<i64>().is_ok() {
        v.trim()
    } else {
        v
    };
    match name {
        "cpu" => Ok(cpu_count()),
        "gpu" => match gpus() {
            0 => Err(usage(
                "--nproc-per-node",
                "'gpu' but CUDA is not available: no NVIDIA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)",
            )),
            n => Ok(n),
        },
        "auto" => match gpus() {
            0 => Ok(cpu_count()),
            n => Ok(n),
        },
        "xpu" => Err(usage(
            "--nproc-per-node",
            "'xpu' is not supported by torchrun-rs (no XPU device discovery); give the number of workers",
        )),
        other => match other.parse::<u32>() {
            Ok(0) => Err(usage("--nproc-per-node", "0: expected a positive integer")),
            Ok(n) => Ok(n),
            Err(_) => Err(usage(
                "--nproc-per-node",
                format!("unsupported value '{other}': expected an integer, cpu, gpu, xpu or auto"),
            )),
        },
    }
}

/// The Python interpreter for workers: `PYTHON_EXEC`, else the active
/// virtualenv's, else the Python environment this launcher is installed in
/// (see [`installed_beside`]), else `python3`, else `python` on PATH.
pub fn python_interpreter(env: &dyn Fn(&str) -> Option<String>) -> String {
    python_interpreter_for(env, std::env::current_exe().ok().as_deref())
}

/// [`python_interpreter`] for a launcher at `exe`.
fn python_interpreter_for(env: &dyn Fn(&str) -> Option<String>, exe: Option<&Path>) -> String {
    if let Some(p) = env("PYTHON_EXEC").filter(|p| !p.is_empty()) {
        return p;
    }
    if let Some(venv) = env("VIRTUAL_ENV").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(venv).join("bin/python");
        if p.exists() {
            return p.display().to_string();
        }
    }
    if let Some(p) = exe.and_then(installed_beside) {
        return p.display().to_string();
    }
    if engine::process::find_program("python3").is_some() {
        "python3".to_string()
    } else {
        "python".to_string()
    }
}

/// The `python` of the environment whose `bin/` holds the launcher at
/// `exe` (pip installs it there), as torchrun runs workers with its own
/// interpreter: `<venv>/bin/torchrun-rs` called by path, without
/// activating the venv (a Slurm script), runs that venv's Python, not
/// whichever `python3` comes first on PATH. Only in a virtualenv or conda
/// environment (`pyvenv.cfg` or `conda-meta/` beside `bin/`): a `python`
/// next to a launcher in `/usr/bin` may be another Python altogether.
fn installed_beside(exe: &Path) -> Option<PathBuf> {
    let bin = exe.parent()?;
    let root = bin.parent()?;
    let python = bin.join("python");
    let is_env = root.join("pyvenv.cfg").is_file() || root.join("conda-meta").is_dir();
    (is_env && python.is_file()).then_some(python)
}

/// Splits a duplicate-filter list on `,`, with `,,` standing for a comma.
fn split_filters(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

/// Resolves parsed flags. `env` reads the launcher's environment.
pub fn resolve(
    raw: &RawArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Resolved, UsageError> {
    let mut notices = raw.notes.clone();
    let mut raw = raw.clone();
    if let Some(note) = crate::cluster::apply(&mut raw, env, "/etc/hosts")? {
        notices.push(note);
    }
    let raw = &raw;
    let script = raw.script.clone().ok_or_else(|| {
        UsageError(
            "the following arguments are required: training_script, training_script_args"
                .to_string(),
        )
    })?;
    let mut c = LaunchConfig::default();
    let nnodes = raw.get("nnodes").unwrap_or("1:1");
    let (min_nodes, max_nodes) = parse_nnodes(nnodes)?;
    c.min_nodes = min_nodes;
    c.max_nodes = max_nodes;

    let mut backend = raw.get("rdzv_backend").unwrap_or("static").to_string();
    let mut endpoint = raw.get("rdzv_endpoint").unwrap_or("").to_string();
    let mut run_id = raw.get("rdzv_id").unwrap_or("none").to_string();
    let master_port_given = raw.get("master_port").is_some();
    let standalone = raw.flag("standalone");
    if standalone
        || (backend == "static" && endpoint.is_empty() && !master_port_given && max_nodes == 1)
    {
        // torch 2.15: single-node runs without --master-port use c10d on a
        // free port with a fresh run id, like --standalone.
        backend = "c10d".to_string();
        endpoint = "localhost:0".to_string();
        run_id = uuid4();
    }
    let master_addr = raw.get("master_addr").unwrap_or("127.0.0.1").to_string();
    let master_port: u16 = match raw.get("master_port") {
        None => 29500,
        Some(v) => v.trim().parse().map_err(|_| {
            usage(
                "--master-port",
                format!("invalid int value: '{v}' (expected a port, 0 to 65535)"),
            )
        })?,
    };
    // torch takes any integer; a budget beyond 32 bits is as good as none.
    c.max_restarts = parse_int(raw, "max_restarts", "--max-restarts", 0u64)?
        .try_into()
        .unwrap_or(u32::MAX);
    let mi = raw.get("monitor_interval").unwrap_or("0.1");
    c.monitor_interval = engine::config::parse_seconds(mi).ok_or_else(|| {
        usage(
            "--monitor-interval",
            format!(
                "invalid value '{mi}': expected a positive number of seconds, at most {:e}",
                engine::config::MAX_SECONDS
            ),
        )
    })?;
    c.start_method = raw.get("start_method").unwrap_or("spawn").to_string();
    if !["spawn", "fork", "forkserver"].contains(&c.start_method.as_str()) {
        return Err(usage(
            "--start-method",
            format!(
                "invalid choice: '{}' (choose from 'spawn', 'fork', 'forkserver')",
                c.start_method
            ),
        ));
    }
    c.event_log_handler = raw.get("event_log_handler").unwrap_or("null").to_string();
    c.role = raw.get("role").unwrap_or("default").to_string();
    let node_rank = parse_int(raw, "node_rank", "--node-rank", 0u32)?;
    if node_rank != 0 && backend != "static" {
        notices.push(format!(
            "--node-rank={node_rank} is only used by the static rendezvous backend; ignored"
        ));
    }
    c.rdzv_configs = parse_rdzv_conf(raw.get("rdzv_conf").unwrap_or(""))?;
    c.rdzv_configs
        .entry("timeout".to_string())
        .or_insert_with(|| "900".to_string());
    if backend == "static" {
        c.rdzv_configs
            .insert("rank".to_string(), node_rank.to_string());
        if endpoint.is_empty() {
            endpoint = format!("{master_addr}:{master_port}");
            c.master_addr = Some(master_addr.clone());
            c.master_port = Some(master_port);
        }
    }
    c.rdzv_backend = backend;
    c.rdzv_endpoint = endpoint;
    c.run_id = run_id;
    let inherited_visible = env("CUDA_VISIBLE_DEVICES").filter(|v| !v.trim().is_empty());
    let cuda_visible_devices = match raw.get("gpus") {
        None => None,
        Some(v) => {
            let list = parse_gpus(v)?
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            if let Some(existing) = inherited_visible.as_ref().filter(|e| e.trim() != list) {
                return Err(usage(
                    "--gpus",
                    format!("{v} conflicts with CUDA_VISIBLE_DEVICES={existing} already set; give one of them"),
                ));
            }
            Some(list)
        }
    };
    let visible = cuda_visible_devices.clone().or(inherited_visible);
    c.nproc_per_node =
        determine_nproc(raw.get("nproc_per_node").unwrap_or("1"), visible.as_deref())?;
    c.log_dir = raw.get("log_dir").map(PathBuf::from);
    c.events_file = raw
        .get("events_file")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    if let Some(v) = raw.get("hang_timeout").filter(|v| !v.trim().is_empty()) {
        c.hang_timeout = Some(human_duration(v).filter(|d| !d.is_zero()).ok_or_else(|| {
            usage(
                "--hang-timeout",
                format!(
                    "invalid value '{v}': expected a positive duration like 300, 90s, 5m or 1h"
                ),
            )
        })?);
    }
    if let Some(v) = raw.get("restart_backoff").filter(|v| !v.trim().is_empty()) {
        let bad = || {
            usage(
                "--restart-backoff",
                format!("invalid value '{v}': expected MIN or MIN:MAX, durations like 10, 30s or 5m with MIN <= MAX"),
            )
        };
        let (lo, hi) = match v.split_once(':') {
            Some((lo, hi)) => (
                human_duration(lo).ok_or_else(bad)?,
                human_duration(hi).ok_or_else(bad)?,
            ),
            None => {
                let d = human_duration(v).ok_or_else(bad)?;
                (d, d)
            }
        };
        if lo > hi {
            return Err(bad());
        }
        c.restart_backoff = (lo, hi);
    }
    if let Some(v) = raw
        .get("max_node_failures")
        .filter(|v| !v.trim().is_empty())
    {
        c.max_node_failures = Some(v.trim().parse::<u32>().ok().filter(|k| *k > 0).ok_or_else(
            || {
                usage(
                    "--max-node-failures",
                    format!("invalid value '{v}': expected a positive number of failures"),
                )
            },
        )?);
    }
    if let Some(v) = raw.get("node_check").filter(|v| !v.trim().is_empty()) {
        c.node_check = Some(v.to_string());
    }
    if let Some(v) = raw.get("fatal_exit_codes").filter(|v| !v.trim().is_empty()) {
        c.fatal_exit_codes = v
            .split(',')
            .map(|code| code.trim().parse::<i32>().ok().filter(|c| (1..=255).contains(c)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                usage(
                    "--fatal-exit-codes",
                    format!("invalid value '{v}': expected exit codes from 1 to 255, comma-separated, e.g. 2,64"),
                )
            })?;
    }
    c.on_hang = match raw.get("on_hang").map(str::trim) {
        None | Some("report") => engine::config::OnHang::Report,
        Some("fail") => engine::config::OnHang::Fail,
        Some("restart") => engine::config::OnHang::Restart,
        Some(other) => {
            return Err(usage(
                "--on-hang",
                format!("invalid choice: '{other}' (choose from 'report', 'fail', 'restart')"),
            ))
        }
    };
    // torch accepts TORCHELASTIC_HEALTH_CHECK_PORT and, in its open-source
    // build, serves nothing there; we serve the health endpoints on it.
    let port = match raw.get("metrics_port") {
        Some(v) => Some(("--metrics-port", v.to_string())),
        None => env("TORCHELASTIC_HEALTH_CHECK_PORT")
            .filter(|v| !v.trim().is_empty())
            .map(|v| ("TORCHELASTIC_HEALTH_CHECK_PORT", v)),
    };
    if let Some((flag, v)) = port {
        c.metrics_port = Some(v.trim().parse().map_err(|_| {
            usage(
                flag,
                format!("invalid value '{v}': expected a port, 0 to 65535"),
            )
        })?);
    }
    c.open_stacks = raw.flag("open_stacks");
    c.require_same_nodes = raw.flag("require_same_nodes");
    if let Some(a) = raw.get("metrics_addr") {
        c.metrics_addr = a
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| {
                usage(
                    "--metrics-addr",
                    format!("invalid value '{a}': expected an IPv4 or IPv6 address"),
                )
            })?;
    }
    c.redirects = StdSpec::parse("--redirects", raw.get("redirects").unwrap_or("0"))?;
    c.dedup_output =
        raw.flag("dedup_output") || env("TORCHRUN_RS_DEDUP_OUTPUT").is_some_and(|v| v == "1");
    // Deduplicating needs the lines to pass through the launcher: tee'd.
    let tee_default = if c.dedup_output { "3" } else { "0" };
    c.tee = StdSpec::parse("--tee", raw.get("tee").unwrap_or(tee_default))?;
    c.log_line_prefix_template = raw
        .get("log_line_prefix_template")
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .or_else(|| env("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE").filter(|t| !t.is_empty()));
    if let Some(f) = raw.get("local_ranks_filter").filter(|f| !f.is_empty()) {
        // Any integer, as torch: a negative one names no rank.
        let set: Result<BTreeSet<i64>, _> = f.split(',').map(|r| r.trim().parse::<i64>()).collect();
        let set = set.map(|s| {
            s.into_iter()
                .filter_map(|r| u32::try_from(r).ok())
                .collect::<BTreeSet<u32>>()
        });
        c.local_ranks_filter = Some(set.map_err(|_| {
            usage(
                "--local-ranks-filter",
                format!(
                    "invalid value '{f}': expected a comma-separated list of integers e.g. 0,1,2"
                ),
            )
        })?);
    }
    c.duplicate_stdout_filters = split_filters(raw.get("duplicate_stdout_filters").unwrap_or(""));
    c.duplicate_stderr_filters = split_filters(raw.get("duplicate_stderr_filters").unwrap_or(""));
    c.local_addr = raw.get("local_addr").map(str::to_string);
    c.signals_to_handle = raw
        .get("signals_to_handle")
        .unwrap_or(engine::config::DEFAULT_SIGNALS)
        .to_string();
    c.forward_signals = raw.get("forward_signals").unwrap_or("").to_string();
    c.virtual_local_rank = raw.flag("virtual_local_rank");
    let shutdown = match raw.get("shutdown_timeout") {
        Some(v) => Some(("--shutdown-timeout", v.to_string())),
        None => {
            env("TORCH_ELASTIC_SHUTDOWN_TIMEOUT").map(|v| ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", v))
        }
    };
    if let Some((flag, v)) = shutdown {
        c.shutdown_timeout = match v.trim().parse::<i64>() {
            Ok(s) if s >= 0 && s as f64 <= engine::config::MAX_SECONDS => {
                Duration::from_secs(s as u64)
            }
            Ok(s) if s >= 0 => {
                return Err(usage(
                    flag,
                    format!(
                        "shutdown_timeout must be at most {:e} seconds, got {s}",
                        engine::config::MAX_SECONDS
                    ),
                ))
            }
            Ok(s) => {
                return Err(usage(
                    flag,
                    format!("shutdown_timeout must be non-negative, got {s}"),
                ))
            }
            Err(_) => {
                return Err(usage(
                    flag,
                    format!("invalid int value: '{v}' (expected seconds)"),
                ))
            }
        };
    }
    // torch loads the entry point `torchrun.logs_specs[NAME]` before starting
    // anything; only its built-in `default` (our log layout) exists here.
    if let Some(name) = raw.get("logs_specs") {
        if name != "default" {
            return Err(usage(
                "--logs-specs",
                format!("could not find entrypoint under 'torchrun.logs_specs[{name}]' key (torchrun-rs has only the built-in 'default')"),
            ));
        }
    }
    if let Some(n) = raw.get("numa_binding") {
        c.numa_binding = Some(engine::numa::AffinityMode::parse(n).ok_or_else(|| {
            usage(
                "--numa-binding",
                format!(
                    "invalid choice: '{n}' (choose from {})",
                    engine::numa::AffinityMode::CHOICES
                        .iter()
                        .map(|c| format!("'{c}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?);
    }

    // The command (§6.1).
    let module = raw.flag("module");
    let no_python = raw.flag("no_python");
    let run_path = raw.flag("run_path");
    if module && no_python && !run_path {
        return Err(UsageError(
            "don't use both the '--no-python' flag and the '--module' flag at the same time"
                .to_string(),
        ));
    }
    let (entrypoint, mut args) = if run_path {
        if c.start_method != "spawn" {
            notices.push(format!("--start-method={} is not used: --run-path workers are started as fresh Python processes", c.start_method));
        }
        (
            python_interpreter(env),
            vec![
                "-u".to_string(),
                "-c".to_string(),
                RUN_PATH_PROGRAM.to_string(),
                script.clone(),
            ],
        )
    } else if no_python {
        (script.clone(), Vec::new())
    } else if module {
        (
            python_interpreter(env),
            vec!["-u".to_string(), "-m".to_string(), script.clone()],
        )
    } else {
        (
            python_interpreter(env),
            vec!["-u".to_string(), script.clone()],
        )
    };
    args.extend(raw.script_args.iter().cloned());
    let set_omp_threads = c.nproc_per_node > 1 && env("OMP_NUM_THREADS").is_none();
    Ok(Resolved {
        config: c,
        entrypoint,
        args,
        notices,
        set_omp_threads,
        cuda_visible_devices,
        entrypoint_name: run_path.then(|| "run_script_path".to_string()),
    })
}

/// A duration as `--hang-timeout` and `--restart-backoff` take it: seconds
/// (`300`, `1.5`) or with a unit (`90s`, `5m`, `1h`); zero allowed.
fn human_duration(v: &str) -> Option<std::time::Duration> {
    let t = v.trim();
    let (num, unit) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1.0),
        Some((i, 'm')) => (&t[..i], 60.0),
        Some((i, 'h')) => (&t[..i], 3600.0),
        _ => (t, 1.0),
    };
    let secs = num.trim().parse::<f64>().ok()? * unit;
    if secs == 0.0 {
        return Some(std::time::Duration::ZERO);
    }
    engine::config::parse_seconds(&secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse;

    fn r(args: &[&str]) -> Result<Resolved, UsageError> {
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env = |k: &str| match k {
            "PYTHON_EXEC" => Some("/usr/bin/python3".to_string()),
            _ => None,
        };
        resolve(&parse(&a, &env)?, &env)
    }

    #[test]
    fn single_node_default_is_c10d_on_a_free_port() {
        let x = r(&["--nproc-per-node=2", "t.py", "a"]).unwrap();
        assert_eq!(x.config.rdzv_backend, "c10d");
        assert_eq!(x.config.rdzv_endpoint, "localhost:0");
        assert_eq!(x.config.run_id.len(), 36);
        assert_eq!(x.entrypoint, "/usr/bin/python3");
        assert_eq!(x.args, vec!["-u", "t.py", "a"]);
        assert!(x.set_omp_threads);
    }

    #[test]
    fn workers_python_exec_then_venv_then_the_launchers_own_environment() {
        let dir = tempfile::tempdir().unwrap();
        let (venv, active) = (dir.path().join("venv"), dir.path().join("active"));
        for d in [&venv, &active] {
            std::fs::create_dir_all(d.join("bin")).unwrap();
            std::fs::write(d.join("bin/python"), "").unwrap();
        }
        std::fs::write(venv.join("pyvenv.cfg"), "").unwrap();
        let exe = venv.join("bin/torchrun-rs");
        let none = |_: &str| None;
        let beside = venv.join("bin/python").display().to_string();
        // Called by path from a venv that is not active: that venv's Python.
        assert_eq!(python_interpreter_for(&none, Some(&exe)), beside);
        // The active venv and PYTHON_EXEC come first, as documented.
        let active_env = |k: &str| (k == "VIRTUAL_ENV").then(|| active.display().to_string());
        assert_eq!(
            python_interpreter_for(&active_env, Some(&exe)),
            active.join("bin/python").display().to_string()
        );
        let explicit = |k: &str| (k == "PYTHON_EXEC").then(|| "/opt/py".to_string());
        assert_eq!(python_interpreter_for(&explicit, Some(&exe)), "/opt/py");
        // A launcher outside any Python environment (a bin/ without
        // pyvenv.cfg or conda-meta beside it): the PATH's Python.
        std::fs::remove_file(venv.join("pyvenv.cfg")).unwrap();
        assert_ne!(python_interpreter_for(&none, Some(&exe)), beside);
        std::fs::create_dir(venv.join("conda-meta")).unwrap();
        assert_eq!(python_interpreter_for(&none, Some(&exe)), beside);
    }

    #[test]
    fn master_port_selects_static() {
        let x = r(&["--master-port=29512", "t.py"]).unwrap();
        assert_eq!(x.config.rdzv_backend, "static");
        assert_eq!(x.config.rdzv_endpoint, "127.0.0.1:29512");
        assert_eq!(x.config.run_id, "none");
        assert_eq!(x.config.rdzv_configs["rank"], "0");
        assert_eq!(x.config.rdzv_configs["timeout"], "900");
        assert!(!x.set_omp_threads);
    }

    #[test]
    fn signals_to_handle_contract() {
        let x = r(&["t.py"]).unwrap();
        assert_eq!(x.config.signals_to_handle, "SIGTERM,SIGINT,SIGHUP,SIGQUIT");
        let x = r(&["--signals-to-handle=SIGTERM,SIGUSR1,SIGUSR2", "t.py"]).unwrap();
        assert_eq!(x.config.signals_to_handle, "SIGTERM,SIGUSR1,SIGUSR2");
    }

    #[test]
    fn commands() {
        assert_eq!(
            r(&["-m", "pkg.mod", "x"]).unwrap().args,
            vec!["-u", "-m", "pkg.mod", "x"]
        );
        let x = r(&["--no-python", "echo", "hi"]).unwrap();
        assert_eq!(
            (x.entrypoint.as_str(), x.args.clone()),
            ("echo", vec!["hi".to_string()])
        );
        assert!(r(&["-m", "--no-python", "x"])
            .unwrap_err()
            .0
            .contains("--no-python"));
        assert!(r(&[]).unwrap_err().0.contains("required"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (vec!["--nproc-per-node=unknown", "t"], "--nproc-per-node"),
            (vec!["--nnodes=2:1", "t"], "--nnodes"),
            (vec!["--max-restarts=-1", "t"], "--max-restarts"),
            (vec!["--monitor-interval=0", "t"], "--monitor-interval"),
            (vec!["--shutdown-timeout=-5", "t"], "--shutdown-timeout"),
            (vec!["-r", "9", "t"], "--redirects"),
            (vec!["--rdzv-conf=a", "t"], "--rdzv-conf"),
            (vec!["--local-ranks-filter=a", "t"], "--local-ranks-filter"),
            (vec!["--start-method=x", "t"], "--start-method"),
        ] {
            let e = r(&args).unwrap_err();
            assert!(e.0.contains(flag), "{args:?}: {e}");
        }
        assert!(r(&["--shutdown-timeout=-5", "t"])
            .unwrap_err()
            .0
            .contains("must be non-negative"));
    }

    #[test]
    fn gpu_visibility_follows_cuda_rules() {
        assert_eq!(visible_gpus(4, None), 4);
        assert_eq!(visible_gpus(4, Some("1,3")), 2);
        assert_eq!(visible_gpus(4, Some("1,7,2")), 1);
        assert_eq!(visible_gpus(4, Some("")), 0);
        assert_eq!(visible_gpus(4, Some("-1")), 0);
        assert_eq!(visible_gpus(0, Some("0")), 0);
    }

    #[test]
    fn filters_split_with_escaped_commas() {
        assert_eq!(split_filters("a,b,,c,"), vec!["a", "b,c"]);
    }
}
