//! The rendezvous runs in a task of its own: the agent sends it commands and
//! receives the results as events, so a store that stalls never holds up the
//! agent's handling of worker exits and signals.
//!
//! A command that arrives while another is under way interrupts it (the
//! operation in progress is dropped): that is how a launcher stopped by a
//! signal while waiting for a round goes on to leave the rendezvous.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Assignment, RendezvousBackend, RendezvousError};
use crate::config::LaunchConfig;

/// What the agent asks of the rendezvous.
#[derive(Debug)]
enum Command {
    /// Join the next round and assign ranks: answered by [`RdzvEvent::Round`].
    NextRound,
    /// Whether the group must re-form: answered by [`RdzvEvent::Membership`].
    CheckMembership,
    /// The job ended here (exit barrier on success, then close): answered
    /// by [`RdzvEvent::Finished`].
    Finish { success: bool },
    /// Stopped by a signal: take this node out without closing.
    Leave,
    /// A hang report for the cluster-wide one: answered by
    /// [`RdzvEvent::HangShared`].
    ShareHang(String),
}

/// A rendezvous result, as an event of the agent's loop.
#[derive(Debug)]
pub enum RdzvEvent {
    Round(Result<Assignment, RendezvousError>),
    /// Whether the group must re-form, and the nodes evicted meanwhile.
    Membership(Result<bool, RendezvousError>, Vec<String>),
    Finished,
    /// Every node's hang report (on group rank 0), else `None`.
    HangShared(Option<Vec<String>>),
}

/// The agent's side of the rendezvous task.
pub struct RendezvousTask {
    commands: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
    poll_interval: Option<std::time::Duration>,
    store_stats: Option<Arc<tcpstore::ServerStats>>,
}

impl RendezvousTask {
    /// Moves `rdzv` into a task; its results arrive on `events`.
    pub fn spawn<B: RendezvousBackend>(
        rdzv: B,
        config: Arc<LaunchConfig>,
        events: mpsc::UnboundedSender<RdzvEvent>,
    ) -> RendezvousTask {
        let poll_interval = rdzv.poll_interval();
        let store_stats = rdzv.store_stats();
        let (commands, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(serve(rdzv, config, rx, events));
        RendezvousTask {
            commands,
            task,
            poll_interval,
            store_stats,
        }
    }

    /// The workers' store this node hosts, if any.
    pub fn store_stats(&self) -> Option<Arc<tcpstore::ServerStats>> {
        self.store_stats.clone()
    }

    /// How often the agent should ask whether membership changed.
    pub fn poll_interval(&self) -> Option<std::time::Duration> {
        self.poll_interval
    }

    fn send(&self, c: Command) {
        // The task ends only when this handle is dropped or shut down.
        let _ = self.commands.send(c);
    }
    pub fn next_round(&self) {
        self.send(Command::NextRound);
    }
    pub fn check_membership(&self) {
        self.send(Command::CheckMembership);
    }
    pub fn finish(&self, success: bool) {
        self.send(Command::Finish { success });
    }
    pub fn leave(&self) {
        self.send(Command::Leave);
    }
    pub fn share_hang(&self, report: String) {
        self.send(Command::ShareHang(report));
    }

    /// Lets the command under way finish (a leave, say), then stops the
    /// stores this node hosts.
    pub async fn shutdown(self) {
        drop(self.commands);
        let _ = self.task.await;
    }
}

async fn serve<B: RendezvousBackend>(
    mut rdzv: B,
    config: Arc<LaunchConfig>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<RdzvEvent>,
) {
    let mut next = commands.recv().await;
    while let Some(command) = next.take() {
        // Each operation races the next command, which interrupts it. A
        // closed channel (the agent is done) lets the operation finish.
        let interrupted = tokio::select! {
            biased;
            Some(c) = commands.recv() => Some(c),
            ev = run(&mut rdzv, &config, command) => {
                if let Some(ev) = ev {
                    let _ = events.send(ev);
                }
                commands.recv().await
            }
        };
        next = interrupted;
    }
    rdzv.shutdown().await;
}

async fn run<B: RendezvousBackend>(
    rdzv: &mut B,
    config: &LaunchConfig,
    c: Command,
) -> Option<RdzvEvent> {
    match c {
        Command::NextRound => Some(RdzvEvent::Round(rdzv.next_round(config).await)),
        Command::CheckMembership => {
            let changed = rdzv.membership_changed().await;
            Some(RdzvEvent::Membership(changed, rdzv.take_evicted()))
        }
        Command::Finish { success } => {
            rdzv.finish(success).await;
            Some(RdzvEvent::Finished)
        }
        Command::Leave => {
            rdzv.leave().await;
            None
        }
        Command::ShareHang(report) => Some(RdzvEvent::HangShared(rdzv.share_hang(report).await)),
    }
}
