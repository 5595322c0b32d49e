//! The runtime's `RuntimeDefault` seccomp profile: an allow-list of ≈ 230 system calls a server
//! needs, everything else EPERM (no namespace creation, mount, ptrace, BPF, io_uring, module or
//! keyring calls; `clone` only without namespace flags, `clone3` ENOSYS so libc falls back).

use oci_spec::runtime::LinuxSeccomp;

const PROFILE: &str = include_str!("runtime_default_seccomp.json");

/// The profile as the runtime config carries it.
pub fn runtime_default() -> LinuxSeccomp {
    serde_json::from_str(PROFILE).expect("runtime_default_seccomp.json is a valid OCI seccomp section")
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxSeccompAction;

    fn allowed(name: &str) -> bool {
        runtime_default().syscalls().iter().flatten().any(|s| {
            s.action() == LinuxSeccompAction::ScmpActAllow && s.names().iter().any(|n| n == name) && s.args().is_none()
        })
    }

    #[test]
    fn a_server_may_serve_and_nothing_may_escape() {
        let p = runtime_default();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        for call in ["accept4", "epoll_wait", "read", "write", "exit_group", "rt_sigaction"] {
            assert!(allowed(call), "{call} is allowed");
        }
        for call in ["mount", "unshare", "setns", "ptrace", "bpf", "init_module", "keyctl", "io_uring_setup"] {
            let named = p.syscalls().iter().flatten().any(|s| s.names().iter().any(|n| n == call));
            assert!(!named, "{call} falls to the default action (EPERM)");
        }
    }
}
