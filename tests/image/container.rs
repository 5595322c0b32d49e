//! The backend container under runc: `runc run` in the foreground (its exit status is the
//! container's), its own state root and bundle in temporary directories, everything removed on
//! drop whatever the test did.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tempfile::TempDir;

use crate::archive::Image;
use crate::netns::Netns;
use crate::pod::Backend;

pub struct Container {
    pub id: String,
    state: TempDir,
    bundle: TempDir,
    run: Child,
    pub created: Instant,
}

#[derive(Deserialize)]
struct State {
    pid: i32,
    status: String,
}

impl Container {
    /// Unpacks the image, writes the runtime config and starts `runc run`; returns at once.
    pub fn run(image: &Image, backend: &Backend, netns: &Netns, env: &[(&str, Option<&str>)]) -> Container {
        let bundle = tempfile::Builder::new().prefix("graceful-bundle-").tempdir().expect("a bundle dir");
        let state = tempfile::Builder::new().prefix("graceful-runc-").tempdir().expect("a runc root");
        image.unpack(&bundle.path().join("b"));
        crate::spec::write(&bundle.path().join("b"), &image.run, backend, &netns.path(), env);
        let id =
            format!("graceful-test-{}-{}", std::process::id(), bundle.path().file_name().unwrap().to_string_lossy());
        let log = File::create(bundle.path().join("container.log")).expect("the container log");
        let created = Instant::now();
        let run = Command::new("runc")
            .arg("--root")
            .arg(state.path())
            .args(["run", "--bundle"])
            .arg(bundle.path().join("b"))
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn runc run");
        Container { id, state, bundle, run, created }
    }

    fn runc(&self) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(self.state.path());
        cmd
    }

    /// The container's init as the host sees it, once runc reports it running.
    pub fn pid(&self) -> Option<i32> {
        let out = self.runc().args(["state", &self.id]).output().ok()?;
        let state: State = serde_json::from_slice(&out.stdout).ok()?;
        (state.status == "running" && state.pid > 0).then_some(state.pid)
    }

    /// Waits (bounded) until the container runs; its host pid.
    pub fn wait_running(&self, bound: Duration) -> i32 {
        let mut pid = None;
        let ok = crate::common::eventually(bound, || {
            pid = self.pid();
            pid.is_some()
        });
        assert!(ok, "container not running within {bound:?}: {}", self.log_text());
        pid.unwrap()
    }

    /// The container's init once it has exec'd the image's entrypoint (`exe`), found among the
    /// children of `runc run` (busy polling): earlier than `runc state` reports it.
    pub fn exec_pid(&self, exe: &str, bound: Duration) -> i32 {
        let runc = self.run.id();
        let deadline = Instant::now() + bound;
        loop {
            for task in std::fs::read_dir(format!("/proc/{runc}/task")).into_iter().flatten().flatten() {
                let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                    if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p.as_os_str() == exe) {
                        return pid;
                    }
                }
            }
            // Busy: the binary is ready within milliseconds of its exec.
            assert!(Instant::now() < deadline, "{exe} not exec'd within {bound:?}: {}", self.log_text());
        }
    }

    /// `runc kill ID SIG`: the signal goes to the container's PID 1.
    pub fn kill(&self, signal: &str) {
        let out = self.runc().args(["kill", &self.id, signal]).output().expect("run runc kill");
        assert!(out.status.success(), "runc kill {signal}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `runc exec` of `args` (no shell: args[0] is a path in the image), bounded.
    pub fn exec(&self, args: &[String], bound: Duration) -> Output {
        let child = self
            .runc()
            .args(["exec", &self.id])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn runc exec");
        let (status, stdout, stderr) = crate::common::wait_bounded(child, bound);
        Output { status, stdout: stdout.into_bytes(), stderr: stderr.into_bytes() }
    }

    /// The container's exit status as `runc run` reports it (128 + signal when killed), bounded.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.run.try_wait().expect("wait for runc run") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.bundle.path().join("container.log")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.runc().args(["kill", &self.id, "KILL"]).stderr(Stdio::null()).status();
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            let _ = self.run.kill();
            let _ = self.run.wait();
        }
        let _ = self.runc().args(["delete", "--force", &self.id]).stderr(Stdio::null()).status();
    }
}
