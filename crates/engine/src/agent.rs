//! The elastic agent for one node: one dispatcher over one stream of events.
//!
//! Everything the agent reacts to is an [`Event`]: a worker exited (reported
//! by the reaper the moment it happens), a signal arrived, the rendezvous
//! task answered, or a timer fired (a membership check is due, a grace
//! period is over). The agent takes them one at a time and moves between
//! explicit phases: joining a round, running a group, stopping a group (with
//! its deadline and escalation), finishing (exit barrier, close). Nothing in
//! the loop blocks: store calls run in the rendezvous task, the final sweep
//! in a blocking-pool thread. Workers are forked from the loop itself, which
//! runs on the launcher's main thread (a worker's parent-death signal follows
//! the thread that forked it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::LaunchConfig;
use crate::logs::failure::ProcessFailure;
use crate::logs::log_dir::LogDir;
use crate::observe::events::{EventLog, WorkerFacts};
use crate::observe::health::{Observed, Ping, SharedObserved, WorkerStatus};
use crate::observe::journal::{Journal, V};
use crate::process::signals::{signal_name, SignalEvent, Trap};
use crate::process::supervisor::Supervisor;
use crate::process::{Exit, ExitStatus};
use crate::rendezvous::task::{RdzvEvent, RendezvousTask};
use crate::rendezvous::RendezvousError;
use crate::terminate::{Expired, Stopping};
use crate::worker_group::{Group, Launch};

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

/// Beyond the exit barrier and the close: the time the store's requests may
/// take (each is bounded by its client's request timeout).
const FINISH_MARGIN: Duration = Duration::from_secs(60);

/// How long to wait for a worker's output pipes after its group ended.
const PIPE_DRAIN: Duration = Duration::from_millis(500);

pub use crate::error::AgentError;

/// Everything the agent reacts to.
#[derive(Debug)]
enum Event {
    Exited(Exit),
    Signal(SignalEvent),
    Rendezvous(RdzvEvent),
    /// The earliest deadline of the current phase passed.
    Timer,
    /// The health endpoint asks whether the loop answers.
    Ping(Ping),
    /// A worker's watchdog timer expired.
    Expired(crate::observe::watchdog::Expired),
    /// The stacks of a group that stopped writing (`--hang-timeout`).
    Hung(HangDumps),
    /// The stacks of workers that outlived a stop's grace period.
    Stubborn(Vec<RankDump>),
    /// The stack of a worker whose watchdog timer expired.
    ExpiredDumped(Box<ExpiryDump>),
    /// The processes the last attempt left behind are gone (how many were
    /// stopped): the next round may start.
    Swept(usize),
    /// `--node-check` ran before a round.
    NodeChecked(crate::node_check::Outcome),
}

/// A watchdog expiry awaiting its stack: the failure, the signal asked
/// for, the rank's log directory, the stack.
type ExpiryDump = (
    ProcessFailure,
    i32,
    Option<PathBuf>,
    Result<crate::observe::stacks::Stack, String>,
);

/// One rank's dump: (local rank, rank, pid, its log directory, the stack
/// or why there is none).
type RankDump = (
    u32,
    u32,
    i32,
    Option<PathBuf>,
    Result<crate::observe::stacks::Stack, String>,
);

/// Every rank's stack, taken because no rank wrote for `quiet` seconds.
#[derive(Debug)]
struct HangDumps {
    quiet: f64,
    dumps: Vec<RankDump>,
}

/// What a group being stopped leads to once every worker is gone.
#[derive(Debug)]
enum AfterStop {
    /// A worker failed: restart if the budget allows, else fail.
    Failed(Vec<ProcessFailure>),
    /// Nodes joined or left: re-form without using a restart.
    Regroup,
    /// The launcher was asked to stop.
    Signaled(i32),
    /// The group could not be started whole.
    Error(AgentError),
}

/// Where the agent is.
enum Phase {
    /// Waiting for the rendezvous task's next round.
    Joining,
    Running(Group),
    Stopping {
        group: Group,
        stop: Stopping,
        then: AfterStop,
    },
    /// Waiting for the rendezvous to finish (exit barrier, close), until
    /// `finish_by` at the latest.
    Finishing(RunResult),
    /// A value for the moment between two phases.
    Between,
}

type Done = Option<Result<RunResult, AgentError>>;

pub struct Agent<'a> {
    launch: Launch<'a>,
    trap: Trap,
    exits: mpsc::UnboundedReceiver<Exit>,
    rdzv: RendezvousTask,
    rdzv_events: mpsc::UnboundedReceiver<RdzvEvent>,
    /// How often to check membership while workers run (c10d across nodes).
    poll_interval: Option<Duration>,
    /// When the next membership check is due; none while one is in flight.
    next_check: Option<Instant>,
    phase: Phase,
    /// Failure-driven restarts so far (TORCHELASTIC_RESTART_COUNT).
    restart_count: u32,
    /// Detection order of failures.
    seq: u64,
    /// Whether any worker was ever started (then the final cleanup looks for
    /// what they left behind).
    started_any: bool,
    /// A shutdown signal already received (the next one skips the grace).
    stopping_signal: Option<i32>,
    /// The memory cgroup file with the kernel's OOM-kill counter.
    oom_counter: Option<PathBuf>,
    /// The last membership check could not reach the rendezvous store.
    rdzv_failing: bool,
    /// torch's agent events (`--event-log-handler`).
    events: EventLog,
    /// When the rendezvous task was last asked for a round.
    round_asked: std::time::Instant,
    /// The workers of the last group started, for the final events.
    last_workers: Vec<WorkerFacts>,
    /// `--events-file`: every lifecycle fact, one JSON line each.
    journal: Journal,
    /// What the health and metrics endpoints show.
    observed: SharedObserved,
    pings: mpsc::UnboundedReceiver<Ping>,
    /// torch's file watchdog, when asked for: the FIFO, the pids whose
    /// timers count, and the expiries.
    /// Held for its life: dropping it removes the FIFO.
    _watchdog: Option<crate::observe::watchdog::Watchdog>,
    watched: crate::observe::watchdog::Workers,
    /// When a worker last armed or released a watchdog timer.
    watchdog_beat: crate::logs::log_stream::Activity,
    expiries: mpsc::UnboundedReceiver<crate::observe::watchdog::Expired>,
    /// `--hang-timeout`: the next look at the workers' output, whether the
    /// current quiet spell was reported, whether stacks are being taken.
    hang_check: Option<Instant>,
    hang_reported: bool,
    hang_capturing: bool,
    hang_tx: mpsc::UnboundedSender<HangDumps>,
    hang_rx: mpsc::UnboundedReceiver<HangDumps>,
    /// `--on-hang=fail`: the group stops with no restart.
    no_more_restarts: bool,
    /// Rounds this agent completed (the events file's `round`).
    events_round: u64,
    /// Workers whose watchdog expiry's stack is being taken. One capture
    /// per worker: an expiry of another worker while one is taken is acted
    /// on too (the watchdog has already forgotten its timer).
    expiring: std::collections::BTreeSet<i32>,
    expiry_tx: mpsc::UnboundedSender<ExpiryDump>,
    expiry_rx: mpsc::UnboundedReceiver<ExpiryDump>,
    /// Stacks of workers that outlived a grace period: being taken, and
    /// their top frames by pid for the report.
    stubborn_capturing: bool,
    stuck: BTreeMap<i32, String>,
    stubborn_tx: mpsc::UnboundedSender<Vec<RankDump>>,
    stubborn_rx: mpsc::UnboundedReceiver<Vec<RankDump>>,
    swept_tx: mpsc::UnboundedSender<usize>,
    swept_rx: mpsc::UnboundedReceiver<usize>,
    /// How long finishing may take (exit barrier, close, and a margin for
    /// the store to answer), and when the current one must be over: a
    /// launcher whose job ended never waits longer, whatever the store does.
    finish_within: Duration,
    finish_by: Option<Instant>,
    /// `--restart-backoff`: when the next round may be joined.
    backoff_until: Option<Instant>,
    /// The next round is joined after this node's workers failed.
    after_failure: bool,
    /// `--node-check`: the check under way, its results, and how many
    /// failed on this node.
    node_check: Option<tokio::task::JoinHandle<()>>,
    node_check_tx: mpsc::UnboundedSender<crate::node_check::Outcome>,
    node_check_rx: mpsc::UnboundedReceiver<crate::node_check::Outcome>,
    node_check_failures: u32,
    /// Hosts the rendezvous has excluded, as last told (for the events
    /// file: each exclusion once).
    excluded_seen: std::collections::BTreeSet<String>,
    /// The job's root cause as the rendezvous shared it when this node
    /// finished after a failure.
    job_root_cause: Option<String>,
}

