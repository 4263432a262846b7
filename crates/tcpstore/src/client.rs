//! An async TCPStore client that behaves like torch's.
//!
//! Like torch's client it prefixes every key with `/`, so keys written through
//! it and through `torch.distributed.TCPStore` are the same keys; `get` waits
//! for the key before reading it; a timed-out `wait` sends CANCEL_WAIT and
//! drains the replies so the connection stays usable.
//!
//! Every request is bounded in time and safe to cancel. A request that does
//! not finish (its future dropped by a `select!`, a timeout, a broken
//! connection) leaves the connection in an unknown place of the protocol: an
//! unread reply, a late STOP_WAITING, half a request sent. The client then
//! never uses that connection again: the next request opens a fresh one
//! (one try, bounded), so a reply can never be read as the answer to
//! another request. A store that vanishes without a reset (power loss, a
//! partition) fails the request after the request timeout instead of the
//! kernel's retransmission limit (about 15 minutes).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::codec::{self, code, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not connect to the store at {addr} within {timeout:?}: {last}")]
    Connect {
        addr: String,
        timeout: Duration,
        last: String,
    },
    #[error("store connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("wait timeout after {}ms, keys: {}", timeout.as_millis(), keys.join(", "))]
    WaitTimeout {
        timeout: Duration,
        keys: Vec<String>,
    },
    #[error("{addr} is not a TCPStore: it answered the handshake with {reply:?}")]
    NotAStore { addr: String, reply: String },
    #[error("unexpected reply byte {0} from the store")]
    UnexpectedReply(u8),
    #[error("queue is empty")]
    QueueEmpty,
    #[error("store reply too large ({0} bytes)")]
    ReplyTooLarge(u64),
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
}

/// How [`Client::connect`] retries.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Give up connecting after this long; also the default timeout of waits.
    pub timeout: Duration,
    /// First retry interval; grows ×1.5 per retry with ±50 % jitter, capped at
    /// `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            timeout: Duration::from_secs(300),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Longest wait for a server's answer to VALIDATE + PING.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest reply value the client accepts.
const MAX_REPLY: u64 = 1 << 31;

/// Longest wait for the answer to a request that does not wait on keys.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection and what is half-built on it.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

pub struct Client {
    conn: Conn,
    /// Where to connect again after a request that did not finish.
    addr: String,
    /// A request was started and has not finished on `conn`: the next one
    /// needs a fresh connection.
    dirty: bool,
    timeout: Duration,
    request_timeout: Duration,
}

fn prefixed(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(b'/');
    k.extend_from_slice(key.as_bytes());
    k
}

