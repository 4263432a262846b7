//! Worker logs (spec §6): the log tree, redirects, tee through pipes with
//! prefixes, filters, and the failure summary's layout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_torchrun-rs");

fn helper() -> String {
    testkit::cli_helper("worker.py")
}

fn launch(flags: &[&str], mode: &str, args: &[&str], out: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(flags)
        .arg(helper())
        .arg(mode)
        .arg(out)
        .args(args)
        .env("PYTHON_EXEC", "python3")
        .env("TMPDIR", out)
        .env_remove("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The single `<run_id>_XXXXXXXX` directory under `root`.
fn run_dir(root: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.into_iter().next().unwrap()
}

#[test]
fn tee_keeps_every_line_whole_with_its_prefix() {
    let out = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let n = 3000;
    let o = launch(
        &[
            "--nproc-per-node=4",
            "-t",
            "3",
            "--log-dir",
            logs.path().to_str().unwrap(),
        ],
        "lines",
        &[&n.to_string()],
        out.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    let stderr = text(&o.stderr);
    for r in 0..4 {
        let prefix = format!("[default{r}]:");
        let mine: Vec<&str> = stdout.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(mine.len(), n, "rank {r} stdout lines");
        for (i, l) in mine[..n - 1].iter().enumerate() {
            let want = format!("{prefix}r{r} line {i} {}", "x".repeat(i % 50));
            assert_eq!(*l, want, "rank {r} line {i}");
        }
        assert_eq!(mine[n - 1], format!("{prefix}r{r} last-partial"));
        let errs = stderr.lines().filter(|l| l.starts_with(&prefix)).count();
        assert_eq!(errs, n - 1, "rank {r} stderr lines");
        // The file holds the worker's bytes exactly, partial last line included.
        let file =
            std::fs::read_to_string(run_dir(logs.path()).join(format!("attempt_0/{r}/stdout.log")))
                .unwrap();
        assert!(file.ends_with(&format!("\nr{r} last-partial")));
        assert_eq!(file.lines().count(), n);
    }
    // Nothing else: no torn or glued lines.
    assert_eq!(stdout.lines().count(), 4 * n);
    assert!(stdout.lines().all(|l| l.starts_with("[default")));
}

#[test]
fn log_tree_after_a_restart() {
    let out = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let o = launch(
        &[
            "--nproc-per-node=2",
            "--max-restarts=1",
            "-r",
            "3",
            "--log-dir",
            logs.path().to_str().unwrap(),
            "--rdzv-id=job1",
            "--master-port=0",
        ],
        "fail-once",
        &["1"],
        out.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let run = run_dir(logs.path());
    let name = run.file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.starts_with("job1_") && name.len() == "job1_".len() + 8,
        "{name}"
    );
    for attempt in 0..2 {
        for r in 0..2 {
            let d = run.join(format!("attempt_{attempt}/{r}"));
            assert!(d.join("stdout.log").is_file(), "{d:?}");
            assert!(d.join("stderr.log").is_file(), "{d:?}");
            assert!(!d.join("error.json").exists());
        }
    }
    assert!(!run.join("attempt_2").exists());
    // Redirected, not tee'd: nothing of the workers on the console.
    assert_eq!(text(&o.stdout), "");
}

#[test]
fn dev_null_log_dir_writes_nothing() {
    let out = tempfile::tempdir().unwrap();
    let o = launch(
        &["--log-dir", "/dev/null", "-r", "3"],
        "env",
        &[],
        out.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let env: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("env.0.0.json")).unwrap())
            .unwrap();
    assert_eq!(env["env"]["TORCHELASTIC_ERROR_FILE"], "");
    let made: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("torchelastic_"))
        .collect();
    assert!(made.is_empty(), "{made:?}");
}

#[test]
fn log_dir_that_is_a_file_is_a_clear_error() {
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let o = launch(
        &["--log-dir", file.to_str().unwrap()],
        "env",
        &[],
        out.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("--log-dir") && err.contains("not a directory"),
        "{err}"
    );
}

#[test]
fn filters_and_local_ranks_filter() {
    let out = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let o = launch(
        &[
            "--nproc-per-node=2",
            "-t",
            "3",
            "--local-ranks-filter=0",
            "--duplicate-stdout-filters=line 7 ,last",
            "--log-dir",
            logs.path().to_str().unwrap(),
        ],
        "lines",
        &["20"],
        out.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(
        stdout.lines().all(|l| l.starts_with("[default0]:")),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 20);
    let run = run_dir(logs.path());
    assert!(
        run.join("attempt_0/1/stdout.log").is_file(),
        "filtered ranks still write files"
    );
    let filtered = std::fs::read_to_string(run.join("attempt_0/filtered_stdout.log")).unwrap();
    let mut lines: Vec<&str> = filtered.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "[default0]:r0 last-partial",
            "[default0]:r0 line 7 xxxxxxx",
            "[default1]:r1 last-partial",
            "[default1]:r1 line 7 xxxxxxx",
        ]
    );
}

