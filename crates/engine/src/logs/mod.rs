//! Workers' output and the failure report: the log tree on disk
//! (`log_dir`), tee and pass-through pipes (`log_stream`), what a worker
//! wrote last, for the status (`last_line`), identical lines
//! of several ranks printed once (`dedup`), and torch's error files and
//! summary (`failure`).

pub mod dedup;
pub mod failure;
pub mod last_line;
pub mod log_dir;
pub mod log_stream;
