//! What a launching process owns before anything else: its children.
//!
//! The `torchrun-rs` binary creates a [`Supervisor::for_launcher`] first
//! thing in `main`, while it has one thread: it forks the guardian (no
//! orphans, ever, even when the launcher is SIGKILLed), makes the process a
//! child subreaper (orphaned descendants come back to it) and lets the
//! reaper collect every child. A program that embeds the engine gets a
//! [`Supervisor::embedded`]: the reaper then touches only the workers the
//! engine starts, never the program's own children.
//!
//! The reaper itself is one per process (SIGCHLD and the child table are),
//! but each launch receives the exits of its own workers only, so several
//! launches can run in one process.

use std::sync::Arc;

use crate::process;
use crate::process::lifeline::{self, Lifeline};

#[derive(Debug, Clone)]
pub struct Supervisor {
    lifeline: Option<Arc<Lifeline>>,
    marker: String,
}

impl Supervisor {
    /// For a launcher process: call first thing in `main`, before any
    /// thread starts. A guardian that cannot be started is a warning (the
    /// workers still die with the launcher); the rest always works.
    pub fn for_launcher() -> Supervisor {
        let lifeline = match Lifeline::start() {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                tracing::warn!(
                    "cannot start the orphan guardian ({e}); workers still die with the launcher"
                );
                None
            }
        };
        process::become_subreaper();
        process::reap_all_children();
        let marker = lifeline
            .as_ref()
            .map_or_else(lifeline::make_marker, |l| l.marker().to_string());
        Supervisor { lifeline, marker }
    }

    /// For a program that embeds the engine: no guardian, no subreaper, and
    /// the reaper collects only the engine's workers.
    pub fn embedded() -> Supervisor {
        Supervisor {
            lifeline: None,
            marker: lifeline::make_marker(),
        }
    }

    /// The value of `TORCHRUN_RS_JOB` this supervisor's workers carry.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Between two attempts, once the first attempt's workers are reaped:
    /// stops what they left behind (daemons that left their process groups,
    /// holding ports and GPU memory the next attempt needs). The launcher's
    /// subtree when it owns one, else every process with this run's marker.
    /// Returns how many were stopped. Reads `/proc`: call it off async
    /// threads.
    pub fn sweep_attempt(&self) -> usize {
        match self.lifeline.as_ref().and_then(|l| l.stop_descendants()) {
            Some(n) => n,
            None => lifeline::sweep(&self.marker),
        }
    }

    /// Stops whatever the workers left behind, once no worker runs: the
    /// launcher's whole subtree when it owns one (then the guardian is told
    /// it has nothing to do), else every process with this run's marker.
    /// Reads `/proc` and waits between rounds: call it off async threads.
    pub fn sweep_leftovers(&self, started_any: bool) {
        match &self.lifeline {
            Some(l) if l.stop_descendants().is_some() => l.disarm(),
            _ if started_any => {
                lifeline::sweep(&self.marker);
            }
            _ => {}
        }
    }
}
