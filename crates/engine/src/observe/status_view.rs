//! `torchrun-rs --status ADDR:PORT [--watch]`: a running launcher's
//! `/status` (its `--metrics-port` server) as a table: the phase, the round,
//! restarts, and per local rank its global rank, pid, state, memory, CPU
//! time, seconds since its last output and its last line.

use serde_json::Value;
use std::fmt::Write as _;
use std::time::Duration;

/// The signals that end a `--status` query (held since `main` began).
const STOP: &str = "SIGINT,SIGTERM,SIGHUP,SIGQUIT";

/// Fetches and prints the table (again every second with `watch`, until
/// the launcher goes away or the user interrupts). Returns the exit status:
/// 128 + the signal's number when a signal ends it, as with a launch.
pub fn show(addr: &str, watch: bool) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("torchrun-rs: error: cannot start: {e}");
            return 1;
        }
    };
    rt.block_on(async {
        // The launcher blocks these signals first thing, for its agent to
        // take over; here nothing else would ever let them through.
        let (mut trap, _) = crate::process::signals::Trap::install(STOP, "");
        tokio::select! {
            sig = trap.next_shutdown() => {
                if watch {
                    // The cursor sits after a redrawn table: end its line.
                    println!();
                }
                128 + sig
            }
            code = query(addr, watch) => code,
        }
    })
}

async fn query(addr: &str, watch: bool) -> i32 {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("torchrun-rs: error: {e}");
            return 1;
        }
    };
    let url = format!("http://{addr}/status");
    let mut shown = false;
    loop {
        match fetch(&client, &url).await {
            Ok(v) => {
                let table = render(addr, &v);
                if watch {
                    // Home, clear, redraw: the table stays in place.
                    print!("\x1b[H\x1b[2J{table}");
                } else {
                    print!("{table}");
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
                shown = true;
            }
            Err(e) if shown => {
                println!("torchrun-rs: the launcher at {addr} no longer answers ({e})");
                return 0;
            }
            Err(e) => {
                eprintln!(
                        "torchrun-rs: error: no launcher answers at {addr} ({e}); --status reads the port a launcher serves with --metrics-port"
                    );
                return 1;
            }
        }
        if !watch {
            return 0;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let r = client
        .get(url)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if !r.status().is_success() {
        return Err(format!("HTTP {}", r.status()));
    }
    r.json::<Value>()
        .await
        .map_err(|e| format!("not a torchrun-rs /status: {}", e.without_url()))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The table for one `/status` answer.
pub fn render(addr: &str, v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "torchrun-rs at {addr}: {}, role {}, round {}, attempt {} ({} restarts left), node {} of {}, world size {}",
        text(&v["phase"]),
        text(&v["role"]),
        text(&v["rendezvous_rounds"]),
        text(&v["attempt"]),
        text(&v["restarts_left"]),
        text(&v["group_rank"]),
        text(&v["group_world_size"]),
        text(&v["world_size"]),
    );
    if let Some(ex) = v["excluded_nodes"].as_array().filter(|a| !a.is_empty()) {
        let names: Vec<String> = ex.iter().map(text).collect();
        let _ = writeln!(out, "excluded nodes: {}", names.join(", "));
    }
    let _ = writeln!(
        out,
        "{:>5} {:>6} {:>8}  {:<9} {:>9} {:>8} {:>7}  last line",
        "local", "rank", "pid", "state", "rss MiB", "cpu s", "quiet s"
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        let mib = w["rss_bytes"]
            .as_f64()
            .map_or("-".into(), |b| format!("{:.1}", b / 1048576.0));
        let cpu = w["cpu_seconds"]
            .as_f64()
            .map_or("-".into(), |s| format!("{s:.1}"));
        let quiet = w["seconds_since_output"]
            .as_f64()
            .map_or("-".into(), |s| format!("{s:.1}"));
        // Only text reaches the terminal, whatever the server sent.
        let mut last = crate::logs::last_line::sanitize(&text(&w["last_line"]));
        if last.chars().count() > 60 {
            last = last.chars().take(59).collect::<String>() + "…";
        }
        let _ = writeln!(
            out,
            "{:>5} {:>6} {:>8}  {:<9} {:>9} {:>8} {:>7}  {}",
            text(&w["local_rank"]),
            text(&w["rank"]),
            text(&w["pid"]),
            text(&w["state"]),
            mib,
            cpu,
            quiet,
            last
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_worker_and_survives_missing_fields() {
        let v: Value = serde_json::from_str(
            r#"{"phase":"running","role":"default","attempt":1,"restarts_left":2,
                "rendezvous_rounds":2,"group_rank":0,"group_world_size":1,"world_size":2,
                "workers":[{"local_rank":0,"rank":0,"pid":42,"state":"running","rss_bytes":104857600,
                            "cpu_seconds":3.25,"seconds_since_output":0.5,"last_line":"step 7"},
                           {"local_rank":1,"rank":1,"pid":43,"state":"failed"}]}"#,
        )
        .unwrap();
        let t = render("h:1", &v);
        assert!(
            t.starts_with(
                "torchrun-rs at h:1: running, role default, round 2, attempt 1 (2 restarts left)"
            ),
            "{t}"
        );
        assert!(
            t.contains("100.0") && t.contains("3.2") && t.contains("step 7"),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.contains("43") && l.contains("failed") && l.ends_with("-")),
            "{t}"
        );
        // Not a /status at all: still a table, nothing panics.
        let t = render("h:1", &Value::Null);
        assert!(t.contains("local"), "{t}");
    }

    #[test]
    fn a_last_line_with_control_characters_prints_as_text() {
        let v: Value = serde_json::from_str(
            r#"{"workers":[{"local_rank":0,"last_line":"\u001b[31mred\u001b[0m\r 10%|#\u001b]0;t\u0007|"}]}"#,
        )
        .unwrap();
        let t = render("h:1", &v);
        assert!(
            !t.contains('\x1b') && !t.contains('\r') && !t.contains('\x07'),
            "{t:?}"
        );
        assert!(t.contains("red 10%|#|"), "{t:?}");
    }
}