impl Client {
    /// Connects to `host:port`, retrying with backoff and jitter until
    /// `opts.timeout`, then validates and pings like torch's client.
    pub async fn connect(
        host: &str,
        port: u16,
        opts: ConnectOptions,
    ) -> Result<Client, ClientError> {
        let deadline = Instant::now() + opts.timeout;
        let mut interval = opts.initial_backoff;
        let mut warned_silent = false;
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        loop {
            // A peer that accepts but never answers the handshake (not a
            // store) must not hang us: each try is bounded too.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt =
                tokio::time::timeout(remaining.min(HANDSHAKE_TIMEOUT), Self::try_connect(&addr))
                    .await;
            let attempt = attempt.unwrap_or_else(|_| {
                if !warned_silent {
                    // Perhaps a store too busy to answer, perhaps not a
                    // store at all: say so rather than wait in silence.
                    warned_silent = true;
                    tracing::warn!(
                        "{addr} accepts connections but does not answer the TCPStore handshake; retrying for up to {:?}",
                        opts.timeout
                    );
                }
                Err(ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer to the TCPStore handshake (is this port a TCPStore?)",
                )))
            });
            let last = match attempt {
                Ok(stream) => {
                    return Ok(Client {
                        conn: Conn {
                            stream,
                            buf: Vec::new(),
                        },
                        addr,
                        dirty: false,
                        timeout: opts.timeout,
                        request_timeout: REQUEST_TIMEOUT,
                    })
                }
                // Something answered, and not as a TCPStore does: waiting
                // will not change what listens there.
                Err(e @ ClientError::NotAStore { .. }) => return Err(e),
                Err(e) => e,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Connect {
                    addr,
                    timeout: opts.timeout,
                    last: last.to_string(),
                });
            }
            let jitter = rand::thread_rng().gen_range(0.5..1.5);
            let sleep = interval.mul_f64(jitter).min(deadline - now);
            tracing::debug!("store at {addr} not reachable ({last}); retrying in {sleep:?}");
            tokio::time::sleep(sleep).await;
            interval = interval.mul_f64(1.5).min(opts.max_backoff);
        }
    }

    async fn try_connect(addr: &str) -> Result<TcpStream, ClientError> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let nonce = std::process::id();
        let mut hello = Vec::with_capacity(10);
        codec::encode(
            &Request::Validate {
                magic: codec::VALIDATE_MAGIC,
            },
            &mut hello,
        );
        codec::encode(&Request::Ping { nonce }, &mut hello);
        stream.write_all(&hello).await?;
        let got = stream.read_u32_le().await?;
        if got != nonce {
            return Err(ClientError::NotAStore {
                addr: addr.to_string(),
                reply: String::from_utf8_lossy(&got.to_le_bytes()).into_owned(),
            });
        }
        Ok(stream)
    }

    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.conn.stream.peer_addr()
    }

    /// The timeout used by `get`, `multi_get` and blocking `queue_pop`.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long a request that does not wait on keys may take (30 s by
    /// default); a wait gets this on top of its own timeout.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// The connection for the next request, a fresh one if the last
    /// request did not finish; marked busy until [`Client::settle`].
    async fn ready(&mut self) -> Result<&mut Conn, ClientError> {
        if self.dirty || closed_by_peer(&self.conn.stream) {
            let stream = tokio::time::timeout(
                self.request_timeout.min(HANDSHAKE_TIMEOUT),
                Self::try_connect(&self.addr),
            )
            .await
            .map_err(|_| ClientError::Timeout(self.request_timeout.min(HANDSHAKE_TIMEOUT)))??;
            tracing::debug!("store connection to {} opened again", self.addr);
            self.conn = Conn {
                stream,
                buf: Vec::new(),
            };
        }
        self.dirty = true;
        Ok(&mut self.conn)
    }

    /// After a request: the connection is clean again when the request
    /// finished the protocol's exchange (a successful reply, or an answer
    /// that says no); an I/O error or a timeout leaves it dirty.
    fn settle<T>(&mut self, r: &Result<T, ClientError>) {
        self.dirty = !matches!(
            r,
            Ok(_) | Err(ClientError::WaitTimeout { .. } | ClientError::QueueEmpty)
        );
    }

    /// Runs one request on a clean connection, within `limit`.
    async fn bounded<T>(
        limit: Duration,
        f: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(limit, f)
            .await
            .unwrap_or(Err(ClientError::Timeout(limit)))
    }

    pub async fn set(&mut self, key: &str, value: &[u8]) -> Result<(), ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.set(key, value)).await;
        self.settle(&r);
        r
    }

    /// Waits for `key` (up to the client timeout), then reads it.
    pub async fn get(&mut self, key: &str) -> Result<Vec<u8>, ClientError> {
        let (t, limit) = (self.timeout, self.timeout + self.request_timeout);
        let r = Self::bounded(limit, self.ready().await?.get(key, t)).await;
        self.settle(&r);
        r
    }

    /// Reads `key` without waiting; a missing key reads as empty.
    pub async fn get_now(&mut self, key: &str) -> Result<Vec<u8>, ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.get_now(key)).await;
        self.settle(&r);
        r
    }

    pub async fn add(&mut self, key: &str, delta: i64) -> Result<i64, ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.add(key, delta)).await;
        self.settle(&r);
        r
    }

    /// Returns the value now stored (or, for a missing key and a non-empty
    /// `expected`, `expected` itself): the swap succeeded iff it equals
    /// `desired`.
    pub async fn compare_set(
        &mut self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let limit = self.request_timeout;
        let conn = self.ready().await?;
        let r = Self::bounded(limit, conn.compare_set(key, expected, desired)).await;
        self.settle(&r);
        r
    }

    pub async fn check(&mut self, keys: &[&str]) -> Result<bool, ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.check(keys)).await;
        self.settle(&r);
        r
    }

    /// Waits until every key exists; on timeout cancels the wait on the server.
    pub async fn wait(&mut self, keys: &[&str], timeout: Duration) -> Result<(), ClientError> {
        let limit = timeout + self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.wait(keys, timeout)).await;
        self.settle(&r);
        r
    }

    pub async fn num_keys(&mut self) -> Result<i64, ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.num_keys()).await;
        self.settle(&r);
        r
    }

    pub async fn delete_key(&mut self, key: &str) -> Result<bool, ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.delete_key(key)).await;
        self.settle(&r);
        r
    }

    pub async fn append(&mut self, key: &str, value: &[u8]) -> Result<(), ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.append(key, value)).await;
        self.settle(&r);
        r
    }

    /// Waits for all keys, then reads them in order.
    pub async fn multi_get(&mut self, keys: &[&str]) -> Result<Vec<Vec<u8>>, ClientError> {
        let (t, limit) = (self.timeout, self.timeout + self.request_timeout);
        let r = Self::bounded(limit, self.ready().await?.multi_get(keys, t)).await;
        self.settle(&r);
        r
    }

    pub async fn multi_set(&mut self, pairs: &[(&str, &[u8])]) -> Result<(), ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.multi_set(pairs)).await;
        self.settle(&r);
        r
    }

    pub async fn ping(&mut self, nonce: u32) -> Result<u32, ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.ping(nonce)).await;
        self.settle(&r);
        r
    }

    pub async fn queue_push(&mut self, key: &str, value: &[u8]) -> Result<(), ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.queue_push(key, value)).await;
        self.settle(&r);
        r
    }

    /// Pops the head of a queue; with `block`, first waits (up to the client
    /// timeout) for the queue to be non-empty.
    pub async fn queue_pop(&mut self, key: &str, block: bool) -> Result<Vec<u8>, ClientError> {
        let (t, limit) = (self.timeout, self.timeout + self.request_timeout);
        let r = Self::bounded(limit, self.ready().await?.queue_pop(key, block, t)).await;
        self.settle(&r);
        r
    }

    pub async fn queue_len(&mut self, key: &str) -> Result<i64, ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.queue_len(key)).await;
        self.settle(&r);
        r
    }

    /// Keys without the client prefix; keys not written through a client
    /// (no leading `/`) are left out, as torch's client does.
    pub async fn list_keys(&mut self) -> Result<Vec<String>, ClientError> {
        let limit = self.request_timeout;
        let r = Self::bounded(limit, self.ready().await?.list_keys()).await;
        self.settle(&r);
        r
    }

    /// Server-side barrier (torch 2.15's BARRIER command): returns when
    /// `world_size` clients have arrived at `key`.
    pub async fn barrier(
        &mut self,
        key: &str,
        world_size: i64,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let limit = timeout + self.request_timeout;
        let conn = self.ready().await?;
        let r = Self::bounded(limit, conn.barrier(key, world_size, timeout)).await;
        self.settle(&r);
        r
    }
}

