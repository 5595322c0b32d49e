//! Containers under runc. `runc run` stays in the foreground as this process's child: its exit
//! status is the container init's (128 + N when a signal ended it), which `runc create`/`start`
//! would lose once the init is reparented. Signals go through `runc kill`, commands through
//! `runc exec`; every state file lives under the runtime's own `--root`, so two labs never see
//! each other's containers, and `delete` (or drop) removes the container, its cgroup, its
//! overlay and its bundle.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::Signal;
use tokio::sync::watch;

use super::guard::Guard;
use super::image_store::Image;
use super::rootfs::ContainerRootfs;
use super::runtime_config::{self, ContainerSpec};
use super::tool;
use crate::lab::node::run_group;

/// `runc run` creates and starts a container in ≈ 30 ms here; this only stops a hang.
const START_BOUND: Duration = Duration::from_secs(20);
/// `runc kill`, `state`, `delete`: each well under a second.
const RUNC_BOUND: Duration = Duration::from_secs(10);
/// After SIGKILL, the init is gone within milliseconds.
const KILL_BOUND: Duration = Duration::from_secs(5);

/// The node's runc: its state root and container bundles under one directory of the lab run.
pub struct Runtime {
    root: PathBuf,
    bundles: PathBuf,
    /// Prefixes cgroup names (the cgroup tree is the host's, shared by every lab).
    cgroup_prefix: String,
    /// Deletes what is left under `root` when the runtime is dropped or the lab dies; taken
    /// (and so run) first when the runtime is dropped.
    guard: Option<Guard>,
}

/// What a command run in a container printed, and how it ended.
#[derive(Debug)]
pub struct ExecOutput {
    /// None: still running at the timeout, and killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

pub struct Container {
    id: String,
    root: PathBuf,
    bundle: PathBuf,
    rootfs: ContainerRootfs,
    pid: i32,
    exit: watch::Receiver<Option<ExitStatus>>,
    created: Instant,
    started_in: Duration,
    execs: AtomicU64,
    deleted: bool,
}

impl Runtime {
    /// A runtime keeping its state under `dir` (created). Fails, naming runc, when runc is absent.
    /// Its containers do not outlive it: dropping it (or the lab's death) deletes them.
    pub async fn new(dir: &Path) -> Result<Runtime> {
        let (root, bundles) = (dir.join("runc"), dir.join("containers"));
        for d in [&root, &bundles] {
            tokio::fs::create_dir_all(d).await.with_context(|| format!("cannot create {}", d.display()))?;
        }
        let mut version = tokio::process::Command::new("runc");
        version.arg("--version");
        tool::run(version, RUNC_BOUND).await.context("the OCI runtime needs runc (apt-get install runc)")?;
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let cgroup_prefix = format!("graceful-{}-{nanos:x}", std::process::id());
        let guard = Some(Guard::start(&root, &cgroup_prefix)?);
        Ok(Runtime { root, bundles, cgroup_prefix, guard })
    }

    fn runc(&self) -> tokio::process::Command {
        runc(&self.root)
    }

