//! Tee through pipes: a worker's stream goes into a pipe; one thread per
//! stream copies the bytes to the log file as they come and writes every
//! complete line, with its prefix, to the launcher's console in a single
//! write, so lines from different ranks never tear or glue together. A last
//! line without a newline is still printed, with its prefix.
//!
//! Without `-t`, when the launcher's stderr is not a terminal (a cluster
//! job's log), a worker's stderr still goes through a pipe: the bytes reach
//! the launcher's stderr unchanged, and the last ones are kept ([`Tail`]) so
//! that the failure report can show the root cause's last lines.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Which console stream a tee writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    Stdout,
    Stderr,
}

/// Lines containing any of `patterns` are copied (prefixed) to `file`.
#[derive(Clone)]
pub struct LineFilter {
    pub patterns: Arc<Vec<String>>,
    pub file: Arc<Mutex<File>>,
}

/// Where the bytes of one tee'd stream go.
/// When a worker last wrote anything (ms since the Unix epoch), shared by
/// the threads that carry its streams: what `--hang-timeout` watches.
pub type Activity = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// Marks `a` active now.
pub fn touch(a: &Activity) {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    a.store(ms, std::sync::atomic::Ordering::Relaxed);
}

pub struct TeeTargets {
    /// When the worker last wrote, updated at every read.
    pub activity: Option<Activity>,
    /// The stream's log file (`stdout.log` / `stderr.log`).
    pub file: Option<File>,
    /// The console, or `None` for a rank left out by `--local-ranks-filter`.
    pub console: Option<Console>,
    pub prefix: String,
    pub filter: Option<LineFilter>,
    /// `--dedup-output`: console lines go through the deduplicator, as
    /// this local rank of this role.
    pub dedup: Option<(u32, String)>,
}

/// A pipe: the read end for the launcher, the write end for the worker.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = small_pipe()?;
    // A larger pipe lets a chatty worker run ahead instead of waking the
    // tee thread every 64 KiB (best effort: the limit is a sysctl).
    // SAFETY: plain fcntl on our new descriptor.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok((r, w))
}

/// A pipe of the kernel's default size (64 KiB), for streams that are only
/// passed through.
pub fn small_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A running tee thread.
pub struct TeeHandle {
    thread: JoinHandle<()>,
    /// Closed (the sender dropped) when the thread is done.
    done: std::sync::mpsc::Receiver<()>,
}

impl TeeHandle {
    fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> io::Result<TeeHandle> {
        let (tx, done) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _done = tx;
                work();
            })?;
        Ok(TeeHandle { thread, done })
    }

    /// Waits for the stream to end, up to `deadline`. A stream held open by
    /// a process that outlived its worker is left behind rather than waited for.
    pub fn finish_by(self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.done.recv_timeout(left) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::debug!("a worker's output pipe is still open; not waiting for it");
            }
            _ => {
                let _ = self.thread.join();
            }
        }
    }
}

const PIPE_SIZE: libc::c_int = 1 << 20;
const READ_CHUNK: usize = 256 * 1024;

/// Longest partial line held back waiting for its newline; longer ones are
/// printed as they are.
const MAX_PENDING: usize = 1 << 20;

pub fn start(read: OwnedFd, targets: TeeTargets) -> io::Result<TeeHandle> {
    // The deduplicator waits for this rank's lines from now until the
    // stream ends.
    let deduped = match (&targets.console, &targets.dedup) {
        (Some(c), Some((rank, _))) => Some((console_fd(*c), *rank)),
        _ => None,
    };
    if let Some((fd, rank)) = deduped {
        crate::logs::dedup::get().open(fd, rank);
    }
    let handle = TeeHandle::spawn("tee", move || {
        copy_lines(File::from(read), targets);
        if let Some((fd, rank)) = deduped {
            crate::logs::dedup::get().close(fd, rank);
        }
    });
    if handle.is_err() {
        if let Some((fd, rank)) = deduped {
            crate::logs::dedup::get().close(fd, rank);
        }
    }
    handle
}

fn console_fd(c: Console) -> i32 {
    match c {
        Console::Stdout => 1,
        Console::Stderr => 2,
    }
}

