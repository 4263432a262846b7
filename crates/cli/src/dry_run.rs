//! `--dry-run`: everything resolved (flags, `PET_*`, cluster detection,
//! GPU count), printed, and nothing started: no process, no port, no file.

use engine::worker_env::{get as env_get, set as env_set};
use std::fmt::Write;

use engine::rdzv_settings::{Backend, RdzvSettings};

use crate::args::UsageError;
use crate::resolve::Resolved;

/// Quotes a word for a POSIX shell when it needs it.
fn shell_word(w: &str) -> String {
    let plain = !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// The report: the configuration, then each local rank's command and the
/// variables the launcher would set for it.
pub fn render(r: &Resolved, launcher_env: &engine::worker_env::Env) -> Result<String, UsageError> {
    let c = &r.config;
    let settings = RdzvSettings::from_config(c).map_err(UsageError::from)?;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "torchrun-rs --dry-run: nothing was started");
    let _ = writeln!(w, "configuration:");
    let nnodes = if c.min_nodes == c.max_nodes {
        c.max_nodes.to_string()
    } else {
        format!("{}:{}", c.min_nodes, c.max_nodes)
    };
    let _ = writeln!(w, "  nnodes: {nnodes}");
    let _ = writeln!(w, "  nproc_per_node: {}", c.nproc_per_node);
    let rdzv = match &settings.backend {
        Backend::Static { host, port, rank } => {
            format!("static, store at {host}:{port}, node rank {rank}")
        }
        Backend::Local { port: 0 } => "c10d on this node, store on a free port".to_string(),
        Backend::Local { port } => format!("c10d on this node, store on port {port}"),
        Backend::C10d {
            host,
            port,
            is_host,
        } => format!(
            "c10d at {host}:{port}{}",
            match is_host {
                Some(true) => ", this node hosts the store",
                Some(false) => ", another node hosts the store",
                None => "",
            }
        ),
        Backend::Etcd(e) => format!(
            "etcd-v3 at {} ({}), keys under {}/rendezvous/{}/{}",
            e.options.endpoints.join(","),
            if e.options.https { "https" } else { "http" },
            e.prefix.trim_end_matches('/'),
            c.run_id,
            match &e.options.username {
                Some(u) => format!(", as user {u}"),
                None => String::new(),
            }
        ),
    };
    let _ = writeln!(w, "  rendezvous: {rdzv}");
    let _ = writeln!(w, "  run_id: {}", c.run_id);
    let _ = writeln!(w, "  max_restarts: {}", c.max_restarts);
    let _ = writeln!(
        w,
        "  log_dir: {}",
        c.log_dir
            .as_ref()
            .map_or("a new $TMPDIR/torchelastic_* directory".to_string(), |d| d
                .display()
                .to_string())
    );
    let _ = writeln!(w, "  signals_to_handle: {}", c.signals_to_handle);
    let _ = writeln!(w, "  shutdown_timeout: {}s", c.shutdown_timeout.as_secs());
    for n in &r.notices {
        let _ = writeln!(w, "  note: {n}");
    }
    let mut base = launcher_env.clone();
    if let Some(list) = &r.cuda_visible_devices {
        env_set(&mut base, "CUDA_VISIBLE_DEVICES", list.clone());
    }
    if r.set_omp_threads {
        env_set(&mut base, "OMP_NUM_THREADS", "1");
    }
    env_set(
        &mut base,
        "TORCHELASTIC_SIGNALS_TO_HANDLE",
        c.signals_to_handle.clone(),
    );
    let local_addr = c
        .local_addr
        .clone()
        .unwrap_or_else(|| "<this host's name>".to_string());
    let workers = engine::preview::preview_workers(c, &r.entrypoint, &r.args, &base, &local_addr)
        .map_err(UsageError::from)?;
    let cpus = match c.numa_binding {
        None => Vec::new(),
        Some(mode) => {
            let visible = env_get(&base, "CUDA_VISIBLE_DEVICES");
            engine::numa::Topology::of_this_host(visible)
                .and_then(|t| t.bindings(mode, c.nproc_per_node))
                .map_err(|e| UsageError(e.to_string()))?
        }
    };
    for mut p in workers {
        // Set by the launcher itself for every worker.
        for k in [
            "OMP_NUM_THREADS",
            "TORCHELASTIC_SIGNALS_TO_HANDLE",
            "CUDA_VISIBLE_DEVICES",
        ] {
            if let Some(v) = env_get(&base, k).filter(|v| env_get(launcher_env, k) != Some(*v)) {
                p.env.insert(k.to_string(), v.to_string());
            }
        }
        let _ = writeln!(w, "local rank {}:", p.local_rank);
        let argv: Vec<String> = p.argv.iter().map(|a| shell_word(a)).collect();
        let _ = writeln!(w, "  command: {}", argv.join(" "));
        if let Some(set) = cpus.get(p.local_rank as usize) {
            let _ = writeln!(w, "  cpus: {}", engine::numa::format_ranges(set));
        }
        let _ = writeln!(w, "  environment (on top of the launcher's):");
        for (k, v) in &p.env {
            let _ = writeln!(w, "    {k}={v}");
        }
    }
    Ok(out)
}
