//! A bug in either binary ends in one line on stderr, never a backtrace.

/// Installs the hook for the program `name`. With `exit_with`, the process
/// exits at once with that status from whichever thread panicked (the
/// launcher: its guardian then stops every worker), unless the panic is in
/// one of the engine's background tasks (a stack capture, one HTTP
/// connection): that task alone ends, and the job goes on. Without
/// `exit_with`, the panic unwinds as usual (the store: a panicking
/// connection's task ends that connection only, the runtime catching it).
pub fn install(name: &'static str, exit_with: Option<u8>) {
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("{name}: internal error: {msg}{at} (please report it)");
        if let Some(code) = exit_with {
            if !engine::background::in_background() {
                std::process::exit(i32::from(code));
            }
        }
    }));
}
