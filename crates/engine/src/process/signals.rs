//! Signal names, and trapping the signals the launcher handles.
//!
//! The handled signals are blocked at the first line of `main` (before any
//! thread exists, so every thread inherits the mask) and unblocked once their
//! handlers are installed: a signal that arrives while the launcher is still
//! parsing flags or binding the store is held, not lost and not fatal.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

const NAMES: &[(&str, i32)] = &[
    ("SIGHUP", libc::SIGHUP),
    ("SIGINT", libc::SIGINT),
    ("SIGQUIT", libc::SIGQUIT),
    ("SIGILL", libc::SIGILL),
    ("SIGTRAP", libc::SIGTRAP),
    ("SIGABRT", libc::SIGABRT),
    ("SIGBUS", libc::SIGBUS),
    ("SIGFPE", libc::SIGFPE),
    ("SIGKILL", libc::SIGKILL),
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGSEGV", libc::SIGSEGV),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGPIPE", libc::SIGPIPE),
    ("SIGALRM", libc::SIGALRM),
    ("SIGTERM", libc::SIGTERM),
    ("SIGSTKFLT", libc::SIGSTKFLT),
    ("SIGCHLD", libc::SIGCHLD),
    ("SIGCONT", libc::SIGCONT),
    ("SIGSTOP", libc::SIGSTOP),
    ("SIGTSTP", libc::SIGTSTP),
    ("SIGTTIN", libc::SIGTTIN),
    ("SIGTTOU", libc::SIGTTOU),
    ("SIGURG", libc::SIGURG),
    ("SIGXCPU", libc::SIGXCPU),
    ("SIGXFSZ", libc::SIGXFSZ),
    ("SIGVTALRM", libc::SIGVTALRM),
    ("SIGPROF", libc::SIGPROF),
    ("SIGWINCH", libc::SIGWINCH),
    ("SIGIO", libc::SIGIO),
    ("SIGPWR", libc::SIGPWR),
    ("SIGSYS", libc::SIGSYS),
];

/// `SIGTERM` → 15.
pub fn signal_number(name: &str) -> Option<i32> {
    NAMES.iter().find(|(n, _)| *n == name).map(|&(_, s)| s)
}

/// 15 → `SIGTERM`.
pub fn signal_name(sig: i32) -> Option<&'static str> {
    NAMES.iter().find(|(_, s)| *s == sig).map(|&(n, _)| n)
}

/// Splits a comma list of names into known signal numbers and unknown names
/// (torch warns about those and registers the rest).
pub fn parse_signal_list(list: &str) -> (Vec<i32>, Vec<String>) {
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match signal_number(name) {
            Some(s) if !known.contains(&s) => known.push(s),
            Some(_) => {}
            None => unknown.push(name.to_string()),
        }
    }
    (known, unknown)
}

/// Signals held from the first instant: torch's defaults plus the two user
/// signals (Slurm's pre-emption warning is usually SIGUSR1).
pub const EARLY_BLOCKED: &[i32] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks `signals` in the calling thread (call first thing in `main`, so
/// that every thread started later inherits the mask).
pub fn block(signals: &[i32]) {
    let set = sigset(signals);
    // SAFETY: changes only this thread's signal mask.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Unblocks `signals` in the calling thread.
pub fn unblock(signals: &[i32]) {
    let set = sigset(signals);
    // SAFETY: changes only this thread's signal mask.
    unsafe {
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// What a received signal asks of the launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// A `--signals-to-handle` signal: forward it, then shut down.
    Shutdown(i32),
    /// A `--forward-signals` signal: forward it and keep running.
    Forward(i32),
}

/// Receives the trapped signals.
pub struct Trap {
    rx: mpsc::UnboundedReceiver<SignalEvent>,
}

/// A signal that could not be trapped, with the reason.
#[derive(Debug)]
pub struct TrapWarning {
    pub name: String,
    pub reason: String,
}

impl Trap {
    /// Installs handlers for `shutdown` and `forward` signal lists (names,
    /// comma-separated). Must run inside a Tokio runtime. Unknown or
    /// untrappable names are returned as warnings; the others still work.
    pub fn install(shutdown: &str, forward: &str) -> (Trap, Vec<TrapWarning>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut warnings = Vec::new();
        let (fwd, fwd_unknown) = parse_signal_list(forward);
        let (stop, stop_unknown) = parse_signal_list(shutdown);
        for name in stop_unknown.into_iter().chain(fwd_unknown) {
            warnings.push(TrapWarning {
                name,
                reason: "not a signal name".to_string(),
            });
        }
        let mut installed = Vec::new();
        let lists = [(fwd, true), (stop, false)];
        for (sigs, is_forward) in lists {
            for sig in sigs {
                if installed.contains(&sig) {
                    continue;
                }
                match signal(SignalKind::from_raw(sig)) {
                    Ok(mut stream) => {
                        installed.push(sig);
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            while stream.recv().await.is_some() {
                                let ev = if is_forward {
                                    SignalEvent::Forward(sig)
                                } else {
                                    SignalEvent::Shutdown(sig)
                                };
                                if tx.send(ev).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(e) => warnings.push(TrapWarning {
                        name: signal_name(sig).unwrap_or("?").to_string(),
                        reason: e.to_string(),
                    }),
                }
            }
        }
        // Handlers exist now: let held signals through.
        unblock(EARLY_BLOCKED);
        (Trap { rx }, warnings)
    }

    pub async fn recv(&mut self) -> Option<SignalEvent> {
        self.rx.recv().await
    }

    /// Waits for the next shutdown signal; forward-only signals received
    /// meanwhile are dropped (there are no workers to forward them to).
    pub async fn next_shutdown(&mut self) -> i32 {
        loop {
            match self.rx.recv().await {
                Some(SignalEvent::Shutdown(sig)) => return sig,
                Some(SignalEvent::Forward(_)) => {}
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// A signal already received, without waiting.
    pub fn try_recv(&mut self) -> Option<SignalEvent> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_name(10), Some("SIGUSR1"));
        let (k, u) = parse_signal_list("SIGTERM, SIGUSR1,SIGNOPE,SIGTERM");
        assert_eq!(k, vec![15, 10]);
        assert_eq!(u, vec!["SIGNOPE".to_string()]);
    }
}
