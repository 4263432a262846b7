//! What a node would run, published with its join so that nodes that
//! differ are caught at the rendezvous (beyond torch): the torchrun-rs
//! version, the worker command line, a digest of the entrypoint script, the
//! Python and torch versions the workers will use (read without importing
//! torch), and the environment variables that change a job's numerics or
//! communication ([`COMPARED_PREFIXES`]).
//!
//! Computed once per launcher, off the main thread, from its start: a
//! round never waits for it unless the launcher's first round completes
//! before the Python probe (tens of milliseconds) answers.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Environment variables compared across nodes: every variable whose name
/// starts with one of these...
pub const COMPARED_PREFIXES: &[&str] = &[
    "NCCL_",
    "TORCH_",
    "PYTORCH_",
    "CUDA_",
    "CUDNN_",
    "CUBLAS_",
    "CUBLASLT_",
    "NVIDIA_TF32",
    "GLOO_",
    "UCX_",
    "FI_",
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
];

/// ...except those that name something of the node itself (devices,
/// addresses, ports, ranks, its own network interface or files).
const PER_NODE: &[&str] = &[
    "VISIBLE_DEVICES",
    "ADDR",
    "PORT",
    "RANK",
    "IFNAME",
    "HCA",
    "DEBUG_FILE",
    "TOPO_FILE",
    "HOME",
    "PATH",
];

const PENDING: &str = "pending";

/// How much of a script is digested (with its size): enough to tell two
/// versions apart without reading a large binary whole.
const DIGEST_BYTES: usize = 16 << 20;

/// The fingerprint: its quick part at once, then the whole (with the
/// Python probe's answers).
#[derive(Default)]
struct Parts {
    quick: Option<String>,
    whole: Option<String>,
}

type Slot = (Mutex<Parts>, Condvar);

fn slot() -> &'static Slot {
    static S: OnceLock<Slot> = OnceLock::new();
    S.get_or_init(|| (Mutex::new(Parts::default()), Condvar::new()))
}

/// Starts computing this launcher's fingerprint.
pub fn start(program: PathBuf, args: Vec<OsString>, env: Vec<(String, String)>, host: String) {
    let _ = std::thread::Builder::new()
        .name("fingerprint".into())
        .spawn(move || {
            // The host names the node in messages; it is not compared.
            let (m, cv) = slot();
            let quick = format!("@host={host}\n{}", compute(&program, &args, &env, false));
            m.lock().unwrap_or_else(|p| p.into_inner()).quick = Some(quick);
            cv.notify_all();
            let whole = format!("@host={host}\n{}", compute(&program, &args, &env, true));
            m.lock().unwrap_or_else(|p| p.into_inner()).whole = Some(whole);
            cv.notify_all();
        });
}

/// This launcher's fingerprint, waiting at most `within` for the whole
/// of it; what is ready then (the Python and torch versions say `pending`
/// until the probe answers, and are then not compared).
pub fn this_node(within: Duration) -> String {
    let (m, cv) = slot();
    let g = m.lock().unwrap_or_else(|p| p.into_inner());
    let (g, _) = cv
        .wait_timeout_while(g, within, |p| p.whole.is_none())
        .unwrap_or_else(|p| p.into_inner());
    if let Some(w) = &g.whole {
        return w.clone();
    }
    // The quick part takes microseconds: wait for it.
    let (g, _) = cv
        .wait_timeout_while(g, Duration::from_secs(1), |p| p.quick.is_none())
        .unwrap_or_else(|p| p.into_inner());
    g.quick
        .clone()
        .unwrap_or_else(|| "unavailable=the fingerprint was not ready\n".into())
}

/// The fingerprint's text; without `probe`, the Python and torch versions
/// are `pending` (the probe runs a Python).
fn compute(program: &Path, args: &[OsString], env: &[(String, String)], probe: bool) -> String {
    let mut fp: BTreeMap<String, String> = BTreeMap::new();
    fp.insert("torchrun-rs".into(), env!("CARGO_PKG_VERSION").into());
    let words: Vec<String> = std::iter::once(program.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    fp.insert("command".into(), words.join(" "));
    let python = program
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("python"));
    let script: Option<PathBuf> = if python {
        // `python -u script.py ...` (not `-m module`).
        let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
        let first = it.by_ref().find(|a| a != "-u");
        first.filter(|a| !a.starts_with('-')).map(PathBuf::from)
    } else {
        Some(program.to_path_buf())
    };
    if let Some(s) = script {
        fp.insert(
            "script digest".into(),
            digest_file(&s).unwrap_or_else(|| "-".into()),
        );
    }
    if python {
        let (py, torch) = if probe {
            python_versions(program)
        } else {
            (PENDING.into(), PENDING.into())
        };
        fp.insert("python".into(), py);
        fp.insert("torch".into(), torch);
    }
    for (k, v) in env {
        if COMPARED_PREFIXES.iter().any(|p| k.starts_with(p))
            && !PER_NODE.iter().any(|p| k.contains(p))
        {
            fp.insert(format!("${k}"), v.clone());
        }
    }
    fp.iter()
        .map(|(k, v)| format!("{k}={}\n", v.replace('\n', "\\n")))
        .collect()
}

/// FNV-1a (64 bits) of the file's first [`DIGEST_BYTES`], and its size.
fn digest_file(path: &Path) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let size = f.metadata().ok()?.len();
    let mut buf = Vec::new();
    f.take(DIGEST_BYTES as u64).read_to_end(&mut buf).ok()?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &buf {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Some(format!("{h:016x} ({size} bytes)"))
}

