//! Running handlers (probes and hooks) once, and the kubelet's threshold bookkeeping.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::lab::network::http_client;
use crate::lab::node::oci::Container;
use crate::lab::node::pod_spec::Handler;
use crate::lab::node::runtime::ExecIn;

/// Runs `h` once within `timeout`. Ok = success by the kubelet's rules (HTTP 200–399, TCP
/// connect, exec exit 0, sleep done); Err says why not. HTTP and TCP handlers connect from the
/// node, as the kubelet's do; an exec runs inside the container (`--runtime oci`), else on the
/// host in the container's network namespace, when it has one.
pub async fn run(
    h: &Handler,
    timeout: Duration,
    env: &[(String, String)],
    log: &Path,
    at: &ExecIn,
) -> Result<(), String> {
    match h {
        Handler::Sleep(d) => {
            tokio::time::sleep(*d).await;
            Ok(())
        }
        Handler::HttpGet { addr, host, path, headers } => {
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            match tokio::time::timeout(timeout, http_client::get_once(*addr, host, path, &hs)).await {
                Ok(Ok(r)) if (200..400).contains(&r.status) => Ok(()),
                Ok(Ok(r)) => Err(format!("HTTP probe failed with statuscode: {}", r.status)),
                Ok(Err(e)) => Err(format!("Get http://{addr}{path}: {e}")),
                Err(_) => Err(format!("Get http://{addr}{path}: timeout after {timeout:?}")),
            }
        }
        Handler::Tcp { addr } => match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
            Err(_) => Err(format!("dial tcp {addr}: timeout")),
        },
        Handler::Exec { program, args } => {
            let netns = match at {
                ExecIn::Container(c) => return exec_in_container(c, program, args, timeout, log).await,
                ExecIn::Host { netns } => netns.as_ref(),
            };
            let out = log_file(log);
            let err = out.as_ref().and_then(|f| f.try_clone().ok());
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(out.map(Stdio::from).unwrap_or_else(Stdio::null))
                .stderr(err.map(Stdio::from).unwrap_or_else(Stdio::null))
                .kill_on_drop(true);
            if let Some(ns) = netns {
                ns.enter_on_exec(cmd.as_std_mut()).map_err(|e| format!("exec {}: {e:#}", program.display()))?;
            }
            crate::lab::node::run_group::join(&mut cmd);
            let mut child = cmd.spawn().map_err(|e| format!("exec {}: {e}", program.display()))?;
            // Declared after `child`, so dropped before it: the tree goes while its root is alive.
            let mut tree = crate::lab::node::run_group::TreeKill::new(child.id());
            let outcome = tokio::time::timeout(timeout, child.wait()).await;
            if outcome.is_ok() {
                tree.disarm();
            }
            match outcome {
                Ok(Ok(s)) if s.success() => Ok(()),
                Ok(Ok(s)) => Err(format!("exec {} {}: {s}", program.display(), args.join(" "))),
                Ok(Err(e)) => Err(format!("exec {}: {e}", program.display())),
                Err(_) => {
                    drop(tree);
                    let _ = child.kill().await;
                    Err(format!("exec {}: timed out after {timeout:?}", program.display()))
                }
            }
        }
    }
}

/// `runc exec` with the container's own environment, user and confinement; output to the log.
async fn exec_in_container(
    c: &Container,
    program: &Path,
    args: &[String],
    timeout: Duration,
    log: &Path,
) -> Result<(), String> {
    let argv: Vec<String> = std::iter::once(program.display().to_string()).chain(args.iter().cloned()).collect();
    let out = c.exec(&argv, &[], timeout).await.map_err(|e| format!("exec {}: {e:#}", program.display()))?;
    if let Some(mut f) = log_file(log) {
        use std::io::Write;
        let _ = f.write_all(out.stdout.as_bytes()).and_then(|_| f.write_all(out.stderr.as_bytes()));
    }
    match out.status {
        Some(s) if s.success() => Ok(()),
        Some(s) => {
            let why = out.stderr.lines().last().map(|l| format!(" ({l})")).unwrap_or_default();
            Err(format!("exec {} {}: {s}{why}", program.display(), args.join(" ")))
        }
        None => Err(format!("exec {}: timed out after {timeout:?}", program.display())),
    }
}

