//! `launch_agent`: torch's launcher API. Takes a resolved [`LaunchConfig`], an
//! entrypoint and its arguments, runs the job on this node, and returns how it
//! ended.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use crate::agent::{Agent, AgentError, RunResult};
use crate::config::{ConfigError, LaunchConfig};
use crate::logs::failure::{self, ProcessFailure};
use crate::logs::log_dir::LogDir;
use crate::process;
use crate::process::signals::{signal_name, Trap};
use crate::process::supervisor::Supervisor;
use crate::rendezvous::{self, RendezvousError};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}: no such file or executable on PATH")]
    NotFound(String),
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    LogDir(#[from] crate::logs::log_dir::LogDirError),
    #[error(transparent)]
    Numa(#[from] crate::process::numa::NumaError),
    #[error("--events-file {}: {source}", path.display())]
    EventsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// How a launch ended, with what the failure report needs.
#[derive(Debug)]
pub struct LaunchOutcome {
    pub result: RunResult,
    /// torch's entrypoint name: the script as typed, the module, or the binary.
    pub entrypoint_name: String,
    /// This host's fully qualified name (the summary's `host` field).
    pub host: String,
    /// The run's log directory, if any.
    pub run_dir: Option<PathBuf>,
    /// The job's root cause when it failed, the same line on every node
    /// (c10d, etcd-v3: the first failure any node reported).
    pub job_root_cause: Option<String>,
}

impl LaunchOutcome {
    /// The launcher's exit status: 0, the root cause's exit code (128+N for
    /// a signal), or 128+N when the launcher itself stopped on signal N.
    pub fn exit_code(&self) -> i32 {
        match &self.result {
            RunResult::Succeeded => 0,
            RunResult::Signaled { signal } => 128 + signal,
            RunResult::Failed { failures } => failure::root_cause(failures)
                .map_or(1, |i| failures[i].status.shell_code())
                .clamp(1, 255),
        }
    }

    /// The failure report for stderr: torch's summary box, then the root
    /// cause's reason in words and the tail of its stderr when captured.
    pub fn report(&self) -> Option<String> {
        match &self.result {
            RunResult::Succeeded => None,
            RunResult::Signaled { signal } => Some(format!(
                "torchrun-rs: stopped by {} ({signal}); workers were signalled and stopped\n",
                signal_name(*signal).unwrap_or("signal")
            )),
            RunResult::Failed { failures } => {
                let mut out = failure::summary(&self.entrypoint_name, failures, &self.host);
                out.push('\n');
                if let Some(i) = failure::root_cause(failures) {
                    out.push_str(&root_cause_details(&failures[i]));
                }
                if let Some(dir) = &self.run_dir {
                    out.push_str(&format!("Worker logs: {}\n", dir.display()));
                }
                if let Some(line) = &self.job_root_cause {
                    out.push_str(&format!(
                        "The job's root cause (the first failure on any node): {line}\n"
                    ));
                }
                Some(out)
            }
        }
    }
}

fn root_cause_details(f: &ProcessFailure) -> String {
    let mut out = format!(
        "Root cause: rank {} (local_rank {}, pid {}) {}\n",
        f.global_rank,
        f.local_rank,
        f.pid,
        failure::reason(f)
    );
    if let Some(note) = &f.error_note {
        out.push_str(&format!("Note: {note}\n"));
    }
    let (lines, from) = match (&f.stderr_file, &f.stderr_tail) {
        (Some(path), _) => (
            failure::tail_lines(path, 20),
            format!(" ({})", path.display()),
        ),
        (None, Some(tail)) => (
            tail.lock()
                .unwrap_or_else(|p| p.into_inner())
                .last_lines(20),
            String::new(),
        ),
        (None, None) => (Vec::new(), String::new()),
    };
    if !lines.is_empty() {
        out.push_str(&format!("Last lines of its stderr{from}:\n"));
        for l in lines {
            out.push_str("  ");
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// Each local rank's CPUs under `--numa-binding` (none without it), as
/// torch computes them; a failure is an error before anything starts, as in
/// torch.
fn numa_bindings(
    config: &LaunchConfig,
) -> Result<Vec<libc::cpu_set_t>, crate::process::numa::NumaError> {
    let Some(mode) = config.numa_binding else {
        return Ok(Vec::new());
    };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let topology = crate::process::numa::Topology::of_this_host(visible.as_deref())?;
    let sets = topology.bindings(mode, config.nproc_per_node)?;
    for (r, s) in sets.iter().enumerate() {
        tracing::info!(
            "--numa-binding: local rank {r} on CPUs {}",
            crate::process::numa::format_ranges(s)
        );
    }
    Ok(sets.iter().map(crate::process::numa::cpu_set).collect())
}

/// torch's `_get_entrypoint_name`: for a Python interpreter, the first
/// argument not starting with `-` (the script as typed, or the module);
/// otherwise the entrypoint as given.
pub fn entrypoint_name(entrypoint: &str, args: &[OsString]) -> String {
    let base = std::path::Path::new(entrypoint)
        .file_name()
        .map_or(String::new(), |b| b.to_string_lossy().into_owned());
    if base.starts_with("python") {
        args.iter()
            .map(|a| a.to_string_lossy())
            .find(|a| !a.starts_with('-'))
            .map(|a| a.into_owned())
            .unwrap_or_default()
    } else {
        entrypoint.to_string()
    }
}

fn new_run_id() -> String {
    use rand::Rng;
    rand::thread_rng().gen::<u128>().to_string()
}

/// Runs the job and returns how it ended. Works from plain and from async
/// code (then the launch runs on a thread of its own). Workers are tied to
/// the launcher's life through the thread that forks them, which lives until
/// every worker is gone.
///
/// `args` are passed to the entrypoint as they are, bytes that are not UTF-8
/// included (`String`s, `OsString`s, `&str`s).
pub fn launch_agent<A: AsRef<OsStr>>(
    config: &LaunchConfig,
    entrypoint: &str,
    args: &[A],
) -> Result<LaunchOutcome, LaunchError> {
    launch_agent_with(&Supervisor::embedded(), config, entrypoint, args)
}

/// [`launch_agent`] under a given [`Supervisor`]: the launcher binary's,
/// which owns every child of the process and the orphan guardian.
pub fn launch_agent_with<A: AsRef<OsStr>>(
    supervisor: &Supervisor,
    config: &LaunchConfig,
    entrypoint: &str,
    args: &[A],
) -> Result<LaunchOutcome, LaunchError> {
    config.validate()?;
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    let args = args.as_slice();
    let mut config = config.clone();
    if config.run_id.is_empty() {
        config.run_id = new_run_id();
        tracing::warn!(
            "config has no run_id, generated a random run_id: {}",
            config.run_id
        );
    }
    let launch = move || -> Result<LaunchOutcome, LaunchError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(LaunchError::Runtime)?;
        // block_on runs this future on the calling thread, so workers are
        // forked (and tied by PDEATHSIG) from it.
        rt.block_on(run(supervisor, config, entrypoint, args))
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return launch();
    }
    // Called from async code: a runtime cannot be started (nor blocked on)
    // inside another, so the launch gets a thread of its own, which lives
    // until every worker is gone (workers die with the thread that forked
    // them).
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("torchrun-rs-launch".into())
            .spawn_scoped(scope, launch)
            .map_err(LaunchError::Runtime)?
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

async fn run(
    supervisor: &Supervisor,
    config: LaunchConfig,
    entrypoint: &str,
    args: &[OsString],
) -> Result<LaunchOutcome, LaunchError> {
    let (mut trap, warnings) = Trap::install(&config.signals_to_handle, &config.forward_signals);
    for w in warnings {
        tracing::warn!(
            "Failed to register signal handler for {}: {}",
            w.name,
            w.reason
        );
    }
    let program = process::find_program(entrypoint)
        .ok_or_else(|| LaunchError::NotFound(entrypoint.to_string()))?;

    // Byte for byte, as torchrun passes it: a variable that is not UTF-8
    // reaches the workers unchanged.
    let mut base_env: crate::config::worker_env::Env = std::env::vars_os().collect();
    crate::config::worker_env::set(
        &mut base_env,
        "TORCHELASTIC_SIGNALS_TO_HANDLE",
        config.signals_to_handle.clone(),
    );
    let launcher_error_file = base_env
        .get(OsStr::new("TORCHELASTIC_ERROR_FILE"))
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);

    let cpus = numa_bindings(&config)?;
    let host = crate::process::host::fqdn();
    if config.max_nodes > 1 {
        // What this node would run, for the others to compare at the
        // rendezvous (computed off this thread while it joins).
        let env = base_env
            .iter()
            .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v.to_str()?.to_string())))
            .collect();
        crate::rendezvous::fingerprint::start(program.clone(), args.to_vec(), env, host.clone());
    }
    let journal = crate::observe::journal::Journal::open(
        config.events_file.as_deref(),
        &config.run_id,
        &host,
    )
    .map_err(|source| LaunchError::EventsFile {
        path: config.events_file.clone().unwrap_or_default(),
        source,
    })?;
    let local_addr = config.local_addr.clone().unwrap_or_else(|| host.clone());
    let log_dir = LogDir::create(config.log_dir.as_deref(), &config.run_id)?;
    let run_dir = log_dir.run_dir().map(PathBuf::from);
    // A handled signal stops the launch while it waits for other nodes.
    // Health and metrics first: they answer while the rendezvous waits.
    let observed = std::sync::Arc::new(std::sync::Mutex::new(crate::observe::health::Observed {
        role: config.role.clone(),
        phase: "starting",
        max_restarts: config.max_restarts,
        ..Default::default()
    }));
    let (ping_tx, pings) = tokio::sync::mpsc::unbounded_channel();
    let _health = match config.metrics_port {
        None => None,
        Some(port) => {
            let addr = std::net::SocketAddr::new(config.metrics_addr, port);
            match crate::observe::health::start(addr, observed.clone(), ping_tx, config.open_stacks)
                .await
            {
                Ok(server) => {
                    if port == 0 {
                        eprintln!("torchrun-rs: health and metrics on http://{}", server.addr);
                    } else {
                        tracing::info!("health and metrics on http://{}", server.addr);
                    }
                    Some(server)
                }
                Err(e) => {
                    // Observability must never fail the job.
                    tracing::warn!(
                        "cannot serve health and metrics on {addr}: {e}; the job runs without them"
                    );
                    None
                }
            }
        }
    };
    let (rdzv_tx, rdzv_events) = tokio::sync::mpsc::unbounded_channel();
    let created = tokio::select! {
        r = rendezvous::start(&config, &local_addr, rdzv_tx) => r,
        sig = trap.next_shutdown() => {
            return Ok(LaunchOutcome {
                result: RunResult::Signaled { signal: sig },
                entrypoint_name: entrypoint_name(entrypoint, args),
                host,
                run_dir,
                job_root_cause: None,
            });
        }
    };
    let rdzv = created.map_err(|e| match e {
        // A bad value (--node-rank out of range, ...) is a usage error.
        RendezvousError::Config(c) => LaunchError::Config(c),
        other => LaunchError::Rendezvous(other),
    })?;
    let mut agent = Agent::new(
        &config,
        supervisor,
        program,
        args.to_vec(),
        base_env,
        log_dir,
        rdzv,
        rdzv_events,
        trap,
        cpus,
        crate::observe::events::EventLog::new(
            &config,
            host.clone(),
            entrypoint_name(entrypoint, args),
        ),
        journal,
        (observed, pings),
    );
    let result = agent.run().await;
    let job_root_cause = agent.job_root_cause().map(str::to_string);
    agent.shutdown().await;
    let result = result?;
    if let (RunResult::Failed { failures }, Some(dest)) = (&result, &launcher_error_file) {
        if let Some(i) = failure::root_cause(failures) {
            if let Err(e) = failure::copy_error_file(&failures[i], dest) {
                tracing::error!(
                    "cannot write the launcher's error file {}: {e}",
                    dest.display()
                );
            }
        }
    }
    // Lines still waiting for their copies are written before the report.
    crate::logs::dedup::flush();
    Ok(LaunchOutcome {
        result,
        entrypoint_name: entrypoint_name(entrypoint, args),
        host,
        run_dir,
        job_root_cause,
    })
}
