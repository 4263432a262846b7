//! Failed workers: reading torch's `error.json`, choosing the root cause, and
//! the failure summary box tools grep for (spec §7), plus what torchrun does
//! not say: the last lines of the root cause's stderr and the reason in words.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::process::signals::signal_name;
use crate::process::ExitStatus;

/// One failed worker, as torch's `ProcessFailure`.
#[derive(Debug, Clone)]
pub struct ProcessFailure {
    pub local_rank: u32,
    pub global_rank: u32,
    pub pid: i32,
    pub status: ExitStatus,
    /// The error file if the worker wrote one.
    pub error_file: Option<PathBuf>,
    /// The error file's parsed JSON, when it could be parsed.
    pub error_data: Option<Json>,
    /// A note about an unreadable error file.
    pub error_note: Option<String>,
    /// Whole seconds since the epoch (from the error file, else when seen).
    pub timestamp: u64,
    /// Order of detection, breaking timestamp ties.
    pub seq: u64,
    /// The worker's redirected stderr, if any.
    pub stderr_file: Option<PathBuf>,
    /// The last bytes of the worker's stderr, kept by the launcher when it
    /// was not redirected to a file.
    pub(crate) stderr_tail: Option<crate::logs::log_stream::SharedTail>,
    /// SIGKILLed while the memory cgroup's OOM-kill counter went up.
    pub oom_killed: bool,
    /// Stopped because its watchdog timer (this scope) expired.
    pub watchdog_scope: Option<String>,
    /// Stopped as hung (`--on-hang`): what the report said of it.
    pub hang: Option<String>,
    /// It ignored the stop signal for the whole grace period; its top frame
    /// then.
    pub stuck_in: Option<String>,
}

pub use json::Json;

impl ProcessFailure {
    pub fn new(
        local_rank: u32,
        global_rank: u32,
        pid: i32,
        status: ExitStatus,
        error_file: Option<&Path>,
        seq: u64,
    ) -> ProcessFailure {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut f = ProcessFailure {
            local_rank,
            global_rank,
            pid,
            status,
            error_file: None,
            error_data: None,
            error_note: None,
            timestamp: now,
            seq,
            stderr_file: None,
            stderr_tail: None,
            oom_killed: false,
            watchdog_scope: None,
            hang: None,
            stuck_in: None,
        };
        if let Some(path) = error_file.filter(|p| p.is_file()) {
            f.error_file = Some(path.to_path_buf());
            match std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|s| json::parse(&s))
            {
                Ok(data) => {
                    if let Some(ts) = error_timestamp(&data) {
                        f.timestamp = ts;
                    }
                    f.error_data = Some(data);
                }
                Err(e) => {
                    f.error_note = Some(format!(
                        "error file {} could not be read: {e}",
                        path.display()
                    ))
                }
            }
        }
        f
    }

    /// torch's exit code convention (negative for signals).
    pub fn exitcode(&self) -> i32 {
        self.status.torch_code()
    }

    /// The `traceback :` field.
    pub fn message(&self) -> String {
        if let Some(data) = &self.error_data {
            match data.get("message") {
                Some(Json::Str(s)) => return s.clone(),
                Some(m @ Json::Object(_)) => {
                    let tb = m
                        .get("extraInfo")
                        .and_then(|e| e.get("py_callstack"))
                        .and_then(Json::as_str)
                        .or_else(|| m.get("message").and_then(Json::as_str))
                        .unwrap_or("<N/A>");
                    return tb.replace('\n', "\n  ");
                }
                _ => {}
            }
        }
        match self.status {
            ExitStatus::Signal(s) => format!(
                "Signal {s} ({}) received by PID {}",
                signal_name(s).unwrap_or("<N/A>"),
                self.pid
            ),
            ExitStatus::Code(_) => {
                "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"
                    .to_string()
            }
        }
    }
}

