//! torchrun's command line for torchrun-rs: [`args`] parses flags like
//! argparse, [`resolve`] turns them into a launch configuration and command.

pub mod args;
pub mod caller;
pub mod cluster;
pub mod completions;
pub mod dry_run;
pub mod exit_code;
pub mod hostlist;
pub mod log_format;
pub mod panic_hook;
pub mod raw_args;
pub mod resolve;

/// The torch release whose torchrun the flags and behaviour follow.
pub const TORCH_RELEASE: &str = "2.15";
