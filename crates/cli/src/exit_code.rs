//! The launcher's exit statuses, in one place (the README lists them).
//!
//! Besides these, a failed job exits with its root-cause worker's exit code
//! (128+N when that worker died of signal N), and a launcher stopped by a
//! handled signal N exits 128+N.

/// Every worker exited 0 (or `-h`, `--version`, `--dry-run`).
pub const SUCCESS: u8 = 0;
/// The job could not be launched or run: the script was not found, the store
/// port was taken, the rendezvous timed out, a process limit was reached.
pub const LAUNCH_ERROR: u8 = 1;
/// A usage or configuration error: a bad flag, value or `PET_*` variable.
pub const USAGE: u8 = 2;
/// A bug in torchrun-rs (sysexits' EX_SOFTWARE). The guardian still stops
/// every worker.
pub const INTERNAL_ERROR: u8 = 70;
