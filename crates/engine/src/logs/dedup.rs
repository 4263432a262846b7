//! `--dedup-output` (beyond torch): a line that several local ranks print
//! alike at the same point of their output reaches the console once,
//! prefixed with the ranks that printed it (`[default0-7]:`,
//! `[default0,2,5]:`).
//!
//! Every tee'd console line passes through here. Each rank's lines wait in
//! a queue of their own and leave from its head only, so each rank's order
//! is kept by construction. A line at the head of some ranks' queues leaves
//! as one merged line as soon as no other rank can still print it:
//!
//! - every other rank's own line at that point has been seen (their
//!   position, counted in lines since they last printed a line together,
//!   has reached it) and is another text: the line of a step that differs
//!   between ranks (a loss) leaves as soon as each rank printed its own;
//! - a rank whose stream closed (its worker exited), or that is more than
//!   [`NEARBY`] lines behind (silent), is not waited for;
//! - a rank that is behind but already at a line that comes later in this
//!   line's rank (it printed no such line) is not waited for either;
//! - a rank that is behind (start-up, a slower rank) or has the same text
//!   still queued is waited for, at most [`WINDOW`] after the line
//!   arrived: no line is ever held back longer than that.
//!
//! The log files are written by the tee before this, every rank's every
//! line.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The longest a line waits for the same line from other ranks
/// (`TORCHRUN_RS_DEDUP_WINDOW_MS` changes it). Only a line that some rank
/// has not reached yet waits that long: one that every rank has passed
/// leaves at once.
pub const WINDOW: Duration = Duration::from_millis(1000);

/// A rank more than this many lines behind a line is not waited for: it is
/// not printing the same lines (it is silent, or prints far less).
const NEARBY: i64 = 16;

fn window() -> Duration {
    static W: OnceLock<Duration> = OnceLock::new();
    *W.get_or_init(|| {
        std::env::var("TORCHRUN_RS_DEDUP_WINDOW_MS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(WINDOW, Duration::from_millis)
    })
}

/// Lines wait at most this many at once per stream: under a flood the
/// oldest leave early rather than memory growing.
const MAX_WAITING: usize = 4096;

/// One rank's line waiting to leave.
struct Line {
    text: Vec<u8>,
    hash: u64,
    at: Instant,
    /// Its position in the rank's output (see [`Rank::next_pos`]).
    pos: i64,
    /// Who printed it: its prefix and role ([`State::writers`]).
    writer: u32,
}

/// One rank's side of one stream.
#[derive(Default)]
struct Rank {
    queue: VecDeque<Line>,
    /// The position its next line gets: lines counted from its start, put
    /// level with the other ranks' at every line they print together, so
    /// that "the same point" survives a rank printing extra lines.
    next_pos: i64,
    /// Tees open on it (a worker's stream; a group being started).
    open: u32,
}

/// One console stream (stdout or stderr) of every rank.
struct Stream {
    ranks: Vec<Rank>,
    /// Ranks with waiting lines (bit r: rank r).
    busy: u128,
    /// Ranks whose stream is open, waited for.
    open: u128,
    waiting: usize,
    /// Each waiting text (by hash): how many lines, and the ranks that
    /// queued one (a rank's bit may outlive its line while other copies
    /// wait: it then only costs a wait, within the bound).
    texts: FxMap<u64, (u32, u128)>,
}

impl Stream {
    fn new() -> Stream {
        Stream {
            ranks: (0..128).map(|_| Rank::default()).collect(),
            busy: 0,
            open: 0,
            waiting: 0,
            texts: FxMap::default(),
        }
    }
}

fn bit(rank: u32) -> u128 {
    1u128 << rank
}

fn ranks_of(mask: u128) -> impl Iterator<Item = u32> {
    let mut m = mask;
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let r = m.trailing_zeros();
        m &= m - 1;
        Some(r)
    })
}

/// The heads of the queues that carry one text.
struct Group {
    hash: u64,
    ranks: u128,
    first: u32,
    at: Instant,
    /// The furthest position among them.
    pos: i64,
}

struct State {
    streams: [Stream; 2],
    /// Each (fd, rank)'s prefix and role, and its index.
    writers: Vec<(Vec<u8>, String)>,
    writer_ids: FxMap<(i32, u32), u32>,
    /// Text buffers of lines already written, for reuse.
    spare: Vec<Vec<u8>>,
    /// Groups being started: every rank below `starting_ranks` is waited
    /// for meanwhile, before its tee is open.
    starting: u32,
    starting_ranks: u32,
    /// Scratch space for [`State::groups`].
    groups: Vec<Group>,
}

