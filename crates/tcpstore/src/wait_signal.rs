//! How a waiting connection learns that its wait was satisfied, and the one
//! piece of I/O done outside the connection's task: the STOP_WAITING byte.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

/// How a connection learns that one of its waits was satisfied.
///
/// The fast path writes the one-byte STOP_WAITING straight to the client's
/// socket from the thread that satisfied the wait: releasing 1,000 waiters
/// then costs 1,000 `send` calls instead of 1,000 task wake-ups. `write_lock`
/// and `replying` keep that byte from landing inside a reply the connection
/// task is writing (a reply the socket took only part of is still being
/// written between two `send`s); when the lock is busy, a reply is half
/// written or the socket is full, the byte is left to the connection task
/// (`pending` + `waker`), which writes it after the reply.
#[derive(Debug)]
pub struct WaitSignal {
    pending: AtomicU32,
    waker: AtomicWaker,
    /// The connection's socket, or -1 once it is closing.
    fd: AtomicI32,
    /// Guards every write to the socket; the bool is true while the
    /// connection task has reply bytes that the socket has not taken yet.
    pub(crate) write_lock: std::sync::Mutex<bool>,
}

impl Default for WaitSignal {
    fn default() -> Self {
        WaitSignal::new(-1)
    }
}

impl WaitSignal {
    pub fn new(fd: i32) -> Self {
        WaitSignal {
            pending: AtomicU32::new(0),
            waker: AtomicWaker::new(),
            fd: AtomicI32::new(fd),
            write_lock: std::sync::Mutex::new(false),
        }
    }

    /// Stops direct writes; called (under the state lock) before the socket
    /// is closed, so a recycled descriptor is never written.
    pub(crate) fn detach(&self) {
        self.fd.store(-1, Ordering::Release);
    }

    /// Delivers one STOP_WAITING. Called by the connection that satisfied
    /// the wait, with the state lock held.
    pub(crate) fn wake(&self) {
        let fd = self.fd.load(Ordering::Acquire);
        if fd >= 0 {
            // Never inside a half-written reply: that byte is left to the
            // task, which writes it after the reply.
            if let Ok(false) = self.write_lock.try_lock().as_deref() {
                let byte = [crate::codec::STOP_WAITING];
                // SAFETY: `fd` is the connection's open socket: it is detached
                // under the state lock (held by our caller) before closing.
                let n = unsafe {
                    libc::send(
                        fd,
                        byte.as_ptr().cast(),
                        1,
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n == 1 {
                    return;
                }
            }
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.waker.wake();
    }
    /// Number of STOP_WAITING replies owed since the last call.
    pub fn take_pending(&self) -> u32 {
        self.pending.swap(0, Ordering::AcqRel)
    }
    /// The STOP_WAITING replies owed to the connection task, or `Pending`
    /// with `cx` woken by the next `wake` that leaves one. A registered
    /// waker, not a waiter list: polling it on every request costs two
    /// atomics, no lock.
    pub fn poll_pending(&self, cx: &mut Context<'_>) -> Poll<u32> {
        self.waker.register(cx.waker());
        match self.take_pending() {
            0 => Poll::Pending,
            n => Poll::Ready(n),
        }
    }
}
