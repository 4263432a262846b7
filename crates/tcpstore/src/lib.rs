//! PyTorch's TCPStore wire protocol: a server that torch's clients cannot tell
//! from torch's own, and a client that talks to either.
//!
//! - [`codec`]: request decoding and encoding, byte for byte.
//! - [`state`]: keys, queues, waiters; no I/O.
//! - `wait_signal`: how a satisfied wait reaches its connection.
//! - [`server`]: binding and accepting; [`connection`] serves one client.
//! - [`client`]: the async client.
//! - [`cli`]: the `torchrun-rs-store` command line.

pub mod cli;
pub mod client;
pub mod codec;
mod connection;
pub mod server;
pub mod state;
mod wait_signal;

pub use client::{Client, ClientError, ConnectOptions};
pub use codec::Limits;
pub use server::{BindAddr, BindError, Server, ServerHandle, ServerStats};
