//! What a worker wrote last, for `/status` and `--status`: when each of its
//! streams last carried bytes and the line a terminal would show last.
//!
//! Nothing is added to the path the bytes take. A stream the launcher
//! writes to a log file (`--tee`, `--redirects`) is read back from the
//! file's end, and its time is the file's modification time; a stream
//! passed through a pipe keeps its last bytes in a [`Tail`]. A stream the
//! worker writes straight to the launcher's terminal is not seen at all.
//!
//! Workers write progress bars (`\r`), colours and cursor movements: the
//! last line is the text after the last carriage return of the last line
//! that shows any text, with escape sequences and control characters
//! removed, and at most [`MAX_CHARS`] characters, so that it never reaches
//! an operator's terminal as anything but text.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::logs::log_stream::SharedTail;

/// The most characters of a last line that are shown.
pub const MAX_CHARS: usize = 200;

/// How many of a stream's last bytes are read to find its last line.
const WINDOW: usize = 4096;

/// Where one stream's recent output can be read.
#[derive(Debug, Clone)]
pub enum Source {
    /// The stream's log file, which the worker or a tee thread writes as
    /// the bytes come.
    File(PathBuf),
    /// The tail a pass-through thread keeps.
    Tail(SharedTail),
}

/// A worker's two streams, each where the launcher can read it.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub stdout: Option<Source>,
    pub stderr: Option<Source>,
}

/// One stream's last bytes and how long ago it wrote them.
struct Recent {
    ago: Duration,
    bytes: Vec<u8>,
    /// Whether bytes before `bytes` were left out.
    cut: bool,
}

impl Source {
    /// When the stream last wrote, and with `bytes`, its last bytes.
    fn recent(&self, bytes: bool) -> Option<Recent> {
        match self {
            Source::Tail(tail) => {
                let t = tail.lock().unwrap_or_else(|p| p.into_inner());
                let ago = t.last_output()?.elapsed();
                let (bytes, cut) = if bytes {
                    t.last_bytes(WINDOW)
                } else {
                    (Vec::new(), false)
                };
                Some(Recent { ago, bytes, cut })
            }
            Source::File(path) => {
                let meta = std::fs::metadata(path).ok()?;
                if meta.len() == 0 {
                    return None;
                }
                let ago = SystemTime::now()
                    .duration_since(meta.modified().ok()?)
                    .unwrap_or_default();
                if !bytes {
                    return Some(Recent {
                        ago,
                        bytes: Vec::new(),
                        cut: false,
                    });
                }
                // The file may have grown since: its last window now.
                let mut f = std::fs::File::open(path).ok()?;
                let len = f.metadata().ok()?.len();
                let start = len.saturating_sub(WINDOW as u64);
                f.seek(SeekFrom::Start(start)).ok()?;
                let mut bytes = Vec::with_capacity(WINDOW);
                f.take(WINDOW as u64).read_to_end(&mut bytes).ok()?;
                Some(Recent {
                    ago,
                    bytes,
                    cut: start > 0,
                })
            }
        }
    }
}

/// What the status shows of a worker's output.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// How long ago it last wrote, on either stream.
    pub quiet: Option<Duration>,
    /// Its last line (when asked for).
    pub last_line: Option<String>,
}

impl Output {
    /// How long the worker has been quiet and, with `line`, its last line:
    /// that of the stream written last (or of the other, when the last one
    /// shows no text).
    pub fn seen(&self, line: bool) -> Seen {
        let mut streams: Vec<Recent> = [&self.stdout, &self.stderr]
            .into_iter()
            .flatten()
            .filter_map(|s| s.recent(line))
            .collect();
        streams.sort_by_key(|r| r.ago);
        Seen {
            quiet: streams.first().map(|r| r.ago),
            last_line: streams.iter().find_map(|r| last_line(&r.bytes, r.cut)),
        }
    }
}

/// The last line of `bytes` a terminal would show: of the last line with
/// any text, the last carriage-return segment with any text, cleaned by
/// [`sanitize`]. `cut`: the bytes do not start at the stream's start, so
/// a line without a newline before it may have lost its beginning.
pub fn last_line(bytes: &[u8], cut: bool) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split('\n').rev().peekable();
    while let Some(line) = lines.next() {
        let first_line = lines.peek().is_none();
        for segment in line.rsplit('\r') {
            let clean = sanitize(segment);
            if clean.is_empty() {
                continue;
            }
            // The text that began the window may be the end of a longer one.
            let partial = cut && first_line && std::ptr::eq(segment.as_ptr(), text.as_ptr());
            return Some(if partial {
                format!("…{clean}")
            } else {
                clean
            });
        }
    }
    None
}

