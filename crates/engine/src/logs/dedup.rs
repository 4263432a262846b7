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

use std::collections::{HashMap, VecDeque};
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
    hash: u64,
    /// The local ranks that printed it (bit r: rank r; ranks from 128 on
    /// are not deduplicated).
    ranks: u128,
    /// Who printed it first: its prefix and role ([`State::writers`]).
    writer: u32,
    at: Instant,
}

/// Lines wait at most this many at once: under a flood of distinct lines
/// the oldest leave early (nothing to merge there), which keeps every
/// lookup in cache.
const MAX_WAITING: usize = 2048;

/// The waiting lines in print order, indexed so that finding a line's
/// copies costs a hash lookup, not a scan (a chatty job sends every line
/// through here).
struct State {
    entries: VecDeque<Entry>,
    next_seq: u64,
    /// The print position of the front entry. An entry's print position
    /// is its `seq`, or `moved[seq]` for the few moved behind another
    /// rank's line; its index in `entries` is that minus `front`.
    front: u64,
    moved: FxMap<u64, u64>,
    /// The newest waiting line by (stream, text hash).
    by_text: FxMap<(i32, u64), u64>,
    /// Per stream (stdout, stderr) and rank: the sequence number of its
    /// latest waiting line.
    last: [[Option<u64>; 128]; 2],
    /// Each (fd, rank)'s prefix and role, and its index.
    writers: Vec<(Vec<u8>, String)>,
    writer_ids: FxMap<(i32, u32), u32>,
    /// Text buffers of lines already written, for reuse (no allocation
    /// per line).
    spare: Vec<Vec<u8>>,
}

fn bit(rank: u32) -> u128 {
    1u128 << rank
}

impl State {
    fn new() -> State {
        State {
            entries: VecDeque::new(),
            next_seq: 0,
            front: 0,
            moved: FxMap::default(),
            by_text: FxMap::default(),
            last: [[None; 128]; 2],
            writers: Vec::new(),
            writer_ids: FxMap::default(),
            spare: Vec::new(),
        }
    }

    /// Where a waiting line is now (`None` once written).
    fn index_of(&self, seq: u64) -> Option<usize> {
        let p = if self.moved.is_empty() {
            seq
        } else {
            self.moved.get(&seq).copied().unwrap_or(seq)
        };
        let i = p.checked_sub(self.front)? as usize;
        (i < self.entries.len() && self.entries[i].seq == seq).then_some(i)
    }

    fn writer(&mut self, fd: i32, rank: u32, role: &str, prefix: &[u8]) -> u32 {
        if let Some(&id) = self.writer_ids.get(&(fd, rank)) {
            if self.writers[id as usize].0 == prefix {
                return id;
            }
        }
        // New, or a new round's prefix (another group rank).
        let id = self.writers.len() as u32;
        self.writers.push((prefix.to_vec(), role.to_string()));
        self.writer_ids.insert((fd, rank), id);
        id
    }

    fn push_line(&mut self, fd: i32, rank: u32, writer: u32, line: &[u8], hash: u64, now: Instant) {
        let stream = usize::from(fd == 2);
        let last = self.last[stream][rank as usize].and_then(|seq| self.index_of(seq));
        let from = last.map_or(0, |p| p + 1);
        // The newest waiting copy of this line, if it lacks this rank.
        let candidate = self
            .by_text
            .get(&(fd, hash))
            .and_then(|seq| self.index_of(*seq))
            .filter(|&i| {
                let e = &self.entries[i];
                e.text == line && e.ranks & bit(rank) == 0
            });
        let joined = match candidate {
            Some(i) if i >= from => Some(i),
            // A copy waiting before this rank's previous line moves after
            // it, if none of its ranks has a line in between.
            Some(i) => last.and_then(|lp| {
                let theirs = self.entries[i].ranks;
                if !self
                    .entries
                    .range(i + 1..=lp)
                    .all(|e| e.ranks & theirs == 0)
                {
                    return None;
                }
                let e = self.entries.remove(i).expect("a candidate");
                self.entries.insert(lp, e);
                for j in i..=lp {
                    let seq = self.entries[j].seq;
                    self.moved.insert(seq, self.front + j as u64);
                }
                Some(lp)
            }),
            None => None,
        };
        let seq = match joined {
            Some(i) => {
                let e = &mut self.entries[i];
                e.ranks |= bit(rank);
                e.seq
            }
            None => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.by_text.insert((fd, hash), seq);
                let mut text = self.spare.pop().unwrap_or_default();
                text.clear();
                text.extend_from_slice(line);
                self.entries.push_back(Entry {
                    seq,
                    fd,
                    text,
                    hash,
                    ranks: bit(rank),
                    writer,
                    at: now,
                });
                seq
            }
        };
        self.last[stream][rank as usize] = Some(seq);
    }

    fn pop(&mut self) -> Option<Entry> {
        let e = self.entries.pop_front()?;
        self.front += 1;
        if !self.moved.is_empty() {
            self.moved.remove(&e.seq);
        }
        if self.by_text.get(&(e.fd, e.hash)) == Some(&e.seq) {
            self.by_text.remove(&(e.fd, e.hash));
        }
        let mut ranks = e.ranks;
        while ranks != 0 {
            let r = ranks.trailing_zeros();
            ranks &= ranks - 1;
            let stream = usize::from(e.fd == 2);
            if self.last[stream][r as usize] == Some(e.seq) {
                self.last[stream][r as usize] = None;
            }
        }
        Some(e)
    }

    /// Pops the lines due by `now` (all with `None`) into `out` (stdout,
    /// stderr), formatted.
    fn take_due(&mut self, now: Option<Instant>, limit: usize, out: &mut [Vec<u8>; 2]) {
        while let Some(e) = self.entries.front() {
            if self.entries.len() <= limit && now.is_some_and(|n| e.at + window() > n) {
                break;
            }
            let e = self.pop().expect("looked at above");
            let (prefix, role) = &self.writers[e.writer as usize];
            let buf = &mut out[usize::from(e.fd == 2)];
            if e.ranks.count_ones() == 1 {
                buf.extend_from_slice(prefix);
            } else {
                buf.extend_from_slice(format!("[{role}{}]:", ranges(e.ranks)).as_bytes());
            }
            buf.extend_from_slice(&e.text);
            buf.push(b'\n');
            if self.spare.len() < MAX_WAITING {
                self.spare.push(e.text);
            }
        }
    }
}

