//! `torchrun-rs`: flags → resolved config → launch. Usage errors are one line
//! on stderr and exit status 2; see the README for every exit status.

use std::process::ExitCode;

use cli::exit_code;
use engine::signals;

fn init_logging() {
    let level = std::env::var("LOGLEVEL").unwrap_or_else(|_| "warn".to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(level.to_lowercase())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(cli::log_format::TorchFormat)
        .init();
}

fn main() -> ExitCode {
    // A bug: one line, no backtrace, and the launcher exits at once from
    // whichever thread panicked; the guardian then stops every worker.
    cli::panic_hook::install("torchrun-rs", Some(exit_code::INTERNAL_ERROR));
    // Hold the handled signals from the first instant; the agent unblocks
    // them once its handlers are in place.
    signals::block(signals::EARLY_BLOCKED);
    init_logging();
    // Started by torchrun's Python API: end with the caller (a SIGTERM,
    // held like the others until the agent handles it).
    cli::caller::tie_to_caller();
    // First thing, while this process has a single thread: the guardian is
    // forked, and every child of the process becomes the launcher's.
    let supervisor = engine::Supervisor::for_launcher();

    // Flags are text (parsed as such); the raw arguments are kept so that
    // what is passed on (the script's arguments, a --log-dir) keeps its
    // bytes when they are not UTF-8, as with torchrun.
    let argv_os: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let argv: Vec<String> = argv_os
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if argv.len() == 1 && argv[0] == "--torchrun-rs-flag-table" {
        // For the Python package (torchrun_rs.run): not a user flag.
        println!("{}", cli::args::flag_table_json());
        return ExitCode::SUCCESS;
    }
    let env = |k: &str| std::env::var(k).ok();
    let raw = match cli::args::parse(&argv, &env) {
        Ok(r) => r,
        Err(e) => return usage_error(&e.0),
    };
    if raw.help {
        print!("{}", cli::args::help_text());
        return ExitCode::SUCCESS;
    }
    if raw.version {
        println!(
            "torchrun-rs {} (flags and behaviour of torchrun from torch {})",
            env!("CARGO_PKG_VERSION"),
            cli::TORCH_RELEASE
        );
        return ExitCode::SUCCESS;
    }
    if raw.flag("watch") && raw.get("status").is_none() {
        return usage_error("--watch goes with --status ADDR:PORT");
    }
    if let Some(addr) = raw.get("status") {
        let code = engine::status_view::show(addr, raw.flag("watch"));
        return ExitCode::from(code as u8);
    }
    if let Some(shell) = raw.get("print_completion") {
        return match cli::completions::script(shell) {
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => usage_error(&e.0),
        };
    }
    let mut resolved = match cli::resolve::resolve(&raw, &env) {
        Ok(r) => r,
        Err(e) => return usage_error(&e.0),
    };
    let (worker_args, tail) = cli::raw_args::worker_args(&resolved.args, &argv_os);
    let flags = &argv_os[..argv_os.len() - tail];
    if let Some(dir) = resolved.config.log_dir.take() {
        resolved.config.log_dir = Some(cli::raw_args::path_value(dir, flags, "PET_LOG_DIR"));
    }
    // Every value checked before anything touches the disk or the network.
    if let Err(e) = resolved.config.validate() {
        return usage_error(&format!("argument {}: {}", e.flag, e.message));
    }
    if raw.flag("dry_run") {
        let launcher_env: engine::worker_env::Env = std::env::vars_os().collect();
        return match cli::dry_run::render(&resolved, &launcher_env) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => usage_error(&e.0),
        };
    }
    for n in &resolved.notices {
        eprintln!("torchrun-rs: note: {n}");
    }
    if let Some(list) = &resolved.cuda_visible_devices {
        // Still without other threads: setting the variable is safe.
        std::env::set_var("CUDA_VISIBLE_DEVICES", list);
    }
    if resolved.set_omp_threads {
        // Still single-threaded but for the guardian: setting the variable is safe.
        std::env::set_var("OMP_NUM_THREADS", "1");
        let stars = "*".repeat(41);
        // torch logs it as one warning that starts with a newline.
        tracing::warn!(
            "\n{stars}\nSetting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your system being overloaded, please further tune the variable for optimal performance in your application as needed. \n{stars}"
        );
    }
    match engine::launch_agent_with(
        &supervisor,
        &resolved.config,
        &resolved.entrypoint,
        &worker_args,
    ) {
        Ok(mut outcome) => {
            if let Some(name) = resolved.entrypoint_name {
                outcome.entrypoint_name = name;
            }
            if let Some(report) = outcome.report() {
                eprint!("{report}");
            }
            ExitCode::from(outcome.exit_code() as u8)
        }
        Err(engine::LaunchError::Config(e)) => {
            usage_error(&format!("argument {}: {}", e.flag, e.message))
        }
        Err(e) => {
            eprintln!("torchrun-rs: error: {e}");
            ExitCode::from(exit_code::LAUNCH_ERROR)
        }
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("torchrun-rs: error: {msg}");
    eprintln!("usage: torchrun-rs [options] training_script [training_script_args ...] (see -h)");
    ExitCode::from(exit_code::USAGE)
}