fn copy_lines(mut input: File, mut t: TeeTargets) {
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut pending: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let prefix = t.prefix.clone().into_bytes();
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let data = &chunk[..n];
        if let Some(a) = &t.activity {
            touch(a);
        }
        if let Some(f) = t.file.as_mut() {
            let _ = f.write_all(data);
        }
        let Some(last_nl) = memchr::memrchr(b'\n', data) else {
            pending.extend_from_slice(data);
            if pending.len() > MAX_PENDING {
                let p = std::mem::take(&mut pending);
                emit(&mut t, &prefix, &mut out, std::iter::once(&p[..]));
            }
            continue;
        };
        let (complete, rest) = data.split_at(last_nl + 1);
        if pending.is_empty() {
            emit(
                &mut t,
                &prefix,
                &mut out,
                lines(&complete[..complete.len() - 1]),
            );
        } else {
            pending.extend_from_slice(complete);
            let p = std::mem::take(&mut pending);
            emit(&mut t, &prefix, &mut out, lines(&p[..p.len() - 1]));
        }
        pending.extend_from_slice(rest);
    }
    if !pending.is_empty() {
        emit(&mut t, &prefix, &mut out, std::iter::once(&pending[..]));
    }
    if let Some(f) = t.file.as_mut() {
        let _ = f.flush();
    }
}

/// Splits on newlines (the last line has none).
fn lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    let mut ends = memchr::memchr_iter(b'\n', buf).chain(std::iter::once(buf.len()));
    std::iter::from_fn(move || {
        let end = ends.next()?;
        let line = &buf[start..end];
        start = end + 1;
        Some(line)
    })
}

/// The launcher's stdout and stderr, written with one `write` per batch of
/// whole lines (no line buffering to scan the bytes again). The lock keeps
/// batches of different ranks from interleaving.
pub(crate) fn console_write(fd: i32, buf: &[u8]) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Flush what Rust's own stdout may hold, so order is kept.
    let _ = if fd == 1 {
        io::stdout().flush()
    } else {
        io::stderr().flush()
    };
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: writing from a valid buffer to the process's own stream.
        let n = unsafe { libc::write(fd, buf[off..].as_ptr().cast(), buf.len() - off) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        off += n as usize;
    }
}

/// Writes `lines` (without their newlines) to the console and filter file,
/// each prefixed, in one write per destination.
fn emit<'a>(
    t: &mut TeeTargets,
    prefix: &[u8],
    out: &mut Vec<u8>,
    lines: impl Iterator<Item = &'a [u8]>,
) {
    out.clear();
    let mut filtered: Vec<u8> = Vec::new();
    let mut plain: Vec<&'a [u8]> = Vec::new();
    for line in lines {
        if t.dedup.is_some() {
            plain.push(line);
        }
        let start = out.len();
        out.extend_from_slice(prefix);
        out.extend_from_slice(line);
        out.push(b'\n');
        if let Some(f) = &t.filter {
            if f.patterns.iter().any(|p| contains(line, p.as_bytes())) {
                filtered.extend_from_slice(&out[start..]);
            }
        }
    }
    let fd = t.console.map(console_fd);
    match (fd, &t.dedup) {
        (Some(fd), Some((rank, role))) => {
            crate::logs::dedup::get().push(fd, *rank, role, prefix, plain.into_iter())
        }
        (Some(fd), None) => console_write(fd, out),
        (None, _) => {}
    }
    if !filtered.is_empty() {
        if let Some(f) = &t.filter {
            if let Ok(mut file) = f.file.lock() {
                let _ = file.write_all(&filtered);
            }
        }
    }
}

/// The last bytes a stream carried (at most [`Tail::CAPACITY`], or
/// [`Tail::SMALL`]).
#[derive(Debug)]
pub struct Tail {
    buf: std::collections::VecDeque<u8>,
    capacity: usize,
    /// Whether bytes were dropped to stay within the capacity.
    dropped: bool,
    /// When the stream last carried bytes.
    last: Option<Instant>,
}

impl Default for Tail {
    fn default() -> Tail {
        Tail::with_capacity(Tail::CAPACITY)
    }
}

/// A [`Tail`] shared between the thread that fills it and the report.
pub type SharedTail = Arc<Mutex<Tail>>;

