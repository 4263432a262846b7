//! Whether a rendezvous endpoint names this machine: address lookups, which
//! may block on DNS, so callers run them in the blocking pool.

/// Whether two host names or addresses name the same host (by their
/// addresses, no reverse DNS).
pub(crate) fn same_host(a: &str, b: &str) -> bool {
    use std::net::ToSocketAddrs;
    if a == b {
        return true;
    }
    let ips = |h: &str| -> Vec<std::net::IpAddr> {
        (h, 0)
            .to_socket_addrs()
            .map(|it| it.map(|s| s.ip()).collect())
            .unwrap_or_default()
    };
    let (x, y) = (ips(a), ips(b));
    x.iter().any(|ip| y.contains(ip))
}

/// Whether `host` names this machine: `localhost`, this host's names, or an
/// address that a socket can be bound to here. No reverse DNS.
pub(crate) fn host_is_local(host: &str) -> bool {
    use std::net::ToSocketAddrs;
    if host == "localhost" || host == crate::process::host::hostname() {
        return true;
    }
    let Ok(addrs) = (host, 0).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| a.ip().is_loopback() || std::net::UdpSocket::bind((a.ip(), 0)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hosts() {
        assert!(host_is_local("localhost"));
        assert!(host_is_local("127.0.0.1"));
        assert!(host_is_local("127.0.0.3"));
        assert!(!host_is_local("192.0.2.1"));
        assert!(same_host("127.0.0.2", "127.0.0.2"));
        assert!(!same_host("127.0.0.2", "127.0.0.3"));
        assert!(same_host("localhost", "127.0.0.1"));
    }
}
