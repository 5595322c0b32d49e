//! Signal handling, from the first instruction of `main`: as PID 1 a signal with no handler is
//! simply discarded by the kernel, so a SIGTERM that lands while we load config and telemetry
//! would otherwise be lost and the pod would serve until SIGKILL.
//!
//! Until the server takes over ([`Signals::install`]), SIGTERM and SIGINT end the process at once
//! (143 / 130: nothing is served yet, so nothing can be drained); SIGHUP and SIGUSR1 are ignored,
//! then and later.

use std::sync::Mutex;

use signal_hook_registry::SigId;
use tokio::signal::unix::{signal, SignalKind};

use crate::lifecycle::DrainTrigger;

static EARLY: Mutex<Vec<SigId>> = Mutex::new(Vec::new());

/// Exit codes a shell reports for a death by signal (128 + signal number).
pub const EXIT_SIGTERM: u8 = 143;
pub const EXIT_SIGINT: u8 = 130;

/// Installs the early handlers. Call first thing in `main`, for the serving roles only.
pub fn install_early() {
    let mut ids = EARLY.lock().unwrap_or_else(|e| e.into_inner());
    for (sig, code) in [(libc::SIGTERM, EXIT_SIGTERM), (libc::SIGINT, EXIT_SIGINT)] {
        // SAFETY: `_exit` is async-signal-safe; the action touches nothing else.
        if let Ok(id) = unsafe { signal_hook_registry::register(sig, move || libc::_exit(i32::from(code))) } {
            ids.push(id);
        }
    }
    for sig in [libc::SIGHUP, libc::SIGUSR1] {
        // SAFETY: an empty action. Registering it replaces the default (terminate) disposition.
        let _ = unsafe { signal_hook_registry::register(sig, || {}) };
    }
}

/// Hands SIGTERM and SIGINT over to the server's own handlers (registered before this call).
fn release() {
    let mut ids = EARLY.lock().unwrap_or_else(|e| e.into_inner());
    for id in ids.drain(..) {
        signal_hook_registry::unregister(id);
    }
}

/// The termination signals, registered before anything listens.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        let s = Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        };
        // Ours now: the early handlers (exit at once) step aside.
        release();
        Ok(s)
    }

    /// The next SIGTERM or SIGINT; SIGHUP and SIGUSR1 are logged and ignored (Kubernetes never
    /// sends them; a terminal hang-up must not kill a pod's process without a drain).
    pub async fn next_stop(&mut self) -> DrainTrigger {
        loop {
            tokio::select! {
                _ = self.term.recv() => return DrainTrigger::Sigterm,
                _ = self.int.recv() => return DrainTrigger::Sigint,
                _ = self.hup.recv() => tracing::info!("SIGHUP ignored: SIGTERM starts the drain"),
                _ = self.usr1.recv() => tracing::info!("SIGUSR1 ignored: SIGTERM starts the drain"),
            }
        }
    }
}

/// The role named on the command line, found without parsing it (parsing comes after `install_early`).
pub fn serving_role(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    let mut skip_value = false;
    for arg in args.skip(1) {
        let arg = arg.to_string_lossy();
        if skip_value {
            skip_value = false;
            continue;
        }
        if arg == "--config" {
            skip_value = true;
            continue;
        }
        if arg.starts_with('-') {
            continue;
        }
        return arg == "backend" || arg == "frontend";
    }
    false
}

#[cfg(test)]
mod tests {
    use super::serving_role;

    fn role(args: &[&str]) -> bool {
        serving_role(args.iter().map(std::ffi::OsString::from))
    }

    #[test]
    fn finds_the_role_without_parsing() {
        assert!(role(&["graceful", "backend", "--listen", "x"]));
        assert!(role(&["graceful", "--config", "backend", "frontend"]));
        assert!(!role(&["graceful", "--config", "f.toml", "lab", "backend"]));
        assert!(!role(&["graceful", "shutdown-probe", "--drain", "u"]));
    }
}
