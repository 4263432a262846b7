//! One attempt's worker group: starting every local rank with its
//! environment and its output wiring, and the group's bookkeeping (who runs,
//! who exited how, signalling the group, releasing it).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::worker_env::{self, GroupInfo, WorkerRanks};
use crate::config::LaunchConfig;
use crate::error::AgentError;
use crate::logs::failure::ProcessFailure;
use crate::logs::last_line::{Output, Source};
use crate::logs::log_dir::LogDir;
use crate::logs::log_stream::{
    self, Activity, Console, LineFilter, PassThrough, SharedTail, Tail, TeeHandle, TeeTargets,
};
use crate::process::lifeline;
use crate::process::supervisor::Supervisor;
use crate::process::{self, Exit, ExitStatus, SpawnSpec, Stdio};
use crate::rendezvous::Assignment;

/// Where a worker is in its life, as the launcher knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Running,
    /// Exited, not yet reaped: its PID (its group's ID) is still reserved.
    Exited(ExitStatus),
}

#[derive(Debug)]
pub struct Worker {
    pub ranks: WorkerRanks,
    pub pid: i32,
    pub state: WorkerState,
    error_file: Option<PathBuf>,
    stderr_file: Option<PathBuf>,
    stderr_tail: Option<SharedTail>,
    /// Where its recent output can be read, for the status.
    output: Output,
    /// When it last wrote (where the launcher carries its output).
    pub activity: Activity,
}

impl Worker {
    /// This worker's log directory of the attempt, if logs are kept.
    pub fn rank_dir(&self) -> Option<PathBuf> {
        self.error_file.as_ref()?.parent().map(Path::to_path_buf)
    }

    /// Where the status reads what the worker wrote last.
    pub fn output(&self) -> Output {
        self.output.clone()
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        match self.state {
            WorkerState::Running => None,
            WorkerState::Exited(s) => Some(s),
        }
    }

