//! `torchrun-rs-store --port P [--host ADDR]`: a standalone TCPStore server,
//! for jobs whose store should not live inside a GPU node.
//!
//! Exit status: 0 after SIGTERM/SIGINT, 1 when it cannot serve (port taken),
//! 2 for a usage error, 70 for an internal error (a bug: one line, no
//! backtrace).

use std::process::ExitCode;

use tcpstore::cli::{self as store_cli, Command, USAGE};
use tcpstore::Server;

fn main() -> ExitCode {
    // A panic in a connection's task ends that connection only (the runtime
    // catches it and the store's locks survive it); one in the main thread
    // ends the process with status 70.
    cli::panic_hook::install("torchrun-rs-store", None);
    match std::panic::catch_unwind(run) {
        Ok(code) => code,
        Err(_) => ExitCode::from(70),
    }
}

fn run() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOGLEVEL")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let (bind, threads) = match store_cli::parse(&args, &|k| std::env::var(k).ok()) {
        Ok(Command::Serve { bind, threads }) => (bind, threads),
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("torchrun-rs-store: error: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("torchrun-rs-store: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let server = match Server::bind(bind) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("torchrun-rs-store: error: {e}");
                return ExitCode::FAILURE;
            }
        };
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("torchrun-rs-store: error: cannot handle SIGTERM/SIGINT: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("torchrun-rs-store listening on {}", server.local_addr());
        let handle = server.spawn();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}