fn log_file(path: &Path) -> Option<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path).ok()
}

/// Consecutive-result thresholds, as the kubelet's probe workers keep them.
#[derive(Debug, Clone)]
pub struct Thresholds {
    success: u32,
    failure: u32,
    ok_run: u32,
    fail_run: u32,
    result: bool,
}

impl Thresholds {
    /// `initial`: the result before any probe (readiness starts failing, liveness passing).
    pub fn new(success: u32, failure: u32, initial: bool) -> Thresholds {
        Thresholds { success, failure, ok_run: 0, fail_run: 0, result: initial }
    }

    /// Records one probe result; returns the new overall result when it flips.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.ok_run += 1;
            self.fail_run = 0;
            if !self.result && self.ok_run >= self.success {
                self.result = true;
                return Some(true);
            }
        } else {
            self.fail_run += 1;
            self.ok_run = 0;
            if self.result && self.fail_run >= self.failure {
                self.result = false;
                return Some(false);
            }
        }
        None
    }

    pub fn result(&self) -> bool {
        self.result
    }

    /// Failed `failure` times in a row (for probes whose failure is an action, not a state).
    pub fn failed_out(&self) -> bool {
        self.fail_run >= self.failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_need_consecutive_results() {
        let mut t = Thresholds::new(2, 3, false);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert!(t.failed_out());
    }

    #[tokio::test]
    async fn exec_and_tcp_handlers() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let env = vec![("PATH".to_string(), std::env::var("PATH").unwrap_or_default())];
        let host = ExecIn::Host { netns: None };
        let t = Duration::from_secs(2);
        let ok = Handler::Exec { program: "true".into(), args: vec![] };
        assert!(run(&ok, t, &env, &log, &host).await.is_ok());
        let bad = Handler::Exec { program: "false".into(), args: vec![] };
        assert!(run(&bad, t, &env, &log, &host).await.is_err());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = Handler::Tcp { addr: l.local_addr().unwrap() };
        assert!(run(&tcp, t, &env, &log, &host).await.is_ok());
        drop(l);
        assert!(run(&tcp, t, &env, &log, &host).await.is_err());
    }

    /// Live processes whose command line is exactly `argv`.
    fn running(argv: &[&str]) -> usize {
        let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
            .count()
    }

    async fn gone_within(argv: &[&str], limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while running(argv) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        running(argv) == 0
    }

    /// A hook's own children go with it, whether it times out or the kubelet drops it.
    #[tokio::test]
    async fn an_exec_that_times_out_or_is_dropped_takes_its_children_along() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let env = vec![("PATH".to_string(), std::env::var("PATH").unwrap_or_default())];
        let host = ExecIn::Host { netns: None };
        for (i, drop_it) in [false, true].into_iter().enumerate() {
            let seconds = format!("3600.{}{i}", std::process::id());
            let script = format!("sleep {seconds}; true");
            let h = Handler::Exec { program: "/bin/sh".into(), args: vec!["-c".into(), script] };
            let started = tokio::time::Instant::now();
            let exec = run(&h, Duration::from_millis(if drop_it { 60_000 } else { 500 }), &env, &log, &host);
            let waiting = tokio::spawn(async move {
                while running(&["sleep", &seconds]) == 0 && started.elapsed() < Duration::from_secs(5) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                running(&["sleep", &seconds]) > 0
            });
            if drop_it {
                // The kubelet drops a preStop whose grace period ran out.
                assert!(tokio::time::timeout(Duration::from_millis(500), exec).await.is_err());
            } else {
                assert!(exec.await.unwrap_err().contains("timed out"));
            }
            assert!(waiting.await.unwrap(), "the hook's sleep ran (drop: {drop_it})");
            let seconds = format!("3600.{}{i}", std::process::id());
            assert!(gone_within(&["sleep", &seconds], Duration::from_secs(5)).await, "drop: {drop_it}");
        }
    }
}
