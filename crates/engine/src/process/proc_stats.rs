//! A process's resident memory and CPU time, from `/proc/<pid>/stat`: one
//! small read per worker, cheap enough for a scrape every second.

/// Resident set size in bytes and CPU seconds (user + system) of `pid`.
pub fn of(pid: i32) -> Option<(u64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse(&stat, page_size(), ticks_per_second())
}

/// `stat`'s fields after the command (which may hold spaces and
/// parentheses: the last `)` ends it): utime and stime are fields 14 and 15
/// of the whole line, rss (pages) field 24.
fn parse(stat: &str, page: u64, ticks: f64) -> Option<(u64, f64)> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let rss: i64 = f.get(21)?.parse().ok()?;
    Some((rss.max(0) as u64 * page, (utime + stime) as f64 / ticks))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_with_spaces_and_parentheses_is_skipped_whole() {
        let line = "42 (a b) (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000000 300 18446744073709551615";
        assert_eq!(parse(line, 4096, 100.0), Some((300 * 4096, 3.0)));
        assert_eq!(parse("garbage", 4096, 100.0), None);
    }

    #[test]
    fn this_process_uses_memory_and_time() {
        let (rss, cpu) = of(std::process::id() as i32).unwrap();
        assert!(rss > 1 << 20, "{rss}");
        assert!(cpu >= 0.0);
    }
}
