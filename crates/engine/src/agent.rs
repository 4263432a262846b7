//! The elastic agent for one node: start the worker group, watch it, restart
//! it on failure, forward signals, and stop it cleanly.
//!
//! One task owns all state and takes events one at a time: a worker exited
//! (reported by the reaper the moment it happens, no polling), or a signal
//! arrived. Workers run in their own sessions; the agent always signals whole
//! process groups.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::LaunchConfig;
use crate::failure::ProcessFailure;
use crate::lifeline;
use crate::log_dir::LogDir;
use crate::log_stream::{self, Console, LineFilter, TeeHandle, TeeTargets};
use crate::process::{self, Exit, ExitStatus, SpawnSpec, Stdio};
use crate::rendezvous::Rendezvous;
use crate::signals::{signal_name, SignalEvent, Trap};
use crate::worker_env::{self, GroupInfo, WorkerRanks};

/// How a run ended.
#[derive(Debug)]
pub enum RunResult {
    /// Every worker exited 0.
    Succeeded,
    /// A worker failed and no restart was left. Failures in detection order.
    Failed { failures: Vec<ProcessFailure> },
    /// The launcher received `signal` and stopped the workers.
    Signaled { signal: i32 },
}

/// Grace period when stopping a group for a restart or after a sibling's
/// failure: torch hard-codes 30 s there, whatever `--shutdown-timeout` says.
const RESTART_GRACE: Duration = Duration::from_secs(30);

/// How long to wait for a worker's output pipes after its group ended.
const PIPE_DRAIN: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Worker {
    ranks: WorkerRanks,
    pid: i32,
    exited: Option<ExitStatus>,
    error_file: Option<PathBuf>,
    stderr_file: Option<PathBuf>,
    stderr_tail: Option<log_stream::SharedTail>,
}

/// Errors that stop the agent before or between worker groups.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot start local rank {local_rank} of {nproc} ({program}): {source}{}; the workers already started were stopped", spawn_hint(source))]
    Spawn {
        local_rank: u32,
        nproc: u32,
        program: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    LogDir(#[from] crate::log_dir::LogDirError),
    #[error("cannot set up output streams: {source}{}", spawn_hint(source))]
    Streams { source: std::io::Error },
    #[error(transparent)]
    Rendezvous(#[from] crate::rendezvous::RendezvousError),
}

/// What to add to a spawn error so the user knows which limit to raise.
fn spawn_hint(e: &std::io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EAGAIN) {
        " (the system's limit on processes was reached: `ulimit -u`, the pids cgroup's pids.max, or kernel.pid_max)"
    } else {
        ""
    }
}

pub struct Agent<'a> {
    pub config: &'a LaunchConfig,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub base_env: BTreeMap<String, String>,
    pub log_dir: LogDir,
    pub rdzv: Rendezvous,
    pub trap: Trap,
    pub exits: mpsc::UnboundedReceiver<Exit>,
    /// Short hostname, for `${hostname}` in line prefixes.
    pub hostname: String,
    /// Failure-driven restarts so far (TORCHELASTIC_RESTART_COUNT).
    pub restart_count: u32,
    /// Detection order of failures.
    seq: u64,
    /// Whether any worker was ever started (then the final cleanup looks for
    /// what they left behind).
    started_any: bool,
    /// A shutdown signal already received (the next one skips the grace).
    stopping: Option<i32>,
    /// The memory cgroup file with the kernel's OOM-kill counter.
    oom_counter: Option<PathBuf>,
    /// The last membership check could not reach the rendezvous store.
    rdzv_failing: bool,
    /// Keep the last lines of each worker's stderr that goes to the
    /// console, for the failure report: the launcher's stderr is not a
    /// terminal (a cluster job's log), so a pipe changes nothing a user sees.
    tail_stderr: bool,
}

/// The group of workers of one attempt.
struct Group {
    workers: Vec<Worker>,
    tees: Vec<TeeHandle>,
    /// The memory cgroup's OOM-kill count when the group started.
    oom_kills_at_start: Option<u64>,
}

impl Worker {
    fn failure(&self, status: ExitStatus, seq: u64) -> ProcessFailure {
        let mut f = ProcessFailure::new(
            self.ranks.local_rank,
            self.ranks.global_rank,
            self.pid,
            status,
            self.error_file.as_deref(),
            seq,
        );
        f.stderr_file = self.stderr_file.clone();
        f.stderr_tail = self.stderr_tail.clone();
        f
    }
}

