//! Running handlers (probes and hooks) once, and the kubelet's threshold bookkeeping.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::lab::network::http_client;
use crate::lab::node::pod_spec::Handler;

/// Runs `h` once within `timeout`. Ok = success by the kubelet's rules (HTTP 200–399, TCP
/// connect, exec exit 0, sleep done); Err says why not.
pub async fn run(h: &Handler, timeout: Duration, env: &[(String, String)], log: &Path) -> Result<(), String> {
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
            let mut child = cmd.spawn().map_err(|e| format!("exec {}: {e}", program.display()))?;
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(s)) if s.success() => Ok(()),
                Ok(Ok(s)) => Err(format!("exec {} {}: {s}", program.display(), args.join(" "))),
                Ok(Err(e)) => Err(format!("exec {}: {e}", program.display())),
                Err(_) => {
                    let _ = child.kill().await;
                    Err(format!("exec {}: timed out after {timeout:?}", program.display()))
                }
            }
        }
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
        let t = Duration::from_secs(2);
        let ok = Handler::Exec { program: "true".into(), args: vec![] };
        assert!(run(&ok, t, &env, &log).await.is_ok());
        let bad = Handler::Exec { program: "false".into(), args: vec![] };
        assert!(run(&bad, t, &env, &log).await.is_err());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = Handler::Tcp { addr: l.local_addr().unwrap() };
        assert!(run(&tcp, t, &env, &log).await.is_ok());
        drop(l);
        assert!(run(&tcp, t, &env, &log).await.is_err());
    }
}