/// Whether an idle connection was closed (or written to) by the server:
/// between requests a store never sends anything, so anything to read is
/// the end of the connection (its host restarted, say) or garbage. Such a
/// connection is replaced before a request is written into it: a request
/// written into a dead connection would fail, though the store behind the
/// address may be back.
fn closed_by_peer(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll on one pollfd of a descriptor this stream owns, without
    // waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents != 0
}

/// The protocol on one connection; [`Client`] decides when it may be used.
impl Conn {
    async fn send(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(&self.buf).await?;
        self.buf.clear();
        Ok(())
    }

    async fn read_bytes(&mut self) -> Result<Vec<u8>, ClientError> {
        let len = self.stream.read_u64_le().await?;
        if len > MAX_REPLY {
            return Err(ClientError::ReplyTooLarge(len));
        }
        let mut v = vec![0u8; len as usize];
        self.stream.read_exact(&mut v).await?;
        Ok(v)
    }

    async fn set(&mut self, key: &str, value: &[u8]) -> Result<(), ClientError> {
        let k = prefixed(key);
        codec::encode(&Request::Set { key: &k, value }, &mut self.buf);
        self.send().await
    }

    /// Waits for `key` (up to `timeout`), then reads it.
    async fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>, ClientError> {
        self.wait(&[key], timeout).await?;
        self.get_now(key).await
    }