    /// The failure record of this worker's exit.
    pub fn failure(&self, status: ExitStatus, seq: u64) -> ProcessFailure {
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

/// The workers of one attempt and the threads carrying their output.
pub struct Group {
    pub workers: Vec<Worker>,
    tees: Vec<TeeHandle>,
    /// The memory cgroup's OOM-kill count when the group started.
    pub oom_kills_at_start: Option<u64>,
}

impl Group {
    pub fn new(oom_kills_at_start: Option<u64>) -> Group {
        Group {
            workers: Vec::new(),
            tees: Vec::new(),
            oom_kills_at_start,
        }
    }
    pub fn alive(&self) -> impl Iterator<Item = &Worker> {
        self.workers
            .iter()
            .filter(|w| w.state == WorkerState::Running)
    }
    pub fn all_exited(&self) -> bool {
        self.alive().next().is_none()
    }
    /// Records an exit; `None` if the pid is not a running worker of this
    /// group (an orphaned grandchild reaped as subreaper, say).
    pub fn mark_exited(&mut self, exit: Exit) -> Option<&Worker> {
        let w = self
            .workers
            .iter_mut()
            .find(|w| w.pid == exit.pid && w.state == WorkerState::Running)?;
        w.state = WorkerState::Exited(exit.status);
        Some(w)
    }
    /// Sends `sig` to the process group of every running worker.
    pub fn signal_alive(&self, sig: i32) {
        for w in self.alive() {
            process::signal_group(w.pid, sig);
        }
    }
    /// Sends `sig` to every worker's process group, including the groups of
    /// workers that already exited (their descendants may still run there).
    /// Safe against PID reuse: a worker is reaped only in [`Group::release`].
    pub fn signal_all(&self, sig: i32) {
        for w in &self.workers {
            process::signal_group(w.pid, sig);
        }
    }
    /// Ends the group for good: SIGKILLs whatever is left in the workers'
    /// process groups, reaps the workers (which frees their PIDs; nothing
    /// signals these groups again), and waits up to `drain_by` for their
    /// output to be copied.
    pub fn release(&mut self, drain_by: Instant) {
        self.signal_all(libc::SIGKILL);
        // Those still running (a stop gave up on them) are reaped by the
        // reaper when they finally exit.
        for w in &self.workers {
            process::release(w.pid);
        }
        for t in self.tees.drain(..) {
            t.finish_by(drain_by);
        }
    }
}

/// What every attempt's workers are started from.
pub struct Launch<'a> {
    pub config: &'a LaunchConfig,
    pub supervisor: &'a Supervisor,
    /// Where the reaper sends this launch's workers' exits.
    pub exits: tokio::sync::mpsc::UnboundedSender<Exit>,
    /// Each local rank's CPUs (`--numa-binding`), computed at start.
    pub cpus: Vec<libc::cpu_set_t>,
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
    pub base_env: worker_env::Env,
    pub log_dir: LogDir,
    /// Short hostname, for `${hostname}` in line prefixes.
    pub hostname: String,
    /// Keep the last lines of each worker's stderr that goes to the
    /// console, for the failure report: true when the launcher's stderr is
    /// not a terminal (a cluster job's log), where a pipe changes nothing a
    /// user sees.
    pub tail_stderr: bool,
    /// Carry stdout through a pipe, so that the status sees what workers
    /// print: true when the launcher's stdout is not a terminal, where a
    /// pipe changes nothing a user sees.
    pub carry_stdout: bool,
    /// Carry stdout too, to see when workers write (`--hang-timeout`).
    pub watch_output: bool,
}

/// The filter files of one attempt, shared by its ranks.
struct Filters {
    stdout: Option<LineFilter>,
    stderr: Option<LineFilter>,
}

fn open_filter(
    dir: Option<&Path>,
    patterns: &[String],
    name: &str,
) -> Result<Option<LineFilter>, AgentError> {
    match dir {
        Some(dir) if !patterns.is_empty() => {
            let file = crate::logs::log_dir::create_file(&dir.join(name))
                .map_err(|source| AgentError::Streams { source })?;
            Ok(Some(LineFilter {
                patterns: Arc::new(patterns.to_vec()),
                file: Arc::new(Mutex::new(file)),
            }))
        }
        _ => Ok(None),
    }
}

/// How one of a worker's streams is wired, and what the group keeps of it.
struct Stream {
    stdio: Stdio,
    tee: Option<TeeHandle>,
    /// A stream to pass through, by the group's one pass-through thread.
    pass: Option<PassThrough>,
    /// Where the status reads the stream's recent output.
    record: Option<Source>,
}

impl Stream {
    fn plain(stdio: Stdio) -> Stream {
        Stream {
            stdio,
            tee: None,
            pass: None,
            record: None,
        }
    }
}

fn streams_err(source: std::io::Error) -> AgentError {
    AgentError::Streams { source }
}

impl Launch<'_> {
    /// The tee prefix: torch's macros (`${role_name}`, `${rank}`,
    /// `${local_rank}`, `${hostname}`: `socket.gethostname()`), and
    /// torchrun-rs's `${group_rank}` (the node's rank in the round).
    fn prefix_for(&self, w: &WorkerRanks, group_rank: u32) -> String {
        match &self.config.log_line_prefix_template {
            Some(t) if !t.is_empty() => worker_env::template_substitute(t, |name| match name {
                "role_name" => Some(self.config.role.clone()),
                "rank" => Some(w.global_rank.to_string()),
                "local_rank" => Some(w.local_rank.to_string()),
                "hostname" => Some(self.hostname.clone()),
                "group_rank" => Some(group_rank.to_string()),
                _ => None,
            }),
            _ => format!("[{}{}]:", self.config.role, w.local_rank),
        }
    }

