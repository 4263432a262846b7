//! Seeing a dead launcher at once, not after the heartbeat window.
//!
//! When a launcher process dies (SIGKILL, a crash, the OOM killer), the
//! kernel closes its sockets: a peer holding a connection to it reads the
//! end of the stream at once. Every launcher listens on its workers' store
//! (its address is published at start), so a watcher holds one idle
//! connection to each node it watches and, when that connection ends,
//! connects again. A refused connection, on a port that accepted before,
//! means the host is up and nothing listens there any more: the launcher
//! is gone. That is the only verdict drawn here (a port that never
//! accepted, a firewall's reset say, proves nothing); anything else (a timeout, an unreachable network, a
//! host that froze) is left to the heartbeat window, so a partition or a
//! blip that drops a connection never counts as a death.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::dynamic::Node;

/// How often a refused connection is tried again before the node is taken
/// for dead, and how long apart: a listener being re-created (it never is,
/// but a port may be briefly between owners) gets this long.
const REFUSALS: u32 = 3;
const REFUSAL_PAUSE: Duration = Duration::from_millis(50);

/// How long one connection attempt may take before it counts as
/// unanswered (left to the heartbeats).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections to the watched nodes, and the nodes found gone.
#[derive(Default)]
pub struct PeerWatch {
    held: HashMap<Node, tokio::task::JoinHandle<()>>,
    dead: Arc<Mutex<HashSet<Node>>>,
    /// Woken when a node is found gone.
    pub news: Arc<Notify>,
}

impl Drop for PeerWatch {
    fn drop(&mut self) {
        for (_, h) in self.held.drain() {
            h.abort();
        }
    }
}

impl PeerWatch {
    /// Whether `n` is watched already.
    pub fn watches(&self, n: &Node) -> bool {
        self.held.contains_key(n)
    }

    /// Stops watching the nodes not in `keep`, and forgets them.
    pub fn retain(&mut self, keep: &[Node]) {
        self.held.retain(|n, h| {
            let kept = keep.contains(n);
            if !kept {
                h.abort();
            }
            kept
        });
        self.dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n| keep.contains(n));
    }

    /// Holds a connection to `n`'s launcher at `addr` (`host:port`).
    pub fn watch(&mut self, n: Node, addr: String) {
        if self.held.contains_key(&n) {
            return;
        }
        let (dead, news, who) = (self.dead.clone(), self.news.clone(), n.clone());
        let task = tokio::spawn(async move {
            if hold(&addr).await {
                tracing::warn!(
                    "rendezvous: the launcher of node {}:{} is gone (its port {addr} refuses connections)",
                    who.addr,
                    who.pid
                );
                dead.lock().unwrap_or_else(|p| p.into_inner()).insert(who);
                news.notify_waiters();
            }
        });
        self.held.insert(n, task);
    }

    /// Every node found gone (and still remembered).
    pub fn dead(&self) -> Vec<Node> {
        self.dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Forgets `n` (it left the rendezvous).
    pub fn forget(&mut self, n: &Node) {
        if let Some(h) = self.held.remove(n) {
            h.abort();
        }
        self.dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(n);
    }
}

/// Holds connections to `addr` for as long as it accepts them. Returns true
/// once its port refuses them (the process behind it is gone); never
/// returns while the host does not answer at all (that is the heartbeats'
/// to judge).
async fn hold(addr: &str) -> bool {
    let mut refusals = 0;
    let mut accepted_once = false;
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(mut s)) => {
                refusals = 0;
                accepted_once = true;
                // Nothing is sent: the store waits for a request, we for
                // the end of the stream, which comes when the process dies.
                let mut buf = [0u8; 64];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                tokio::time::sleep(REFUSAL_PAUSE).await;
            }
            Ok(Err(e)) if accepted_once && e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refusals += 1;
                if refusals >= REFUSALS {
                    return true;
                }
                tokio::time::sleep(REFUSAL_PAUSE).await;
            }
            // Unreachable or unanswered: perhaps a partition; look again
            // later, the heartbeats decide meanwhile.
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(pid: u32) -> Node {
        Node {
            order: u32::MAX,
            addr: "127.0.0.1".into(),
            pid,
            local_id: 0,
        }
    }

    #[tokio::test]
    async fn a_port_that_closes_is_a_death_and_an_open_one_is_not() {
        let alive = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, g) = (alive.local_addr().unwrap(), gone.local_addr().unwrap());
        // Accept and hold (as a store does), until the listener goes.
        let holder = tokio::spawn(async move {
            let mut kept = Vec::new();
            loop {
                tokio::select! {
                    Ok((s, _)) = alive.accept() => kept.push(s),
                    Ok((s, _)) = gone.accept() => kept.push(s),
                }
            }
        });
        let mut w = PeerWatch::default();
        w.watch(node(1), a.to_string());
        w.watch(node(2), g.to_string());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(w.dead().is_empty());
        // The process behind both ports dies: connections end, ports close.
        holder.abort();
        let _ = holder.await;
        let news = w.news.clone();
        let t0 = std::time::Instant::now();
        while w.dead().len() < 2 {
            let _ = tokio::time::timeout(Duration::from_secs(1), news.notified()).await;
            assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", w.dead());
        }
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        assert!(w.dead().contains(&node(1)) && w.dead().contains(&node(2)));
        w.forget(&node(1));
        assert!(!w.dead().contains(&node(1)));
    }

    #[tokio::test]
    async fn a_connection_that_drops_while_the_port_still_listens_is_no_death() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A blip: the first two connections are cut, the port stays open.
        let server = tokio::spawn(async move {
            let mut kept = Vec::new();
            let mut n = 0;
            loop {
                let (s, _) = listener.accept().await.unwrap();
                n += 1;
                if n > 2 {
                    kept.push(s);
                }
            }
        });
        let mut w = PeerWatch::default();
        w.watch(node(1), addr.to_string());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            w.dead().is_empty(),
            "a dropped connection was taken for a death"
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_port_that_never_accepted_is_no_death() {
        // Bound and closed: connections to it are refused from the start
        // (as a firewall's reset would be).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut w = PeerWatch::default();
        w.watch(node(1), addr.to_string());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            w.dead().is_empty(),
            "a port that never accepted was taken for a death"
        );
    }
}
