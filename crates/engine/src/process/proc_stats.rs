//! The resident memory and CPU time of each worker's processes, from
//! `/proc/<pid>/stat`.
//!
//! A worker is its process group (the launcher starts each worker as a
//! group leader): DataLoader workers, a `--no-python` wrapper's program and
//! whatever they start stay in it. One pass over `/proc` serves every
//! worker of a status or a scrape: one small read per process of the
//! machine (or of the container), cheap enough for a poll every second.
//! Memory is the sum of the processes' resident sets, as adding up `ps`
//! would give: a page that forked processes share counts once per process.
//! CPU time counts the processes running now and the descendants they
//! have reaped (`cutime`, `cstime`), so DataLoader workers that ended
//! still count.

use std::collections::HashMap;

/// What one process group uses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Resident set sizes, summed.
    pub rss_bytes: u64,
    /// User and system time, the reaped descendants' included.
    pub cpu_seconds: f64,
    pub processes: u32,
}

/// The usage of each process group of `pgids` that has a process left.
pub fn of_groups(pgids: &[i32]) -> HashMap<i32, Usage> {
    let mut by_group = HashMap::new();
    if pgids.is_empty() {
        return by_group;
    }
    let (page, ticks) = (page_size(), ticks_per_second());
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return by_group;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // A process that ended meanwhile is simply not counted.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(p) = parse(&stat, page, ticks) else {
            continue;
        };
        if pgids.contains(&p.pgrp) {
            let u: &mut Usage = by_group.entry(p.pgrp).or_default();
            u.rss_bytes += p.rss_bytes;
            u.cpu_seconds += p.cpu_seconds;
            u.processes += 1;
        }
    }
    by_group
}

/// One process's line.
#[derive(Debug, PartialEq)]
struct Stat {
    pgrp: i32,
    rss_bytes: u64,
    cpu_seconds: f64,
}

/// `stat`'s fields after the command (which may hold spaces and
/// parentheses: the last `)` ends it): pgrp is field 5 of the whole line,
/// utime, stime, cutime and cstime fields 14 to 17, rss (pages) field 24.
fn parse(stat: &str, page: u64, ticks: f64) -> Option<Stat> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state).
    let pgrp: i32 = f.get(2)?.parse().ok()?;
    let mut ticks_used = 0u64;
    for i in 11..=14 {
        // cutime and cstime are signed in the kernel's format.
        ticks_used += f.get(i)?.parse::<i64>().ok()?.max(0) as u64;
    }
    let rss: i64 = f.get(21)?.parse().ok()?;
    Some(Stat {
        pgrp,
        rss_bytes: rss.max(0) as u64 * page,
        cpu_seconds: ticks_used as f64 / ticks,
    })
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
        let line = "42 (a b) (c)) S 1 40 42 0 -1 4194560 100 0 0 0 250 50 100 25 20 0 1 0 100 1000000 300 18446744073709551615";
        assert_eq!(
            parse(line, 4096, 100.0),
            Some(Stat {
                pgrp: 40,
                rss_bytes: 300 * 4096,
                cpu_seconds: 4.25
            })
        );
        assert_eq!(parse("garbage", 4096, 100.0), None);
    }

    #[test]
    fn a_group_counts_every_process_in_it() {
        // SAFETY: getpgrp has no preconditions.
        let own = unsafe { libc::getpgrp() };
        // A child in this process group, with memory of its own.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let alone = of_groups(&[own]);
        let u = alone[&own];
        assert!(u.processes >= 2, "{u:?}");
        assert!(u.rss_bytes > 1 << 20, "{u:?}");
        assert!(u.cpu_seconds >= 0.0);
        assert!(of_groups(&[]).is_empty());
        assert!(of_groups(&[i32::MAX]).is_empty());
        let _ = child.kill();
        let _ = child.wait();
    }
}
