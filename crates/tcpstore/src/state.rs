//! The store's data: keys, queues, and the connections waiting on them.
//!
//! Pure data structure, no I/O. A wait is registered with the waiting
//! connection's [`WaitSignal`], an opaque handle here; when a request
//! satisfies waits, their signals are set aside and the connection that
//! applied the request takes them ([`State::released`]) and wakes them before
//! it lets go of the state lock, so once a connection has removed its
//! registrations no further wake can arrive for them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

pub use crate::wait_signal::WaitSignal;

pub type WaitId = u64;

#[derive(Debug)]
struct PendingWait {
    /// Keys this wait is still registered on (with repeats, as sent).
    keys: Vec<Vec<u8>>,
    missing: usize,
    signal: Arc<WaitSignal>,
    /// Barrier registrations live in `barrier_waiters`, not `key_waiters`.
    barrier: bool,
}

/// Why a request could not be applied; the connection is closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("ADD on key {key:?} whose value {value:?} is not a decimal integer")]
    NotAnInteger { key: String, value: String },
    #[error("ADD on key {key:?} overflows a 64-bit integer")]
    Overflow { key: String },
}

#[derive(Debug, Default)]
pub struct State {
    keys: HashMap<Vec<u8>, Vec<u8>>,
    queues: HashMap<Vec<u8>, VecDeque<Vec<u8>>>,
    key_waiters: HashMap<Vec<u8>, Vec<WaitId>>,
    barrier_waiters: HashMap<Vec<u8>, Vec<WaitId>>,
    waits: HashMap<WaitId, PendingWait>,
    next_wait: WaitId,
    /// Signals of waits satisfied by the last request, to be woken by the
    /// connection that applied it.
    released: Vec<Arc<WaitSignal>>,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Parses a stored counter the way C's `stoll` does: leading whitespace, an
/// optional sign, digits; trailing bytes after the digits are ignored.
fn parse_counter(value: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(value).ok()?.trim_start();
    let end = s
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && (c == '-' || c == '+'))))
        .map_or(s.len(), |(i, _)| i);
    s[..end].parse().ok()
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    /// A key "exists" for CHECK and WAIT if it has a value or a non-empty queue.
    fn exists(&self, key: &[u8]) -> bool {
        self.keys.contains_key(key) || self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    /// Wakes every wait registered on `key`.
    fn notify_key(&mut self, key: &[u8]) {
        let Some(ids) = self.key_waiters.remove(key) else {
            return;
        };
        for id in ids {
            let done = match self.waits.get_mut(&id) {
                Some(w) => {
                    w.missing -= 1;
                    w.missing == 0
                }
                None => false,
            };
            if done {
                if let Some(w) = self.waits.remove(&id) {
                    self.released.push(w.signal);
                }
            }
        }
    }

    /// The signals of the waits that the requests applied since the last
    /// call satisfied. Wake each (one STOP_WAITING) before releasing the
    /// state's lock.
    pub fn released(&mut self) -> std::vec::Drain<'_, Arc<WaitSignal>> {
        self.released.drain(..)
    }

    pub fn set(&mut self, key: &[u8], value: &[u8]) {
        match self.keys.get_mut(key) {
            Some(v) => {
                v.clear();
                v.extend_from_slice(value);
            }
            None => {
                self.keys.insert(key.to_vec(), value.to_vec());
            }
        }
        self.notify_key(key);
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.keys.get(key).map(Vec::as_slice)
    }

    /// COMPARE_SET with torch's semantics; returns the reply value.
    pub fn compare_set(&mut self, key: &[u8], expected: &[u8], desired: &[u8]) -> Vec<u8> {
        let reply = match self.keys.get_mut(key) {
            None if expected.is_empty() => {
                self.keys.insert(key.to_vec(), desired.to_vec());
                desired.to_vec()
            }
            // torch answers with the expected value and stores nothing.
            None => expected.to_vec(),
            Some(current) => {
                if current.as_slice() == expected {
                    current.clear();
                    current.extend_from_slice(desired);
                }
                current.clone()
            }
        };
        self.notify_key(key);
        reply
    }

    pub fn add(&mut self, key: &[u8], delta: i64) -> Result<i64, StateError> {
        let current = match self.keys.get(key) {
            None => 0,
            Some(v) => parse_counter(v).ok_or_else(|| StateError::NotAnInteger {
                key: lossy(key),
                value: lossy(v),
            })?,
        };
        let new = current
            .checked_add(delta)
            .ok_or_else(|| StateError::Overflow { key: lossy(key) })?;
        self.keys.insert(key.to_vec(), new.to_string().into_bytes());
        self.notify_key(key);
        Ok(new)
    }

    pub fn check<'a>(&self, mut keys: impl Iterator<Item = &'a [u8]>) -> bool {
        keys.all(|k| self.exists(k))
    }

    /// Registers a wait for the missing keys. `None` when all exist already
    /// (the caller answers STOP_WAITING at once).
    pub fn wait<'a>(
        &mut self,
        keys: impl Iterator<Item = &'a [u8]>,
        signal: &Arc<WaitSignal>,
    ) -> Option<WaitId> {
        let missing: Vec<Vec<u8>> = keys
            .filter(|k| !self.exists(k))
            .map(<[u8]>::to_vec)
            .collect();
        if missing.is_empty() {
            return None;
        }
        let id = self.next_wait;
        self.next_wait += 1;
        for k in &missing {
            self.key_waiters.entry(k.clone()).or_default().push(id);
        }
        self.waits.insert(
            id,
            PendingWait {
                missing: missing.len(),
                keys: missing,
                signal: Arc::clone(signal),
                barrier: false,
            },
        );
        Some(id)
    }

    /// Drops a wait or barrier registration (cancel, or the client left).
    pub fn cancel(&mut self, id: WaitId) {
        let Some(w) = self.waits.remove(&id) else {
            return;
        };
        let map = if w.barrier {
            &mut self.barrier_waiters
        } else {
            &mut self.key_waiters
        };
        for k in &w.keys {
            if let Some(ids) = map.get_mut(k) {
                ids.retain(|&x| x != id);
                if ids.is_empty() {
                    map.remove(k);
                }
            }
        }
    }

    /// Whether a wait is still registered (not yet satisfied or cancelled).
    pub fn is_waiting(&self, id: WaitId) -> bool {
        self.waits.contains_key(&id)
    }

    pub fn num_keys(&self) -> i64 {
        self.keys.len() as i64
    }

    pub fn delete(&mut self, key: &[u8]) -> i64 {
        i64::from(self.keys.remove(key).is_some())
    }

    pub fn append(&mut self, key: &[u8], value: &[u8]) {
        match self.keys.get_mut(key) {
            Some(v) => v.extend_from_slice(value),
            None => {
                self.keys.insert(key.to_vec(), value.to_vec());
            }
        }
        self.notify_key(key);
    }

    pub fn queue_push(&mut self, key: &[u8], value: &[u8]) {
        match self.queues.get_mut(key) {
            Some(q) => q.push_back(value.to_vec()),
            None => {
                self.queues
                    .insert(key.to_vec(), VecDeque::from([value.to_vec()]));
            }
        }
        self.notify_key(key);
    }

    /// Returns the queue length before the pop and the popped value.
    pub fn queue_pop(&mut self, key: &[u8]) -> (i64, Option<Vec<u8>>) {
        let Some(q) = self.queues.get_mut(key) else {
            return (0, None);
        };
        let len = q.len() as i64;
        let v = q.pop_front();
        if q.is_empty() {
            self.queues.remove(key);
        }
        (len, v)
    }

    pub fn queue_len(&self, key: &[u8]) -> i64 {
        self.queues.get(key).map_or(0, |q| q.len() as i64)
    }

    pub fn list_keys(&self) -> impl Iterator<Item = &[u8]> {
        self.keys.keys().map(Vec::as_slice)
    }

    /// BARRIER: bumps the counter at `key`; releases every registered client
    /// once it reaches `world_size`. `Ok(None)` means "reply STOP_WAITING now".
    pub fn barrier(
        &mut self,
        key: &[u8],
        world_size: i64,
        signal: &Arc<WaitSignal>,
    ) -> Result<Option<WaitId>, StateError> {
        let count = self.add(key, 1)?;
        if count >= world_size {
            if let Some(ids) = self.barrier_waiters.remove(key) {
                for id in ids {
                    if let Some(w) = self.waits.remove(&id) {
                        self.released.push(w.signal);
                    }
                }
            }
            return Ok(None);
        }
        let id = self.next_wait;
        self.next_wait += 1;
        self.barrier_waiters
            .entry(key.to_vec())
            .or_default()
            .push(id);
        self.waits.insert(
            id,
            PendingWait {
                keys: vec![key.to_vec()],
                missing: 1,
                signal: Arc::clone(signal),
                barrier: true,
            },
        );
        Ok(Some(id))
    }

    /// Drops every key and queue for which `keep` is false.
    pub fn retain_keys(&mut self, keep: impl Fn(&[u8]) -> bool) {
        self.keys.retain(|k, _| keep(k));
        self.queues.retain(|k, _| keep(k));
    }

    /// Registrations still held, for tests of cleanup.
    pub fn registered_waits(&self) -> usize {
        self.waits.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_set_semantics() {
        let mut s = State::new();
        assert_eq!(s.compare_set(b"k", b"x", b"y"), b"x");
        assert_eq!(s.get(b"k"), None);
        assert_eq!(s.compare_set(b"k", b"", b"v1"), b"v1");
        assert_eq!(s.compare_set(b"k", b"nope", b"v2"), b"v1");
        assert_eq!(s.compare_set(b"k", b"v1", b"v2"), b"v2");
        assert_eq!(s.get(b"k"), Some(&b"v2"[..]));
    }

    #[test]
    fn add_parses_like_stoll() {
        let mut s = State::new();
        s.set(b"c", b"  12");
        assert_eq!(s.add(b"c", -15).unwrap(), -3);
        assert_eq!(s.get(b"c"), Some(&b"-3"[..]));
        s.set(b"bad", b"abc");
        assert!(s.add(b"bad", 1).is_err());
        s.set(b"big", i64::MAX.to_string().as_bytes());
        assert!(matches!(s.add(b"big", 1), Err(StateError::Overflow { .. })));
    }

    #[test]
    fn wait_needs_every_key_and_cancel_cleans_up() {
        let mut s = State::new();
        let sig = Arc::new(WaitSignal::default());
        let keys: [&[u8]; 2] = [b"a", b"b"];
        let id = s.wait(keys.into_iter(), &sig).unwrap();
        s.set(b"a", b"1");
        assert_eq!(s.released().count(), 0);
        s.append(b"b", b"2");
        assert!(s.released().all(|r| Arc::ptr_eq(&r, &sig)));
        assert!(!s.is_waiting(id));

        let id = s.wait([&b"zz"[..]].into_iter(), &sig).unwrap();
        s.cancel(id);
        assert_eq!(s.registered_waits(), 0);
        assert!(s.key_waiters.is_empty());
        s.set(b"zz", b"");
        assert_eq!(s.released().count(), 0);
    }

    #[test]
    fn barrier_releases_all() {
        let mut s = State::new();
        let a = Arc::new(WaitSignal::default());
        let b = Arc::new(WaitSignal::default());
        assert!(s.barrier(b"bar", 3, &a).unwrap().is_some());
        assert!(s.barrier(b"bar", 3, &b).unwrap().is_some());
        assert!(s.barrier(b"bar", 3, &a).unwrap().is_none());
        let released: Vec<_> = s.released().collect();
        assert_eq!(released.len(), 2);
        assert!(Arc::ptr_eq(&released[0], &a) && Arc::ptr_eq(&released[1], &b));
    }
}
