//! Which node runs the lab, and getting into it: `--node kernel` re-runs the lab inside a
//! private world (new network and mount namespaces, and a user namespace when not root) where
//! it builds the kernel node; `--node auto` does so where the machine allows it and otherwise
//! says why in one line and runs the process node.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use crate::lab::cli::{LabArgs, NodeKind};
use crate::lab::kernel_node::node::Node;
use crate::lab::kernel_node::private_world::{self, Isolation};

/// The node this invocation runs, once decided.
pub enum Decided {
    Process,
    /// Re-run this command inside a private world.
    EnterWorld,
    /// Already inside: build the node here.
    Kernel,
}

pub fn decide(args: &LabArgs) -> Result<Decided> {
    if args.inside_world {
        return Ok(Decided::Kernel);
    }
    match args.node {
        NodeKind::Process => Ok(Decided::Process),
        NodeKind::Kernel => {
            private_world::check_host().context("--node kernel")?;
            Ok(Decided::EnterWorld)
        }
        NodeKind::Auto => match private_world::check_host() {
            Ok(_) => Ok(Decided::EnterWorld),
            Err(e) => {
                eprintln!("node: process (the kernel node is not available here: {e:#})");
                Ok(Decided::Process)
            }
        },
    }
}

/// Runs this very command again inside a new private world and returns its exit status. A
/// terminal's Ctrl-C reaches both processes (one process group): the inner lab handles it and
/// this one waits. SIGTERM is passed on. If this process is killed, the world dies with it.
pub fn run_in_world() -> Result<ExitCode> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1)).arg("--inside-world");
    let cmd = private_world::command_in_new_world(cmd);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut child = tokio::process::Command::from(cmd).spawn().context("entering a private world")?;
        let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let status = loop {
            tokio::select! {
                s = child.wait() => break s.context("waiting for the lab in its private world")?,
                _ = term.recv() => {
                    if let Some(pid) = child.id() {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
                    }
                }
                // The inner lab got it too (same process group) and ends the run.
                _ = int.recv() => {}
            }
        };
        use std::os::unix::process::ExitStatusExt;
        Ok(match (status.code(), status.signal()) {
            (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
            (None, Some(sig)) => ExitCode::from(128u8.saturating_add(sig as u8)),
            _ => ExitCode::from(1),
        })
    })
}

/// Inside the world: builds the node and moves this thread into its namespace, so the runtime
/// started next (the kubelet's probes, the receiver, kube-proxy's tools) lives on the node.
pub fn build_node() -> Result<(Arc<Mutex<Node>>, Isolation)> {
    let node = Node::create().context("building the kernel node")?;
    node.netns.enter_this_thread()?;
    Ok((Arc::new(Mutex::new(node)), isolation_inside()))
}

/// Inside the world: a runtime whose threads live in the host's network namespace (the one the
/// lab was started in, which its parent, waiting outside, still holds), for what must reach the
/// user's machine itself: forwarding spans to a local Jaeger. Root only: a user namespace
/// cannot enter a network namespace its owner's namespace holds.
pub fn host_runtime() -> Result<tokio::runtime::Runtime> {
    let parent = nix::unistd::getppid();
    let file = std::fs::File::open(format!("/proc/{parent}/ns/net"))
        .with_context(|| format!("opening the network namespace of the lab outside (pid {parent})"))?;
    crate::lab::kernel_node::netns::runtime_in(file, "host-net", 1)
}

/// Inside a world, root is root either way: the user-id map tells whether it is the host's.
fn isolation_inside() -> Isolation {
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let fields: Vec<&str> = map.split_whitespace().collect();
    if fields.get(..3) == Some(&["0", "0", "4294967295"][..]) {
        Isolation::Root
    } else {
        Isolation::UserNamespace
    }
}
