//! `--event-log-handler`: torch's agent events, as torch records them.
//!
//! `console` writes each event's JSON on stderr exactly as torch's
//! `Event.serialize()` does (key order, Python separators, `timestamp: 0`,
//! one-element lists in the inner metadata string), at the points torch
//! records them: RENDEZVOUS and ASSIGN_WORKER_RANKS after each round, START
//! for every worker started, and at the end of the run one event per worker
//! of the last group (SUCCEEDED / FAILED / TERMINATED) and one for the agent.
//! `null` (the default) and `dynamic_rendezvous` record nothing, as in torch.
//! Like torch's event logger, `LOGLEVEL=WARNING` (or higher) silences them.

use std::time::Instant;

use crate::config::worker_env::WorkerRanks;
use crate::config::LaunchConfig;
use crate::logs::failure::{Json, ProcessFailure};

/// The agent's event recorder.
pub struct EventLog {
    console: bool,
    run_id: String,
    role: String,
    hostname: String,
    rdzv_backend: String,
    entry_point: String,
    started: Instant,
    /// Known once a round assigned them.
    pub group_rank: Option<u32>,
    pub group_world_size: Option<u32>,
}

/// A worker as its events describe it.
#[derive(Debug, Clone)]
pub struct WorkerFacts {
    pub ranks: WorkerRanks,
    pub pid: i32,
}

fn opt_u32(v: Option<u32>) -> Json {
    v.map_or(Json::Null, |n| Json::Num(f64::from(n)))
}

fn one(v: Json) -> Json {
    Json::Array(vec![v])
}

impl EventLog {
    pub fn new(config: &LaunchConfig, hostname: String, entry_point: String) -> EventLog {
        let loud = std::env::var("LOGLEVEL")
            .map(|l| {
                !matches!(
                    l.to_ascii_uppercase().as_str(),
                    "WARNING" | "WARN" | "ERROR" | "CRITICAL" | "FATAL"
                )
            })
            .unwrap_or(true);
        EventLog {
            console: config.event_log_handler == "console" && loud,
            run_id: config.run_id.clone(),
            role: config.role.clone(),
            hostname,
            rdzv_backend: config.rdzv_backend.clone(),
            entry_point,
            started: Instant::now(),
            group_rank: None,
            group_world_size: None,
        }
    }

    /// One event, torch's `_construct_event`.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        state: &str,
        worker: Option<&WorkerFacts>,
        raw_error: Option<String>,
        duration_ms: Option<f64>,
        failure: Option<&ProcessFailure>,
        restarts: u32,
        total_run_time: u64,
    ) -> String {
        let mut md = vec![
            (
                "group_world_size".to_string(),
                opt_u32(self.group_world_size),
            ),
            (
                "entry_point".to_string(),
                Json::Str(self.entry_point.clone()),
            ),
        ];
        if let Some(w) = worker {
            md.push((
                "local_rank".into(),
                one(Json::Num(f64::from(w.ranks.local_rank))),
            ));
            md.push((
                "role_rank".into(),
                one(Json::Num(f64::from(w.ranks.role_rank))),
            ));
            md.push((
                "role_world_size".into(),
                one(Json::Num(f64::from(w.ranks.role_world_size))),
            ));
            md.push((
                "exit_code".into(),
                one(failure.map_or(Json::Null, |f| Json::Num(f64::from(f.exitcode())))),
            ));
            md.push((
                "worker_pid".into(),
                one(failure.map_or(Json::Null, |f| Json::Num(f64::from(f.pid)))),
            ));
        }
        let source = if worker.is_some() { "WORKER" } else { "AGENT" };
        let metadata = Json::Object(vec![
            ("run_id".into(), Json::Str(self.run_id.clone())),
            (
                "global_rank".into(),
                opt_u32(worker.map(|w| w.ranks.global_rank)),
            ),
            ("group_rank".into(), opt_u32(self.group_rank)),
            (
                "worker_id".into(),
                worker.map_or(Json::Null, |w| Json::Str(w.pid.to_string())),
            ),
            ("role".into(), Json::Str(self.role.clone())),
            ("hostname".into(), Json::Str(self.hostname.clone())),
            ("state".into(), Json::Str(state.to_string())),
            ("total_run_time".into(), Json::Num(total_run_time as f64)),
            ("rdzv_backend".into(), Json::Str(self.rdzv_backend.clone())),
            ("raw_error".into(), raw_error.map_or(Json::Null, Json::Str)),
            ("metadata".into(), Json::Str(Json::Object(md).to_string())),
            ("agent_restarts".into(), Json::Num(f64::from(restarts))),
            (
                "duration_ms".into(),
                duration_ms.map_or(Json::Null, Json::Float),
            ),
        ]);
        Json::Object(vec![
            (
                "name".into(),
                Json::Str(format!("torchelastic.worker.status.{state}")),
            ),
            ("source".into(), Json::Str(source.to_string())),
            ("timestamp".into(), Json::Num(0.0)),
            ("metadata".into(), metadata),
        ])
        .to_string()
    }

    fn emit(&self, line: String) {
        if self.console {
            eprintln!("{line}");
        }
    }

    /// After a round: RENDEZVOUS (the round took `rdzv_ms`) and
    /// ASSIGN_WORKER_RANKS, with the group as it was before the round (as
    /// torch records them), then the new group is remembered.
    pub fn round(
        &mut self,
        rdzv_ms: f64,
        assign_ms: f64,
        restarts: u32,
        group_rank: u32,
        group_world_size: u32,
    ) {
        self.emit(self.event("RENDEZVOUS", None, None, Some(rdzv_ms), None, restarts, 0));
        self.emit(self.event(
            "ASSIGN_WORKER_RANKS",
            None,
            None,
            Some(assign_ms),
            None,
            restarts,
            0,
        ));
        self.group_rank = Some(group_rank);
        self.group_world_size = Some(group_world_size);
    }

    /// START for every worker of a new group.
    pub fn started(&self, workers: &[WorkerFacts], restarts: u32) {
        for w in workers {
            self.emit(self.event("START", Some(w), None, None, None, restarts, 0));
        }
    }

    /// The end of the run: one event per worker of the last group and
    /// SUCCEEDED for the agent (torch records SUCCEEDED whenever the run
    /// returns, failed workers or not).
    pub fn finished(&self, workers: &[WorkerFacts], failures: &[ProcessFailure], restarts: u32) {
        let total = self.started.elapsed().as_secs();
        for w in workers {
            let f = failures.iter().find(|f| f.pid == w.pid);
            let state = match f {
                Some(_) => "FAILED",
                None if !failures.is_empty() => "TERMINATED",
                None => "SUCCEEDED",
            };
            let raw_error = f.map(|f| {
                f.error_data.as_ref().map_or_else(
                    // torch's record for a worker that wrote no error file.
                    || r#"{"message": "<NONE>", "errorTraits": {"category": "system_terminated_error", "retryability": "False"}}"#.to_string(),
                    Json::to_string,
                )
            });
            self.emit(self.event(state, Some(w), raw_error, None, f, restarts, total));
        }
        self.emit(self.event("SUCCEEDED", None, None, None, None, restarts, total));
    }

    /// The run ended by a signal or an error: FAILED for the agent, with
    /// what happened in place of torch's Python traceback.
    pub fn agent_failed(&self, why: &str, restarts: u32) {
        let total = self.started.elapsed().as_secs();
        self.emit(self.event(
            "FAILED",
            None,
            Some(why.to_string()),
            None,
            None,
            restarts,
            total,
        ));
    }
}