#[test]
fn prefix_template_from_flag_and_environment() {
    let out = tempfile::tempdir().unwrap();
    let o = launch(
        &[
            "--nproc-per-node=2",
            "-t",
            "1",
            "--log-line-prefix-template",
            "[rank${rank}|${role_name}|${local_rank}|$foo]: ",
        ],
        "lines",
        &["3"],
        out.path(),
        &[],
    );
    let stdout = text(&o.stdout);
    assert!(
        stdout.contains("[rank1|default|1|$foo]: r1 line 0 \n"),
        "{stdout}"
    );
    let o = launch(
        &["--redirect=3", "--tee=3"],
        "lines",
        &["2"],
        out.path(),
        &[("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "[rank${rank}]: ")],
    );
    assert!(
        text(&o.stdout).contains("[rank0]: r0 line 0 \n"),
        "{}",
        text(&o.stdout)
    );
}

#[test]
fn a_process_holding_the_pipe_does_not_hang_the_launcher() {
    let out = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let o = launch(&["-t", "3"], "leak-pipe", &[], out.path(), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "launcher waited for the leaked pipe"
    );
    assert!(text(&o.stdout).contains("[default0]:worker 0 done"));
    let leaker: i32 = std::fs::read_to_string(out.path().join("leaker.0"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    testkit::wait_for(
        Duration::from_secs(1),
        "the leaked process to be stopped",
        || (!testkit::pid_alive(leaker)).then_some(()),
    );
}

/// Replaces what changes from run to run: times, pids, hosts, paths.
fn redact(s: &str) -> String {
    s.lines()
        .map(|l| {
            if let Some((k, _)) = l
                .split_once(": ")
                .filter(|(k, _)| k.trim() == "time" || k.trim() == "host")
            {
                return format!("{k}: <X>");
            }
            match l.find("(pid: ") {
                Some(i) => {
                    let end = l[i..].find(')').unwrap() + i;
                    format!("{}(pid: <PID>{}", &l[..i], &l[end..])
                }
                None => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn golden_summary_for_sys_exit_3() {
    let out = tempfile::tempdir().unwrap();
    let o = launch(
        &["--nproc-per-node=2"],
        "exit",
        &["3", "1"],
        out.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(3));
    let err = text(&o.stderr);
    let start = err.find("\n====").expect("summary box");
    let end = err.rfind("====").unwrap() + 4;
    let expected = "
============================================================
worker.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : <X>
  host      : <X>
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: <PID>)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID <PID>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : <X>
  host      : <X>
  rank      : 1 (local_rank: 1)
  exitcode  : 3 (pid: <PID>) 
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================";
    // The title is the script as typed: here the helper's full path.
    let got: String = redact(&err[start..end].replace(&helper(), "worker.py"))
        .lines()
        .map(|l| match l.find("received by PID ") {
            Some(i) => format!("{}received by PID <PID>", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(got, expected, "\n{got}");
}

#[test]
fn golden_summary_for_sigkill() {
    let out = tempfile::tempdir().unwrap();
    let o = launch(&[], "signal", &["9", "0"], out.path(), &[]);
    assert_eq!(o.status.code(), Some(137));
    let err = text(&o.stderr);
    assert!(err.contains("  exitcode  : -9 (pid: "), "{err}");
    assert!(err.contains(")  (SIGKILL)\n"), "{err}");
    assert!(
        err.contains("  traceback : Signal 9 (SIGKILL) received by PID "),
        "{err}"
    );
    assert!(err.contains("Failures:\n  <NO_OTHER_FAILURES>\n"), "{err}");
    assert!(
        err.contains("Root cause: rank 0 (local_rank 0, pid "),
        "{err}"
    );
    assert!(err.contains("killed by signal 9 (SIGKILL)"), "{err}");
    assert!(err.contains("Worker logs: "), "{err}");
}

#[test]
fn a_malformed_error_file_is_a_note_not_a_crash() {
    let out = tempfile::tempdir().unwrap();
    let o = launch(&[], "bad-error-file", &[], out.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("Root Cause (first observed failure):"),
        "{err}"
    );
    assert!(
        err.contains("Note: error file ") && err.contains("could not be read"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn run_path_runs_the_script_in_a_python_worker() {
    let out = tempfile::tempdir().unwrap();
    let o = launch(
        &["--run-path", "--nproc-per-node=2"],
        "env",
        &[],
        out.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("env.1.0.json")).unwrap())
            .unwrap();
    // sys.argv is the script and its arguments, as with runpy.run_path.
    assert_eq!(v["argv"][0], helper());
    assert_eq!(v["argv"][1], "env");
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn workers_logs_are_private_to_the_user() {
    // No --log-dir: a fresh $TMPDIR/torchelastic_* like torch's mkdtemp.
    let out = tempfile::tempdir().unwrap();
    let o = launch(
        &[
            "--nproc-per-node=2",
            "-t",
            "3",
            "--local-ranks-filter=0",
            "--duplicate-stdout-filters=r",
        ],
        "lines",
        &["3"],
        out.path(),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let top: Vec<PathBuf> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("torchelastic_")
        })
        .collect();
    assert_eq!(top.len(), 1, "{top:?}");
    let mut dirs = vec![top[0].clone()];
    let mut files = 0;
    while let Some(d) = dirs.pop() {
        assert_eq!(mode_of(&d), 0o700, "{d:?}");
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                assert_eq!(mode_of(&p), 0o600, "{p:?}");
                files += 1;
            }
        }
    }
    // stdout.log and stderr.log of two ranks, and the filtered stdout.
    assert!(files >= 5, "{files} files");
}

#[test]
fn an_existing_log_dir_keeps_its_mode_and_a_new_one_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let out = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let fresh = out.path().join("new/logs");
    for root in [shared.path(), fresh.as_path()] {
        let o = launch(
            &[
                "--nproc-per-node=1",
                "-r",
                "3",
                "--log-dir",
                root.to_str().unwrap(),
            ],
            "env",
            &[],
            out.path(),
            &[],
        );
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        let run = run_dir(root);
        assert_eq!(mode_of(&run), 0o700);
        assert_eq!(mode_of(&run.join("attempt_0/0")), 0o700);
        assert_eq!(mode_of(&run.join("attempt_0/0/stdout.log")), 0o600);
    }
    assert_eq!(
        mode_of(shared.path()),
        0o755,
        "the user's directory is left alone"
    );
    assert_eq!(mode_of(&fresh), 0o700);
    assert_eq!(mode_of(fresh.parent().unwrap()), 0o700);
}

/// `--hang-timeout` with `-r 3`: the workers write straight into their log
/// files, past the launcher, and that still counts as life; a worker that
/// stops writing is still found hung.
#[test]
fn redirected_output_counts_as_activity_for_the_hang_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let job = |script: &str| {
        Command::new(BIN)
            .args([
                "--standalone",
                "--nproc-per-node=2",
                "-r",
                "3",
                "--hang-timeout=2s",
                "--on-hang=fail",
                "--log-dir",
            ])
            .arg(dir.path().join("logs"))
            .args(["--no-python", "sh", "-c", script])
            .env("TMPDIR", dir.path())
            .output()
            .unwrap()
    };
    // A line every 0.2 s for 4 s: never 2 s of silence.
    let out = job("i=0; while [ $i -lt 20 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("no worker wrote any output"), "{stderr}");
    // One line, then silence: reported and stopped.
    let out = job("echo once; exec sleep 60");
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("no worker wrote any output for"),
        "{stderr}"
    );
}

#[test]
fn the_prefix_template_names_the_host_and_the_group_rank() {
    let out = tempfile::tempdir().unwrap();
    let o = launch(
        &["--nproc-per-node=2", "-t", "1"],
        "lines",
        &["1"],
        out.path(),
        &[(
            "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE",
            "${hostname}|${group_rank}|${rank}|${local_rank}: ",
        )],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let host = {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(rc, 0);
        let end = buf.iter().position(|&b| b == 0).unwrap();
        String::from_utf8_lossy(&buf[..end]).into_owned()
    };
    let stdout = text(&o.stdout);
    for r in 0..2 {
        let prefix = format!("{host}|0|{r}|{r}: ");
        assert!(
            stdout.lines().any(|l| l.starts_with(&prefix)),
            "{prefix}: {stdout}"
        );
    }
}

#[test]
fn dedup_output_prints_a_line_of_several_ranks_once_and_the_files_keep_every_line() {
    for n in [2u32, 4] {
        let out = tempfile::tempdir().unwrap();
        let logs = out.path().join("logs");
        let o = launch(
            &[
                &format!("--nproc-per-node={n}"),
                "--dedup-output",
                "--log-dir",
                logs.to_str().unwrap(),
            ],
            "chorus",
            &[],
            out.path(),
            // A loaded machine may start the ranks further apart than the
            // default window (40 ms).
            &[("TORCHRUN_RS_DEDUP_WINDOW_MS", "1000")],
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
        let stdout = text(&o.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        let all = if n == 2 {
            "0,1".to_string()
        } else {
            format!("0-{}", n - 1)
        };
        let at = |want: &str| {
            let found: Vec<usize> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| **l == want)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(found.len(), 1, "{want:?} in {stdout}");
            found[0]
        };
        let hello = at(&format!("[default{all}]:all say hello"));
        let bye = at(&format!("[default{all}]:all say bye"));
        for r in 0..n {
            let own = at(&format!("[default{r}]:only rank {r}"));
            assert!(hello < own && own < bye, "rank {r}'s order: {stdout}");
            let file = run_dir(&logs).join(format!("attempt_0/{r}/stdout.log"));
            assert_eq!(
                std::fs::read_to_string(file).unwrap(),
                format!("all say hello\nonly rank {r}\nall say bye\n")
            );
        }
        assert_eq!(
            lines.iter().filter(|l| l.contains("say")).count(),
            2,
            "{stdout}"
        );
    }
}

#[test]
fn a_dev_null_log_dir_still_shows_teed_and_deduplicated_output() {
    // As torch: with `--log-dir /dev/null` a tee has no file to write, and
    // the workers write to the console themselves.
    let out = tempfile::tempdir().unwrap();
    let o = launch(
        &["--nproc-per-node=2", "--tee", "3", "--log-dir", "/dev/null"],
        "chorus",
        &[],
        out.path(),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    let count = |s: &str, want: &str| s.lines().filter(|l| *l == want).count();
    assert_eq!(count(&stdout, "all say hello"), 2, "{stdout}");
    assert_eq!(count(&stdout, "only rank 1"), 1, "{stdout}");
    // `--dedup-output` still merges what the ranks print alike.
    let o = launch(
        &[
            "--nproc-per-node=2",
            "--dedup-output",
            "--log-dir",
            "/dev/null",
        ],
        "chorus",
        &[],
        out.path(),
        &[("TORCHRUN_RS_DEDUP_WINDOW_MS", "1000")],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert_eq!(count(&stdout, "[default0,1]:all say hello"), 1, "{stdout}");
    assert_eq!(count(&stdout, "[default0]:only rank 0"), 1, "{stdout}");
    assert_eq!(count(&stdout, "[default1]:only rank 1"), 1, "{stdout}");
    assert_eq!(count(&stdout, "[default0,1]:all say bye"), 1, "{stdout}");
    let made = std::fs::read_dir(out.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("torchelastic_")
        })
        .count();
    assert_eq!(made, 0, "a log directory was made");
}

/// `--dedup-output` with four ranks of `sh -c SCRIPT` and an events file:
/// the launcher, its stdout read line by line.
fn dedup_run(script: &str, events: &Path) -> std::process::Child {
    Command::new(BIN)
        .args([
            "--standalone",
            "--nproc-per-node=4",
            "--dedup-output",
            &format!("--events-file={}", events.display()),
            "--no-python",
            "sh",
            "-c",
            script,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn dedup_merges_lines_printed_hundreds_of_ms_apart_and_a_rank_lines_ahead() {
    let out = tempfile::tempdir().unwrap();
    // Rank 0 prints at once, two lines ahead of the others, which start
    // 100 to 300 ms later.
    let script = r#"
        case $LOCAL_RANK in 0) d=0;; 1) d=0.1;; 2) d=0.3;; 3) d=0.2;; esac
        sleep $d; echo loading; echo "step 1"; echo "step 2"
    "#;
    let c = dedup_run(script, &out.path().join("events"));
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(
        text(&o.stdout),
        "[default0-3]:loading\n[default0-3]:step 1\n[default0-3]:step 2\n"
    );
}

#[test]
fn dedup_prints_a_line_a_rank_never_prints_while_the_workers_still_run() {
    let out = tempfile::tempdir().unwrap();
    let events = out.path().join("events");
    // Rank 3 prints nothing; every rank runs on for 8 s.
    let script = r#"[ "$LOCAL_RANK" = 3 ] || echo hello; sleep 8"#;
    let mut c = dedup_run(script, &events);
    let stdout = c.stdout.take().unwrap();
    let (_rest, seen) = testkit::read_until_line(stdout, "hello");
    assert_eq!(seen, "[default0-2]:hello\n");
    let exits = std::fs::read_to_string(&events)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"worker_exited\""))
        .count();
    assert_eq!(exits, 0, "the line came only when the workers ended");
    let _ = c.kill();
    let _ = c.wait();
}
