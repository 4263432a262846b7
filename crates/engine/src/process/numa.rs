//! `--numa-binding`: the CPUs each local rank is pinned to, computed as
//! torch 2.15's `torch/numa/binding.py` computes them, from the GPU's PCI
//! NUMA node and the host's NUMA, core and cache topology in sysfs. The
//! affinity is set in the worker before exec (no `numactl` needed).
//!
//! Device `i` is the `i`-th visible NVIDIA GPU (PCI order, narrowed by
//! `CUDA_VISIBLE_DEVICES`), the one local rank `i` uses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// torch's four modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffinityMode {
    /// Every CPU of the GPU's NUMA node.
    Node,
    /// Every CPU of every NUMA node of the GPU's socket.
    Socket,
    /// An even share of the node's physical cores for each of its GPUs.
    Exclusive,
    /// One core complex (cores sharing the last-level cache) per GPU.
    CoreComplex,
}

impl AffinityMode {
    pub const CHOICES: &'static [&'static str] = &["node", "socket", "exclusive", "core-complex"];

    pub fn parse(v: &str) -> Option<AffinityMode> {
        Some(match v {
            "node" => AffinityMode::Node,
            "socket" => AffinityMode::Socket,
            "exclusive" => AffinityMode::Exclusive,
            "core-complex" => AffinityMode::CoreComplex,
            _ => return None,
        })
    }
}

/// Why no binding could be computed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--numa-binding: {0}")]
pub struct NumaError(pub String);

fn err(msg: impl Into<String>) -> NumaError {
    NumaError(msg.into())
}

/// A CPU list as sysfs writes it: `0-2,4,6-7`.
pub fn parse_ranges(s: &str) -> Option<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 1 << 16 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().ok()?);
            }
        }
    }
    Some(out)
}

