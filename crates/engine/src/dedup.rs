//! `--dedup-output` (beyond torch): a line that several local ranks print
//! with the same text within [`WINDOW`] reaches the console once, prefixed
//! with the ranks that printed it (`[default0-7]:`, `[default0,2,5]:`).
//!
//! Every tee'd console line passes through here: it waits at most
//! [`WINDOW`] for the same line from other ranks, then is written. Lines
//! leave in the order they arrived, except that a waiting line another
//! rank repeats moves after that rank's previous line when no rank of it
//! has a line in between: each rank's lines keep their order. The log files are written by the tee before this, every
//! rank's every line.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a line waits for its copies from other ranks
/// (`TORCHRUN_RS_DEDUP_WINDOW_MS` changes it, e.g. for a loaded machine).
pub const WINDOW: Duration = Duration::from_millis(40);

fn window() -> Duration {
    static W: OnceLock<Duration> = OnceLock::new();
    *W.get_or_init(|| {
        std::env::var("TORCHRUN_RS_DEDUP_WINDOW_MS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(WINDOW, Duration::from_millis)
    })
}

/// One console line waiting for copies.
struct Entry {
    seq: u64,
    fd: i32,
    text: Vec<u8>,
    ranks: BTreeSet<u32>,
    /// The first rank's own prefix (printed when no other rank joins).
    prefix: Vec<u8>,
    role: String,
    at: Instant,
}

#[derive(Default)]
struct State {
    entries: VecDeque<Entry>,
    next_seq: u64,
    /// Per (fd, rank): the sequence number of its latest waiting line.
    last: std::collections::HashMap<(i32, u32), u64>,
}

pub struct Dedup {
    state: Mutex<State>,
    wake: Condvar,
}

static DEDUP: OnceLock<Arc<Dedup>> = OnceLock::new();

/// The launcher's deduplicator (its flushing thread starts on first use).
pub fn get() -> Arc<Dedup> {
    DEDUP
        .get_or_init(|| {
            let d = Arc::new(Dedup {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
            });
            let flusher = d.clone();
            let _ = std::thread::Builder::new()
                .name("dedup".into())
                .spawn(move || flusher.run());
            d
        })
        .clone()
}

/// Writes every waiting line now (the job is ending).
pub fn flush() {
    if let Some(d) = DEDUP.get() {
        d.write_due(None);
    }
}

impl Dedup {
    /// Hands over whole lines (without newlines) of one rank's stream.
    pub fn push<'a>(
        &self,
        fd: i32,
        rank: u32,
        role: &str,
        prefix: &[u8],
        lines: impl Iterator<Item = &'a [u8]>,
    ) {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for line in lines {
            let s = &mut *s;
            let same = |e: &Entry| e.fd == fd && e.text == line && !e.ranks.contains(&rank);
            // Where this rank's previous waiting line is: its next line
            // must be printed after it.
            let last = s
                .last
                .get(&(fd, rank))
                .and_then(|seq| s.entries.iter().position(|e| e.seq == *seq));
            let from = last.map_or(0, |p| p + 1);
            let joined = match (from..s.entries.len()).find(|&i| same(&s.entries[i])) {
                Some(i) => Some(i),
                // A copy waiting before this rank's previous line can move
                // after it, if none of its ranks has a line in between.
                None => last.and_then(|lp| {
                    let i = (0..lp).rev().find(|&i| {
                        same(&s.entries[i])
                            && s.entries
                                .range(i + 1..=lp)
                                .all(|e| e.ranks.is_disjoint(&s.entries[i].ranks))
                    })?;
                    let e = s.entries.remove(i).expect("found above");
                    s.entries.insert(lp, e);
                    Some(lp)
                }),
            };
            let seq = match joined {
                Some(i) => {
                    let e = &mut s.entries[i];
                    e.ranks.insert(rank);
                    e.seq
                }
                None => {
                    let seq = s.next_seq;
                    s.next_seq += 1;
                    s.entries.push_back(Entry {
                        seq,
                        fd,
                        text: line.to_vec(),
                        ranks: BTreeSet::from([rank]),
                        prefix: prefix.to_vec(),
                        role: role.to_string(),
                        at: now,
                    });
                    seq
                }
            };
            s.last.insert((fd, rank), seq);
        }
        drop(s);
        self.wake.notify_one();
    }

    fn run(&self) {
        loop {
            let next = self.write_due(Some(Instant::now()));
            let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let wait = next.map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(Instant::now())
            });
            let _ = self.wake.wait_timeout(s, wait);
        }
    }

    /// Writes the lines whose window has passed by `now` (all with `None`),
    /// in order; returns when the next one is due.
    fn write_due(&self, now: Option<Instant>) -> Option<Instant> {
        let mut out: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(e) = s.entries.front() {
            if now.is_some_and(|n| e.at + window() > n) {
                break;
            }
            let e = s.entries.pop_front().expect("looked at above");
            for r in &e.ranks {
                if s.last.get(&(e.fd, *r)) == Some(&e.seq) {
                    s.last.remove(&(e.fd, *r));
                }
            }
            let buf = &mut out[usize::from(e.fd == 2)];
            if e.ranks.len() == 1 {
                buf.extend_from_slice(&e.prefix);
            } else {
                buf.extend_from_slice(format!("[{}{}]:", e.role, ranges(&e.ranks)).as_bytes());
            }
            buf.extend_from_slice(&e.text);
            buf.push(b'\n');
        }
        let next = s.entries.front().map(|e| e.at + window());
        // Written under the lock: a later batch cannot overtake this one.
        for i in [0, 1] {
            if !out[i].is_empty() {
                crate::log_stream::console_write(if i == 0 { 1 } else { 2 }, &out[i]);
            }
        }
        drop(s);
        next
    }
}

