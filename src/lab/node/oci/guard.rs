//! Containers must not outlive the lab, however it ends. A container's init is not the lab's
//! descendant in any way a signal can follow: runc's init starts a session of its own (so the
//! run group's kill misses it) and is reparented when `runc run` dies. So each runtime starts a
//! guard: a shell in its own process group, blocked reading a pipe only the lab holds. When the
//! lab ends (drop, exit, panic or SIGKILL) the kernel closes the pipe and the guard force-deletes
//! every container under the runtime's runc root, which kills their inits and with them their
//! pid namespaces.

use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// `$1`: runc's root, `$2`: the runtime's cgroup name prefix. `cat` returns at end-of-file;
/// nothing is ever written to the pipe. A cgroup whose last process is still exiting refuses
/// runc's removal (EBUSY), and a `runc run` killed mid-start leaves its cgroups to no one: the
/// empty ones are removed, retried every 0.1 s for up to 3 s while any is still busy.
const SCRIPT: &str = r#"cat >/dev/null
for id in $(runc --root "$1" list --quiet); do runc --root "$1" delete --force "$id"; done
for try in $(seq 30); do
  left=0
  for d in /sys/fs/cgroup/"$2"-* /sys/fs/cgroup/*/"$2"-*; do
    [ -d "$d" ] || continue
    rmdir "$d" 2>/dev/null || left=1
  done
  [ "$left" = 0 ] && break
  sleep 0.1
done"#;
/// The guard's sweep: one `runc delete` per container, each ≈ 30 ms.
const SWEEP_BOUND: Duration = Duration::from_secs(10);

pub struct Guard {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Guard {
    pub fn start(runc_root: &Path, cgroup_prefix: &str) -> Result<Guard> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("sh")
            .args(["-c", SCRIPT, "oci-runtime-guard"])
            .arg(runc_root)
            .arg(cgroup_prefix)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Out of the run's process group: the group is killed at the same moment.
            .process_group(0)
            .spawn()
            .context("cannot start the OCI runtime's guard (sh)")?;
        let pipe = child.stdin.take();
        Ok(Guard { child, pipe })
    }
}

impl Drop for Guard {
    /// Lets the guard sweep now and waits for it, bounded.
    fn drop(&mut self) {
        drop(self.pipe.take());
        let deadline = Instant::now() + SWEEP_BOUND;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
