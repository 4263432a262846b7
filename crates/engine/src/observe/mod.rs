//! What the launcher tells the world: torch's agent events (`events`), the
//! `--events-file` journal (`journal`), health, status and metrics over
//! HTTP (`health`) and the `--status` view of them (`status_view`), torch's
//! file watchdog (`watchdog`) and workers' stacks (`stacks`).

pub(crate) mod events;
pub(crate) mod health;
pub(crate) mod journal;
pub(crate) mod stacks;
pub mod status_view;
pub(crate) mod watchdog;
