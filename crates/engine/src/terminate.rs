//! Stopping a worker group: the signal to every worker's process group, a
//! grace period, then SIGKILL, then a last wait for processes that cannot
//! die (uninterruptible sleep). The agent drives it with its own clock: it
//! reports exits to the group and calls [`Stopping::on_deadline`] when
//! [`Stopping::deadline`] passes.

use std::time::Duration;

use tokio::time::Instant;

use crate::process::signals::signal_name;
use crate::worker_group::Group;

/// How long to wait for workers after SIGKILL before giving up on them.
const AFTER_SIGKILL: Duration = Duration::from_secs(10);

/// A group being stopped.
#[derive(Debug)]
pub struct Stopping {
    /// The signal the workers were sent.
    sig: i32,
    deadline: Instant,
    killed: bool,
    /// When the stop began: how much of a recovery the stop takes.
    began: Instant,
}

/// What a passed deadline leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Expired {
    /// The survivors were SIGKILLed; wait a little longer.
    Killed,
    /// Even SIGKILL did not end them: stop waiting.
    GaveUp,
}

impl Stopping {
    /// Sends `sig` to every worker's process group (groups of exited
    /// workers too: their descendants may still be there) and starts the
    /// grace period.
    pub fn begin(group: &Group, sig: i32, grace: Duration) -> Stopping {
        for w in group.alive() {
            tracing::warn!(
                "Sending process {} closing signal {}",
                w.pid,
                signal_name(sig).unwrap_or("?")
            );
        }
        group.signal_all(sig);
        Stopping {
            sig,
            deadline: Instant::now() + grace,
            killed: false,
            began: Instant::now(),
        }
    }

    /// A stop that starts with SIGKILL (a group that could not be started
    /// whole).
    pub fn kill(group: &Group) -> Stopping {
        group.signal_all(libc::SIGKILL);
        Stopping {
            sig: libc::SIGKILL,
            deadline: Instant::now() + AFTER_SIGKILL,
            killed: true,
            began: Instant::now(),
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// How long the stop has taken so far.
    pub fn took(&self) -> Duration {
        self.began.elapsed()
    }

    /// Whether the group was SIGKILLed already.
    pub fn killed(&self) -> bool {
        self.killed
    }

    /// Moves the deadline (while the survivors' stacks are taken).
    pub fn postpone(&mut self, by: Duration) {
        self.deadline = Instant::now() + by;
    }

    /// The grace period is over (or a second signal asked to skip it).
    pub fn on_deadline(&mut self, group: &Group) -> Expired {
        if self.killed {
            tracing::error!("workers did not exit after SIGKILL (uninterruptible sleep?)");
            return Expired::GaveUp;
        }
        for w in group.alive() {
            tracing::warn!(
                "Unable to shutdown process {} via {}, forcefully exiting via SIGKILL",
                w.pid,
                signal_name(self.sig).unwrap_or("?")
            );
        }
        group.signal_all(libc::SIGKILL);
        self.killed = true;
        self.deadline = Instant::now() + AFTER_SIGKILL;
        Expired::Killed
    }

    /// Skips the rest of the grace period (a second shutdown signal).
    pub fn escalate(&mut self, group: &Group) {
        if !self.killed {
            tracing::warn!("second signal: killing the workers now");
            self.on_deadline(group);
        }
    }
}
