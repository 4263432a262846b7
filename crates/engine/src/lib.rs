//! The torchrun-rs engine: torch's launcher API ([`LaunchConfig`],
//! [`launch_agent`]) and everything behind it. The public surface is what
//! this file exports; the modules behind it are the crate's own.
//!
//! The folders are its parts, each using only those below it:
//!
//! - [`process`]: fork/exec and reaping, signals, the guardian, what the kernel says of a process (OOM, memory, NUMA).
//! - [`config`]: the torch-shaped configuration and its grammars, the
//!   rendezvous settings, the workers' environment, `--dry-run`'s preview.
//! - [`logs`]: the log tree, tee and pass-through pipes, `--dedup-output`,
//!   error files and the failure summary.
//! - `observe`: torch's events, the `--events-file` journal, health, status
//!   and metrics, the file watchdog, stacks.
//! - `rendezvous`: one backend per file behind one trait, run in a task;
//!   node fingerprints.
//! - At the top: `launch` (`launch_agent`), `agent` (one node's dispatcher:
//!   every event, every phase, restarts), `worker_group` (starting a
//!   group's workers), `terminate` (stopping one: signal, grace, SIGKILL), `node_check`, and [`background`] (side tasks whose
//!   panic must not end the launcher).

mod agent;
pub mod background;
pub mod config;
mod error;
mod launch;
pub mod logs;
mod node_check;
pub(crate) mod observe;
pub mod process;
mod rendezvous;
mod terminate;
mod worker_group;

// The paths the CLI and the tests have always used.
pub use config::{preview, rdzv_settings, worker_env};
pub use logs::failure;
pub use observe::status_view;
pub use process::{numa, signals};

pub use agent::{AgentError, RunResult};
pub use config::{ConfigError, LaunchConfig, Std, StdSpec};
pub use launch::{launch_agent, launch_agent_with, LaunchError, LaunchOutcome};
pub use logs::log_dir::LogDirError;
pub use process::supervisor::Supervisor;
pub use rendezvous::RendezvousError;
