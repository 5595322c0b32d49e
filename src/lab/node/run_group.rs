//! One process group for every child of a lab run, and a guard process that kills that group
//! when the lab goes away, however it goes (exit, SIGINT/SIGTERM, panic, SIGKILL).
//!
//! Why a separate guard: a parent-death signal reaches only direct children, so a hook such as
//! `sh -c 'sleep 3600'` would leave its `sleep` behind; and a killed lab runs no clean-up code.
//! The guard (this binary, `lab --run-group-guard`) leads the group, blocks on a pipe from the
//! lab, and on end-of-file — the kernel closes the pipe when the lab dies — kills the group,
//! itself included. Children join the group at spawn; their descendants inherit it.

use std::io::Read;
use std::path::Path;
use std::process::{Child, ChildStdin, ExitCode, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result};

/// The run's process group id (the guard's pid); 0 while no guard runs (e.g. unit tests).
static GROUP: AtomicI32 = AtomicI32::new(0);

/// The guard of this lab process; dropping it closes the pipe, and the guard kills the group.
pub struct RunGroup {
    guard: Child,
    pipe: Option<ChildStdin>,
}

impl RunGroup {
    /// Starts the guard as the leader of a new process group.
    pub fn start(exe: &Path) -> Result<RunGroup> {
        use std::os::unix::process::CommandExt;
        let mut guard = std::process::Command::new(exe)
            .args(["lab", "--run-group-guard"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the run's process-group guard ({})", exe.display()))?;
        let pipe = guard.stdin.take();
        GROUP.store(guard.id() as i32, Ordering::SeqCst);
        Ok(RunGroup { guard, pipe })
    }
}

impl Drop for RunGroup {
    fn drop(&mut self) {
        GROUP.store(0, Ordering::SeqCst);
        drop(self.pipe.take());
        // The guard kills its group (itself too) as soon as it reads end-of-file: wait for that,
        // bounded, and make sure of it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while matches!(self.guard.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if matches!(self.guard.try_wait(), Ok(None)) {
            let _ = self.guard.kill();
            let _ = self.guard.wait();
        }
    }
}

/// Puts a child about to be spawned into the run's group (no-op when no guard runs).
pub fn join(cmd: &mut tokio::process::Command) {
    let group = GROUP.load(Ordering::SeqCst);
    if group > 0 {
        cmd.process_group(group);
    }
}

/// The guard's whole life: wait for the lab's end, then kill the group.
pub fn guard() -> ExitCode {
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin().lock();
    // Nothing is ever written: read returns 0 (end-of-file) when the lab's end closes, or an error.
    while let Ok(n) = stdin.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    let _ = nix::sys::signal::killpg(nix::unistd::getpgrp(), nix::sys::signal::Signal::SIGKILL);
    ExitCode::FAILURE
}

/// Kills a hook's or probe's process and everything it started, when the kubelet gives up on it
/// (timeout) or drops it (grace period over): without this a shell's children would run on until
/// the lab ends. Disarmed once the process has ended by itself.
pub struct TreeKill {
    pid: Option<u32>,
}

impl TreeKill {
    pub fn new(pid: Option<u32>) -> TreeKill {
        TreeKill { pid }
    }

    pub fn disarm(&mut self) {
        self.pid = None;
    }
}

impl Drop for TreeKill {
    fn drop(&mut self) {
        if let Some(root) = self.pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) {
            // Descendants first, while they are still linked to the root; then the root.
            for pid in descendants(root).into_iter().chain([root]) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// Every process below `root`, from /proc's parent links.
fn descendants(root: i32) -> Vec<i32> {
    let parent_of = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its end.
        stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()
    };
    let links: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (child, _) in links.iter().filter(|(_, parent)| *parent == p) {
            if !found.contains(child) {
                found.push(*child);
                frontier.push(*child);
            }
        }
    }
    found
}