/// The timestamp torch takes from an error file.
fn error_timestamp(data: &Json) -> Option<u64> {
    let as_secs = |j: &Json| match j {
        Json::Str(s) => s.trim().parse::<f64>().ok().map(|f| f as u64),
        Json::Num(n) => Some(*n as u64),
        _ => None,
    };
    match data.get("message")? {
        Json::Str(_) => data.get("timestamp").and_then(as_secs),
        m @ Json::Object(_) => m.get("extraInfo")?.get("timestamp").and_then(as_secs),
        _ => None,
    }
}

/// The root cause: earliest timestamp, ties broken by detection order.
pub fn root_cause(failures: &[ProcessFailure]) -> Option<usize> {
    (0..failures.len()).min_by_key(|&i| (failures[i].timestamp, failures[i].seq))
}

/// Local time as torch prints it: `YYYY-MM-DD_HH:MM:SS`.
fn local_time(ts: u64) -> String {
    // SAFETY: localtime_r fills the local struct.
    unsafe {
        let t = ts as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        format!(
            "{:04}-{:02}-{:02}_{:02}:{:02}:{:02}",
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec
        )
    }
}

fn block(idx: usize, f: &ProcessFailure, host: &str) -> String {
    let signal_part = match f.status {
        ExitStatus::Signal(s) => format!(" ({})", signal_name(s).unwrap_or("<N/A>")),
        ExitStatus::Code(_) => String::new(),
    };
    let error_file = f
        .error_file
        .as_ref()
        .map_or("<N/A>".to_string(), |p| p.display().to_string());
    format!(
        "[{idx}]:\n  time      : {}\n  host      : {host}\n  rank      : {} (local_rank: {})\n  exitcode  : {} (pid: {}) {signal_part}\n  error_file: {error_file}\n  traceback : {}",
        local_time(f.timestamp),
        f.global_rank,
        f.local_rank,
        f.exitcode(),
        f.pid,
        f.message()
    )
}

/// torch's failure summary (`ChildFailedError.format_msg`), starting with a
/// newline, for the entrypoint `name`.
pub fn summary(name: &str, failures: &[ProcessFailure], host: &str) -> String {
    let Some(root) = root_cause(failures) else {
        return String::new();
    };
    let title = format!("{name} FAILED");
    let root_block = block(root, &failures[root], host);
    let others: Vec<String> = failures
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != root)
        .map(|(i, f)| block(i, f, host))
        .collect();
    let longest = std::iter::once(&root_block)
        .chain(others.iter())
        .flat_map(|b| b.lines())
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0);
    let width = title.chars().count().max(longest).min(60);
    let others_text = if others.is_empty() {
        "  <NO_OTHER_FAILURES>".to_string()
    } else {
        others.join("\n")
    };
    format!(
        "\n{eq}\n{title}\n{dash}\nFailures:\n{others_text}\n{dash}\nRoot Cause (first observed failure):\n{root_block}\n{eq}",
        eq = "=".repeat(width),
        dash = "-".repeat(width),
    )
}

/// A failure in one line, naming its node, for the other nodes' reports.
pub fn job_line(f: &ProcessFailure, node: &str) -> String {
    format!(
        "rank {} (local_rank {}) on {node} {} at {}",
        f.global_rank,
        f.local_rank,
        reason(f),
        local_time(f.timestamp)
    )
}

/// The cause in words, where it is knowable.
pub fn reason(f: &ProcessFailure) -> String {
    if let Some(scope) = &f.watchdog_scope {
        let sig = match f.status {
            ExitStatus::Signal(s) => signal_name(s).unwrap_or("a signal").to_string(),
            ExitStatus::Code(c) => format!("exit code {c}"),
        };
        let at = f
            .stuck_in
            .as_ref()
            .map_or(String::new(), |t| format!(" in {t}"));
        return format!("watchdog timer '{scope}' expired{at}; the worker was stopped ({sig})");
    }
    let base = reason_of_exit(f);
    match &f.stuck_in {
        Some(top) => format!("{base}; it ignored the stop signal, stuck in {top}"),
        None => base,
    }
}