/// `s` as plain text on one line: ANSI escape sequences (CSI, OSC and the
/// two-character ones) and every other control character removed, a tab
/// made a space, the ends trimmed, at most [`MAX_CHARS`] characters (an
/// ellipsis marks a cut).
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(4 * MAX_CHARS));
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters and intermediates, then a final byte.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC (a window title, a hyperlink): up to BEL or ST.
                Some(']') | Some('P') | Some('_') | Some('^') | Some('X') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' && chars.peek() == Some(&'\\') {
                            chars.next();
                            break;
                        }
                    }
                }
                // Intermediates, then one final character.
                Some(c) if ('\x20'..='\x2f').contains(&c) => {
                    for c in chars.by_ref() {
                        if !('\x20'..='\x2f').contains(&c) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    let trimmed = out.trim();
    match trimmed.char_indices().nth(MAX_CHARS) {
        // More than MAX_CHARS: the first MAX_CHARS - 1 and the ellipsis.
        Some(_) => {
            let end = trimmed
                .char_indices()
                .nth(MAX_CHARS - 1)
                .map_or(trimmed.len(), |(i, _)| i);
            format!("{}…", &trimmed[..end])
        }
        None => trimmed.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_bar_shows_as_its_last_state() {
        let mut bar = Vec::new();
        for i in 0..=100 {
            bar.extend_from_slice(format!("\r{i:3}%|{}| {i}/100", "█".repeat(i / 10)).as_bytes());
        }
        let line = last_line(&bar, false).unwrap();
        assert_eq!(line, format!("100%|{}| 100/100", "█".repeat(10)));
        // tqdm's closing newline, then nothing: the same line.
        bar.push(b'\n');
        assert_eq!(last_line(&bar, false).unwrap(), line);
        // A bar cleared with a trailing \r keeps what the terminal shows.
        assert_eq!(last_line(b"step 3\r", false).unwrap(), "step 3");
    }

    #[test]
    fn escape_sequences_and_control_characters_never_come_through() {
        let raw =
            "\x1b[1;31mERROR\x1b[0m \x1b]0;title\x07loss\t0.5\x1b(B\x08\x07\x00 \u{9b}done\x1b[2K";
        assert_eq!(sanitize(raw), "ERROR loss 0.5 done");
        assert_eq!(
            last_line(b"\x1b[A\x1b[2K\r 50%|##   |\x1b[A\n", false).unwrap(),
            "50%|##   |"
        );
        // Invalid UTF-8 is replaced, never passed on.
        assert_eq!(
            last_line(b"ok \xff\xfe\n", false).unwrap(),
            "ok \u{fffd}\u{fffd}"
        );
    }

    #[test]
    fn the_last_line_is_capped_on_a_character_boundary() {
        let long = "é".repeat(5000);
        let s = sanitize(&long);
        assert_eq!(s.chars().count(), MAX_CHARS);
        assert!(s.ends_with('…'));
        let exact = "x".repeat(MAX_CHARS);
        assert_eq!(sanitize(&exact), exact);
        let over = "x".repeat(MAX_CHARS + 1);
        assert_eq!(sanitize(&over).chars().count(), MAX_CHARS);
    }

    #[test]
    fn blank_lines_and_a_cut_window_are_handled() {
        assert_eq!(last_line(b"epoch 1\n\n  \n", false).unwrap(), "epoch 1");
        assert_eq!(last_line(b"", false), None);
        assert_eq!(last_line(b"\r\n\x1b[0m\n", false), None);
        // The window began inside a long line: its start is missing.
        assert_eq!(last_line(b"xxxx tail", true).unwrap(), "…xxxx tail");
        assert_eq!(last_line(b"xx\nwhole", true).unwrap(), "whole");
        assert_eq!(last_line(b"xx tail\r", true).unwrap(), "…xx tail");
        assert_eq!(last_line(b"xx\rbar", true).unwrap(), "bar");
    }

    #[test]
    fn the_stream_written_last_gives_the_line_and_either_the_quiet_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stdout.log");
        std::fs::write(&file, "epoch 1\r 10%|#|\r 20%|##|").unwrap();
        let tail = SharedTail::default();
        let out = Output {
            stdout: Some(Source::File(file.clone())),
            stderr: Some(Source::Tail(tail.clone())),
        };
        let seen = out.seen(true);
        assert_eq!(seen.last_line.unwrap(), "20%|##|");
        assert!(seen.quiet.unwrap() < Duration::from_secs(60));
        assert_eq!(out.seen(false).last_line, None);
        tail.lock().unwrap().push(b"warning: slow\n");
        assert_eq!(out.seen(true).last_line.unwrap(), "warning: slow");
        let none = Output::default();
        assert_eq!(none.seen(true), Seen::default());
    }
}
