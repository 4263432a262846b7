//! The TCPStore server: binds, accepts, and runs one task per connection.
//!
//! [`Server::bind`] returns only after the socket is listening, so the caller
//! can publish [`Server::local_addr`] knowing that clients will find it there:
//! there is no pick-a-free-port-then-bind race.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::codec::Limits;
use crate::connection::Connection;
use crate::state::State;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot bind the store to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Where the server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindAddr {
    /// `::` dual-stack, falling back to `0.0.0.0` where IPv6 is off (torch's
    /// behaviour).
    Any(u16),
    /// One specific address.
    Exact(SocketAddr),
}

/// A bound store server, not yet serving.
pub struct Server {
    listener: std::net::TcpListener,
    limits: Limits,
    state: Arc<Mutex<State>>,
    stats: Arc<ServerStats>,
}

fn listen_on(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // Accept IPv4 clients too when bound to `::`.
        let _ = socket.set_only_v6(false);
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // The kernel clamps this to net.core.somaxconn: "the system maximum".
    socket.listen(i32::MAX)?;
    Ok(socket.into())
}

impl Server {
    pub fn bind(addr: BindAddr) -> Result<Server, BindError> {
        Self::bind_with_limits(addr, Limits::default())
    }

    pub fn bind_with_limits(addr: BindAddr, limits: Limits) -> Result<Server, BindError> {
        let listener = match addr {
            BindAddr::Any(port) => {
                let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
                match listen_on(v6) {
                    Ok(l) => l,
                    Err(e6) => {
                        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
                        tracing::debug!("dual-stack bind failed ({e6}), trying {v4}");
                        listen_on(v4).map_err(|source| BindError::Bind { addr: v4, source })?
                    }
                }
            }
            BindAddr::Exact(a) => {
                listen_on(a).map_err(|source| BindError::Bind { addr: a, source })?
            }
        };
        Ok(Server {
            listener,
            limits,
            state: Arc::new(Mutex::new(State::new())),
            stats: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound socket has an address")
    }

    /// Starts serving on the current Tokio runtime.
    pub fn spawn(self) -> ServerHandle {
        let addr = self.local_addr();
        let (tx, rx) = watch::channel(false);
        let state = Arc::clone(&self.state);
        let stats = Arc::clone(&self.stats);
        let task = tokio::spawn(accept_loop(self, rx));
        ServerHandle {
            addr,
            shutdown: tx,
            task,
            state,
            stats,
        }
    }
}

async fn accept_loop(server: Server, mut shutdown: watch::Receiver<bool>) {
    let listener = match TcpListener::from_std(server.listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("store listener cannot join the runtime: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = Connection::new(
                        stream,
                        Arc::clone(&server.state),
                        server.limits,
                        Arc::clone(&server.stats),
                    );
                    tokio::spawn(conn.run(shutdown.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!("store accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    state: Arc<Mutex<State>>,
    stats: Arc<ServerStats>,
}

/// What a server has served, for metrics.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub connections: std::sync::atomic::AtomicU64,
    /// Requests applied since the start.
    pub requests: std::sync::atomic::AtomicU64,
}

impl ServerHandle {
    /// Connections and requests served.
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Drops every key (and queue) for which `keep` is false. The launcher
    /// uses it between attempts, so that a restarted worker group never reads
    /// what the previous attempt's workers wrote.
    pub fn retain_keys(&self, keep: impl Fn(&[u8]) -> bool) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain_keys(keep);
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}
