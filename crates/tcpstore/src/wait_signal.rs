//! How a waiting connection learns that its wait was satisfied, and the one
//! piece of I/O done outside the connection's task: the STOP_WAITING byte.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use tokio::sync::Notify;

/// How a connection learns that one of its waits was satisfied.
///
/// The fast path writes the one-byte STOP_WAITING straight to the client's
/// socket from the thread that satisfied the wait: releasing 1,000 waiters
/// then costs 1,000 `send` calls instead of 1,000 task wake-ups. `write_lock`
/// keeps that byte from landing inside a reply the connection task is
/// writing; when the lock is busy or the socket is full, the byte is left to
/// the connection task (`pending` + `notify`).
#[derive(Debug)]
pub struct WaitSignal {
    pending: AtomicU32,
    notify: Notify,
    /// The connection's socket, or -1 once it is closing.
    fd: AtomicI32,
    pub(crate) write_lock: std::sync::Mutex<()>,
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
            notify: Notify::new(),
            fd: AtomicI32::new(fd),
            write_lock: std::sync::Mutex::new(()),
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
            if let Ok(_guard) = self.write_lock.try_lock() {
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
        self.notify.notify_one();
    }
    /// Number of STOP_WAITING replies owed since the last call.
    pub fn take_pending(&self) -> u32 {
        self.pending.swap(0, Ordering::AcqRel)
    }
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}