    /// Reads `key` without waiting; a missing key reads as empty.
    async fn get_now(&mut self, key: &str) -> Result<Vec<u8>, ClientError> {
        let k = prefixed(key);
        codec::encode(&Request::Get { key: &k }, &mut self.buf);
        self.send().await?;
        self.read_bytes().await
    }

    async fn add(&mut self, key: &str, delta: i64) -> Result<i64, ClientError> {
        let k = prefixed(key);
        codec::encode(&Request::Add { key: &k, delta }, &mut self.buf);
        self.send().await?;
        Ok(self.stream.read_i64_le().await?)
    }

    /// Returns the value now stored (or, for a missing key and a non-empty
    /// `expected`, `expected` itself): the swap succeeded iff it equals
    /// `desired`.
    async fn compare_set(
        &mut self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let k = prefixed(key);
        codec::encode(
            &Request::CompareSet {
                key: &k,
                expected,
                desired,
            },
            &mut self.buf,
        );
        self.send().await?;
        self.read_bytes().await
    }

    async fn check(&mut self, keys: &[&str]) -> Result<bool, ClientError> {
        let ks: Vec<_> = keys.iter().map(|k| prefixed(k)).collect();
        codec::encode_keys(code::CHECK, &ks, &mut self.buf);
        self.send().await?;
        match self.stream.read_u8().await? {
            codec::READY => Ok(true),
            codec::NOT_READY => Ok(false),
            other => Err(ClientError::UnexpectedReply(other)),
        }
    }

    /// Waits until every key exists; on timeout cancels the wait on the server.
    async fn wait(&mut self, keys: &[&str], timeout: Duration) -> Result<(), ClientError> {
        let ks: Vec<_> = keys.iter().map(|k| prefixed(k)).collect();
        codec::encode_keys(code::WAIT, &ks, &mut self.buf);
        self.send().await?;
        self.await_stop_waiting(timeout, || {
            ks.iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect()
        })
        .await
    }

    async fn await_stop_waiting(
        &mut self,
        timeout: Duration,
        keys: impl FnOnce() -> Vec<String>,
    ) -> Result<(), ClientError> {
        match tokio::time::timeout(timeout, self.stream.read_u8()).await {
            Ok(Ok(codec::STOP_WAITING)) => Ok(()),
            Ok(Ok(other)) => Err(ClientError::UnexpectedReply(other)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                self.buf.push(code::CANCEL_WAIT);
                self.send().await?;
                // A STOP_WAITING may have raced ahead of WAIT_CANCELED.
                let mut b = self.stream.read_u8().await?;
                if b == codec::STOP_WAITING {
                    b = self.stream.read_u8().await?;
                }
                if b != codec::WAIT_CANCELED {
                    return Err(ClientError::UnexpectedReply(b));
                }
                Err(ClientError::WaitTimeout {
                    timeout,
                    keys: keys(),
                })
            }
        }
    }

