//! The container runtime's part: a container is a child process of this binary, started from
//! its plan, signalled and described when it ends.

use std::process::Stdio;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::lab::api::signal;
use crate::lab::node::pod_spec::ContainerPlan;

/// Starts the container: this binary with the plan's arguments and environment, output to its log.
pub fn spawn(plan: &ContainerPlan, log: &std::path::Path) -> std::io::Result<Child> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(&plan.program);
    cmd.args(&plan.args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    if let Some(dir) = &plan.cwd {
        cmd.current_dir(dir);
    }
    if let Some(ns) = &plan.netns {
        ns.enter_on_exec(cmd.as_std_mut()).map_err(std::io::Error::other)?;
    }
    super::run_group::join(&mut cmd);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child if the lab dies,
    // so no pod outlives a crashed lab.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `sig` to the container while it is still ours.
pub fn send_signal(child: &Child, sig: Signal) {
    // `id()` is None once reaped, so the pid is still our own child's.
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
    }
}

/// "exit code N" or "killed by SIGX", for the pod's events.
pub fn describe_exit(s: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by {}", signal::describe(sig)),
        _ => "exited".into(),
    }
}
