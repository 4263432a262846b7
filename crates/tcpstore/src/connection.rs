//! One client connection: read frames, apply them to the shared state, write
//! replies, and deliver the STOP_WAITING replies of waits that complete later.
//!
//! An idle connection holds no buffers (they are released when drained), so
//! thousands of idle clients cost little memory. A peer that breaks the
//! protocol is disconnected; nothing it did affects other clients.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::codec::{self, put_bytes, put_i64, put_u32, Limits, Request};
use crate::state::{State, StateError, WaitId, WaitSignal};

/// Why a connection was closed by the server.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CloseReason {
    #[error("first command was not VALIDATE")]
    NotValidated,
    #[error("VALIDATE with wrong magic {0:#010x}")]
    BadMagic(u32),
    #[error(transparent)]
    Protocol(#[from] codec::ProtocolError),
    #[error(transparent)]
    State(#[from] StateError),
}

pub(crate) struct Connection {
    stream: TcpStream,
    state: Arc<Mutex<State>>,
    limits: Limits,
    signal: Arc<WaitSignal>,
    validated: bool,
    /// Bytes of an incomplete frame.
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// Waits and barrier registrations of this connection that may still be
    /// pending in the state.
    waits: Vec<WaitId>,
    stats: Arc<crate::server::ServerStats>,
}

const READ_CHUNK: usize = 16 * 1024;
/// Buffers larger than this are released once drained.
const KEEP_CAPACITY: usize = 64 * 1024;

impl Connection {
    pub(crate) fn new(
        stream: TcpStream,
        state: Arc<Mutex<State>>,
        limits: Limits,
        stats: Arc<crate::server::ServerStats>,
    ) -> Self {
        use std::os::fd::AsRawFd;
        stats
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fd = stream.as_raw_fd();
        Connection {
            stream,
            state,
            limits,
            signal: Arc::new(WaitSignal::new(fd)),
            validated: false,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            waits: Vec::new(),
            stats,
        }
    }

    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let peer = self.stream.peer_addr().ok();
        let result = self.serve(&mut shutdown).await;
        if let Err(e) = &result {
            tracing::debug!(?peer, "closing store connection: {e}");
        }
    }

    async fn serve(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), ServeError> {
        if *shutdown.borrow() {
            return Ok(());
        }
        // One hand-written poll per turn instead of `select!` over fresh
        // futures: registering and dropping waiters on every request was a
        // visible share of the server's own CPU. A busy connection sees a
        // shutdown through the version check (one atomic load); the
        // shutdown future, which takes a lock when polled, is only polled
        // when there is nothing to read.
        let signal = Arc::clone(&self.signal);
        let mut stop_rx = shutdown.clone();
        let stopping = stop_rx.changed();
        tokio::pin!(stopping);
        loop {
            if shutdown.has_changed().unwrap_or(true) {
                return Ok(());
            }
            let event = std::future::poll_fn(|cx| {
                if let Poll::Ready(n) = signal.poll_pending(cx) {
                    return Poll::Ready(Event::Owed(n));
                }
                if let Poll::Ready(r) = self.stream.poll_read_ready(cx) {
                    return Poll::Ready(Event::Readable(r));
                }
                match stopping.as_mut().poll(cx) {
                    Poll::Ready(_) => Poll::Ready(Event::Stop),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match event {
                Event::Stop => return Ok(()),
                Event::Owed(n) => {
                    self.outbuf
                        .extend(std::iter::repeat_n(codec::STOP_WAITING, n as usize));
                }
                Event::Readable(r) => {
                    r?;
                    if self.read_and_process()? {
                        return Ok(());
                    }
                }
            }
            if !self.outbuf.is_empty() {
                self.flush().await?;
                self.outbuf.clear();
                if self.outbuf.capacity() > KEEP_CAPACITY {
                    self.outbuf = Vec::new();
                }
            }
        }
    }

    /// Writes `outbuf`, holding the write lock only around each `send` so
    /// that a directly written STOP_WAITING never lands inside a reply; while
    /// the socket has taken only part of `outbuf`, the lock's flag tells
    /// `WaitSignal::wake` to leave its byte to this task.
    async fn flush(&mut self) -> std::io::Result<()> {
        let mut off = 0;
        while off < self.outbuf.len() {
            self.stream.writable().await?;
            let mut replying = self
                .signal
                .write_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match self.stream.try_write(&self.outbuf[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    *replying = false;
                    return Err(e);
                }
            }
            *replying = off < self.outbuf.len();
        }
        Ok(())
    }

    /// Reads what is available and applies every complete frame. Returns true
    /// when the peer closed the connection.
    fn read_and_process(&mut self) -> Result<bool, ServeError> {
        // One read buffer per runtime thread, zeroed once: a fresh 16 KiB
        // buffer per read cost a memset per request. It is only borrowed
        // here, between awaits, so no two connections share it at once.
        thread_local! {
            static CHUNK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_CHUNK]);
        }
        CHUNK.with(|chunk| {
            let mut chunk = chunk.borrow_mut();
            loop {
                let (n, drained) = match self.read_once(&mut chunk) {
                    Ok((0, _)) => return Ok(true),
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e.into()),
                };
                if self.inbuf.is_empty() {
                    // Fast path: decode straight from the read buffer.
                    let used = self.process(&chunk[..n])?;
                    self.inbuf.extend_from_slice(&chunk[used..n]);
                } else {
                    self.inbuf.extend_from_slice(&chunk[..n]);
                    let buf = std::mem::take(&mut self.inbuf);
                    let used = self.process(&buf)?;
                    self.inbuf = buf;
                    self.inbuf.drain(..used);
                    if self.inbuf.is_empty() && self.inbuf.capacity() > KEEP_CAPACITY {
                        self.inbuf = Vec::new();
                    }
                }
                if drained {
                    return Ok(false);
                }
            }
        })
    }

    /// One `recv` into `buf`: the bytes read, and whether they drained the
    /// socket. A read shorter than the buffer found the queue empty, so the
    /// socket's readiness is cleared right there (as libuv does) instead of
    /// by one more `recv` that returns EAGAIN: that second call was a third
    /// of the server's system calls. The readiness is cleared only if no
    /// new data was signalled since this call began (tokio compares the
    /// event tick), so no wake-up is lost.
    fn read_once(&self, buf: &mut [u8]) -> std::io::Result<(usize, bool)> {
        use std::io::Read;
        let mut short = None;
        let r = self.stream.try_io(tokio::io::Interest::READABLE, || {
            let n = (&*socket2::SockRef::from(&self.stream)).read(buf)?;
            if n > 0 && n < buf.len() {
                short = Some(n);
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (r, short) {
            (_, Some(n)) => Ok((n, true)),
            (Ok(n), None) => Ok((n, false)),
            (Err(e), None) => Err(e),
        }
    }

    /// Applies every complete frame at the start of `buf`; returns the bytes used.
    fn process(&mut self, buf: &[u8]) -> Result<usize, CloseReason> {
        let mut used = 0;
        let mut state = None;
        while let Some((req, n)) = codec::decode(&buf[used..], &self.limits)? {
            used += n;
            if !self.validated {
                match req {
                    Request::Validate { magic } if magic == codec::VALIDATE_MAGIC => {
                        self.validated = true;
                        continue;
                    }
                    Request::Validate { magic } => return Err(CloseReason::BadMagic(magic)),
                    _ => return Err(CloseReason::NotValidated),
                }
            }
            // Hold the lock across a batch of pipelined frames.
            let state =
                state.get_or_insert_with(|| self.state.lock().unwrap_or_else(|p| p.into_inner()));
            apply(req, state, &mut self.outbuf, &self.signal, &mut self.waits)?;
            self.stats
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Still under the lock: no CANCEL_WAIT can slip between a wait's
            // release and its STOP_WAITING.
            for released in state.released() {
                released.wake();
            }
        }
        Ok(used)
    }
}

impl Drop for Connection {
    /// Drops this client's waits and barrier registrations (never its keys),
    /// and detaches the socket before it closes.
    fn drop(&mut self) {
        self.stats
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.signal.detach();
        for id in self.waits.drain(..) {
            state.cancel(id);
        }
    }
}

/// What woke a connection's task.
enum Event {
    Stop,
    /// STOP_WAITING replies owed that another thread could not write.
    Owed(u32),
    Readable(std::io::Result<()>),
}

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Close(#[from] CloseReason),
}

/// Applies one validated request and appends its reply.
fn apply(
    req: Request<'_>,
    state: &mut State,
    out: &mut Vec<u8>,
    signal: &Arc<WaitSignal>,
    waits: &mut Vec<WaitId>,
) -> Result<(), CloseReason> {
    match req {
        // A repeated VALIDATE is harmless.
        Request::Validate { .. } => {}
        Request::Set { key, value } => state.set(key, value),
        Request::CompareSet {
            key,
            expected,
            desired,
        } => {
            let v = state.compare_set(key, expected, desired);
            put_bytes(out, &v);
        }
        // torch's libuv server answers an empty value for a missing key.
        Request::Get { key } => put_bytes(out, state.get(key).unwrap_or_default()),
        Request::Add { key, delta } => put_i64(out, state.add(key, delta)?),
        Request::Check { keys } => out.push(if state.check(keys.iter()) {
            codec::READY
        } else {
            codec::NOT_READY
        }),
        Request::Wait { keys } => {
            waits.retain(|&id| state.is_waiting(id));
            match state.wait(keys.iter(), signal) {
                None => out.push(codec::STOP_WAITING),
                Some(id) => waits.push(id),
            }
        }
        Request::GetNumKeys => put_i64(out, state.num_keys()),
        Request::DeleteKey { key } => put_i64(out, state.delete(key)),
        Request::Append { key, value } => state.append(key, value),
        Request::MultiGet { keys } => {
            for k in keys.iter() {
                put_bytes(out, state.get(k).unwrap_or_default());
            }
        }
        Request::MultiSet { pairs } => {
            for (k, v) in pairs.iter() {
                state.set(k, v);
            }
        }
        Request::CancelWait => {
            for id in waits.drain(..) {
                state.cancel(id);
            }
            // A STOP_WAITING that raced ahead of the cancel goes out first;
            // torch's client reads it, then WAIT_CANCELED.
            let raced = signal.take_pending();
            out.extend(std::iter::repeat_n(codec::STOP_WAITING, raced as usize));
            out.push(codec::WAIT_CANCELED);
        }
        Request::Ping { nonce } => put_u32(out, nonce),
        Request::QueuePush { key, value } => state.queue_push(key, value),
        Request::QueuePop { key } => {
            let (len, v) = state.queue_pop(key);
            put_i64(out, len);
            if let Some(v) = v {
                put_bytes(out, &v);
            }
        }
        Request::QueueLen { key } => put_i64(out, state.queue_len(key)),
        Request::ListKeys => {
            put_i64(out, state.num_keys());
            for k in state.list_keys() {
                put_bytes(out, k);
            }
        }
        Request::Barrier { key, world_size } => {
            waits.retain(|&id| state.is_waiting(id));
            match state.barrier(key, world_size, signal)? {
                None => out.push(codec::STOP_WAITING),
                Some(id) => waits.push(id),
            }
        }
    }
    Ok(())
}