fn write_out(out: &[Vec<u8>; 2]) {
    for (i, buf) in out.iter().enumerate() {
        if !buf.is_empty() {
            crate::logs::log_stream::console_write(if i == 0 { 1 } else { 2 }, buf);
        }
    }
}

/// A line's hash, eight bytes at a time (not for adversaries: a
/// collision only costs a comparison of the texts).
fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ b.len() as u64;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("eight bytes"));
        h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    for x in chunks.remainder() {
        h = (h ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Fx-style hashing for the small integer keys of the indexes (the
/// default SipHash costs more than the rest of a line's way).
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl std::hash::Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_i32(&mut self, v: i32) {
        self.write_u64(v as u64);
    }
}

type FxMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fx>>;

pub struct Dedup {
    state: Mutex<State>,
    wake: Condvar,
    /// Held while writing a batch, taken before the state is let go: the
    /// writes keep their order while the tee threads go on queueing.
    writing: Mutex<()>,
}

static DEDUP: OnceLock<Arc<Dedup>> = OnceLock::new();

/// The launcher's deduplicator (its flushing thread starts on first use).
pub fn get() -> Arc<Dedup> {
    DEDUP
        .get_or_init(|| {
            let d = Arc::new(Dedup {
                state: Mutex::new(State::new()),
                wake: Condvar::new(),
                writing: Mutex::new(()),
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
        let mut out: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        // Hashed before the lock is taken.
        let lines: Vec<(&[u8], u64)> = lines.map(|l| (l, fnv(l))).collect();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if rank >= 128 {
            // Beyond the rank mask: printed as is, after what waits.
            s.take_due(None, 0, &mut out);
            let buf = &mut out[usize::from(fd == 2)];
            for (line, _) in lines {
                buf.extend_from_slice(prefix);
                buf.extend_from_slice(line);
                buf.push(b'\n');
            }
            let w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
            drop(s);
            write_out(&out);
            drop(w);
            return;
        }
        let was_empty = s.entries.is_empty();
        let writer = s.writer(fd, rank, role, prefix);
        for (line, hash) in lines {
            s.push_line(fd, rank, writer, line, hash, now);
        }
        if s.entries.len() > MAX_WAITING {
            s.take_due(Some(now), MAX_WAITING / 2, &mut out);
            let w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
            drop(s);
            write_out(&out);
            drop(w);
        } else {
            drop(s);
        }
        if was_empty {
            // The flusher sleeps until the oldest line is due; only a new
            // oldest line changes that.
            self.wake.notify_one();
        }
    }

    fn run(&self) {
        loop {
            let next = self.write_due(Some(Instant::now()));
            let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.entries.is_empty() || next.is_none() {
                drop(self.wake.wait_while(s, |s| s.entries.is_empty()));
                continue;
            }
            let wait = next.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            });
            drop(s);
            std::thread::sleep(wait);
        }
    }

    /// Writes the lines whose window has passed by `now` (all with `None`),
    /// in order; returns when the next one is due.
    fn write_due(&self, now: Option<Instant>) -> Option<Instant> {
        let mut out: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.take_due(now, usize::MAX, &mut out);
        // The front decides: a line moved behind it waits for it.
        let next = s.entries.front().map(|e| e.at + window());
        let w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        drop(s);
        write_out(&out);
        drop(w);
        next
    }
}

/// `0-7`, `0,2,5`, `0-3,6`.
pub fn ranges(ranks: u128) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut it = (0..128u32).filter(|r| ranks & bit(*r) != 0).peekable();
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
        std::iter::from_fn(|| s.pop())
            .map(|e| {
                let ranks = (0..128).filter(|r| e.ranks & bit(*r) != 0).collect();
                (String::from_utf8(e.text).unwrap(), ranks)
            })
            .collect()
    }

    #[test]
    fn copies_merge_and_each_ranks_lines_keep_their_order() {
        let d = Dedup {
            state: Mutex::new(State::new()),
            wake: Condvar::new(),
            writing: Mutex::new(()),
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
        let s = |v: &[u32]| ranges(v.iter().fold(0, |m, r| m | bit(*r)));
        assert_eq!(s(&[0, 1, 2, 3, 4, 5, 6, 7]), "0-7");
        assert_eq!(s(&[0, 2, 5]), "0,2,5");
        assert_eq!(s(&[0, 1, 2, 3, 6]), "0-3,6");
        assert_eq!(s(&[3, 4]), "3,4");
    }
}