impl State {
    fn new() -> State {
        State {
            streams: [Stream::new(), Stream::new()],
            writers: Vec::new(),
            writer_ids: FxMap::default(),
            spare: Vec::new(),
            starting: 0,
            starting_ranks: 0,
            groups: Vec::new(),
        }
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

    /// A group of `nproc` ranks starts: each rank not running yet starts
    /// its output over (a restart), and is waited for from now.
    fn start_group(&mut self, nproc: u32) {
        self.starting += 1;
        self.starting_ranks = nproc;
        for s in &mut self.streams {
            for r in s.ranks.iter_mut().take(nproc.min(128) as usize) {
                if r.open == 0 && r.queue.is_empty() {
                    r.next_pos = 0;
                }
            }
        }
    }

    fn open(&mut self, fd: i32, rank: u32) {
        let s = &mut self.streams[usize::from(fd == 2)];
        let r = &mut s.ranks[rank as usize];
        if r.open == 0 && r.queue.is_empty() {
            // A new worker: its output starts over.
            r.next_pos = 0;
        }
        r.open += 1;
        s.open |= bit(rank);
    }

    fn close(&mut self, fd: i32, rank: u32) {
        let s = &mut self.streams[usize::from(fd == 2)];
        let r = &mut s.ranks[rank as usize];
        r.open = r.open.saturating_sub(1);
        if r.open == 0 {
            s.open &= !bit(rank);
        }
    }

    /// Ranks waited for on a stream.
    fn expected(&self, stream: usize) -> u128 {
        let starting = if self.starting > 0 && self.starting_ranks > 0 {
            u128::MAX >> (128 - self.starting_ranks.min(128))
        } else {
            0
        };
        self.streams[stream].open | starting
    }

    fn push_line(&mut self, fd: i32, rank: u32, writer: u32, line: &[u8], hash: u64, now: Instant) {
        let mut text = self.spare.pop().unwrap_or_default();
        text.clear();
        text.extend_from_slice(line);
        let s = &mut self.streams[usize::from(fd == 2)];
        let r = &mut s.ranks[rank as usize];
        let pos = r.next_pos;
        r.next_pos += 1;
        r.queue.push_back(Line {
            text,
            hash,
            at: now,
            pos,
            writer,
        });
        let t = s.texts.entry(hash).or_default();
        t.0 += 1;
        t.1 |= bit(rank);
        s.busy |= bit(rank);
        s.waiting += 1;
    }

    /// The groups of queue heads with one text, into `groups`.
    fn groups(&self, stream: usize, groups: &mut Vec<Group>) {
        let s = &self.streams[stream];
        groups.clear();
        for r in ranks_of(s.busy) {
            let head = s.ranks[r as usize].queue.front().expect("a busy rank");
            let same = groups.iter_mut().find(|g| {
                g.hash == head.hash
                    && s.ranks[g.first as usize]
                        .queue
                        .front()
                        .is_some_and(|h| h.text == head.text)
            });
            match same {
                Some(g) => {
                    g.ranks |= bit(r);
                    g.at = g.at.min(head.at);
                    g.pos = g.pos.max(head.pos);
                }
                None => groups.push(Group {
                    hash: head.hash,
                    ranks: bit(r),
                    first: r,
                    at: head.at,
                    pos: head.pos,
                }),
            }
        }
    }

    /// Whether no rank that may still print `g`'s line is left to wait for.
    fn complete(&self, stream: usize, g: &Group) -> bool {
        let s = &self.streams[stream];
        let others = self.expected(stream) & !g.ranks;
        if others == 0 {
            return true;
        }
        // Does another rank have this text waiting further back?
        let (copies, holders) = s.texts.get(&g.hash).copied().unwrap_or((0, 0));
        let queued_elsewhere = copies > g.ranks.count_ones();
        ranks_of(others).all(|e| {
            let r = &s.ranks[e as usize];
            if queued_elsewhere && holders & bit(e) != 0 {
                // It will get there.
                return false;
            }
            // The last position it printed: past this line, or too far
            // behind to be printing the same lines.
            let reached = r.next_pos - 1;
            if reached >= g.pos || reached < g.pos - NEARBY {
                return true;
            }
            // Behind, but already at a line that comes after this one
            // here: this line is not one of its lines.
            r.queue.front().is_some_and(|h| {
                s.texts
                    .get(&h.hash)
                    .is_some_and(|t| t.1 & bit(g.first) != 0)
            })
        })
    }

    /// Writes out (into `out`: stdout, stderr) every line that is ready by
    /// `now`, or every line with `None`.
    fn take_ready(&mut self, now: Option<Instant>, out: &mut [Vec<u8>; 2]) {
        let window = window();
        let mut groups = std::mem::take(&mut self.groups);
        for (stream, buf) in out.iter_mut().enumerate() {
            while self.streams[stream].busy != 0 {
                let full = self.streams[stream].waiting > MAX_WAITING;
                self.groups(stream, &mut groups);
                // The heads ready now leave together, oldest first (the
                // groups have no rank in common: one never changes another's
                // heads); then the next heads are looked at.
                groups.retain(|g| {
                    full || now.is_none_or(|n| g.at + window <= n) || self.complete(stream, g)
                });
                if groups.is_empty() {
                    break;
                }
                if full && now.is_some() {
                    // Only the oldest, to make room.
                    let oldest = (0..groups.len()).min_by_key(|&i| groups[i].at).unwrap_or(0);
                    groups.swap(0, oldest);
                    groups.truncate(1);
                }
                groups.sort_unstable_by_key(|g| g.at);
                for g in &groups {
                    self.emit(stream, g.ranks, g.first, g.pos, buf);
                }
            }
        }
        self.groups = groups;
    }

    /// Pops the heads of `ranks` (one text) as one line into `buf`.
    fn emit(&mut self, stream: usize, ranks: u128, first: u32, pos: i64, buf: &mut Vec<u8>) {
        let mut text = None;
        let mut writer = 0;
        for r in ranks_of(ranks) {
            let s = &mut self.streams[stream];
            let rank = &mut s.ranks[r as usize];
            let line = rank.queue.pop_front().expect("a head");
            // Level with the others that printed it.
            let shift = pos - line.pos;
            if shift > 0 {
                rank.next_pos += shift;
                for l in rank.queue.iter_mut() {
                    l.pos += shift;
                }
            }
            if let Some(t) = s.texts.get_mut(&line.hash) {
                t.0 -= 1;
                if t.0 == 0 {
                    s.texts.remove(&line.hash);
                }
            }
            if rank.queue.is_empty() {
                s.busy &= !bit(r);
            }
            s.waiting -= 1;
            if r == first {
                writer = line.writer;
                text = Some(line.text);
            } else if self.spare.len() < MAX_WAITING {
                self.spare.push(line.text);
            }
        }
        let text = text.expect("the first rank's line");
        let (prefix, role) = &self.writers[writer as usize];
        if ranks.count_ones() == 1 {
            buf.extend_from_slice(prefix);
        } else {
            buf.extend_from_slice(format!("[{role}{}]:", ranges(ranks)).as_bytes());
        }
        buf.extend_from_slice(&text);
        buf.push(b'\n');
        if self.spare.len() < MAX_WAITING {
            self.spare.push(text);
        }
    }

    /// When the next line's wait ends, if any waits.
    fn next_due(&self) -> Option<Instant> {
        let window = window();
        self.streams
            .iter()
            .flat_map(|s| ranks_of(s.busy).map(move |r| s.ranks[r as usize].queue.front()))
            .flatten()
            .map(|l| l.at + window)
            .min()
    }

    fn is_empty(&self) -> bool {
        self.streams.iter().all(|s| s.busy == 0)
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
/// collision only costs a comparison of the texts, or a wait).
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
            let d = Arc::new(Dedup::new());
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
        d.write_ready(None);
    }
}

/// While a group starts (see [`Dedup::starting`]).
pub struct Starting(Arc<Dedup>);

impl Drop for Starting {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.starting -= 1;
        drop(s);
        self.0.write_ready(Some(Instant::now()));
    }
}