/// `0-7`, `0,2,5`, `0-3,6`.
pub fn ranges(ranks: &BTreeSet<u32>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut it = ranks.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end = it.next().expect("peeked");
        }
        parts.push(match end - start {
            0 => start.to_string(),
            1 => format!("{start},{end}"),
            _ => format!("{start}-{end}"),
        });
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(d: &Dedup) -> Vec<(String, Vec<u32>)> {
        let mut s = d.state.lock().unwrap();
        s.entries
            .drain(..)
            .map(|e| {
                (
                    String::from_utf8(e.text).unwrap(),
                    e.ranks.into_iter().collect(),
                )
            })
            .collect()
    }

    #[test]
    fn copies_merge_and_each_ranks_lines_keep_their_order() {
        let d = Dedup {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        };
        let say = |rank: u32, line: &str| {
            d.push(
                1,
                rank,
                "default",
                b"[p]:",
                std::iter::once(line.as_bytes()),
            )
        };
        say(0, "hello");
        say(1, "hello");
        say(1, "only 1");
        say(1, "bye");
        say(0, "only 0");
        say(0, "bye");
        // Rank 1's "bye" moved after rank 0's "only 0" to join rank 0's.
        assert_eq!(
            drain(&d),
            [
                ("hello".to_string(), vec![0, 1]),
                ("only 1".to_string(), vec![1]),
                ("only 0".to_string(), vec![0]),
                ("bye".to_string(), vec![0, 1]),
            ]
        );
        // A copy cannot move past a line of its own ranks.
        say(1, "x");
        say(1, "y");
        say(0, "y");
        say(0, "x");
        assert_eq!(
            drain(&d),
            [
                ("x".to_string(), vec![1]),
                ("y".to_string(), vec![0, 1]),
                ("x".to_string(), vec![0]),
            ]
        );
    }

    #[test]
    fn rank_sets_read_as_ranges() {
        let s = |v: &[u32]| ranges(&v.iter().copied().collect());
        assert_eq!(s(&[0, 1, 2, 3, 4, 5, 6, 7]), "0-7");
        assert_eq!(s(&[0, 2, 5]), "0,2,5");
        assert_eq!(s(&[0, 1, 2, 3, 6]), "0-3,6");
        assert_eq!(s(&[3, 4]), "3,4");
    }
}
