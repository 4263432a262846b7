//! Processes: starting workers (fork/exec) and reaping them, signals and
//! their trapping, the guardian that leaves no process behind, and what the
//! kernel says of a process (OOM kills, memory and CPU, NUMA placement,
//! host names). The bottom of the engine: it uses no other folder.

mod spawn;
pub use spawn::*;

pub(crate) mod host;
pub(crate) mod lifeline;
pub mod numa;
pub(crate) mod oom;
pub(crate) mod proc_stats;
pub mod signals;
pub(crate) mod supervisor;