/// The Python version of `python` and the torch version it would import,
/// read from torch's `version.py` (torch itself is not imported: that takes
/// seconds).
fn python_versions(python: &Path) -> (String, String) {
    let probe = "import sys, importlib.util as u\n\
                 s = u.find_spec('torch')\n\
                 print(sys.version.split()[0])\n\
                 print(s.origin if s and s.origin else '')";
    // Through the launcher's reaper (it would collect a child waited for
    // any other way), on the fingerprint's own thread, which waits for it.
    let Ok((_, stdout)) = crate::process::output(python, &["-c".into(), probe.into()]) else {
        return ("-".into(), "-".into());
    };
    let text = String::from_utf8_lossy(&stdout);
    let mut lines = text.lines();
    let py = lines.next().unwrap_or("-").to_string();
    let torch = lines
        .next()
        .filter(|o| !o.is_empty())
        .and_then(|origin| {
            let v = std::fs::read_to_string(Path::new(origin).with_file_name("version.py")).ok()?;
            let line = v.lines().find(|l| l.starts_with("__version__"))?;
            let q = line.split(['\'', '"']).nth(1)?;
            Some(q.to_string())
        })
        .unwrap_or_else(|| "not installed".into());
    (py, torch)
}

/// What differs among the nodes' fingerprints (by group rank): one line
/// per differing item, naming the value on each set of nodes.
pub fn differences(nodes: &[(u32, String)]) -> Vec<String> {
    let parsed: Vec<(u32, &str, BTreeMap<&str, &str>)> = nodes
        .iter()
        .map(|(g, text)| {
            let m: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
            (*g, m.get("@host").copied().unwrap_or("?"), m)
        })
        .collect();
    let mut keys: Vec<&str> = parsed
        .iter()
        .flat_map(|(_, _, m)| m.keys().copied())
        .filter(|k| !k.starts_with('@'))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        let mut by_value: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (g, host, m) in &parsed {
            by_value
                .entry(m.get(k).copied().unwrap_or("(unset)"))
                .or_default()
                .push(format!("{g} ({host})"));
        }
        // Not known yet on some node (its probe had not answered).
        if by_value.contains_key(PENDING) {
            continue;
        }
        if by_value.len() > 1 {
            let name = k.strip_prefix('$').unwrap_or(k);
            let parts: Vec<String> = by_value
                .iter()
                .map(|(v, who)| {
                    let noun = if who.len() == 1 { "node" } else { "nodes" };
                    format!("{v} on {noun} {}", who.join(", "))
                })
                .collect();
            out.push(format!("{name}: {}", parts.join("; ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe learns the Python version while workers start and exit in
    /// a process whose reaper collects every child it does not hold (a
    /// launcher's): it never loses its own exit to the reaper.
    #[test]
    fn the_python_probe_answers_while_the_launchers_reaper_collects_every_child() {
        use crate::process::test_support;
        if !test_support::as_a_launcher(
            "rendezvous::fingerprint::tests::the_python_probe_answers_while_the_launchers_reaper_collects_every_child",
        ) {
            return;
        }
        let python = crate::process::find_program("python3").expect("python3 on PATH");
        let lost = test_support::while_workers_come_and_go(|| {
            (0..30)
                .filter(|_| python_versions(&python).0 == "-")
                .count()
        });
        assert_eq!(lost, 0, "{lost} of 30 probes lost their answer");
    }

    #[test]
    fn the_fingerprint_names_the_script_the_versions_and_the_numerics_variables() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("train.py");
        std::fs::write(&script, "print(1)\n").unwrap();
        let env = vec![
            ("NCCL_ALGO".to_string(), "Ring".to_string()),
            ("NCCL_SOCKET_IFNAME".to_string(), "eth0".to_string()),
            ("CUDA_VISIBLE_DEVICES".to_string(), "0,1".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let fp = compute(
            Path::new("/bin/sh"),
            &[OsString::from("-c"), OsString::from("true")],
            &env,
            true,
        );
        assert!(fp.contains("$NCCL_ALGO=Ring\n"), "{fp}");
        assert!(
            !fp.contains("IFNAME") && !fp.contains("VISIBLE") && !fp.contains("HOME"),
            "{fp}"
        );
        assert!(fp.contains("command=/bin/sh -c true\n"), "{fp}");
        assert!(fp.contains("script digest="), "{fp}");
        let args = [OsString::from("-u"), script.into_os_string()];
        let py = compute(Path::new("python3"), &args, &[], true);
        assert!(compute(Path::new("python3"), &args, &[], false).contains("python=pending\n"));
        assert!(py.contains("(9 bytes)"), "{py}");
        assert!(py.lines().any(|l| l.starts_with("python=3.")), "{py}");
    }

    #[test]
    fn differences_name_each_value_and_its_nodes() {
        let fp = |host: &str, algo: &str| {
            format!("@host={host}\n$NCCL_ALGO={algo}\ncommand=python x.py\n")
        };
        let d = differences(&[
            (0, fp("h0", "Ring")),
            (1, fp("h1", "Tree")),
            (2, fp("h2", "Ring")),
        ]);
        assert_eq!(
            d,
            ["NCCL_ALGO: Ring on nodes 0 (h0), 2 (h2); Tree on node 1 (h1)"]
        );
        assert!(differences(&[(0, fp("h0", "Ring")), (1, fp("h1", "Ring"))]).is_empty());
    }
}