fn reason_of_exit(f: &ProcessFailure) -> String {
    if let Some(h) = &f.hang {
        return format!("hung: {h}; stopped by --on-hang");
    }
    match f.status {
        ExitStatus::Signal(9) if f.oom_killed => {
            "killed by the kernel's OOM killer (SIGKILL)".to_string()
        }
        ExitStatus::Signal(s) => format!(
            "killed by signal {s} ({})",
            signal_name(s).unwrap_or("unknown")
        ),
        ExitStatus::Code(c) => format!("exited with code {c}"),
    }
}

/// The last `n` lines of a file (for the root cause's stderr).
pub fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(64 * 1024);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

/// Writes the root cause's error file to the launcher's own
/// `TORCHELASTIC_ERROR_FILE`, adding `errorCode` as torch's `@record` does.
pub fn copy_error_file(root: &ProcessFailure, dest: &Path) -> std::io::Result<()> {
    let Some(data) = &root.error_data else {
        return Ok(());
    };
    let mut data = data.clone();
    if root.exitcode() != 0 {
        if let Json::Object(fields) = &mut data {
            if let Some((_, Json::Object(msg))) = fields.iter_mut().find(|(k, _)| k == "message") {
                msg.retain(|(k, _)| k != "errorCode");
                msg.push((
                    "errorCode".to_string(),
                    Json::Num(f64::from(root.exitcode())),
                ));
            }
        }
    }
    if dest.exists() {
        tracing::info!("overwriting the launcher's error file {}", dest.display());
    }
    std::fs::write(dest, data.to_string())
}

/// A small JSON reader and writer, enough for torch's error files.
pub mod json {
    #[derive(Debug, Clone, PartialEq)]
    pub enum Json {
        Null,
        Bool(bool),
        Num(f64),
        /// A Python float: always written with a fraction (`5.0`).
        Float(f64),
        Str(String),
        Array(Vec<Json>),
        /// Keys in file order.
        Object(Vec<(String, Json)>),
    }

    impl Json {
        pub fn get(&self, key: &str) -> Option<&Json> {
            match self {
                Json::Object(f) => f.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }
        pub fn as_str(&self) -> Option<&str> {
            match self {
                Json::Str(s) => Some(s),
                _ => None,
            }
        }
    }

