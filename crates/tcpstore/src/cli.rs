//! The `torchrun-rs-store` command line: `--port P [--host ADDR]` and the
//! `TORCHRUN_RS_STORE_THREADS` environment variable. Every input gives
//! options or a one-line error; never a panic.

use std::net::{IpAddr, SocketAddr};

use crate::BindAddr;

pub const USAGE: &str = "usage: torchrun-rs-store --port PORT [--host ADDR]";

/// Runtime threads when `TORCHRUN_RS_STORE_THREADS` is unset.
pub const DEFAULT_THREADS: usize = 2;
/// The most runtime threads accepted: more only adds contention.
pub const MAX_THREADS: usize = 1024;

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Serve { bind: BindAddr, threads: usize },
}

/// Parses the arguments (without the program name) and the environment.
pub fn parse(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Command, String> {
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
            "-h" | "--help" => return Ok(Command::Help),
            other => return Err(format!("unrecognized argument {other:?}")),
        }
    }
    let port = port.ok_or("--port is required")?;
    let bind = match host {
        Some(ip) => BindAddr::Exact(SocketAddr::new(ip, port)),
        None => BindAddr::Any(port),
    };
    let threads = match env("TORCHRUN_RS_STORE_THREADS") {
        None => DEFAULT_THREADS,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => n,
            _ => {
                return Err(format!(
                    "TORCHRUN_RS_STORE_THREADS: invalid value {v:?}, expected an integer between 1 and {MAX_THREADS}"
                ))
            }
        },
    };
    Ok(Command::Serve { bind, threads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(args: &[&str], threads: Option<&str>) -> Result<Command, String> {
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let t = threads.map(str::to_string);
        parse(&a, &move |k| {
            (k == "TORCHRUN_RS_STORE_THREADS")
                .then(|| t.clone())
                .flatten()
        })
    }

    #[test]
    fn flags_and_threads() {
        assert_eq!(
            p(&["--port", "0"], None).unwrap(),
            Command::Serve {
                bind: BindAddr::Any(0),
                threads: 2
            }
        );
        assert_eq!(
            p(&["--port=5", "--host", "[::1]"], Some("4")).unwrap(),
            Command::Serve {
                bind: BindAddr::Exact("[::1]:5".parse().unwrap()),
                threads: 4
            }
        );
        assert_eq!(p(&["-h"], None).unwrap(), Command::Help);
        for (args, threads, needle) in [
            (vec!["--port", "0"], Some("0"), "TORCHRUN_RS_STORE_THREADS"),
            (
                vec!["--port", "0"],
                Some("99999999999999999999"),
                "TORCHRUN_RS_STORE_THREADS",
            ),
            (vec!["--port", "70000"], None, "--port"),
            (vec!["--host", "x", "--port", "1"], None, "--host"),
            (vec![], None, "--port is required"),
            (vec!["--port"], None, "expects a value"),
        ] {
            let e = p(&args, threads).unwrap_err();
            assert!(e.contains(needle), "{args:?} {threads:?}: {e}");
        }
    }

    proptest! {
        /// Any arguments and any thread setting: options or one line, never a panic.
        #[test]
        fn any_input_gives_options_or_one_line(
            args in proptest::collection::vec(any::<String>(), 0..6),
            threads in proptest::option::of(any::<String>()),
        ) {
            let t = threads.clone();
            let env = move |k: &str| (k == "TORCHRUN_RS_STORE_THREADS").then(|| t.clone()).flatten();
            if let Err(e) = parse(&args, &env) {
                prop_assert!(!e.is_empty() && !e.contains('\n'), "{e:?}");
            }
        }
    }
}