    /// Wires one stream of a worker: tee'd through a pipe (file and
    /// prefixed console), redirected to its file, passed through a pipe that
    /// keeps its tail, discarded, or the launcher's own.
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        is_out: bool,
        ranks: &WorkerRanks,
        group_rank: u32,
        rank_dir: Option<&Path>,
        filter: Option<LineFilter>,
        activity: &Activity,
    ) -> Result<Stream, AgentError> {
        let cfg = self.config;
        let local_rank = ranks.local_rank;
        let redirect = cfg
            .redirects
            .for_rank(local_rank)
            .union(cfg.tee.for_rank(local_rank));
        let tee = cfg.tee.for_rank(local_rank);
        let (redirected, teed, name, console) = if is_out {
            (redirect.stdout, tee.stdout, "stdout.log", Console::Stdout)
        } else {
            (redirect.stderr, tee.stderr, "stderr.log", Console::Stderr)
        };
        let shown = cfg
            .local_ranks_filter
            .as_ref()
            .is_none_or(|f| f.contains(&local_rank));
        let file_path = rank_dir.filter(|_| redirected).map(|d| d.join(name));
        // With `--log-dir /dev/null` there is no file to tee into, and torch
        // then lets the worker write to the console itself; `--dedup-output`
        // still needs the tee's pipe to merge the console lines.
        if teed && (rank_dir.is_some() || cfg.dedup_output) {
            let (r, w) = log_stream::pipe().map_err(streams_err)?;
            let file = match &file_path {
                Some(p) => Some(crate::logs::log_dir::create_file(p).map_err(streams_err)?),
                None => None,
            };
            let targets = TeeTargets {
                activity: Some(activity.clone()),
                file,
                console: shown.then_some(console),
                prefix: self.prefix_for(ranks, group_rank),
                filter,
                dedup: cfg.dedup_output.then(|| (local_rank, cfg.role.clone())),
            };
            let handle = log_stream::start(r, targets).map_err(streams_err)?;
            return Ok(Stream {
                stdio: Stdio::Fd(w),
                tee: Some(handle),
                pass: None,
                // The tee thread writes the file as the bytes come: the
                // status reads it back, adding nothing to the tee's path.
                record: file_path.map(Source::File),
            });
        }
        if let Some(p) = file_path {
            let fd = process::create_file(&p).map_err(streams_err)?;
            return Ok(Stream {
                record: Some(Source::File(p)),
                ..Stream::plain(Stdio::Fd(fd))
            });
        }
        // (With `--log-dir /dev/null` a tee'd stream that is not merged is
        // the worker's own console: its last line is kept here too.)
        let carried = if is_out {
            self.carry_stdout
        } else {
            self.tail_stderr
        };
        if carried || self.watch_output {
            let (r, w) = log_stream::small_pipe().map_err(streams_err)?;
            // stderr's tail also serves the failure report.
            let tail = if is_out {
                Tail::small()
            } else {
                SharedTail::default()
            };
            return Ok(Stream {
                stdio: Stdio::Fd(w),
                tee: None,
                pass: Some(PassThrough {
                    read: r,
                    console: shown.then_some(console),
                    tail: tail.clone(),
                    activity: Some(activity.clone()),
                }),
                record: Some(Source::Tail(tail)),
            });
        }
        if !shown {
            // Filtered out of the console.
            let null = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .map_err(streams_err)?;
            return Ok(Stream::plain(Stdio::Fd(null.into())));
        }
        Ok(Stream::plain(Stdio::Inherit))
    }

    /// Starts every local rank of the round `a` into `group`. On an error the
    /// workers already started are in `group`, for the caller to stop.
    pub fn start_group(
        &self,
        a: &Assignment,
        restart_count: u32,
        group: &mut Group,
    ) -> Result<(), AgentError> {
        let cfg = self.config;
        let nproc = cfg.nproc_per_node;
        let attempt_dir = self.log_dir.start_attempt(restart_count, nproc)?;
        let group_info = GroupInfo {
            role: cfg.role.clone(),
            run_id: cfg.run_id.clone(),
            group_rank: a.group_rank,
            group_world_size: a.group_world_size,
            local_world_size: nproc,
            master_addr: a.master_addr.clone(),
            master_port: a.master_port,
            restart_count,
            max_restarts: cfg.max_restarts,
            use_agent_store: true,
        };
        let filters = Filters {
            stdout: open_filter(
                attempt_dir.as_deref(),
                &cfg.duplicate_stdout_filters,
                "filtered_stdout.log",
            )?,
            stderr: open_filter(
                attempt_dir.as_deref(),
                &cfg.duplicate_stderr_filters,
                "filtered_stderr.log",
            )?,
        };
        let mut passed = Vec::new();
        // Every rank's console lines are waited for from the first rank's
        // start, though its own streams open later.
        let _starting = cfg
            .dedup_output
            .then(|| crate::logs::dedup::get().starting(nproc));
        for local_rank in 0..nproc {
            let ranks = WorkerRanks {
                local_rank,
                global_rank: a.base_global_rank + local_rank,
                role_rank: a.base_role_rank + local_rank,
                world_size: a.world_size,
                role_world_size: a.role_world_size,
            };
            let worker = self.start_worker(
                &group_info,
                ranks,
                attempt_dir.as_deref(),
                &filters,
                group,
                &mut passed,
            )?;
            group.workers.push(worker);
        }
        if !passed.is_empty() {
            let handle = log_stream::start_passthrough(passed).map_err(streams_err)?;
            group.tees.push(handle);
        }
        tracing::info!(
            "[{}] started {} workers (restart {}), master {}:{}",
            cfg.role,
            nproc,
            restart_count,
            a.master_addr,
            a.master_port
        );
        Ok(())
    }

    fn start_worker(
        &self,
        group_info: &GroupInfo,
        ranks: WorkerRanks,
        attempt_dir: Option<&Path>,
        filters: &Filters,
        group: &mut Group,
        passed: &mut Vec<PassThrough>,
    ) -> Result<Worker, AgentError> {
        let cfg = self.config;
        let local_rank = ranks.local_rank;
        let rank_dir = attempt_dir.map(|d| d.join(local_rank.to_string()));
        let error_file = rank_dir.as_ref().map(|d| d.join("error.json"));
        let mut env = worker_env::worker_env(
            &self.base_env,
            group_info,
            &ranks,
            // The path as bytes: a log directory (or TMPDIR) that is not
            // UTF-8 still names the directory the file will be in.
            error_file
                .as_ref()
                .map_or(std::ffi::OsStr::new(""), |p| p.as_os_str()),
            cfg.virtual_local_rank,
        )?;
        worker_env::set(
            &mut env,
            lifeline::MARKER_VAR,
            self.supervisor.marker().to_string(),
        );
        let args: Vec<std::ffi::OsString> = self
            .args
            .iter()
            .map(|a| worker_env::substitute_local_rank_os(a, local_rank))
            .collect();
        let activity = Activity::default();
        log_stream::touch(&activity);
        let out = self.stream(
            true,
            &ranks,
            group_info.group_rank,
            rank_dir.as_deref(),
            filters.stdout.clone(),
            &activity,
        )?;
        group.tees.extend(out.tee);
        let err = self.stream(
            false,
            &ranks,
            group_info.group_rank,
            rank_dir.as_deref(),
            filters.stderr.clone(),
            &activity,
        )?;
        group.tees.extend(err.tee);
        let stderr_tail = err.pass.as_ref().map(|p| p.tail.clone());
        let output = Output {
            stdout: out.record,
            stderr: err.record,
        };
        passed.extend(out.pass);
        passed.extend(err.pass);
        let redirected_stderr =
            cfg.redirects.for_rank(local_rank).stderr || cfg.tee.for_rank(local_rank).stderr;
        let stderr_file = rank_dir
            .as_ref()
            .filter(|_| redirected_stderr)
            .map(|d| d.join("stderr.log"));
        let spec = SpawnSpec {
            program: &self.program,
            args: &args,
            env: &env,
            stdin: Stdio::Inherit,
            stdout: out.stdio,
            stderr: err.stdio,
            cpus: self.cpus.get(local_rank as usize).copied(),
        };
        let pid = process::spawn(spec, &self.exits).map_err(|source| AgentError::Spawn {
            local_rank,
            nproc: cfg.nproc_per_node,
            program: self.program.display().to_string(),
            source,
        })?;
        Ok(Worker {
            ranks,
            pid,
            state: WorkerState::Running,
            error_file,
            stderr_file,
            stderr_tail,
            output,
            activity,
        })
    }
}
