//! The agent's error: what stops a node before or between worker groups.
//! Its own module so that the worker group and the stopping code can
//! return it without depending on the agent that drives them.

use crate::rendezvous::RendezvousError;

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
    LogDir(#[from] crate::logs::log_dir::LogDirError),
    #[error("cannot set up output streams: {source}{}", spawn_hint(source))]
    Streams { source: std::io::Error },
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
}

/// What to add to a spawn error so the user knows which limit to raise.
fn spawn_hint(e: &std::io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EAGAIN) {
        " (the system's limit on processes was reached: `ulimit -u`, the pids cgroup's pids.max, or kernel.pid_max)"
    } else {
        ""
    }
}
