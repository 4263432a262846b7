//! The torchrun-rs engine: torch's launcher API ([`LaunchConfig`],
//! [`launch_agent`]) and everything behind it.
//!
//! - [`config`]: the resolved configuration and its small grammars.
//! - [`launch`]: `launch_agent`, the exit status and the failure report.
//! - [`agent`]: one node's dispatcher: every event, every phase, restarts.
//! - [`worker_group`]: starting a group's workers and their output wiring.
//! - [`terminate`]: stopping a group: signal, grace, SIGKILL.
//! - [`rdzv_settings`]: the rendezvous configuration, typed and checked once.
//! - [`rendezvous`]: the store, who hosts it, and rank assignment.
//! - [`process`]: fork/exec of workers, the reaper, group signals.
//! - [`supervisor`]: what a launching process owns: guardian, reaper mode.
//! - [`lifeline`]: the guardian that leaves no process behind.
//! - [`worker_env`]: the environment contract of spec §3.
//! - [`log_dir`], [`log_stream`]: log files and tee through pipes.
//! - [`failure`]: error files and the failure summary.
//! - [`oom`]: telling an OOM kill from other SIGKILLs.
//! - [`signals`]: signal names and trapping.
//! - [`host`]: this host's names as Python computes them.

pub mod agent;
pub mod config;
pub mod failure;
pub mod host;
pub mod launch;
pub mod lifeline;
pub mod log_dir;
pub mod log_stream;
pub mod oom;
pub mod process;
pub mod rdzv_settings;
pub mod rendezvous;
pub mod signals;
pub mod supervisor;
pub mod terminate;
pub mod worker_env;
pub mod worker_group;

pub use agent::RunResult;
pub use config::{LaunchConfig, Std, StdSpec};
pub use launch::{launch_agent, launch_agent_with, LaunchError, LaunchOutcome};
pub use supervisor::Supervisor;