/// The inverse of [`parse_ranges`].
pub fn format_ranges(cpus: &BTreeSet<u32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = cpus.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end += 1;
            it.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

/// The machine as sysfs shows it, below `root` (`/` on a real host).
pub struct Topology {
    root: PathBuf,
    /// CPUs this process may run on.
    allowed: BTreeSet<u32>,
    /// PCI addresses of the visible GPUs, device index order.
    gpus: Vec<String>,
}

impl Topology {
    /// Reads the GPUs under `root` and narrows them by `cuda_visible`.
    /// `allowed`: the CPUs this process may use.
    pub fn new(
        root: &Path,
        allowed: BTreeSet<u32>,
        cuda_visible: Option<&str>,
    ) -> Result<Topology, NumaError> {
        let mut gpus: Vec<String> = std::fs::read_dir(root.join("sys/bus/pci/devices"))
            .map_err(|e| {
                err(format!(
                    "cannot list PCI devices under {}: {e}",
                    root.display()
                ))
            })?
            .flatten()
            .filter_map(|e| {
                let dir = e.path();
                let vendor = std::fs::read_to_string(dir.join("vendor")).ok()?;
                let class = std::fs::read_to_string(dir.join("class")).ok()?;
                // NVIDIA, display controller (VGA 0x0300 or 3D 0x0302).
                let gpu = vendor.trim() == "0x10de"
                    && (class.trim().starts_with("0x0300") || class.trim().starts_with("0x0302"));
                gpu.then(|| e.file_name().to_string_lossy().into_owned())
            })
            .collect();
        gpus.sort();
        if let Some(list) = cuda_visible {
            let mut visible = Vec::new();
            for item in list.split(',').map(str::trim) {
                // As CUDA: an entry that is not a valid index ends the list.
                match item.parse::<usize>() {
                    Ok(i) if i < gpus.len() => visible.push(gpus[i].clone()),
                    _ => break,
                }
            }
            gpus = visible;
        }
        Ok(Topology {
            root: root.to_path_buf(),
            allowed,
            gpus,
        })
    }

    /// The topology of this host as the launcher sees it: sysfs at
    /// `TORCHRUN_RS_SYSFS_ROOT` (a test hook: there, the fake machine's
    /// online CPUs are the allowed ones) or `/`.
    pub fn of_this_host(cuda_visible: Option<&str>) -> Result<Topology, NumaError> {
        match std::env::var_os("TORCHRUN_RS_SYSFS_ROOT") {
            Some(root) => {
                let root = PathBuf::from(root);
                let t = Topology::new(&root, BTreeSet::new(), cuda_visible)?;
                let allowed = t.ranges("sys/devices/system/cpu/online")?;
                Ok(Topology { allowed, ..t })
            }
            None => Topology::new(Path::new("/"), own_affinity(), cuda_visible),
        }
    }

    fn read(&self, rel: &str) -> Result<String, NumaError> {
        std::fs::read_to_string(self.root.join(rel)).map_err(|e| {
            err(format!(
                "cannot read {}: {e}",
                self.root.join(rel).display()
            ))
        })
    }

    fn ranges(&self, rel: &str) -> Result<BTreeSet<u32>, NumaError> {
        let text = self.read(rel)?;
        parse_ranges(&text).ok_or_else(|| err(format!("{rel}: not a CPU list: {text:?}")))
    }

    /// How many GPUs are visible.
    pub fn gpu_count(&self) -> usize {
        self.gpus.len()
    }

    fn numa_node_of_device(&self, device: usize) -> Result<u32, NumaError> {
        let addr = self.gpus.get(device).ok_or_else(|| {
            err(format!(
                "local rank {device} has no GPU of its own ({} visible)",
                self.gpus.len()
            ))
        })?;
        let text = self.read(&format!("sys/bus/pci/devices/{addr}/numa_node"))?;
        let n: i64 = text
            .trim()
            .parse()
            .map_err(|_| err(format!("numa_node of {addr}: {text:?}")))?;
        // torch: max(numa_node, 0): -1 (no affinity reported) is node 0.
        Ok(n.max(0) as u32)
    }

    fn allowed_cpus_of_node(&self, node: u32) -> Result<BTreeSet<u32>, NumaError> {
        let cpus = self
            .ranges(&format!("sys/devices/system/node/node{node}/cpulist"))
            .map_err(|_| {
                err(format!(
                    "could not determine CPUs corresponding to numa_node_index={node}"
                ))
            })?;
        Ok(cpus.intersection(&self.allowed).copied().collect())
    }

    fn devices_of_node(&self, node: u32) -> Result<Vec<usize>, NumaError> {
        let mut out = Vec::new();
        for d in 0..self.gpus.len() {
            if self.numa_node_of_device(d)? == node {
                out.push(d);
            }
        }
        Ok(out)
    }

    fn socket_of_node(&self, node: u32) -> Result<u32, NumaError> {
        let cpu = *self
            .allowed_cpus_of_node(node)?
            .first()
            .ok_or_else(|| err(format!("no allowed CPU on NUMA node {node}")))?;
        let text = self.read(&format!(
            "sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id"
        ))?;
        text.trim()
            .parse()
            .map_err(|_| err(format!("could not determine socket for cpu_index={cpu}")))
    }

    fn core_of(&self, cpu: u32) -> Result<u32, NumaError> {
        let siblings = self.ranges(&format!(
            "sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        ))?;
        siblings
            .first()
            .copied()
            .ok_or_else(|| err(format!("cpu{cpu}: no thread siblings")))
    }

    /// The lowest CPU sharing `cpu`'s highest-level data or unified cache.
    fn last_level_cache_of(&self, cpu: u32) -> Result<u32, NumaError> {
        let dir = self
            .root
            .join(format!("sys/devices/system/cpu/cpu{cpu}/cache"));
        let mut best: Option<(i64, BTreeSet<u32>)> = None;
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| err(format!("cannot list {}: {e}", dir.display())))?;
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.strip_prefix("index")
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        names.sort();
        for n in names {
            let base = format!("sys/devices/system/cpu/cpu{cpu}/cache/{n}");
            let kind = self.read(&format!("{base}/type"))?;
            if !matches!(kind.trim(), "Unified" | "Data") {
                continue;
            }
            let level: i64 = self
                .read(&format!("{base}/level"))?
                .trim()
                .parse()
                .map_err(|_| err(format!("{base}/level: not a number")))?;
            if best.as_ref().is_some_and(|(l, _)| level <= *l) {
                continue;
            }
            best = Some((level, self.ranges(&format!("{base}/shared_cpu_list"))?));
        }
        best.and_then(|(_, cpus)| cpus.first().copied())
            .ok_or_else(|| err(format!("cpu{cpu}: no data or unified cache listed")))
    }

    /// The CPUs device `device` (local rank) is bound to in `mode`.
    pub fn cpus_for(&self, mode: AffinityMode, device: usize) -> Result<BTreeSet<u32>, NumaError> {
        let node = self.numa_node_of_device(device)?;
        let cpus = match mode {
            AffinityMode::Node => self.allowed_cpus_of_node(node)?,
            AffinityMode::Socket => {
                let socket = self.socket_of_node(node)?;
                let possible = self.ranges("sys/devices/system/node/possible")?;
                let mut cpus = BTreeSet::new();
                for n in possible {
                    if self.socket_of_node(n)? == socket {
                        cpus.extend(self.allowed_cpus_of_node(n)?);
                    }
                }
                cpus
            }
            AffinityMode::Exclusive => {
                let devices = self.devices_of_node(node)?;
                let rel = devices.iter().position(|&d| d == device).unwrap_or(0);
                let mut cores: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
                for cpu in self.allowed_cpus_of_node(node)? {
                    cores.entry(self.core_of(cpu)?).or_default().insert(cpu);
                }
                let per = cores.len() / devices.len();
                let extra = cores.len() % devices.len();
                if per < 1 {
                    return Err(err(format!(
                        "There are only {} physical cores on numa_node_index={node}, but there are {} devices associated with this NUMA node.",
                        cores.len(),
                        devices.len()
                    )));
                }
                let start = rel * per + rel.min(extra);
                let end = start + per + usize::from(rel < extra);
                cores
                    .values()
                    .skip(start)
                    .take(end - start)
                    .flatten()
                    .copied()
                    .collect()
            }
            AffinityMode::CoreComplex => {
                let devices = self.devices_of_node(node)?;
                let rel = devices.iter().position(|&d| d == device).unwrap_or(0);
                let mut complexes: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
                for cpu in self.allowed_cpus_of_node(node)? {
                    complexes
                        .entry(self.last_level_cache_of(cpu)?)
                        .or_default()
                        .insert(cpu);
                }
                // Largest first, then by lowest CPU (torch's order).
                let mut ordered: Vec<(u32, BTreeSet<u32>)> = complexes.into_iter().collect();
                ordered.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
                if ordered.is_empty() {
                    return Err(err(format!("no allowed CPU on NUMA node {node}")));
                }
                ordered.swap_remove(rel % ordered.len()).1
            }
        };
        if cpus.is_empty() {
            return Err(err(format!(
                "local rank {device}: must bind to a non-empty set of CPU indices"
            )));
        }
        Ok(cpus)
    }

    /// The CPU set of every local rank, `nproc` of them.
    pub fn bindings(
        &self,
        mode: AffinityMode,
        nproc: u32,
    ) -> Result<Vec<BTreeSet<u32>>, NumaError> {
        (0..nproc as usize)
            .map(|d| self.cpus_for(mode, d))
            .collect()
    }
}

/// The CPUs this process may run on.
pub fn own_affinity() -> BTreeSet<u32> {
    // SAFETY: sched_getaffinity fills the local set; CPU_ISSET reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return BTreeSet::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .map(|c| c as u32)
            .collect()
    }
}

/// A kernel CPU set for `sched_setaffinity`, built before a fork.
pub fn cpu_set(cpus: &BTreeSet<u32>) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus
            .iter()
            .filter(|&&c| (c as usize) < libc::CPU_SETSIZE as usize)
        {
            libc::CPU_SET(c as usize, &mut set);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_round_trip() {
        let s = parse_ranges("0-2,4,6-7\n").unwrap();
        assert_eq!(
            s.iter().copied().collect::<Vec<_>>(),
            vec![0, 1, 2, 4, 6, 7]
        );
        assert_eq!(format_ranges(&s), "0-2,4,6-7");
        assert_eq!(parse_ranges(""), Some(BTreeSet::new()));
        assert!(parse_ranges("3-1").is_none());
        assert!(parse_ranges("x").is_none());
    }
}
