//! Signal names as a pod spec writes them (`lifecycle.stopSignal: SIGTERM`), typed once at
//! admission so the kubelet sends a `Signal`, not a re-parsed string.

use nix::sys::signal::Signal;

/// The stop signals the lab plays (the `SIG` prefix is optional, as before).
const STOP_SIGNALS: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGKILL,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// `SIGTERM` or `TERM` → the signal, if it is one a container may be stopped with.
pub fn stop_signal(name: &str) -> Option<Signal> {
    let wanted = format!("SIG{}", name.trim_start_matches("SIG"));
    STOP_SIGNALS.iter().copied().find(|s| s.as_str() == wanted)
}

/// A raw signal number from an exit status, by name where it has one.
pub fn describe(raw: i32) -> String {
    Signal::try_from(raw).map(|s| s.as_str().to_string()).unwrap_or_else(|_| format!("signal {raw}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_and_without_the_prefix() {
        assert_eq!(stop_signal("SIGTERM"), Some(Signal::SIGTERM));
        assert_eq!(stop_signal("QUIT"), Some(Signal::SIGQUIT));
        assert_eq!(stop_signal("SIGSTOP"), None, "not a stop signal the lab plays");
        assert_eq!(stop_signal("TERMINATE"), None);
        assert_eq!(describe(9), "SIGKILL");
        assert_eq!(describe(200), "signal 200");
    }
}
