//! The torchrun-rs engine: torch's launcher API ([`LaunchConfig`],
//! [`launch_agent`]) and everything behind it. The public surface is what
//! this file exports; the modules behind it are the crate's own.
//!
//! - [`config`]: the torch-shaped configuration and its small grammars.
//! - [`rdzv_settings`]: the rendezvous configuration, typed and checked once.
//! - `launch`: `launch_agent`, the exit status and the failure report.
//! - `supervisor`: what a launching process owns: guardian, reaper reach.
//! - `agent`: one node's dispatcher: every event, every phase, restarts.
//! - `worker_group`: starting a group's workers and their output wiring.
//! - `terminate`: stopping a group: signal, grace, SIGKILL.
//! - `watchdog`: torch's file watchdog (`FileTimerClient`), as events.
//! - `rendezvous`: one backend per file behind one trait, run in a task.
//! - [`process`]: fork/exec of workers, the reaper, group signals.
//! - `lifeline`: the guardian that leaves no process behind.
//! - [`worker_env`]: the environment contract of spec §3 (bytes, not text).
//! - [`background`]: side tasks whose panic must not end the launcher.
//! - `log_dir`, `log_stream`: log files, tee and pass-through pipes.
//! - [`failure`]: error files and the failure summary.
//! - `events`: torch's agent events (`--event-log-handler console`).
//! - `journal`: `--events-file`, every lifecycle fact as JSON Lines.
//! - `health`: `/healthz`, `/readyz`, `/status`, `/metrics` over HTTP.
//! - `oom`: telling an OOM kill from other SIGKILLs.
//! - [`preview`]: what each worker would get (`--dry-run`).
//! - [`signals`]: signal names and trapping.
//! - `stacks`: a worker's stacks through py-spy, grouped by top frame.
//! - [`numa`]: `--numa-binding`, torch's four modes over sysfs.
//! - `host`: this host's names as Python computes them.

mod agent;
pub mod background;
pub mod config;
mod dedup;
mod events;
pub mod failure;
mod fingerprint;
mod health;
mod host;
mod journal;
mod launch;
mod lifeline;
mod log_dir;
mod log_stream;
mod node_check;
pub mod numa;
mod oom;
pub mod preview;
mod proc_stats;
pub mod process;
pub mod rdzv_settings;
mod rendezvous;
pub mod signals;
mod stacks;
pub mod status_view;
mod supervisor;
mod terminate;
mod watchdog;
pub mod worker_env;
mod worker_group;

pub use agent::{AgentError, RunResult};
pub use config::{ConfigError, LaunchConfig, Std, StdSpec};
pub use launch::{launch_agent, launch_agent_with, LaunchError, LaunchOutcome};
pub use log_dir::LogDirError;
pub use rendezvous::RendezvousError;
pub use supervisor::Supervisor;