impl Dedup {
    fn new() -> Dedup {
        Dedup {
            state: Mutex::new(State::new()),
            wake: Condvar::new(),
            writing: Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A group of `nproc` local ranks is being started: until the guard
    /// goes, each of them is waited for, though its stream is not open yet
    /// (a rank started first must not print alone before the others exist).
    pub fn starting(self: &Arc<Self>, nproc: u32) -> Starting {
        let mut s = self.lock();
        s.start_group(nproc);
        Starting(self.clone())
    }

    /// A rank's stream `fd` is open: its lines are waited for.
    pub fn open(&self, fd: i32, rank: u32) {
        if rank < 128 {
            self.lock().open(fd, rank);
        }
    }

    /// A rank's stream ended: nothing is waited for from it any longer.
    pub fn close(&self, fd: i32, rank: u32) {
        if rank < 128 {
            self.lock().close(fd, rank);
            self.write_ready(Some(Instant::now()));
        }
    }

    /// Hands over whole lines (without newlines) of one rank's stream.
    pub fn push<'a>(
        &self,
        fd: i32,
        rank: u32,
        role: &str,
        prefix: &[u8],
        lines: impl Iterator<Item = &'a [u8]>,
    ) {
        self.push_at(Instant::now(), fd, rank, role, prefix, lines);
    }

    fn push_at<'a>(
        &self,
        now: Instant,
        fd: i32,
        rank: u32,
        role: &str,
        prefix: &[u8],
        lines: impl Iterator<Item = &'a [u8]>,
    ) {
        let mut out: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        // Hashed before the lock is taken.
        let lines: Vec<(&[u8], u64)> = lines.map(|l| (l, fnv(l))).collect();
        let mut s = self.lock();
        if rank >= 128 {
            // Beyond the rank mask: printed as is, after what waits.
            s.take_ready(None, &mut out);
            let buf = &mut out[usize::from(fd == 2)];
            for (line, _) in lines {
                buf.extend_from_slice(prefix);
                buf.extend_from_slice(line);
                buf.push(b'\n');
            }
        } else {
            let was_empty = s.is_empty();
            let writer = s.writer(fd, rank, role, prefix);
            for (line, hash) in lines {
                s.push_line(fd, rank, writer, line, hash, now);
            }
            s.take_ready(Some(now), &mut out);
            if was_empty && !s.is_empty() {
                // The flusher sleeps until the oldest line is due; only a
                // new oldest line changes that.
                self.wake.notify_one();
            }
        }
        let w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        drop(s);
        write_out(&out);
        drop(w);
    }

