//! The host's network namespace as tests see it, to prove a test (or a lab) left it as it was.

use std::process::Command;

/// What the host's network namespace shows: links, named namespaces, the nftables ruleset.
#[derive(Debug, PartialEq, Eq)]
pub struct HostSnapshot {
    links: String,
    netns: String,
    ruleset: String,
}

impl HostSnapshot {
    pub fn take() -> HostSnapshot {
        let run = |args: &[&str]| {
            let out = Command::new(args[0]).args(&args[1..]).output().expect("host tool");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        HostSnapshot {
            links: run(&["ip", "-o", "link"]),
            netns: run(&["ip", "netns", "list"]),
            ruleset: run(&["nft", "list", "ruleset"]),
        }
    }
}

/// Why the kernel node cannot run here (not root, a tool or br_netfilter missing, no
/// namespaces), or None.
pub fn kernel_node_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (the kernel node needs CAP_NET_ADMIN; rootless runs are not tested)".into());
    }
    graceful::lab::kernel_node::private_world::check_host().err().map(|e| format!("{e:#}"))
}