impl Tail {
    /// Enough for the failure report's last lines.
    pub const CAPACITY: usize = 64 * 1024;
    /// Enough for the status's last line.
    pub const SMALL: usize = 4096;

    pub fn with_capacity(capacity: usize) -> Tail {
        Tail {
            buf: std::collections::VecDeque::new(),
            capacity,
            dropped: false,
            last: None,
        }
    }

    /// A shared tail of [`Tail::SMALL`] bytes.
    pub fn small() -> SharedTail {
        Arc::new(Mutex::new(Tail::with_capacity(Tail::SMALL)))
    }

    /// When the stream last carried bytes.
    pub fn last_output(&self) -> Option<Instant> {
        self.last
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.last = Some(Instant::now());
        let kept = &data[data.len().saturating_sub(self.capacity)..];
        let over = (self.buf.len() + kept.len()).saturating_sub(self.capacity);
        self.dropped |= over > 0 || kept.len() < data.len();
        self.buf.drain(..over);
        self.buf.extend(kept);
    }

    /// The last `n` bytes at most, and whether earlier bytes are missing.
    pub fn last_bytes(&self, n: usize) -> (Vec<u8>, bool) {
        let skip = self.buf.len().saturating_sub(n);
        (
            self.buf.iter().skip(skip).copied().collect(),
            self.dropped || skip > 0,
        )
    }

    /// The last `n` lines (a first line cut by the capacity is dropped).
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<&str> = text.lines().collect();
        if self.dropped && !lines.is_empty() {
            lines.remove(0);
        }
        let skip = lines.len().saturating_sub(n);
        lines[skip..].iter().map(|l| l.to_string()).collect()
    }
}

/// One stream to pass through: read end, where it goes, what it keeps.
pub struct PassThrough {
    pub read: OwnedFd,
    pub console: Option<Console>,
    pub tail: SharedTail,
    pub activity: Option<Activity>,
}

/// Copies every stream of `streams` to its console unchanged (if any) and
/// keeps its last bytes in its tail: one thread for a whole group, which
/// waits on all the pipes at once (a thread per worker costs launch time).
pub fn start_passthrough(streams: Vec<PassThrough>) -> io::Result<TeeHandle> {
    TeeHandle::spawn("passthrough", move || {
        let mut streams = streams;
        // A pipe's worth: these streams are not the hot path of a tee.
        let mut chunk = vec![0u8; 64 * 1024];
        while !streams.is_empty() {
            let mut fds: Vec<libc::pollfd> = streams
                .iter()
                .map(|p| libc::pollfd {
                    fd: p.read.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: poll on a local array of pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let mut ended = Vec::new();
            for (i, pfd) in fds.iter().enumerate() {
                if pfd.revents == 0 {
                    continue;
                }
                let p = &streams[i];
                // SAFETY: reading into a local buffer from our pipe.
                let n = unsafe { libc::read(pfd.fd, chunk.as_mut_ptr().cast(), chunk.len()) };
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if n <= 0 {
                    ended.push(i);
                    continue;
                }
                let data = &chunk[..n as usize];
                match p.console {
                    Some(Console::Stdout) => console_write(1, data),
                    Some(Console::Stderr) => console_write(2, data),
                    None => {}
                }
                p.tail.lock().unwrap_or_else(|e| e.into_inner()).push(data);
                if let Some(a) = &p.activity {
                    touch(a);
                }
            }
            for i in ended.into_iter().rev() {
                streams.swap_remove(i);
            }
        }
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_the_last_lines_within_its_capacity() {
        let mut t = Tail::default();
        t.push(b"one\ntwo\nthr");
        t.push(b"ee\n");
        assert_eq!(t.last_lines(2), vec!["two", "three"]);
        assert_eq!(t.last_lines(10), vec!["one", "two", "three"]);
        let big = "x".repeat(100) + "\n";
        for _ in 0..2000 {
            t.push(big.as_bytes());
        }
        t.push(b"last words");
        assert_eq!(t.buf.len(), Tail::CAPACITY);
        assert!(t.dropped);
        let lines = t.last_lines(3);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2], "last words");
        assert!(t
            .last_lines(10_000)
            .iter()
            .all(|l| l.len() <= 100 || l == "last words"));
    }
}
