//! `torchrun-rs-store --port P [--host ADDR]`: a standalone TCPStore server,
//! for jobs whose store should not live inside a GPU node.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use tcpstore::{BindAddr, Server};

const USAGE: &str = "usage: torchrun-rs-store --port PORT [--host ADDR]";

fn parse_args(args: &[String]) -> Result<BindAddr, String> {
    let mut port: Option<u16> = None;
    let mut host: Option<IpAddr> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} expects a value"))
        };
        match flag {
            "--port" | "-p" => {
                let v = value("--port")?;
                port = Some(v.parse().map_err(|_| {
                    format!("--port: invalid value {v:?}, expected an integer between 0 and 65535")
                })?);
            }
            "--host" => {
                let v = value("--host")?;
                let v = v.trim_start_matches('[').trim_end_matches(']');
                host = Some(v.parse().map_err(|_| {
                    format!("--host: invalid value {v:?}, expected an IPv4 or IPv6 address")
                })?);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unrecognized argument {other:?}")),
        }
    }
    let port = port.ok_or("--port is required")?;
    Ok(match host {
        Some(ip) => BindAddr::Exact(SocketAddr::new(ip, port)),
        None => BindAddr::Any(port),
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOGLEVEL")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bind = match parse_args(&args) {
        Ok(b) => b,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("torchrun-rs-store: error: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let workers = std::env::var("TORCHRUN_RS_STORE_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
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
        println!("torchrun-rs-store listening on {}", server.local_addr());
        let handle = server.spawn();
        let signal = async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        };
        signal.await;
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}