impl Group {
    fn alive(&self) -> impl Iterator<Item = &Worker> {
        self.workers.iter().filter(|w| w.exited.is_none())
    }
    /// Records an exit; `None` if the pid is not a live worker of this group
    /// (an orphaned grandchild reaped as subreaper, or an older attempt).
    fn mark_exited(&mut self, exit: Exit) -> Option<&Worker> {
        let w = self
            .workers
            .iter_mut()
            .find(|w| w.pid == exit.pid && w.exited.is_none())?;
        w.exited = Some(exit.status);
        Some(w)
    }
    /// Sends `sig` to the process group of every live worker.
    fn signal_alive(&self, sig: i32) {
        for w in self.alive() {
            process::signal_group(w.pid, sig);
        }
    }
    /// Sends `sig` to every worker's process group, including the groups of
    /// workers that already exited (their descendants may still run there).
    /// Safe against PID reuse: a worker is reaped only in [`Group::release`].
    fn signal_all(&self, sig: i32) {
        for w in &self.workers {
            process::signal_group(w.pid, sig);
        }
    }
    /// Ends the group for good: SIGKILLs whatever is left in the workers'
    /// process groups, then reaps the workers, which frees their PIDs. After
    /// this nothing signals these groups again.
    fn release(&mut self) {
        self.signal_all(libc::SIGKILL);
        for w in &self.workers {
            if w.exited.is_some() {
                process::release(w.pid);
            }
        }
    }
    fn all_exited(&self) -> bool {
        self.workers.iter().all(|w| w.exited.is_some())
    }
}

enum Outcome {
    Succeeded,
    Failed(Vec<ProcessFailure>),
    Signaled(i32),
    /// Nodes joined or left: re-form the group without using a restart.
    Regroup,
}

