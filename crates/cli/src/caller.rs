//! The launcher never outlives the Python program that started it.
//!
//! torchrun's Python API (`torchrun_rs.run`, `torchrun_rs.launcher.api`)
//! runs this binary in a child process and names itself in [`CALLER_VAR`].
//! Where torch's agent lives inside the caller and dies with it, this
//! launcher would go on running, its workers too, once the caller is
//! SIGKILLed or crashes. So the launcher asks the kernel for a SIGTERM when
//! its parent dies: the caller's death stops the job as a `kill -TERM` of the
//! launcher does, workers' handlers included.

/// The caller's pid, set by the Python API for the launcher it starts.
pub const CALLER_VAR: &str = "TORCHRUN_RS_CALLER_PID";

/// Ties this process to the caller named in [`CALLER_VAR`], if any, and
/// removes the variable, so that workers (and a launcher one of them
/// starts) do not inherit a tie meant for this process.
///
/// Call first thing in `main`, with SIGTERM already blocked (it is then
/// held until the agent's handlers are in place) and while this process has
/// a single thread (changing the environment is only sound then).
pub fn tie_to_caller() {
    let Some(value) = std::env::var_os(CALLER_VAR) else {
        return;
    };
    std::env::remove_var(CALLER_VAR);
    let Some(caller) = value.to_str().and_then(|v| v.trim().parse::<i32>().ok()) else {
        tracing::warn!("{CALLER_VAR}={value:?} is not a process id; not tied to the caller");
        return;
    };
    // SAFETY: prctl on this process with plain integer arguments.
    let ok = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        )
    } == 0;
    if !ok {
        tracing::warn!(
            "could not ask for a signal on the caller's death: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } == caller {
        return;
    }
    // SAFETY: signal 0 only asks whether the process exists.
    let caller_alive = unsafe { libc::kill(caller, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if caller_alive {
        // Started through a wrapper that did not exec: tied to the wrapper.
        tracing::info!(
            "started by pid {caller} through another process: this launcher ends with that process instead"
        );
    } else {
        // The caller died before the tie was made: the signal it would
        // have sent, now (held until the agent handles it).
        // SAFETY: a signal to this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    }
}
