//! The rendezvous runs in a task of its own: the agent sends it commands and
//! receives the results as events, so a store that stalls never holds up the
//! agent's handling of worker exits and signals.
//!
//! Commands run one after the other, each to its end: a membership check is
//! never dropped for a hang report (the agent would wait for its answer
//! for ever), a finish never for anything. The one exception is a leave: a
//! launcher stopped by a signal while it waits for a round must not wait
//! for that round, so a leave interrupts the operation under way (the store
//! client is safe to cancel: a dropped request never leaves a reply for the
//! next one) and whatever was queued behind it.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Assignment, RendezvousBackend, RendezvousError};
use crate::config::LaunchConfig;

/// What the agent asks of the rendezvous.
#[derive(Debug)]
enum Command {
    /// Join the next round and assign ranks (after this node's workers
    /// failed, or not): answered by [`RdzvEvent::Round`].
    NextRound { after_failure: bool },
    /// This node's `--node-check` failed.
    CheckFailed { after_failure: bool },
    /// Whether the group must re-form: answered by [`RdzvEvent::Membership`].
    CheckMembership,
    /// The job ended here (exit barrier on success, then close): answered
    /// by [`RdzvEvent::Finished`].
    Finish {
        success: bool,
        failure: Option<String>,
    },
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
    /// With the job's root cause, where the backend shares one.
    Finished(Option<String>),
    /// Every node's hang report (on group rank 0), else `None`.
    HangShared(Option<Vec<String>>),
    /// A failed node check was counted: the host's failures in this run,
    /// where the rendezvous keeps them.
    CheckCounted(Result<Option<u32>, RendezvousError>),
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
        let changed = rdzv.change_signal();
        let task = tokio::spawn(serve(rdzv, config, rx, events, changed));
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
    pub fn next_round(&self, after_failure: bool) {
        self.send(Command::NextRound { after_failure });
    }
    /// `after_failure`: this node's workers failed in the round it is
    /// leaving (the failed round counts before the check does).
    pub fn check_failed(&self, after_failure: bool) {
        self.send(Command::CheckFailed { after_failure });
    }
    pub fn check_membership(&self) {
        self.send(Command::CheckMembership);
    }
    /// Ends the job on this node; `failure`: this node's root cause, shared
    /// with the others (the job's first is then told back).
    pub fn finish(&self, success: bool, failure: Option<String>) {
        self.send(Command::Finish { success, failure });
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
    changed: Option<Arc<tokio::sync::Notify>>,
) {
    let mut queue: VecDeque<Command> = VecDeque::new();
    let mut open = true;
    let changed = changed.unwrap_or_default();
    loop {
        let command = match queue.pop_front() {
            Some(c) => c,
            None if open => tokio::select! {
                c = commands.recv() => match c {
                    Some(c) => c,
                    None => break,
                },
                // The store says the running round changed: the agent
                // hears of it now (it takes a membership answer at any
                // time while its workers run).
                () = changed.notified() => Command::CheckMembership,
            },
            None => break,
        };
        let leaving = matches!(command, Command::Leave);
        let interrupted = {
            let op = run(&mut rdzv, &config, command);
            tokio::pin!(op);
            loop {
                tokio::select! {
                    biased;
                    c = commands.recv(), if open => match c {
                        Some(Command::Leave) if !leaving => break true,
                        Some(c) => queue.push_back(c),
                        // The agent is done: let the operation finish.
                        None => open = false,
                    },
                    ev = &mut op => {
                        if let Some(ev) = ev {
                            let _ = events.send(ev);
                        }
                        break false;
                    }
                }
            }
        };
        if interrupted {
            // Nothing asked before the leave matters any more.
            queue.clear();
            queue.push_back(Command::Leave);
        }
    }
    rdzv.shutdown().await;
}

async fn run<B: RendezvousBackend>(
    rdzv: &mut B,
    config: &LaunchConfig,
    c: Command,
) -> Option<RdzvEvent> {
    match c {
        Command::NextRound { after_failure } => {
            if after_failure {
                rdzv.note_failure();
            }
            let round = match rdzv.next_round(config).await {
                // Closed after a failure: the job's root cause, the same
                // on every node.
                Err(RendezvousError::Closed) => match bounded(rdzv.job_failure()).await {
                    Some(line) => Err(RendezvousError::JobFailed(line)),
                    None => Err(RendezvousError::Closed),
                },
                other => other,
            };
            Some(RdzvEvent::Round(round))
        }
        Command::CheckFailed { after_failure } => {
            if after_failure {
                rdzv.note_failure();
            }
            Some(RdzvEvent::CheckCounted(rdzv.report_check_failure().await))
        }
        Command::CheckMembership => {
            let changed = rdzv.membership_changed().await;
            Some(RdzvEvent::Membership(changed, rdzv.take_evicted()))
        }
        Command::Finish { success, failure } => {
            if let Some(line) = failure {
                rdzv.publish_failure(line).await;
            }
            rdzv.finish(success).await;
            let job = if success {
                None
            } else {
                bounded(rdzv.job_failure()).await
            };
            Some(RdzvEvent::Finished(job))
        }
        Command::Leave => {
            rdzv.leave().await;
            None
        }
        Command::ShareHang(report) => Some(RdzvEvent::HangShared(rdzv.share_hang(report).await)),
    }
}

/// Asks for the job's root cause for a few seconds at most: a store that
/// went with its host does not hold up the end.
async fn bounded(f: impl std::future::Future<Output = Option<String>>) -> Option<String> {
    tokio::time::timeout(std::time::Duration::from_secs(5), f)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A backend whose membership check takes a while, as a store's answer
    /// does; it counts the operations that ran to their end.
    struct Slow {
        checks_done: Arc<std::sync::atomic::AtomicU32>,
    }

    impl RendezvousBackend for Slow {
        async fn next_round(&mut self, _: &LaunchConfig) -> Result<Assignment, RendezvousError> {
            std::future::pending().await
        }
        async fn membership_changed(&mut self) -> Result<bool, RendezvousError> {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.checks_done
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(false)
        }
        async fn finish(&mut self, _: bool) {}
        async fn share_hang(&mut self, report: String) -> Option<Vec<String>> {
            Some(vec![report])
        }
        async fn shutdown(self) {}
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<RdzvEvent>) -> RdzvEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an answer within 5 s")
            .expect("the task is alive")
    }

    #[tokio::test]
    async fn a_membership_check_is_answered_even_when_a_hang_report_follows_it() {
        let checks_done = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = RendezvousTask::spawn(
            Slow {
                checks_done: checks_done.clone(),
            },
            Arc::new(LaunchConfig::default()),
            tx,
        );
        task.check_membership();
        task.share_hang("rank 0".into());
        assert!(matches!(
            next(&mut rx).await,
            RdzvEvent::Membership(Ok(false), _)
        ));
        assert!(matches!(
            next(&mut rx).await,
            RdzvEvent::HangShared(Some(_))
        ));
        assert_eq!(checks_done.load(std::sync::atomic::Ordering::SeqCst), 1);
        task.shutdown().await;
    }

    #[tokio::test]
    async fn a_leave_interrupts_a_round_that_waits() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = RendezvousTask::spawn(
            Slow {
                checks_done: Arc::default(),
            },
            Arc::new(LaunchConfig::default()),
            tx,
        );
        task.next_round(false);
        task.leave();
        // The round never completes; the leave ends it, and the task shuts
        // down at once.
        tokio::time::timeout(Duration::from_secs(5), task.shutdown())
            .await
            .expect("the leave interrupted the round");
        assert!(rx.try_recv().is_err());
    }
}