impl<'a> Agent<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &'a LaunchConfig,
        program: PathBuf,
        args: Vec<String>,
        base_env: BTreeMap<String, String>,
        log_dir: LogDir,
        rdzv: Rendezvous,
        trap: Trap,
        exits: mpsc::UnboundedReceiver<Exit>,
    ) -> Self {
        Agent {
            config,
            program,
            args,
            base_env,
            log_dir,
            rdzv,
            trap,
            exits,
            hostname: crate::host::hostname(),
            restart_count: 0,
            seq: 0,
            started_any: false,
            stopping: None,
            oom_counter: crate::oom::counter_file(),
            rdzv_failing: false,
            // SAFETY: isatty only reads the descriptor's state.
            tail_stderr: unsafe { libc::isatty(2) } == 0,
        }
    }

    /// Runs worker groups until success, exhausted restarts, or a signal.
    pub async fn run(&mut self) -> Result<RunResult, AgentError> {
        let result = self.run_attempts().await;
        self.cleanup();
        if let Ok(RunResult::Signaled { .. }) = result {
            // The workers are stopped: let the other nodes go on without us.
            self.rdzv.leave().await;
        }
        result
    }

    async fn run_attempts(&mut self) -> Result<RunResult, AgentError> {
        let role = self.config.role.clone();
        loop {
            // A signal that arrived during set-up.
            if let Some(SignalEvent::Shutdown(sig)) = self.trap.try_recv() {
                return Ok(RunResult::Signaled { signal: sig });
            }
            let assignment = tokio::select! {
                a = self.rdzv.next_round(self.config) => match a {
                    Ok(a) => a,
                    Err(crate::rendezvous::RendezvousError::GracefulExit) => {
                        tracing::warn!("[{role}] the job ended while this node waited as a spare; exiting");
                        return Ok(RunResult::Succeeded);
                    }
                    Err(e) => return Err(e.into()),
                },
                sig = self.trap.next_shutdown() => return Ok(RunResult::Signaled { signal: sig }),
            };
            let mut group = Group {
                workers: Vec::new(),
                tees: Vec::new(),
                oom_kills_at_start: self
                    .oom_counter
                    .as_deref()
                    .and_then(crate::oom::parse_oom_kills),
            };
            if let Err(e) = self.start_group(&assignment, &mut group) {
                // Stop the workers already started (a process limit reached
                // halfway, say) before reporting.
                group.signal_all(libc::SIGKILL);
                self.wait_all_exited(&mut group).await;
                group.release();
                let drain = Instant::now() + PIPE_DRAIN;
                for t in group.tees.drain(..) {
                    t.finish_by(drain);
                }
                return Err(e);
            }
            let outcome = self.monitor(&mut group).await;
            group.release();
            let drain = Instant::now() + PIPE_DRAIN;
            for t in group.tees.drain(..) {
                t.finish_by(drain);
            }
            match outcome {
                Outcome::Succeeded => {
                    self.rdzv.finish(true).await;
                    return Ok(RunResult::Succeeded);
                }
                Outcome::Signaled(sig) => return Ok(RunResult::Signaled { signal: sig }),
                Outcome::Regroup => continue,
                Outcome::Failed(failures) => {
                    let remaining = self.config.max_restarts - self.restart_count;
                    if remaining > 0 {
                        tracing::info!(
                            "[{role}] Worker group FAILED. {remaining}/{} attempts left; will restart worker group",
                            self.config.max_restarts
                        );
                        self.restart_count += 1;
                        continue;
                    }
                    self.rdzv.finish(false).await;
                    return Ok(RunResult::Failed { failures });
                }
            }
        }
    }

    fn prefix_for(&self, w: &WorkerRanks) -> String {
        match &self.config.log_line_prefix_template {
            Some(t) if !t.is_empty() => worker_env::template_substitute(t, |name| match name {
                "role_name" => Some(self.config.role.clone()),
                "rank" => Some(w.global_rank.to_string()),
                "local_rank" => Some(w.local_rank.to_string()),
                "hostname" => Some(self.hostname.clone()),
                _ => None,
            }),
            _ => format!("[{}{}]:", self.config.role, w.local_rank),
        }
    }

    fn start_group(
        &mut self,
        a: &crate::rendezvous::Assignment,
        group: &mut Group,
    ) -> Result<(), AgentError> {
        let cfg = self.config;
        let nproc = cfg.nproc_per_node;
        let attempt_dir = self.log_dir.start_attempt(self.restart_count, nproc)?;
        let group_info = GroupInfo {
            role: cfg.role.clone(),
            run_id: cfg.run_id.clone(),
            group_rank: a.group_rank,
            group_world_size: a.group_world_size,
            local_world_size: nproc,
            master_addr: a.master_addr.clone(),
            master_port: a.master_port,
            restart_count: self.restart_count,
            max_restarts: cfg.max_restarts,
            use_agent_store: true,
        };
        let filters =
            |patterns: &Vec<String>, name: &str| -> Result<Option<LineFilter>, AgentError> {
                match (&attempt_dir, patterns.is_empty()) {
                    (Some(dir), false) => {
                        let file = crate::log_dir::create_file(&dir.join(name))
                            .map_err(|source| AgentError::Streams { source })?;
                        Ok(Some(LineFilter {
                            patterns: std::sync::Arc::new(patterns.clone()),
                            file: std::sync::Arc::new(std::sync::Mutex::new(file)),
                        }))
                    }
                    _ => Ok(None),
                }
            };
        let out_filter = filters(&cfg.duplicate_stdout_filters, "filtered_stdout.log")?;
        let err_filter = filters(&cfg.duplicate_stderr_filters, "filtered_stderr.log")?;
        for local_rank in 0..nproc {
            let ranks = WorkerRanks {
                local_rank,
                global_rank: a.base_global_rank + local_rank,
                role_rank: a.base_role_rank + local_rank,
                world_size: a.world_size,
                role_world_size: a.role_world_size,
            };
            let rank_dir = attempt_dir.as_ref().map(|d| d.join(local_rank.to_string()));
            let error_file = rank_dir.as_ref().map(|d| d.join("error.json"));
            let mut env = worker_env::worker_env(
                &self.base_env,
                &group_info,
                &ranks,
                &error_file
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string()),
                cfg.virtual_local_rank,
            )?;
            env.insert(
                lifeline::MARKER_VAR.to_string(),
                lifeline::marker().to_string(),
            );
            let args: Vec<String> = self
                .args
                .iter()
                .map(|a| worker_env::substitute_local_rank(a, local_rank))
                .collect();
            let shown = cfg
                .local_ranks_filter
                .as_ref()
                .is_none_or(|f| f.contains(&local_rank));
            let prefix = self.prefix_for(&ranks);
            let redirect = cfg
                .redirects
                .for_rank(local_rank)
                .union(cfg.tee.for_rank(local_rank));
            let tee = cfg.tee.for_rank(local_rank);
            let tail_stderr = self.tail_stderr;
            let mut stderr_tail = None;
            let mut stream = |is_out: bool| -> Result<Stdio, AgentError> {
                let (redirected, teed, name, console, filter) = if is_out {
                    (
                        redirect.stdout,
                        tee.stdout,
                        "stdout.log",
                        Console::Stdout,
                        out_filter.clone(),
                    )
                } else {
                    (
                        redirect.stderr,
                        tee.stderr,
                        "stderr.log",
                        Console::Stderr,
                        err_filter.clone(),
                    )
                };
                let file_path = rank_dir
                    .as_ref()
                    .filter(|_| redirected)
                    .map(|d| d.join(name));
                if teed && rank_dir.is_some() {
                    let (r, w) =
                        log_stream::pipe().map_err(|source| AgentError::Streams { source })?;
                    let file = match &file_path {
                        Some(p) => Some(
                            crate::log_dir::create_file(p)
                                .map_err(|source| AgentError::Streams { source })?,
                        ),
                        None => None,
                    };
                    let handle = log_stream::start(
                        r,
                        TeeTargets {
                            file,
                            console: shown.then_some(console),
                            prefix: prefix.clone(),
                            filter,
                        },
                    )
                    .map_err(|source| AgentError::Streams { source })?;
                    group.tees.push(handle);
                    return Ok(Stdio::Fd(w));
                }
                if let Some(p) = &file_path {
                    return Ok(Stdio::Fd(
                        process::create_file(p).map_err(|source| AgentError::Streams { source })?,
                    ));
                }
                if !is_out && tail_stderr && !(teed && rank_dir.is_none()) {
                    let (r, w) =
                        log_stream::pipe().map_err(|source| AgentError::Streams { source })?;
                    let tail = log_stream::SharedTail::default();
                    let handle = log_stream::start_passthrough(
                        r,
                        shown.then_some(Console::Stderr),
                        tail.clone(),
                    )
                    .map_err(|source| AgentError::Streams { source })?;
                    group.tees.push(handle);
                    stderr_tail = Some(tail);
                    return Ok(Stdio::Fd(w));
                }
                if !shown || (teed && rank_dir.is_none()) {
                    // Filtered out of the console, or tee'd into /dev/null.
                    let null = std::fs::OpenOptions::new()
                        .write(true)
                        .open("/dev/null")
                        .map_err(|source| AgentError::Streams { source })?;
                    return Ok(Stdio::Fd(null.into()));
                }
                Ok(Stdio::Inherit)
            };
            let stdout = stream(true)?;
            let stderr = stream(false)?;
            let stderr_file = rank_dir
                .as_ref()
                .filter(|_| redirect.stderr)
                .map(|d| d.join("stderr.log"));
            let pid = process::spawn(SpawnSpec {
                program: &self.program,
                args: &args,
                env: &env,
                stdout,
                stderr,
            })
            .map_err(|source| AgentError::Spawn {
                local_rank,
                nproc,
                program: self.program.display().to_string(),
                source,
            })?;
            self.started_any = true;
            group.workers.push(Worker {
                ranks,
                pid,
                exited: None,
                error_file,
                stderr_file,
                stderr_tail,
            });
        }
        tracing::info!(
            "[{}] started {} workers (restart {}), master {}:{}",
            cfg.role,
            nproc,
            self.restart_count,
            a.master_addr,
            a.master_port
        );
        Ok(())
    }

    fn record_exit(&mut self, group: &mut Group, exit: Exit) -> Option<ProcessFailure> {
        let start = group.oom_kills_at_start;
        let w = group.mark_exited(exit)?;
        if exit.status.success() {
            return None;
        }
        self.seq += 1;
        let mut f = w.failure(exit.status, self.seq);
        if exit.status == ExitStatus::Signal(libc::SIGKILL) {
            let now = self
                .oom_counter
                .as_deref()
                .and_then(crate::oom::parse_oom_kills);
            f.oom_killed = matches!((start, now), (Some(a), Some(b)) if b > a);
        }
        Some(f)
    }

    /// Watches the group until it succeeds, fails (then its survivors are
    /// stopped), or a shutdown signal stops it.
    async fn monitor(&mut self, group: &mut Group) -> Outcome {
        let mut failures = Vec::new();
        let mut membership = self.rdzv.poll_interval().map(|every| {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            if group.all_exited() {
                return Outcome::Succeeded;
            }
            let tick = async {
                match membership.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tick => match self.rdzv.membership_changed().await {
                    Ok(false) => {
                        if std::mem::take(&mut self.rdzv_failing) {
                            tracing::warn!("the rendezvous store answers again");
                        }
                    }
                    Ok(true) => {
                        if let Some(sig) = self.stop_group(group, libc::SIGTERM, RESTART_GRACE).await {
                            return Outcome::Signaled(sig);
                        }
                        return Outcome::Regroup;
                    }
                    Err(e) => {
                        // Said once, not at every check; the workers keep running.
                        if !std::mem::replace(&mut self.rdzv_failing, true) {
                            tracing::warn!("cannot reach the rendezvous store ({e}); the workers keep running, membership changes are not seen until it answers");
                        }
                    }
                },
                Some(exit) = self.exits.recv() => {
                    if let Some(f) = self.record_exit(group, exit) {
                        tracing::error!(
                            "failed (exitcode: {}) local_rank: {} (pid: {}) of binary: {}",
                            f.exitcode(), f.local_rank, f.pid, self.program.display()
                        );
                        failures.push(f);
                        // Stop the siblings; their exits are recorded too.
                        if let Some(sig) = self.stop_group(group, libc::SIGTERM, RESTART_GRACE).await {
                            self.collect_terminated(group, &mut failures);
                            return Outcome::Signaled(sig);
                        }
                        self.collect_terminated(group, &mut failures);
                        return Outcome::Failed(failures);
                    }
                }
                Some(ev) = self.trap.recv() => match ev {
                    SignalEvent::Forward(sig) => {
                        tracing::warn!("forwarding {} to the workers", signal_name(sig).unwrap_or("signal"));
                        group.signal_alive(sig);
                    }
                    SignalEvent::Shutdown(sig) => {
                        tracing::warn!("Received {sig} death signal, shutting down workers");
                        self.stopping = Some(sig);
                        let _ = self.stop_group(group, sig, self.config.shutdown_timeout).await;
                        return Outcome::Signaled(sig);
                    }
                },
            }
        }
    }

    /// Siblings stopped by the launcher, listed after the root cause as
    /// torch 2.11+ does.
    fn collect_terminated(&mut self, group: &Group, failures: &mut Vec<ProcessFailure>) {
        for w in &group.workers {
            let already = failures.iter().any(|f| f.pid == w.pid);
            if let Some(st) = w.exited.filter(|s| !s.success()) {
                if !already {
                    self.seq += 1;
                    failures.push(w.failure(st, self.seq));
                }
            }
        }
    }

    /// Sends `sig` to every live worker's process group, waits up to `grace`
    /// for them to exit, then SIGKILLs the rest. A shutdown signal arriving
    /// meanwhile is forwarded too; a second one skips the rest of the grace.
    /// Returns the shutdown signal received while stopping, if any.
    async fn stop_group(&mut self, group: &mut Group, sig: i32, grace: Duration) -> Option<i32> {
        let mut received = None;
        for w in group.alive() {
            tracing::warn!(
                "Sending process {} closing signal {}",
                w.pid,
                signal_name(sig).unwrap_or("?")
            );
        }
        // Whole groups, including descendants of workers that already exited.
        group.signal_all(sig);
        let deadline = tokio::time::Instant::now() + grace;
        let mut escalate = false;
        while !group.all_exited() && !escalate {
            tokio::select! {
                Some(exit) = self.exits.recv() => {
                    group.mark_exited(exit);
                }
                Some(ev) = self.trap.recv() => match ev {
                    SignalEvent::Forward(s) => group.signal_alive(s),
                    SignalEvent::Shutdown(s) => {
                        if self.stopping.is_some() {
                            tracing::warn!("second signal: killing the workers now");
                            escalate = true;
                        } else {
                            self.stopping = Some(s);
                            received = Some(s);
                            group.signal_alive(s);
                        }
                    }
                },
                _ = tokio::time::sleep_until(deadline) => escalate = true,
            }
        }
        if !group.all_exited() {
            for w in group.alive() {
                tracing::warn!(
                    "Unable to shutdown process {} via {}, forcefully exiting via SIGKILL",
                    w.pid,
                    signal_name(sig).unwrap_or("?")
                );
            }
            group.signal_all(libc::SIGKILL);
            self.wait_all_exited(group).await;
        }
        received
    }

    /// Waits for every worker of a SIGKILLed group to exit (10 s at most: a
    /// process in uninterruptible sleep may never go).
    async fn wait_all_exited(&mut self, group: &mut Group) {
        let hard_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !group.all_exited() {
            tokio::select! {
                Some(exit) = self.exits.recv() => {
                    group.mark_exited(exit);
                }
                _ = tokio::time::sleep_until(hard_deadline) => {
                    tracing::error!("workers did not exit after SIGKILL (uninterruptible sleep?)");
                    break;
                }
            }
        }
    }

    /// Leaves nothing behind: every group was already ended by
    /// [`Group::release`]; what is left are descendants that left their
    /// worker's process group (daemons), found as this launcher's subtree or,
    /// failing that, by this run's marker.
    fn cleanup(&mut self) {
        if lifeline::stop_descendants().is_some() {
            lifeline::disarm();
        } else if self.started_any {
            lifeline::sweep(lifeline::marker());
        }
    }
}
