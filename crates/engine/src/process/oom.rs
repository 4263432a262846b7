//! Telling whether the kernel's OOM killer took a worker: the OOM-kill
//! counter of the memory cgroup the launcher and its workers share
//! (`memory.events` on cgroup v2, `memory.oom_control` on v1). A worker that
//! died of SIGKILL while the counter went up was most likely OOM-killed.

use std::path::PathBuf;

/// Where the counter lives for this process, if any memory cgroup is visible.
pub fn counter_file() -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        let candidates = if controllers.is_empty() {
            vec![
                PathBuf::from("/sys/fs/cgroup")
                    .join(path)
                    .join("memory.events"),
                PathBuf::from("/sys/fs/cgroup/unified")
                    .join(path)
                    .join("memory.events"),
            ]
        } else if controllers.split(',').any(|c| c == "memory") {
            vec![PathBuf::from("/sys/fs/cgroup/memory")
                .join(path)
                .join("memory.oom_control")]
        } else {
            continue;
        };
        if let Some(p) = candidates
            .into_iter()
            .find(|p| parse_oom_kills(p).is_some())
        {
            return Some(p);
        }
    }
    None
}

/// Reads the `oom_kill N` line of a cgroup file.
pub fn parse_oom_kills(path: &std::path::Path) -> Option<u64> {
    oom_kills_in(&std::fs::read_to_string(path).ok()?)
}

fn oom_kills_in(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_formats() {
        let v2 = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kills_in(v2), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n";
        assert_eq!(oom_kills_in(v1), Some(7));
        assert_eq!(oom_kills_in("nothing here"), None);
    }
}