    impl std::fmt::Display for Json {
        /// Python `json.dumps` default separators.
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Json::Null => write!(f, "null"),
                Json::Bool(b) => write!(f, "{b}"),
                Json::Num(n) if n.fract() == 0.0 && n.abs() < 1e15 => write!(f, "{}", *n as i64),
                Json::Num(n) => write!(f, "{n}"),
                Json::Float(n) if n.is_finite() && n.fract() == 0.0 => write!(f, "{n:.1}"),
                Json::Float(n) => write!(f, "{n}"),
                Json::Str(s) => write_str(f, s),
                Json::Array(a) => {
                    write!(f, "[")?;
                    for (i, v) in a.iter().enumerate() {
                        if i > 0 {
                            write!(f, ", ")?;
                        }
                        write!(f, "{v}")?;
                    }
                    write!(f, "]")
                }
                Json::Object(o) => {
                    write!(f, "{{")?;
                    for (i, (k, v)) in o.iter().enumerate() {
                        if i > 0 {
                            write!(f, ", ")?;
                        }
                        write_str(f, k)?;
                        write!(f, ": {v}")?;
                    }
                    write!(f, "}}")
                }
            }
        }
    }

    fn write_str(f: &mut std::fmt::Formatter<'_>, s: &str) -> std::fmt::Result {
        write!(f, "\"")?;
        for c in s.chars() {
            match c {
                '"' => write!(f, "\\\"")?,
                '\\' => write!(f, "\\\\")?,
                '\n' => write!(f, "\\n")?,
                '\r' => write!(f, "\\r")?,
                '\t' => write!(f, "\\t")?,
                c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                    let mut buf = [0u16; 2];
                    for u in c.encode_utf16(&mut buf) {
                        write!(f, "\\u{u:04x}")?;
                    }
                }
                c => write!(f, "{c}")?,
            }
        }
        write!(f, "\"")
    }

    pub fn parse(s: &str) -> Result<Json, String> {
        let mut p = Parser {
            b: s.as_bytes(),
            i: 0,
            depth: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.b.len() {
            return Err(format!("unexpected data at byte {}", p.i));
        }
        Ok(v)
    }

    struct Parser<'a> {
        b: &'a [u8],
        i: usize,
        depth: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn err<T>(&self, what: &str) -> Result<T, String> {
            Err(format!("{what} at byte {}", self.i))
        }
        fn eat(&mut self, lit: &str) -> Result<(), String> {
            if self.b[self.i..].starts_with(lit.as_bytes()) {
                self.i += lit.len();
                Ok(())
            } else {
                self.err("invalid literal")
            }
        }
        fn value(&mut self) -> Result<Json, String> {
            self.ws();
            self.depth += 1;
            if self.depth > 128 {
                return self.err("nesting too deep");
            }
            let v = match self.b.get(self.i) {
                None => return self.err("unexpected end"),
                Some(b'n') => self.eat("null").map(|_| Json::Null)?,
                Some(b't') => self.eat("true").map(|_| Json::Bool(true))?,
                Some(b'f') => self.eat("false").map(|_| Json::Bool(false))?,
                Some(b'"') => Json::Str(self.string()?),
                Some(b'[') => {
                    self.i += 1;
                    let mut items = Vec::new();
                    self.ws();
                    if self.b.get(self.i) == Some(&b']') {
                        self.i += 1;
                    } else {
                        loop {
                            items.push(self.value()?);
                            self.ws();
                            match self.b.get(self.i) {
                                Some(b',') => self.i += 1,
                                Some(b']') => {
                                    self.i += 1;
                                    break;
                                }
                                _ => return self.err("expected , or ]"),
                            }
                        }
                    }
                    Json::Array(items)
                }
                Some(b'{') => {
                    self.i += 1;
                    let mut fields = Vec::new();
                    self.ws();
                    if self.b.get(self.i) == Some(&b'}') {
                        self.i += 1;
                    } else {
                        loop {
                            self.ws();
                            if self.b.get(self.i) != Some(&b'"') {
                                return self.err("expected a key");
                            }
                            let k = self.string()?;
                            self.ws();
                            if self.b.get(self.i) != Some(&b':') {
                                return self.err("expected :");
                            }
                            self.i += 1;
                            let v = self.value()?;
                            fields.push((k, v));
                            self.ws();
                            match self.b.get(self.i) {
                                Some(b',') => self.i += 1,
                                Some(b'}') => {
                                    self.i += 1;
                                    break;
                                }
                                _ => return self.err("expected , or }"),
                            }
                        }
                    }
                    Json::Object(fields)
                }
                Some(_) => {
                    let start = self.i;
                    while self.i < self.b.len()
                        && matches!(
                            self.b[self.i],
                            b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                        )
                    {
                        self.i += 1;
                    }
                    let text = std::str::from_utf8(&self.b[start..self.i]).unwrap_or("");
                    match text.parse::<f64>() {
                        Ok(n) => Json::Num(n),
                        Err(_) => return self.err("invalid value"),
                    }
                }
            };
            self.depth -= 1;
            Ok(v)
        }
        fn hex4(&mut self) -> Result<u32, String> {
            let h = self
                .b
                .get(self.i..self.i + 4)
                .and_then(|h| std::str::from_utf8(h).ok());
            let v = h.and_then(|h| u32::from_str_radix(h, 16).ok());
            match v {
                Some(v) => {
                    self.i += 4;
                    Ok(v)
                }
                None => self.err("invalid \\u escape"),
            }
        }
        fn string(&mut self) -> Result<String, String> {
            self.i += 1;
            let mut out = String::new();
            loop {
                let Some(&c) = self.b.get(self.i) else {
                    return self.err("unterminated string");
                };
                self.i += 1;
                match c {
                    b'"' => return Ok(out),
                    b'\\' => {
                        let Some(&e) = self.b.get(self.i) else {
                            return self.err("unterminated escape");
                        };
                        self.i += 1;
                        match e {
                            b'"' => out.push('"'),
                            b'\\' => out.push('\\'),
                            b'/' => out.push('/'),
                            b'b' => out.push('\u{8}'),
                            b'f' => out.push('\u{c}'),
                            b'n' => out.push('\n'),
                            b'r' => out.push('\r'),
                            b't' => out.push('\t'),
                            b'u' => {
                                let hi = self.hex4()?;
                                let cp = if (0xD800..0xDC00).contains(&hi)
                                    && self.b[self.i..].starts_with(b"\\u")
                                {
                                    self.i += 2;
                                    let lo = self.hex4()?;
                                    0x10000
                                        + ((hi - 0xD800) << 10)
                                        + (lo.wrapping_sub(0xDC00) & 0x3FF)
                                } else {
                                    hi
                                };
                                out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                            }
                            _ => return self.err("invalid escape"),
                        }
                    }
                    _ => {
                        // Copy a run of plain UTF-8 bytes.
                        let start = self.i - 1;
                        while self.i < self.b.len()
                            && self.b[self.i] != b'"'
                            && self.b[self.i] != b'\\'
                        {
                            self.i += 1;
                        }
                        out.push_str(&String::from_utf8_lossy(&self.b[start..self.i]));
                    }
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_torch_error_file() {
            let s = r#"{"message": {"message": "ValueError: boom", "extraInfo": {"py_callstack": "Traceback:\n  x\n", "timestamp": "1795685066"}}}"#;
            let v = parse(s).unwrap();
            assert_eq!(v.to_string(), s);
            assert!(parse("{\"a\": ").is_err());
            assert!(parse("[1, 2] x").is_err());
            assert_eq!(
                parse("\"\\u00e9\\ud83d\\ude00\"").unwrap(),
                Json::Str("é😀".into())
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(local: u32, status: ExitStatus, ts: u64, seq: u64) -> ProcessFailure {
        let mut f = ProcessFailure::new(local, local, 100 + local as i32, status, None, seq);
        f.timestamp = ts;
        f
    }

    #[test]
    fn summary_layout_matches_torch() {
        let fs = vec![
            failure(1, ExitStatus::Code(3), 10, 0),
            failure(0, ExitStatus::Signal(15), 10, 1),
        ];
        let s = summary("fail.py", &fs, "host");
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "");
        assert_eq!(lines[1], "=".repeat(60));
        assert_eq!(lines[2], "fail.py FAILED");
        assert_eq!(lines[4], "Failures:");
        assert_eq!(lines[5], "[1]:");
        assert!(s.contains("  exitcode  : -15 (pid: 100)  (SIGTERM)\n"));
        assert!(s.contains("  traceback : Signal 15 (SIGTERM) received by PID 100\n"));
        assert!(s.contains("Root Cause (first observed failure):\n[0]:\n"));
        assert!(s.contains("  rank      : 1 (local_rank: 1)\n  exitcode  : 3 (pid: 101) \n"));
        assert!(s.ends_with(&"=".repeat(60)));
    }

    #[test]
    fn root_cause_is_earliest_then_first_seen() {
        let fs = vec![
            failure(0, ExitStatus::Code(1), 12, 0),
            failure(1, ExitStatus::Code(2), 11, 1),
            failure(2, ExitStatus::Code(2), 11, 2),
        ];
        assert_eq!(root_cause(&fs), Some(1));
    }
}