impl<'a> Agent<'a> {
    /// An agent for `config`, driving the rendezvous task `rdzv` whose
    /// results arrive on `rdzv_events`. Call inside the runtime, on the
    /// thread that will run [`Agent::run`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &'a LaunchConfig,
        supervisor: &'a Supervisor,
        program: PathBuf,
        args: Vec<std::ffi::OsString>,
        base_env: crate::config::worker_env::Env,
        log_dir: LogDir,
        rdzv: RendezvousTask,
        rdzv_events: mpsc::UnboundedReceiver<RdzvEvent>,
        trap: Trap,
        cpus: Vec<libc::cpu_set_t>,
        events: EventLog,
        journal: Journal,
        observed_pings: (SharedObserved, mpsc::UnboundedReceiver<Ping>),
    ) -> Self {
        let poll_interval = rdzv.poll_interval();
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let (hang_tx, hang_rx) = mpsc::unbounded_channel();
        let (observed, pings) = observed_pings;
        let (stubborn_tx, stubborn_rx) = mpsc::unbounded_channel();
        let (expiry_tx, expiry_rx) = mpsc::unbounded_channel();
        let (swept_tx, swept_rx) = mpsc::unbounded_channel();
        let (node_check_tx, node_check_rx) = mpsc::unbounded_channel();
        let mut base_env = base_env;
        if config.hang_timeout.is_some()
            && crate::process::find_program("py-spy").is_none()
            && !base_env.contains_key(std::ffi::OsStr::new("PYTHONFAULTHANDLER"))
        {
            // No py-spy: Python's faulthandler prints every thread's stack
            // when a hung group is stopped with SIGABRT (--on-hang).
            crate::config::worker_env::set(&mut base_env, "PYTHONFAULTHANDLER", "1");
        }
        let watched = crate::observe::watchdog::Workers::default();
        let (expired_tx, expiries) = mpsc::unbounded_channel();
        let watchdog_beat = crate::logs::log_stream::Activity::default();
        let watchdog = crate::observe::watchdog::wanted(&|k| {
            crate::config::worker_env::get(&base_env, k).map(str::to_string)
        })
        .and_then(|path| {
            match crate::observe::watchdog::start(
                &path,
                watched.clone(),
                expired_tx,
                watchdog_beat.clone(),
            ) {
                Ok(w) => {
                    crate::config::worker_env::set(
                        &mut base_env,
                        "TORCHELASTIC_TIMER_FILE",
                        path.as_os_str(),
                    );
                    tracing::info!("watchdog: reading timers at {}", path.display());
                    Some(w)
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot start the watchdog at {}: {e}; timers are off",
                        path.display()
                    );
                    None
                }
            }
        });
        {
            let mut o = observed.lock().unwrap_or_else(|p| p.into_inner());
            if watchdog.is_some() {
                o.watchdog_beat = Some(watchdog_beat.clone());
            }
            o.store = rdzv.store_stats();
        }
        Agent {
            launch: Launch {
                config,
                supervisor,
                exits: exits_tx,
                cpus,
                program,
                args,
                base_env,
                log_dir,
                hostname: crate::process::host::hostname(),
                // SAFETY: isatty only reads the descriptor's state.
                tail_stderr: unsafe { libc::isatty(2) } == 0,
                // Only where a status can show its last line (the metrics
                // port): a pipe and a reader per worker cost every launch.
                // SAFETY: isatty only reads the descriptor's kind.
                carry_stdout: config.metrics_port.is_some() && unsafe { libc::isatty(1) } == 0,
                watch_output: config.hang_timeout.is_some(),
            },
            trap,
            exits,
            rdzv,
            rdzv_events,
            poll_interval,
            next_check: None,
            phase: Phase::Joining,
            restart_count: 0,
            seq: 0,
            started_any: false,
            stopping_signal: None,
            oom_counter: crate::process::oom::counter_file(),
            rdzv_failing: false,
            events,
            round_asked: std::time::Instant::now(),
            last_workers: Vec::new(),
            journal,
            observed,
            pings,
            _watchdog: watchdog,
            watchdog_beat,
            watched,
            expiries,
            hang_check: None,
            hang_reported: false,
            hang_capturing: false,
            hang_tx,
            hang_rx,
            no_more_restarts: false,
            events_round: 0,
            expiring: std::collections::BTreeSet::new(),
            expiry_tx,
            expiry_rx,
            stubborn_capturing: false,
            stuck: BTreeMap::new(),
            stubborn_tx,
            stubborn_rx,
            swept_tx,
            swept_rx,
            finish_within: crate::config::rdzv_settings::RdzvSettings::from_config(config)
                .map_or(Duration::from_secs(330), |s| {
                    s.exit_barrier_timeout + s.close_timeout
                })
                + FINISH_MARGIN,
            finish_by: None,
            backoff_until: None,
            after_failure: false,
            node_check: None,
            node_check_tx,
            node_check_rx,
            node_check_failures: 0,
            excluded_seen: Default::default(),
            job_root_cause: None,
        }
    }

    /// Runs worker groups until success, exhausted restarts, or a signal.
    pub async fn run(&mut self) -> Result<RunResult, AgentError> {
        let c = self.launch.config;
        self.journal.record(
            "launcher_started",
            &[
                ("pid", V::U(u64::from(std::process::id()))),
                ("nproc_per_node", V::U(c.nproc_per_node.into())),
                ("min_nodes", V::U(c.min_nodes.into())),
                ("max_nodes", V::U(c.max_nodes.into())),
                ("rdzv_backend", V::S(c.rdzv_backend.clone())),
                ("max_restarts", V::U(c.max_restarts.into())),
            ],
        );
        self.join_next();
        let result = loop {
            let ev = self.next_event().await;
            if let Some(done) = self.handle(ev) {
                break done;
            }
        };
        let restarts = self.restart_count;
        match &result {
            Ok(RunResult::Succeeded) => self.events.finished(&self.last_workers, &[], restarts),
            Ok(RunResult::Failed { failures }) => {
                self.events.finished(&self.last_workers, failures, restarts)
            }
            Ok(RunResult::Signaled { signal }) => self.events.agent_failed(
                &format!(
                    "SignalException: Process {} got signal: {signal}",
                    std::process::id()
                ),
                restarts,
            ),
            Err(e) => self.events.agent_failed(&e.to_string(), restarts),
        }
        let (outcome, detail) = match &result {
            Ok(RunResult::Succeeded) => ("succeeded", V::Null),
            Ok(RunResult::Failed { failures }) => (
                "failed",
                crate::logs::failure::root_cause(failures)
                    .map_or(V::Null, |i| V::U(failures[i].global_rank.into())),
            ),
            Ok(RunResult::Signaled { signal }) => ("signaled", V::I((*signal).into())),
            Err(e) => ("error", V::S(e.to_string())),
        };
        self.journal.record(
            "job_finished",
            &[
                ("result", V::S(outcome.to_string())),
                ("detail", detail),
                ("restarts", V::U(restarts.into())),
                // The same line on every node (the first failure the
                // rendezvous's store took), where the job shares one.
                (
                    "job_root_cause",
                    self.job_root_cause.clone().map_or(V::Null, V::S),
                ),
            ],
        );
        self.phase = Phase::Between;
        self.observe(|o| o.phase = "done");
        self.cleanup().await;
        if let Ok(RunResult::Signaled { .. }) = result {
            // The workers are stopped: let the other nodes go on without us.
            self.rdzv.leave();
        }
        result
    }

    /// Lets the rendezvous task finish what it was asked last, then stops
    /// the stores this node hosts.
    pub async fn shutdown(self) {
        self.rdzv.shutdown().await;
    }

    async fn next_event(&mut self) -> Event {
        let timer = match &self.phase {
            Phase::Running(_) => match (self.next_check, self.hang_check) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            Phase::Stopping { stop, .. } => Some(stop.deadline()),
            Phase::Finishing(_) => self.finish_by,
            Phase::Joining => self.backoff_until,
            _ => None,
        };
        tokio::select! {
            biased;
            Some(s) = self.trap.recv() => Event::Signal(s),
            Some(e) = self.exits.recv() => Event::Exited(e),
            Some(r) = self.rdzv_events.recv() => Event::Rendezvous(r),
            Some(p) = self.pings.recv() => Event::Ping(p),
            Some(e) = self.expiries.recv() => Event::Expired(e),
            Some(h) = self.hang_rx.recv() => Event::Hung(h),
            Some(d) = self.stubborn_rx.recv() => Event::Stubborn(d),
            Some(d) = self.expiry_rx.recv() => Event::ExpiredDumped(Box::new(d)),
            Some(n) = self.swept_rx.recv() => Event::Swept(n),
            Some(c) = self.node_check_rx.recv() => Event::NodeChecked(c),
            _ = sleep_until(timer) => Event::Timer,
        }
    }

    fn handle(&mut self, ev: Event) -> Done {
        match ev {
            Event::Signal(s) => self.on_signal(s),
            Event::Exited(e) => self.on_exit(e),
            Event::Rendezvous(r) => self.on_rendezvous(r),
            Event::Timer => self.on_timer(),
            Event::Ping(p) => {
                let _ = p.send(());
                None
            }
            Event::Expired(e) => self.on_expired(e),
            Event::Hung(h) => self.on_hung(h),
            Event::Stubborn(d) => self.on_stubborn(d),
            Event::ExpiredDumped(d) => self.on_expired_dumped(*d),
            Event::NodeChecked(c) => self.on_node_checked(c),
            Event::Swept(n) => {
                if matches!(self.phase, Phase::Joining) {
                    if n > 0 {
                        tracing::warn!(
                            "stopped {n} process(es) the last attempt's workers left behind (daemons outside their process groups)"
                        );
                        self.journal
                            .record("leftovers_stopped", &[("count", V::U(n as u64))]);
                    }
                    self.join_next();
                }
                None
            }
        }
    }

    fn on_signal(&mut self, s: SignalEvent) -> Done {
        let (sig, action) = match s {
            SignalEvent::Forward(sig) => (sig, "forward"),
            SignalEvent::Shutdown(sig) if self.stopping_signal.is_some() => (sig, "kill_now"),
            SignalEvent::Shutdown(sig) => (sig, "shutdown"),
        };
        self.journal.record(
            "signal_received",
            &[
                ("signal", V::S(signal_name(sig).unwrap_or("?").to_string())),
                ("action", V::S(action.to_string())),
            ],
        );
        match (s, &mut self.phase) {
            (SignalEvent::Forward(sig), Phase::Running(group))
            | (SignalEvent::Forward(sig), Phase::Stopping { group, .. }) => {
                tracing::warn!(
                    "forwarding {} to the workers",
                    signal_name(sig).unwrap_or("signal")
                );
                group.signal_alive(sig);
                None
            }
            // No workers to forward it to.
            (SignalEvent::Forward(_), _) => None,
            (SignalEvent::Shutdown(sig), Phase::Running(_)) => {
                tracing::warn!("Received {sig} death signal, shutting down workers");
                self.stopping_signal = Some(sig);
                let Phase::Running(group) = self.take_phase() else {
                    unreachable!("matched above")
                };
                let grace = self.launch.config.shutdown_timeout;
                self.begin_stop(group, sig, grace, AfterStop::Signaled(sig))
            }
            (SignalEvent::Shutdown(sig), Phase::Stopping { group, stop, then }) => {
                if self.stopping_signal.is_some() {
                    stop.escalate(group);
                } else {
                    self.stopping_signal = Some(sig);
                    group.signal_alive(sig);
                    if !matches!(then, AfterStop::Error(_)) {
                        *then = AfterStop::Signaled(sig);
                    }
                }
                None
            }
            (SignalEvent::Shutdown(sig), Phase::Finishing(_)) => {
                tracing::warn!(
                    "Received {sig} death signal while waiting for the other nodes; not waiting any longer"
                );
                let Phase::Finishing(result) = self.take_phase() else {
                    unreachable!("matched above")
                };
                Some(Ok(result))
            }
            (SignalEvent::Shutdown(sig), _) => Some(Ok(RunResult::Signaled { signal: sig })),
        }
    }

    fn on_exit(&mut self, exit: Exit) -> Done {
        let who = match &self.phase {
            Phase::Running(g) | Phase::Stopping { group: g, .. } => {
                g.alive().find(|w| w.pid == exit.pid).map(|w| w.ranks)
            }
            _ => None,
        };
        if let Some(r) = who {
            let reason = match (&self.phase, exit.status.success()) {
                (Phase::Stopping { .. }, _) => "stopped",
                (_, true) => "succeeded",
                _ => "failed",
            };
            let (code, sig) = match exit.status {
                ExitStatus::Code(c) => (V::I(c.into()), V::Null),
                ExitStatus::Signal(n) => (V::Null, V::S(signal_name(n).unwrap_or("?").to_string())),
            };
            self.journal.record(
                "worker_exited",
                &[
                    ("local_rank", V::U(r.local_rank.into())),
                    ("rank", V::U(r.global_rank.into())),
                    ("pid", V::I(exit.pid.into())),
                    ("exit_code", code),
                    ("signal", sig),
                    ("reason", V::S(reason.to_string())),
                    ("attempt", V::U(self.restart_count.into())),
                ],
            );
            self.observe(|o| {
                if let Some(w) = o.workers.iter_mut().find(|w| w.pid == exit.pid) {
                    w.state = reason;
                    match exit.status {
                        ExitStatus::Code(c) => w.exit_code = Some(c),
                        ExitStatus::Signal(n) => w.signal = Some(n),
                    }
                }
                *o.exits_by_reason.entry(reason).or_default() += 1;
            });
        }
        match &mut self.phase {
            Phase::Running(group) => {
                let Some(f) = record_exit(group, exit, &mut self.seq, self.oom_counter.as_deref())
                else {
                    if !group.all_exited() {
                        return None;
                    }
                    let Phase::Running(mut group) = self.take_phase() else {
                        unreachable!("matched above")
                    };
                    group.release(std::time::Instant::now() + PIPE_DRAIN);
                    self.rdzv.finish(true, None);
                    // The exit barrier (multi-node): this node waits for the
                    // others before closing the rendezvous.
                    if self.events.group_world_size.unwrap_or(1) > 1 {
                        self.journal.record("exit_barrier", &[]);
                    }
                    self.observe(|o| o.phase = "finishing");
                    self.enter_finishing(RunResult::Succeeded);
                    return None;
                };
                tracing::error!(
                    "failed (exitcode: {}) local_rank: {} (pid: {}) of binary: {}",
                    f.exitcode(),
                    f.local_rank,
                    f.pid,
                    self.launch.program.display()
                );
                // Stop the siblings; their exits are recorded too.
                self.fail_running(vec![f], libc::SIGTERM)
            }
            Phase::Stopping { group, .. } => {
                group.mark_exited(exit);
                if group.all_exited() {
                    return self.end_stop();
                }
                None
            }
            // An orphaned descendant reaped as subreaper.
            _ => None,
        }
    }

    /// A watchdog timer expired: the worker it belongs to has failed. Its
    /// process group gets the signal the timer asked for, the rest of the
    /// group is stopped, and the restart policy applies.
    fn on_expired(&mut self, e: crate::observe::watchdog::Expired) -> Done {
        let Phase::Running(group) = &self.phase else {
            return None;
        };
        let is_worker = |pid: i32| group.alive().any(|w| w.pid == pid);
        // The timer's pid, or the worker it descends from.
        let mut p = e.pid;
        while !is_worker(p) {
            let parent = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(1).map(str::to_string))
                })
                .and_then(|s| s.parse::<i32>().ok());
            match parent {
                Some(pp) if pp > 1 => p = pp,
                _ => return None,
            }
        }
        let w = group.alive().find(|w| w.pid == p)?;
        self.seq += 1;
        let mut f = w.failure(ExitStatus::Signal(e.signal), self.seq);
        f.watchdog_scope = Some(e.scope.clone());
        tracing::error!(
            "watchdog timer '{}' of local_rank {} (pid {}) expired; stopping it with {}",
            e.scope,
            w.ranks.local_rank,
            w.pid,
            signal_name(e.signal).unwrap_or("its signal")
        );
        self.journal.record(
            "watchdog_expired",
            &[
                ("local_rank", V::U(w.ranks.local_rank.into())),
                ("rank", V::U(w.ranks.global_rank.into())),
                ("pid", V::I(e.pid.into())),
                ("scope", V::S(e.scope.clone())),
                (
                    "signal",
                    V::S(signal_name(e.signal).unwrap_or("?").to_string()),
                ),
            ],
        );
        // Its stack first (py-spy), then the signal: `on_expired_dumped`.
        if !self.expiring.insert(w.pid) {
            return None;
        }
        let (pid, dir, tx) = (w.pid, w.rank_dir(), self.expiry_tx.clone());
        tokio::spawn(async move {
            let stack = crate::observe::stacks::capture(pid).await;
            let _ = tx.send((f, e.signal, dir, stack));
        });
        None
    }

    /// The stack of a worker whose watchdog timer expired: kept beside its
    /// logs, then its group gets the requested signal and the group fails.
    fn on_expired_dumped(&mut self, d: ExpiryDump) -> Done {
        let (mut f, signal, dir, stack) = d;
        self.expiring.remove(&f.pid);
        let Phase::Running(group) = &self.phase else {
            return None;
        };
        if !group.alive().any(|w| w.pid == f.pid) {
            return None;
        }
        if let (Ok(s), Some(dir)) = (&stack, dir) {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let path = dir.join(format!("stack-{stamp}.txt"));
            if crate::logs::log_dir::create_file(&path)
                .and_then(|mut file| std::io::Write::write_all(&mut file, s.text.as_bytes()))
                .is_ok()
            {
                tracing::warn!(
                    "local_rank {} was in {} when its watchdog timer expired; stack: {}",
                    f.local_rank,
                    s.top.as_deref().unwrap_or("an unknown frame"),
                    path.display()
                );
            }
        }
        if let Ok(s) = &stack {
            f.stuck_in = s.top.clone();
        }
        crate::process::signal_group(f.pid, signal);
        self.fail_running(vec![f], libc::SIGTERM)
    }

    /// The running group failed (`failures`, the root cause first): stop
    /// every worker with `sig`, then the restart policy decides.
    fn fail_running(&mut self, failures: Vec<ProcessFailure>, sig: i32) -> Done {
        let Phase::Running(group) = self.take_phase() else {
            unreachable!("called while running")
        };
        // torch hard-codes 30 s here whatever `--shutdown-timeout` says
        // (pytorch PR #192815 is open for it); the flag bounds every stop.
        let grace = self.launch.config.shutdown_timeout;
        self.begin_stop(group, sig, grace, AfterStop::Failed(failures))
    }

    fn on_rendezvous(&mut self, r: RdzvEvent) -> Done {
        match (r, &self.phase) {
            (RdzvEvent::Round(Ok(a)), Phase::Joining) => {
                self.events_round += 1;
                // The job's count where the rendezvous keeps it: the same
                // on every node of the round, whatever each saw.
                if let Some(r) = a.restarts {
                    self.restart_count = r;
                }
                self.note_node_failures(&a.node_failures);
                if let Some((restarts, excluded)) = a.state_lost {
                    // Said in one line by the rendezvous; recorded here.
                    self.journal.record(
                        "rendezvous_state_lost",
                        &[
                            ("restarts_carried", V::U(restarts.into())),
                            ("excluded_carried", V::U(excluded as u64)),
                        ],
                    );
                }
                // Ranks are assigned within the round here: its time is the
                // rendezvous's, the assignment's is not told apart.
                let took = self.round_asked.elapsed().as_secs_f64() * 1000.0;
                self.events.round(
                    took,
                    0.0,
                    self.restart_count,
                    a.group_rank,
                    a.group_world_size,
                );
                self.journal.record(
                    "rendezvous_completed",
                    &[
                        ("group_rank", V::U(a.group_rank.into())),
                        ("group_world_size", V::U(a.group_world_size.into())),
                        ("world_size", V::U(a.world_size.into())),
                        ("master_addr", V::S(a.master_addr.clone())),
                        ("master_port", V::U(a.master_port.into())),
                        ("duration_ms", V::F((took * 1000.0).round() / 1000.0)),
                        ("attempt", V::U(self.restart_count.into())),
                        ("round", V::U(self.events_round)),
                    ],
                );
                self.observe(|o| {
                    o.rounds += 1;
                    o.round_seconds = took / 1000.0;
                    o.group_rank = Some(a.group_rank);
                    o.group_world_size = Some(a.group_world_size);
                    o.world_size = Some(a.world_size);
                });
                let oom_now = self
                    .oom_counter
                    .as_deref()
                    .and_then(crate::process::oom::parse_oom_kills);
                let mut group = Group::new(oom_now);
                let started = self.launch.start_group(&a, self.restart_count, &mut group);
                self.started_any |= !group.workers.is_empty();
                match started {
                    Ok(()) => {
                        self.last_workers = group
                            .workers
                            .iter()
                            .map(|w| WorkerFacts {
                                ranks: w.ranks,
                                pid: w.pid,
                            })
                            .collect();
                        self.events.started(&self.last_workers, self.restart_count);
                        let statuses: Vec<WorkerStatus> = group
                            .workers
                            .iter()
                            .map(|w| WorkerStatus {
                                local_rank: w.ranks.local_rank,
                                rank: w.ranks.global_rank,
                                pid: w.pid,
                                state: "running",
                                exit_code: None,
                                signal: None,
                                output: w.output(),
                            })
                            .collect();
                        *self.watched.lock().unwrap_or_else(|p| p.into_inner()) =
                            group.workers.iter().map(|w| w.pid).collect();
                        self.hang_check = self
                            .launch
                            .config
                            .hang_timeout
                            .map(|_| Instant::now() + Duration::from_secs(1));
                        self.hang_reported = false;
                        let attempt = self.restart_count;
                        self.observe(|o| {
                            o.workers = statuses;
                            o.phase = "running";
                            o.attempt = attempt;
                        });
                        for w in &self.last_workers {
                            self.journal.record(
                                "worker_started",
                                &[
                                    ("local_rank", V::U(w.ranks.local_rank.into())),
                                    ("rank", V::U(w.ranks.global_rank.into())),
                                    ("pid", V::I(w.pid.into())),
                                    ("attempt", V::U(self.restart_count.into())),
                                ],
                            );
                        }
                        // The first membership check at once, as a fresh
                        // round may already be outdated.
                        self.next_check = self.poll_interval.map(|_| Instant::now());
                        self.phase = Phase::Running(group);
                        None
                    }
                    Err(e) => {
                        // Stop the workers already started (a process limit
                        // reached halfway, say) before reporting.
                        let stop = Stopping::kill(&group);
                        self.enter_stopping(group, stop, AfterStop::Error(e))
                    }
                }
            }
            (RdzvEvent::Round(Err(RendezvousError::GracefulExit)), Phase::Joining) => {
                tracing::warn!(
                    "[{}] the job ended while this node waited as a spare; exiting",
                    self.launch.config.role
                );
                Some(Ok(RunResult::Succeeded))
            }
            (RdzvEvent::Round(Err(e)), Phase::Joining) => {
                self.note_rendezvous_error(&e);
                Some(Err(e.into()))
            }
            (RdzvEvent::CheckCounted(c), Phase::Joining) => self.on_check_counted(c),
            (RdzvEvent::Membership(changed, evicted), Phase::Running(_)) => {
                for node in evicted {
                    self.journal.record("node_evicted", &[("node", V::S(node))]);
                }
                self.next_check = self.poll_interval.map(|p| Instant::now() + p);
                self.on_membership(changed)
            }
            (RdzvEvent::Membership(_, evicted), _) => {
                for node in evicted {
                    self.journal.record("node_evicted", &[("node", V::S(node))]);
                }
                None
            }
            (RdzvEvent::HangShared(Some(reports)), _) => {
                let tops: Vec<(u32, Option<String>)> = reports
                    .iter()
                    .flat_map(|r| r.lines())
                    .filter_map(|l| {
                        let (rank, top) = l.split_once('\t')?;
                        Some((
                            rank.parse().ok()?,
                            (!top.is_empty()).then(|| top.to_string()),
                        ))
                    })
                    .collect();
                let nodes = reports.len();
                let mut out = format!(
                    "torchrun-rs: across the {nodes} node(s) that reported, where each rank is:\n"
                );
                for l in crate::observe::stacks::group_report(&tops) {
                    out.push_str(&format!("  {l}\n"));
                }
                eprint!("{out}");
                None
            }
            (RdzvEvent::Finished(job), Phase::Finishing(_)) => {
                self.job_root_cause = job;
                let Phase::Finishing(result) = self.take_phase() else {
                    unreachable!("matched above")
                };
                Some(Ok(result))
            }
            _ => None,
        }
    }

    fn on_membership(&mut self, changed: Result<bool, RendezvousError>) -> Done {
        match changed {
            Ok(false) => {
                if std::mem::take(&mut self.rdzv_failing) {
                    tracing::warn!("the rendezvous store answers again");
                }
                None
            }
            Ok(true) => {
                let Phase::Running(group) = self.take_phase() else {
                    unreachable!("called while running")
                };
                let grace = self.launch.config.shutdown_timeout;
                self.begin_stop(group, libc::SIGTERM, grace, AfterStop::Regroup)
            }
            Err(e) => {
                // Said once, not at every check; the workers keep running.
                if !std::mem::replace(&mut self.rdzv_failing, true) {
                    tracing::warn!("cannot reach the rendezvous store ({e}); the workers keep running, membership changes are not seen until it answers");
                }
                None
            }
        }
    }

    fn on_timer(&mut self) -> Done {
        let now = Instant::now();
        match &mut self.phase {
            Phase::Joining if self.backoff_until.is_some_and(|t| t <= now) => {
                self.backoff_until = None;
                self.sweep_then_join();
                None
            }
            Phase::Finishing(_) if self.finish_by.is_some_and(|t| t <= now) => {
                tracing::warn!(
                    "the rendezvous did not finish (exit barrier, close) within {:?}; exiting without it",
                    self.finish_within
                );
                let Phase::Finishing(result) = self.take_phase() else {
                    unreachable!("matched above")
                };
                Some(Ok(result))
            }
            Phase::Running(_) => {
                if self.next_check.is_some_and(|t| t <= now) {
                    self.next_check = None;
                    self.rdzv.check_membership();
                }
                if self.hang_check.is_some_and(|t| t <= now) {
                    self.hang_check = Some(now + Duration::from_secs(1));
                    self.look_for_a_hang();
                }
                None
            }
            Phase::Stopping { group, stop, .. } if stop.deadline() <= now => {
                if !stop.killed() && !self.stubborn_capturing {
                    // Before the SIGKILL: where are the ones that would not
                    // stop? (py-spy answers within 10 s or is stopped.)
                    self.stubborn_capturing = true;
                    stop.postpone(Duration::from_secs(12));
                    let ranks: Vec<(u32, u32, i32, Option<PathBuf>)> = group
                        .alive()
                        .map(|w| (w.ranks.local_rank, w.ranks.global_rank, w.pid, w.rank_dir()))
                        .collect();
                    let tx = self.stubborn_tx.clone();
                    tokio::spawn(async move {
                        let mut dumps = Vec::new();
                        for (l, r, pid, dir) in ranks {
                            dumps.push((
                                l,
                                r,
                                pid,
                                dir,
                                crate::observe::stacks::capture(pid).await,
                            ));
                        }
                        let _ = tx.send(dumps);
                    });
                    return None;
                }
                match stop.on_deadline(group) {
                    Expired::Killed => None,
                    Expired::GaveUp => self.end_stop(),
                }
            }
            _ => None,
        }
    }

    /// `--hang-timeout`: when no running worker has written for that long,
    /// takes every rank's stack (off the loop); `on_hung` reports.
    fn look_for_a_hang(&mut self) {
        let (Some(timeout), Phase::Running(group)) = (self.launch.config.hang_timeout, &self.phase)
        else {
            return;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Output, or a watchdog timer armed, counts as life.
        let last = group
            .alive()
            .map(|w| w.activity.load(std::sync::atomic::Ordering::Relaxed))
            .chain(std::iter::once(
                self.watchdog_beat
                    .load(std::sync::atomic::Ordering::Relaxed),
            ))
            .max()
            .unwrap_or(now_ms);
        let mut quiet = now_ms.saturating_sub(last) as f64 / 1000.0;
        if quiet >= timeout.as_secs_f64() {
            // Output redirected with `-r` goes straight into its file, past
            // the launcher: the files' modification times are its activity.
            // Looked at only when the pipes are quiet, so it costs nothing
            // while a job talks.
            let written = group
                .alive()
                .filter_map(|w| w.rank_dir())
                .flat_map(|d| [d.join("stdout.log"), d.join("stderr.log")])
                .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
                .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .max()
                .unwrap_or(0);
            quiet = now_ms.saturating_sub(last.max(written)) as f64 / 1000.0;
        }
        if quiet < timeout.as_secs_f64() {
            self.hang_reported = false;
            return;
        }
        if self.hang_reported || self.hang_capturing {
            return;
        }
        self.hang_capturing = true;
        let ranks: Vec<(u32, u32, i32, Option<PathBuf>)> = group
            .alive()
            .map(|w| (w.ranks.local_rank, w.ranks.global_rank, w.pid, w.rank_dir()))
            .collect();
        let tx = self.hang_tx.clone();
        tokio::spawn(async move {
            let mut dumps = Vec::new();
            let takes: Vec<_> = ranks
                .into_iter()
                .map(|(l, r, pid, dir)| {
                    tokio::spawn(async move {
                        (l, r, pid, dir, crate::observe::stacks::capture(pid).await)
                    })
                })
                .collect();
            for t in takes {
                if let Ok(d) = t.await {
                    dumps.push(d);
                }
            }
            let _ = tx.send(HangDumps { quiet, dumps });
        });
    }

    /// The stacks of a hung group: written beside each rank's logs, one
    /// grouped report, then `--on-hang`.
    fn on_hung(&mut self, h: HangDumps) -> Done {
        self.hang_capturing = false;
        if !matches!(self.phase, Phase::Running(_)) {
            return None;
        }
        self.hang_reported = true;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut files = Vec::new();
        let mut tops = Vec::new();
        for (_, rank, _, dir, stack) in &h.dumps {
            let (text, top) = match stack {
                Ok(s) => (s.text.clone(), s.top.clone()),
                Err(e) => (format!("no stack: {e}\n"), Some(format!("<no stack: {e}>"))),
            };
            tops.push((*rank, top));
            if let Some(d) = dir {
                let path = d.join(format!("stack-{stamp}.txt"));
                if crate::logs::log_dir::create_file(&path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
                    .is_ok()
                {
                    files.push(path);
                }
            }
        }
        let lines = crate::observe::stacks::group_report(&tops);
        let mut report = format!(
            "torchrun-rs: no worker wrote any output for {:.1} s (--hang-timeout); where each rank is:\n",
            h.quiet
        );
        for l in &lines {
            report.push_str(&format!("  {l}\n"));
        }
        if let Some(dir) = files
            .first()
            .and_then(|f| f.parent())
            .and_then(|d| d.parent())
        {
            report.push_str(&format!(
                "Stacks: {}/<local rank>/stack-{stamp}.txt\n",
                dir.display()
            ));
        }
        eprint!("{report}");
        // Across nodes: group rank 0 prints every node's ranks together.
        let mine: Vec<String> = tops
            .iter()
            .map(|(r, t)| format!("{r}\t{}", t.clone().unwrap_or_default()))
            .collect();
        self.rdzv.share_hang(mine.join("\n"));
        self.journal.record(
            "hang_detected",
            &[
                ("quiet_s", V::F(h.quiet)),
                ("ranks", V::S(lines.join("; "))),
                (
                    "action",
                    V::S(format!("{:?}", self.launch.config.on_hang).to_lowercase()),
                ),
            ],
        );
        let on_hang = self.launch.config.on_hang;
        if on_hang == crate::config::OnHang::Report {
            return None;
        }
        // Failures for every rank, so ordered that the root cause is where
        // the job is stuck: ranks outside torch.distributed (the others wait
        // for them in a collective) first, then the odd ones out (smallest
        // groups of the same frame).
        let Phase::Running(group) = self.take_phase() else {
            unreachable!("checked above")
        };
        let mut order: Vec<(bool, usize, u32)> = Vec::new();
        for (_, rank, _, _, stack) in &h.dumps {
            let top = stack.as_ref().ok().and_then(|s| s.top.clone());
            let waiting = top
                .as_deref()
                .is_some_and(|t| t.contains("torch/distributed/"));
            let same = h
                .dumps
                .iter()
                .filter(|d| d.4.as_ref().ok().and_then(|s| s.top.clone()) == top)
                .count();
            order.push((waiting, same, *rank));
        }
        order.sort_unstable();
        let mut failures = Vec::new();
        for (_, _, rank) in order {
            let Some(w) = group.workers.iter().find(|w| w.ranks.global_rank == rank) else {
                continue;
            };
            let top = h
                .dumps
                .iter()
                .find(|d| d.1 == rank)
                .and_then(|d| d.4.as_ref().ok().and_then(|s| s.top.clone()))
                .unwrap_or_else(|| "an unknown frame".to_string());
            self.seq += 1;
            let mut f = w.failure(ExitStatus::Signal(libc::SIGTERM), self.seq);
            f.hang = Some(format!("no output for {:.0} s, in {top}", h.quiet));
            failures.push(f);
        }
        self.no_more_restarts = on_hang == crate::config::OnHang::Fail;
        // Without py-spy, SIGABRT makes faulthandler print the stacks to the
        // workers' stderr (kept in the logs and the report's tail).
        let no_stacks = h.dumps.iter().all(|d| d.4.is_err());
        let stop_signal = if no_stacks {
            libc::SIGABRT
        } else {
            libc::SIGTERM
        };
        self.phase = Phase::Running(group);
        self.fail_running(failures, stop_signal)
    }

    /// The stacks of the workers that ignored the stop signal: said, kept
    /// for the report, then the SIGKILL.
    fn on_stubborn(&mut self, dumps: Vec<RankDump>) -> Done {
        let Phase::Stopping { group, stop, .. } = &mut self.phase else {
            return None;
        };
        if stop.killed() {
            return None;
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (local_rank, _, pid, dir, stack) in dumps {
            if !group.alive().any(|w| w.pid == pid) {
                continue;
            }
            let (text, top) = match stack {
                Ok(s) => (s.text, s.top.unwrap_or_else(|| "an unknown frame".into())),
                Err(e) => (format!("no stack: {e}\n"), format!("<no stack: {e}>")),
            };
            let mut at = String::new();
            if let Some(d) = dir {
                let path = d.join(format!("stack-{stamp}.txt"));
                if crate::logs::log_dir::create_file(&path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
                    .is_ok()
                {
                    at = format!("; stack: {}", path.display());
                }
            }
            tracing::warn!(
                "local_rank {local_rank} (pid {pid}) ignored the stop signal for the whole grace period; it is in {top}{at}"
            );
            self.stuck.insert(pid, top);
        }
        match stop.on_deadline(group) {
            Expired::Killed => None,
            Expired::GaveUp => self.end_stop(),
        }
    }

    fn take_phase(&mut self) -> Phase {
        std::mem::replace(&mut self.phase, Phase::Between)
    }

    fn begin_stop(&mut self, group: Group, sig: i32, grace: Duration, then: AfterStop) -> Done {
        let cause = match &then {
            AfterStop::Failed(_) => "worker_failed",
            AfterStop::Regroup => "membership_changed",
            AfterStop::Signaled(_) => "signal",
            AfterStop::Error(_) => "start_failed",
        };
        self.journal.record(
            "group_stopping",
            &[
                ("cause", V::S(cause.to_string())),
                ("signal", V::S(signal_name(sig).unwrap_or("?").to_string())),
                ("grace_s", V::F(grace.as_secs_f64())),
            ],
        );
        self.observe(|o| o.phase = "stopping");
        let stop = Stopping::begin(&group, sig, grace);
        self.enter_stopping(group, stop, then)
    }

    fn enter_stopping(&mut self, group: Group, stop: Stopping, then: AfterStop) -> Done {
        self.stubborn_capturing = false;
        let done = group.all_exited();
        self.phase = Phase::Stopping { group, stop, then };
        if done {
            return self.end_stop();
        }
        None
    }

    /// Every worker of the stopping group is gone: release it and go on.
    fn end_stop(&mut self) -> Done {
        let Phase::Stopping {
            mut group,
            then,
            stop,
        } = self.take_phase()
        else {
            unreachable!("called while stopping")
        };
        // How much of the recovery the stop took (workers blocked in a
        // collective whose peer died are what makes it long).
        let took = stop.took().as_secs_f64();
        tracing::info!(
            "[{}] the worker group stopped in {took:.3} s",
            self.launch.config.role
        );
        self.journal.record(
            "group_stopped",
            &[("took_s", V::F((took * 1000.0).round() / 1000.0))],
        );
        self.watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        group.release(std::time::Instant::now() + PIPE_DRAIN);
        match then {
            AfterStop::Failed(mut failures) => {
                // The failures seen while the group ran come first; the
                // siblings this launcher stopped are added after them.
                let own = failures.len();
                self.collect_terminated(&group, &mut failures);
                for f in &mut failures {
                    if let Some(top) = self.stuck.remove(&f.pid) {
                        f.stuck_in = Some(top);
                    }
                }
                self.stuck.clear();
                let max = self.launch.config.max_restarts;
                // Only a worker's own failure can be fatal: a sibling
                // stopped by the launcher exits with whatever its handler
                // of the stop signal chose (Lightning exits 1 on SIGTERM).
                let fatal = failures[..own]
                    .iter()
                    .find(|f| self.launch.config.fatal_exit_codes.contains(&f.exitcode()));
                if let Some(f) = fatal {
                    tracing::error!(
                        "local_rank {} exited with {}, one of --fatal-exit-codes: the job ends without a restart",
                        f.local_rank,
                        f.exitcode()
                    );
                }
                // The job's count may exceed this node's budget (another
                // node, started with a larger --max-restarts, restarted the
                // job): then none is left here.
                let remaining = if self.no_more_restarts || fatal.is_some() {
                    0
                } else {
                    max.saturating_sub(self.restart_count)
                };
                if remaining > 0 {
                    self.observe(|o| *o.restarts_by_cause.entry("worker_failed").or_default() += 1);
                    self.journal.record(
                        "restart",
                        &[
                            ("cause", V::S("worker_failed".to_string())),
                            ("restarts_left", V::U((remaining - 1).into())),
                            ("attempt", V::U((self.restart_count + 1).into())),
                        ],
                    );
                    tracing::info!(
                        "[{}] Worker group FAILED. {remaining}/{max} attempts left; will restart worker group",
                        self.launch.config.role
                    );
                    self.restart_count += 1;
                    self.after_failure = true;
                    let wait =
                        restart_backoff(self.launch.config.restart_backoff, self.restart_count - 1);
                    if wait.is_zero() {
                        self.sweep_then_join();
                    } else {
                        tracing::warn!(
                            "[{}] waiting {:.1} s before the restart (--restart-backoff)",
                            self.launch.config.role,
                            wait.as_secs_f64()
                        );
                        self.journal.record(
                            "restart_backoff",
                            &[(
                                "wait_s",
                                V::F((wait.as_secs_f64() * 1000.0).round() / 1000.0),
                            )],
                        );
                        self.observe(|o| o.phase = "backoff");
                        self.phase = Phase::Joining;
                        self.backoff_until = Some(Instant::now() + wait);
                    }
                } else {
                    let line = crate::logs::failure::root_cause(&failures).map(|i| {
                        let f = &failures[i];
                        crate::rendezvous::dynamic::failure_line(
                            f.timestamp,
                            f.seq,
                            &crate::logs::failure::job_line(f, &self.node_name()),
                        )
                    });
                    self.rdzv.finish(false, line);
                    self.observe(|o| o.phase = "finishing");
                    self.enter_finishing(RunResult::Failed { failures });
                }
                None
            }
            AfterStop::Regroup => {
                self.observe(|o| {
                    *o.restarts_by_cause.entry("membership_changed").or_default() += 1
                });
                self.journal.record(
                    "regroup",
                    &[("cause", V::S("membership_changed".to_string()))],
                );
                self.sweep_then_join();
                None
            }
            AfterStop::Signaled(sig) => Some(Ok(RunResult::Signaled { signal: sig })),
            AfterStop::Error(e) => Some(Err(e)),
        }
    }

    /// The job ended here: the rendezvous finishes (exit barrier, close)
    /// within `finish_within`.
    fn enter_finishing(&mut self, result: RunResult) {
        self.finish_by = Some(Instant::now() + self.finish_within);
        self.phase = Phase::Finishing(result);
    }

    /// Updates what the health and metrics endpoints show.
    fn observe(&self, f: impl FnOnce(&mut Observed)) {
        f(&mut self.observed.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Before the next attempt: what the last one left behind (a daemon
    /// that left its worker's process group holds ports, GPU memory) is
    /// stopped off the loop, then the next round is joined (`Swept`).
    fn sweep_then_join(&mut self) {
        self.observe(|o| o.phase = "rendezvous");
        self.phase = Phase::Joining;
        let supervisor = self.launch.supervisor.clone();
        let tx = self.swept_tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(supervisor.sweep_attempt());
        });
    }

    /// Joins the next round, after `--node-check` passes where one is set.
    fn join_next(&mut self) {
        let Some(cmd) = self.launch.config.node_check.clone() else {
            return self.join_round();
        };
        self.observe(|o| o.phase = "node_check");
        self.phase = Phase::Joining;
        let tx = self.node_check_tx.clone();
        // Started here, on the thread workers are forked from: the check
        // dies with it, as they do.
        let check = crate::node_check::start(&cmd, self.launch.supervisor.marker());
        self.node_check = Some(crate::background::spawn(async move {
            let outcome = match check {
                Ok(running) => running.finish(crate::node_check::TIMEOUT).await,
                Err(outcome) => outcome,
            };
            let _ = tx.send(outcome);
        }));
    }

    fn on_node_checked(&mut self, c: crate::node_check::Outcome) -> Done {
        self.node_check = None;
        if !matches!(self.phase, Phase::Joining) {
            return None;
        }
        let took = (c.took.as_secs_f64() * 1000.0).round() / 1000.0;
        if c.passed() {
            self.journal
                .record("node_check_passed", &[("took_s", V::F(took))]);
            self.join_round();
            return None;
        }
        let why = c.why.unwrap_or_default();
        self.node_check_failures += 1;
        let output = if c.output.is_empty() {
            String::new()
        } else {
            format!(": {}", c.output)
        };
        tracing::error!(
            "[{}] --node-check {why} after {took:.1} s{output}; this node stays out of the next round",
            self.launch.config.role
        );
        self.journal.record(
            "node_check_failed",
            &[
                ("exit_code", c.code.map_or(V::Null, |v| V::I(v.into()))),
                ("signal", c.signal.map_or(V::Null, |v| V::I(v.into()))),
                ("reason", V::S(why)),
                ("took_s", V::F(took)),
                ("output", V::S(c.output)),
            ],
        );
        let n = self.node_check_failures;
        self.observe(|o| o.node_check_failures = n);
        // A failed round that led here is counted with the check's report
        // (the next round, joined after a passing check, is not one).
        self.rdzv
            .check_failed(std::mem::take(&mut self.after_failure));
        None
    }

    /// A failed check was counted where the job keeps node failures:
    /// excluded, or another check after a pause.
    fn on_check_counted(&mut self, counted: Result<Option<u32>, RendezvousError>) -> Done {
        let limit = self.launch.config.max_node_failures;
        let failures = match counted {
            // The rendezvous keeps no count (one node): this agent's own.
            Ok(None) if limit.is_some_and(|k| self.node_check_failures >= k) => {
                Err(RendezvousError::Excluded)
            }
            Ok(n) => Ok(n.unwrap_or(self.node_check_failures)),
            Err(e) => Err(e),
        };
        match failures {
            Ok(n) => {
                let wait = restart_backoff(
                    self.launch.config.restart_backoff,
                    self.node_check_failures - 1,
                )
                .max(NODE_CHECK_RETRY);
                tracing::warn!(
                    "[{}] this host has {n} failure(s) in this run{}; checking again in {:.1} s",
                    self.launch.config.role,
                    limit.map_or(String::new(), |k| format!(" (excluded at {k})")),
                    wait.as_secs_f64()
                );
                self.observe(|o| o.phase = "backoff");
                self.backoff_until = Some(Instant::now() + wait);
                None
            }
            Err(e) => {
                self.note_rendezvous_error(&e);
                Some(Err(e.into()))
            }
        }
    }

    /// This node as the other nodes know it: `--local-addr`, else the
    /// fully qualified host name.
    fn node_name(&self) -> String {
        self.launch
            .config
            .local_addr
            .clone()
            .unwrap_or_else(crate::process::host::fqdn)
    }

    /// The job's root cause (the first failure on any node), where the
    /// rendezvous shares one: the same line on every node.
    pub fn job_root_cause(&self) -> Option<&str> {
        self.job_root_cause.as_deref()
    }

    /// The events file's record of a rendezvous that ended this node.
    fn note_rendezvous_error(&mut self, e: &RendezvousError) {
        if let RendezvousError::JobFailed(line) = e {
            // The job failed on another node: its root cause is this
            // node's too (the events file's `job_finished` says it).
            self.job_root_cause = Some(line.clone());
        }
        if matches!(e, RendezvousError::Excluded) {
            let node = self.node_name();
            self.journal.record(
                "node_excluded",
                &[("node", V::S(node)), ("this_node", V::Bool(true))],
            );
        }
        self.journal
            .record("rendezvous_failed", &[("error", V::S(e.to_string()))]);
    }

    /// What the round says of failing hosts: in `/status`, `/metrics` and,
    /// each exclusion once, in the events file.
    fn note_node_failures(&mut self, f: &crate::rendezvous::dynamic::NodeFailures) {
        for addr in f.excluded.difference(&self.excluded_seen) {
            let count = f.counts.get(addr).copied().unwrap_or(0);
            tracing::warn!(
                "[{}] host {addr} is excluded from the run after {count} failure(s) (--max-node-failures)",
                self.launch.config.role
            );
            self.journal.record(
                "node_excluded",
                &[
                    ("node", V::S(addr.clone())),
                    ("failures", V::U(count.into())),
                    ("this_node", V::Bool(false)),
                ],
            );
        }
        self.excluded_seen.clone_from(&f.excluded);
        let f = f.clone();
        self.observe(|o| o.node_failures = f);
    }

    fn join_round(&mut self) {
        self.journal.record(
            "rendezvous_joining",
            &[("attempt", V::U(self.restart_count.into()))],
        );
        self.observe(|o| o.phase = "rendezvous");
        self.phase = Phase::Joining;
        self.round_asked = std::time::Instant::now();
        self.rdzv
            .next_round(std::mem::take(&mut self.after_failure));
    }

    /// Siblings stopped by the launcher, listed after the root cause as
    /// torch 2.11+ does.
    fn collect_terminated(&mut self, group: &Group, failures: &mut Vec<ProcessFailure>) {
        for w in &group.workers {
            let already = failures.iter().any(|f| f.pid == w.pid);
            if let Some(st) = w.exit_status().filter(|s| !s.success()) {
                if !already {
                    self.seq += 1;
                    failures.push(w.failure(st, self.seq));
                }
            }
        }
    }

    /// Leaves nothing behind: every group was already ended by
    /// [`Group::release`]; what is left are descendants that left their
    /// worker's process group (daemons), found as this launcher's subtree or,
    /// failing that, by this run's marker. Reads `/proc` and waits between
    /// rounds, so it runs off the runtime's threads.
    async fn cleanup(&mut self) {
        if let Some(check) = self.node_check.take() {
            // Its process group is killed as the check is dropped.
            check.abort();
            let _ = check.await;
        }
        let started_any = self.started_any;
        let supervisor = self.launch.supervisor.clone();
        let sweep = move || supervisor.sweep_leftovers(started_any);
        if let Err(e) = tokio::task::spawn_blocking(sweep).await {
            tracing::error!("the final sweep of leftover processes failed: {e}");
        }
    }
}

/// Records a worker's exit in `group`; returns its failure, if it failed
/// (`None` too for a pid that is not a running worker of the group).
fn record_exit(
    group: &mut Group,
    exit: Exit,
    seq: &mut u64,
    oom_counter: Option<&std::path::Path>,
) -> Option<ProcessFailure> {
    let start = group.oom_kills_at_start;
    let w = group.mark_exited(exit)?;
    if exit.status.success() {
        return None;
    }
    *seq += 1;
    let mut f = w.failure(exit.status, *seq);
    if exit.status == ExitStatus::Signal(libc::SIGKILL) {
        let now = oom_counter.and_then(crate::process::oom::parse_oom_kills);
        f.oom_killed = matches!((start, now), (Some(a), Some(b)) if b > a);
    }
    Some(f)
}

/// The least pause between a failed `--node-check` and the next.
const NODE_CHECK_RETRY: Duration = Duration::from_secs(2);

/// The wait before restart `n` (0 for the first): `min(max, min·2^n)` plus
/// up to 25 % of it at random, so that nodes do not restart in lockstep.
fn restart_backoff((min, max): (Duration, Duration), n: u32) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let base = min.saturating_mul(1u32 << n.min(20)).min(max);
    use rand::Rng;
    base.mul_f64(1.0 + rand::thread_rng().gen_range(0.0..=0.25))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::restart_backoff;
    use std::time::Duration;

    #[test]
    fn the_backoff_doubles_up_to_its_maximum_with_a_quarter_of_jitter() {
        let s = Duration::from_secs;
        assert_eq!(restart_backoff((s(0), s(0)), 3), Duration::ZERO);
        for (n, base) in [(0, 2), (1, 4), (2, 8), (3, 10), (30, 10)] {
            let w = restart_backoff((s(2), s(10)), n);
            assert!(w >= s(base) && w <= s(base).mul_f64(1.25), "{n}: {w:?}");
        }
    }
}