    async fn num_keys(&mut self) -> Result<i64, ClientError> {
        self.buf.push(code::GETNUMKEYS);
        self.send().await?;
        Ok(self.stream.read_i64_le().await?)
    }

    async fn delete_key(&mut self, key: &str) -> Result<bool, ClientError> {
        let k = prefixed(key);
        codec::encode(&Request::DeleteKey { key: &k }, &mut self.buf);
        self.send().await?;
        Ok(self.stream.read_i64_le().await? == 1)
    }

    async fn append(&mut self, key: &str, value: &[u8]) -> Result<(), ClientError> {
        let k = prefixed(key);
        codec::encode(&Request::Append { key: &k, value }, &mut self.buf);
        self.send().await
    }

    /// Waits for all keys, then reads them in order.
    async fn multi_get(
        &mut self,
        keys: &[&str],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        self.wait(keys, timeout).await?;
        let ks: Vec<_> = keys.iter().map(|k| prefixed(k)).collect();
        codec::encode_keys(code::MULTI_GET, &ks, &mut self.buf);
        self.send().await?;
        let mut out = Vec::with_capacity(keys.len());
        for _ in keys {
            out.push(self.read_bytes().await?);
        }
        Ok(out)
    }

    async fn multi_set(&mut self, pairs: &[(&str, &[u8])]) -> Result<(), ClientError> {
        let ps: Vec<_> = pairs.iter().map(|(k, v)| (prefixed(k), *v)).collect();
        codec::encode_multi_set(&ps, &mut self.buf);
        self.send().await
    }

    async fn ping(&mut self, nonce: u32) -> Result<u32, ClientError> {
        codec::encode(&Request::Ping { nonce }, &mut self.buf);
        self.send().await?;
        Ok(self.stream.read_u32_le().await?)
    }

    async fn queue_push(&mut self, key: &str, value: &[u8]) -> Result<(), ClientError> {
        let k = prefixed(key);
        codec::encode(&Request::QueuePush { key: &k, value }, &mut self.buf);
        self.send().await
    }

    /// Pops the head of a queue; with `block`, first waits (up to the client
    /// timeout) for the queue to be non-empty.
    async fn queue_pop(
        &mut self,
        key: &str,
        block: bool,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        if block {
            self.wait(&[key], timeout).await?;
        }
        let k = prefixed(key);
        codec::encode(&Request::QueuePop { key: &k }, &mut self.buf);
        self.send().await?;
        let len = self.stream.read_i64_le().await?;
        if len <= 0 {
            return Err(ClientError::QueueEmpty);
        }
        self.read_bytes().await
    }

    async fn queue_len(&mut self, key: &str) -> Result<i64, ClientError> {
        let k = prefixed(key);
        codec::encode(&Request::QueueLen { key: &k }, &mut self.buf);
        self.send().await?;
        Ok(self.stream.read_i64_le().await?)
    }

    /// Keys without the client prefix; keys not written through a client
    /// (no leading `/`) are left out, as torch's client does.
    async fn list_keys(&mut self) -> Result<Vec<String>, ClientError> {
        self.buf.push(code::LIST_KEYS);
        self.send().await?;
        let n = self.stream.read_i64_le().await?;
        let mut out = Vec::new();
        for _ in 0..n.max(0) {
            let k = self.read_bytes().await?;
            if let Some(rest) = k.strip_prefix(b"/") {
                out.push(String::from_utf8_lossy(rest).into_owned());
            }
        }
        Ok(out)
    }

    /// Server-side barrier (torch 2.15's BARRIER command): returns when
    /// `world_size` clients have arrived at `key`.
    async fn barrier(
        &mut self,
        key: &str,
        world_size: i64,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let k = prefixed(key);
        codec::encode(
            &Request::Barrier {
                key: &k,
                world_size,
            },
            &mut self.buf,
        );
        self.send().await?;
        let name = key.to_string();
        self.await_stop_waiting(timeout, || vec![name]).await
    }
}