    fn run(&self) {
        loop {
            let next = self.write_ready(Some(Instant::now()));
            let s = self.lock();
            match next {
                None => drop(self.wake.wait_while(s, |s| s.is_empty())),
                Some(t) => {
                    let wait = t.saturating_duration_since(Instant::now());
                    drop(self.wake.wait_timeout(s, wait));
                }
            }
        }
    }

    /// Writes the lines ready by `now` (all with `None`), in order;
    /// returns when the next wait ends.
    fn write_ready(&self, now: Option<Instant>) -> Option<Instant> {
        let mut out: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut s = self.lock();
        s.take_ready(now, &mut out);
        let next = s.next_due();
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

    /// A deduplicator driven by a clock of the test's own: what it would
    /// print by each moment.
    struct Sim {
        state: State,
        t0: Instant,
        out: Vec<(u64, String)>,
    }

    impl Sim {
        fn new(ranks: u32) -> Sim {
            let mut state = State::new();
            for r in 0..ranks {
                state.open(1, r);
            }
            Sim {
                state,
                t0: Instant::now(),
                out: Vec::new(),
            }
        }
        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
        fn collect(&mut self, ms: u64, now: Option<Instant>) {
            let mut out = [Vec::new(), Vec::new()];
            self.state.take_ready(now, &mut out);
            for l in String::from_utf8(out[0].clone()).unwrap().lines() {
                self.out.push((ms, l.to_string()));
            }
        }
        fn say(&mut self, ms: u64, rank: u32, line: &str) {
            let prefix = format!("[default{rank}]:");
            let w = self.state.writer(1, rank, "default", prefix.as_bytes());
            let now = self.at(ms);
            self.state
                .push_line(1, rank, w, line.as_bytes(), fnv(line.as_bytes()), now);
            self.collect(ms, Some(now));
        }
        fn tick(&mut self, ms: u64) {
            let now = self.at(ms);
            self.collect(ms, Some(now));
        }
        fn close(&mut self, ms: u64, rank: u32) {
            self.state.close(1, rank);
            self.tick(ms);
        }
        fn lines(&self) -> Vec<&str> {
            self.out.iter().map(|(_, l)| l.as_str()).collect()
        }
    }

    #[test]
    fn lines_arriving_hundreds_of_ms_apart_merge_with_a_rank_two_lines_ahead() {
        let mut s = Sim::new(4);
        // Rank 0 is two lines ahead; the others follow 100 to 300 ms later.
        for (i, line) in ["import warning", "step 1", "step 2"].iter().enumerate() {
            s.say(i as u64 * 10, 0, line);
        }
        for (rank, jitter) in [(1, 120), (2, 300), (3, 210)] {
            for (i, line) in ["import warning", "step 1", "step 2"].iter().enumerate() {
                s.say(jitter + i as u64 * 40, rank, line);
            }
        }
        s.tick(2000);
        assert_eq!(
            s.lines(),
            [
                "[default0-3]:import warning",
                "[default0-3]:step 1",
                "[default0-3]:step 2"
            ]
        );
        // Each went out as soon as the last rank printed it.
        assert!(s.out.iter().all(|(ms, _)| *ms <= 380), "{:?}", s.out);
    }

    #[test]
    fn a_rank_that_never_prints_the_line_holds_it_back_no_longer_than_the_window() {
        let mut s = Sim::new(4);
        for r in 0..3 {
            s.say(r as u64 * 50, r, "hello");
        }
        s.tick(999);
        assert!(s.out.is_empty(), "{:?}", s.out);
        s.tick(1000);
        assert_eq!(s.lines(), ["[default0-2]:hello"]);
        // Once its worker is gone, nobody waits for it.
        s.say(1100, 0, "bye");
        s.say(1150, 1, "bye");
        s.say(1160, 2, "bye");
        assert_eq!(s.out.len(), 1);
        s.close(1200, 3);
        assert_eq!(s.lines(), ["[default0-2]:hello", "[default0-2]:bye"]);
        assert_eq!(s.out[1].0, 1200);
    }

    #[test]
    fn lines_that_differ_leave_once_every_rank_printed_its_own() {
        let mut s = Sim::new(2);
        s.say(0, 0, "loss 1.25");
        assert!(s.out.is_empty());
        s.say(30, 1, "loss 1.31");
        assert_eq!(s.lines(), ["[default0]:loss 1.25", "[default1]:loss 1.31"]);
        assert!(s.out.iter().all(|(ms, _)| *ms == 30));
    }

    #[test]
    fn each_ranks_order_is_kept_and_extra_lines_do_not_stop_later_merges() {
        let mut s = Sim::new(2);
        s.say(0, 0, "a");
        s.say(0, 1, "a");
        // Rank 0 prints three lines of its own, then both print "b".
        for (i, l) in ["saving", "saved", "took 3 s"].iter().enumerate() {
            s.say(10 + i as u64, 0, l);
        }
        s.say(20, 0, "b");
        s.say(200, 1, "b");
        // Rank 1 prints a line of its own where rank 0 prints "c" (known
        // as such once rank 1's own "c" is in).
        s.say(210, 1, "only 1");
        s.say(215, 1, "c");
        s.say(220, 0, "c");
        // Rank 0's own lines left as soon as rank 1 was seen at "b".
        let b = s.out.iter().find(|(_, l)| l == "[default0,1]:b").unwrap();
        assert_eq!(b.0, 200);
        s.tick(5000);
        assert_eq!(
            s.lines(),
            [
                "[default0,1]:a",
                "[default0]:saving",
                "[default0]:saved",
                "[default0]:took 3 s",
                "[default0,1]:b",
                "[default1]:only 1",
                "[default0,1]:c"
            ]
        );
    }

    #[test]
    fn a_silent_rank_is_not_waited_for_once_far_behind() {
        let mut s = Sim::new(2);
        s.say(0, 0, "start");
        s.say(5, 1, "start");
        // Rank 1 goes quiet; rank 0 logs on.
        for i in 0..40u64 {
            s.say(100 + i * 2000, 0, &format!("step {i}"));
        }
        s.tick(100 + 40 * 2000);
        assert_eq!(s.out.len(), 41);
        // Past the first few, each line leaves as it arrives.
        let late: Vec<_> = s.out[20..]
            .iter()
            .filter(|(ms, _)| (ms - 100) % 2000 != 0)
            .collect();
        assert!(late.is_empty(), "{late:?}");
    }

    #[test]
    fn a_group_being_started_is_waited_for_before_its_streams_open() {
        let mut s = Sim::new(0);
        for attempt in 0..2u64 {
            let t = attempt * 10_000;
            s.state.start_group(2);
            s.state.open(1, 0);
            s.say(t, 0, "hi");
            s.state.open(1, 1);
            s.state.starting -= 1;
            // Rank 1's output of the last attempt went further.
            let lines = if attempt == 0 { 30 } else { 1 };
            for i in 0..lines {
                s.say(t + 50 + i, 1, if i == 0 { "hi" } else { "more" });
            }
            s.tick(t + 5000);
            s.state.close(1, 0);
            s.state.close(1, 1);
        }
        let his: Vec<_> = s
            .lines()
            .into_iter()
            .filter(|l| l.ends_with("hi"))
            .collect();
        assert_eq!(his, ["[default0,1]:hi", "[default0,1]:hi"]);
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
