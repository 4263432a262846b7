//! torchrun's command line for torchrun-rs: [`args`] parses flags like
//! argparse, [`resolve`] turns them into a launch configuration and command.

pub mod args;
pub mod exit_code;
pub mod log_format;
pub mod resolve;