    /// Creates and starts container `id` (letters, digits, `-`, `_`, `.`) of `image` as `spec`
    /// says, its output appended to `log`; returns once runc reports its init process.
    pub async fn run(&self, id: &str, image: &Image, spec: &ContainerSpec, log: &Path) -> Result<Container> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            bail!("container id `{id}`: only letters, digits, `-`, `_` and `.` are allowed");
        }
        let created = Instant::now();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("container log {}", log.display()))?;
        let bundle = self.bundles.join(id);
        if bundle.exists() {
            bail!("container `{id}` already exists ({})", bundle.display());
        }
        let rootfs = match self.prepare(id, image, spec, &bundle).await {
            Ok(rootfs) => rootfs,
            Err(e) => {
                // The overlay, if mounted, went with the error; the bundle must not block a retry.
                let _ = tokio::fs::remove_dir_all(&bundle).await;
                return Err(e);
            }
        };
        let pid_file = bundle.join("init.pid");
        let mut cmd = self.runc();
        cmd.args(["run", "--bundle"])
            .arg(&bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // A `run` cut short (the lab interrupted) must not leave runc creating a container
            // after the runtime's guard has swept; once the container runs, killing `runc run`
            // leaves it to `Container` and the guard.
            .kill_on_drop(true);
        // runc joins the run's process group; the container's init starts a session of its own,
        // which the runtime's guard (guard.rs) covers.
        run_group::join(&mut cmd);
        let mut child = cmd.spawn().context("cannot start `runc run`")?;

        let (tx, exit) = watch::channel(None);
        let deadline = Instant::now() + START_BOUND;
        let pid = loop {
            if let Some(pid) = read_pid(&pid_file).await {
                break pid;
            }
            if let Some(status) = child.try_wait()? {
                let mut failed = Container::new(id, &self.root, bundle, rootfs, 0, exit, created);
                failed.deleted = true;
                let _ = failed.remove().await;
                bail!("container `{id}` did not start ({status}): {}", log_tail(log));
            }
            if Instant::now() >= deadline {
                let _ = child.kill().await;
                let mut failed = Container::new(id, &self.root, bundle, rootfs, 0, exit, created);
                failed.deleted = true;
                let _ = failed.remove().await;
                bail!("container `{id}` did not start within {START_BOUND:?}: {}", log_tail(log));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        tokio::spawn(async move {
            let status = child.wait().await.unwrap_or_else(|_| ExitStatus::from_raw(255 << 8));
            let _ = tx.send(Some(status));
        });
        Ok(Container::new(id, &self.root, bundle, rootfs, pid, exit, created))
    }

    /// The bundle: the container's overlay over the image, and its runtime config.
    async fn prepare(&self, id: &str, image: &Image, spec: &ContainerSpec, bundle: &Path) -> Result<ContainerRootfs> {
        tokio::fs::create_dir_all(bundle).await.with_context(|| format!("cannot create {}", bundle.display()))?;
        let rootfs = ContainerRootfs::mount(&image.rootfs, bundle).with_context(|| format!("container `{id}`"))?;
        let mut config = runtime_config::build(&image.config, &image.rootfs, spec, rootfs.path())
            .with_context(|| format!("container `{id}` of image {}", image.name))?;
        if let Some(linux) = config.linux_mut() {
            linux.set_cgroups_path(Some(PathBuf::from(format!("/{}-{id}", self.cgroup_prefix))));
        }
        config.save(bundle.join("config.json")).with_context(|| format!("writing {}", bundle.display()))?;
        Ok(rootfs)
    }

    /// Deletes every container left under this runtime's root and every bundle (its overlay
    /// unmounted): what a lab that lost its `Container`s (a panic, a kill) left behind. Returns
    /// how many containers runc still listed.
    pub async fn sweep(&self) -> Result<usize> {
        let mut list = self.runc();
        list.args(["list", "--quiet"]);
        let ids = tool::run(list, RUNC_BOUND).await?.stdout;
        let mut n = 0;
        for id in ids.lines().filter(|l| !l.is_empty()) {
            let mut delete = self.runc();
            delete.args(["delete", "--force", id]);
            tool::run(delete, RUNC_BOUND).await?;
            n += 1;
        }
        let mut bundles = tokio::fs::read_dir(&self.bundles).await?;
        while let Some(bundle) = bundles.next_entry().await? {
            // Not mounted (already gone, or never mounted) is fine: EINVAL.
            let _ = umount2(&bundle.path().join("rootfs"), MntFlags::MNT_DETACH);
            tokio::fs::remove_dir_all(bundle.path())
                .await
                .with_context(|| format!("removing {}", bundle.path().display()))?;
        }
        Ok(n)
    }
}

impl Drop for Runtime {
    /// What a `run` cut short left (its future dropped by an interrupted lab between the bundle
    /// and the `Container`): the guard force-deletes every container runc lists, then each bundle
    /// left on disk goes, its overlay unmounted first.
    fn drop(&mut self) {
        drop(self.guard.take());
        let Ok(bundles) = std::fs::read_dir(&self.bundles) else { return };
        for bundle in bundles.flatten() {
            let _ = umount2(&bundle.path().join("rootfs"), MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir_all(bundle.path());
        }
    }
}

fn runc(root: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("runc");
    cmd.arg("--root").arg(root);
    cmd
}

async fn read_pid(path: &Path) -> Option<i32> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    text.trim().parse().ok().filter(|p| *p > 0)
}

/// The last lines of a log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

impl Container {
    fn new(
        id: &str,
        root: &Path,
        bundle: PathBuf,
        rootfs: ContainerRootfs,
        pid: i32,
        exit: watch::Receiver<Option<ExitStatus>>,
        created: Instant,
    ) -> Container {
        Container {
            id: id.to_string(),
            root: root.to_path_buf(),
            bundle,
            rootfs,
            pid,
            exit,
            started_in: created.elapsed(),
            created,
            execs: AtomicU64::new(0),
            deleted: false,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's init as the host sees it.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// When `run` was called, and how long until runc reported the init.
    pub fn created(&self) -> Instant {
        self.created
    }

    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The init's exit status once it has ended (as `runc run` reports it: 128 + N for signal N).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits at most `bound` for the init to end.
    pub async fn wait(&self, bound: Duration) -> Result<ExitStatus> {
        let mut exit = self.exit.clone();
        let waited = tokio::time::timeout(bound, exit.wait_for(Option::is_some)).await.map(|r| r.map(|s| *s));
        match waited {
            Ok(Ok(Some(status))) => Ok(status),
            Ok(Ok(None)) => unreachable!("wait_for returns a value it was asked for"),
            Ok(Err(_)) => bail!("container `{}`: lost track of `runc run`", self.id),
            Err(_) => bail!("container `{}` still running after {bound:?}", self.id),
        }
    }

    /// `runc kill`: the signal goes to the container's init (PID 1 in its namespace, which
    /// ignores signals it has no handler for, SIGKILL excepted).
    pub async fn signal(&self, sig: Signal) -> Result<()> {
        let mut cmd = runc(&self.root);
        cmd.args(["kill", &self.id, sig.as_str()]);
        tool::run(cmd, RUNC_BOUND).await.with_context(|| format!("signal {sig} to container `{}`", self.id))?;
        Ok(())
    }

    /// Runs `argv` inside the container (`argv[0]` a path in the image or found on its PATH),
    /// with the container's user, capabilities and seccomp profile plus `env`; killed at `timeout`.
    pub async fn exec(&self, argv: &[String], env: &[(String, String)], timeout: Duration) -> Result<ExecOutput> {
        if argv.is_empty() {
            bail!("exec in container `{}`: empty command", self.id);
        }
        let t = Instant::now();
        let pid_file = self.bundle.join(format!("exec-{}.pid", self.execs.fetch_add(1, Ordering::Relaxed)));
        let mut cmd = runc(&self.root);
        cmd.arg("exec").arg("--pid-file").arg(&pid_file);
        for (k, v) in env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        cmd.arg(&self.id)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        run_group::join(&mut cmd);
        let child = cmd.spawn().context("cannot start `runc exec`")?;
        let result = tokio::time::timeout(timeout, child.wait_with_output()).await;
        let exec_pid = read_pid(&pid_file).await;
        let _ = tokio::fs::remove_file(&pid_file).await;
        match result {
            Ok(out) => {
                let out = out.context("waiting for `runc exec`")?;
                Ok(ExecOutput {
                    status: Some(out.status),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                    took: t.elapsed(),
                })
            }
            Err(_) => {
                // runc exec was killed with the dropped future; the command it started is not its
                // child any more: kill it by the pid runc recorded.
                if let Some(pid) = exec_pid {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
                Ok(ExecOutput { status: None, stdout: String::new(), stderr: String::new(), took: t.elapsed() })
            }
        }
    }

    /// Kills the init if it still runs, then removes the container, its overlay and its bundle.
    pub async fn delete(mut self) -> Result<()> {
        self.deleted = true;
        if self.exit_status().is_none() {
            let _ = self.signal(Signal::SIGKILL).await;
            let _ = self.wait(KILL_BOUND).await;
        }
        self.remove().await
    }

    async fn remove(&mut self) -> Result<()> {
        let mut cmd = runc(&self.root);
        cmd.args(["delete", "--force", &self.id]);
        let deleted = tool::run(cmd, RUNC_BOUND).await;
        self.rootfs.unmount()?;
        tokio::fs::remove_dir_all(&self.bundle).await.with_context(|| format!("removing {}", self.bundle.display()))?;
        match deleted {
            Ok(_) => Ok(()),
            // A container that never got created has nothing to delete.
            Err(e) if format!("{e:#}").contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Container {
    /// The blocking fallback when `delete` was not awaited: the container must not outlive the lab.
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        let runc = |args: &[&str]| {
            let _ = std::process::Command::new("runc")
                .arg("--root")
                .arg(&self.root)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        runc(&["kill", &self.id, "KILL"]);
        // Polls the pid, not the exit channel: its sender is a task this thread may be blocking.
        let deadline = Instant::now() + KILL_BOUND;
        while self.pid > 0
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), None).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        runc(&["delete", "--force", &self.id]);
        let _ = self.rootfs.unmount();
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}
