//! The real `graceful` binary as the benchmark runs it: a clean environment (nothing from the
//! caller's may change what is measured), its memory and CPU from /proc; spawning, log lines,
//! the serving line, signals and the timed exit come from the tests' shared harness.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, ExitStatus};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context, Result};
use nix::sys::signal::Signal;

use crate::process::Process;

/// Built by cargo with the bench profile (which inherits `[profile.release]`).
const BUILT: &str = env!("CARGO_BIN_EXE_graceful");

/// The binary under test: the one cargo built, or `GRACEFUL_BENCH_BIN` (a candidate build to
/// compare against, measured the same way).
pub fn bin() -> String {
    std::env::var("GRACEFUL_BENCH_BIN").ok().filter(|b| !b.is_empty()).unwrap_or_else(|| BUILT.to_string())
}

/// What to run: role, flags and extra environment.
#[derive(Clone, Debug)]
pub struct Spec {
    pub role: &'static str,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Spec {
    pub fn new(role: &'static str) -> Spec {
        Spec { role, args: Vec::new(), env: Vec::new() }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Spec {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Spec {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Spec {
        self.env.push((k.to_string(), v.into()));
        self
    }

    /// Ephemeral ports on loopback for both listeners.
    pub fn ephemeral(self) -> Spec {
        self.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
    }

    /// OTLP/HTTP export of every span to `endpoint`.
    pub fn traced(self, endpoint: &str) -> Spec {
        self.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint).env("OTEL_TRACES_SAMPLER", "always_on")
    }
}

/// One role of the binary under test (the shared harness, tests/common/process.rs, underneath).
pub struct Proc {
    pub role: &'static str,
    process: Process,
    pub pid: i32,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl Proc {
    /// Spawns without waiting for anything (the readiness measurement polls by itself).
    pub fn spawn(spec: &Spec) -> Result<Proc> {
        let bin = bin();
        let mut cmd = Command::new(&bin);
        cmd.arg(spec.role).args(&spec.args);
        // Nothing from the caller's environment may change what is measured.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("GRACEFUL_") || k.starts_with("OTEL_") || k == "RUST_LOG" || k.starts_with("POD_") {
                cmd.env_remove(k.as_ref());
            }
        }
        cmd.env("GRACEFUL_TELEMETRY__LOG_FORMAT", "json")
            .env("GRACEFUL_TELEMETRY__LOG_LEVEL", "info")
            .env("GRACEFUL_BACKEND__WORK_MIN", "0ms")
            .env("GRACEFUL_BACKEND__WORK_MAX", "0ms")
            .env("POD_NAME", format!("bench-{}", spec.role));
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        let process = Process::spawn(cmd).with_context(|| format!("spawning {bin}"))?;
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        Ok(Proc { role: spec.role, pid: process.pid, process, listen: unknown, admin: unknown })
    }

    /// A reference server (benches/graceful/bare.rs): this bench binary, run with `--bare-serve`.
    pub fn start_bare(role: crate::bare::BareRole, upstream: Option<SocketAddr>) -> Result<Proc> {
        let me = std::env::current_exe().context("the bench binary's own path")?;
        let mut cmd = Command::new(&me);
        cmd.args(["--bare-serve", role.flag()]);
        if let Some(a) = upstream {
            cmd.arg("--bare-upstream").arg(a.to_string());
        }
        let process = Process::spawn(cmd).with_context(|| format!("spawning {}", me.display()))?;
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut p = Proc { role: role.flag(), pid: process.pid, process, listen: unknown, admin: unknown };
        p.wait_serving(Duration::from_secs(20))?;
        Ok(p)
    }

    /// Spawns and waits for the `serving` log line, which names both listeners.
    pub fn start(spec: &Spec) -> Result<Proc> {
        let mut p = Proc::spawn(spec)?;
        p.wait_serving(Duration::from_secs(20))?;
        Ok(p)
    }

    pub fn wait_serving(&mut self, bound: Duration) -> Result<()> {
        let l = self.process.wait_serving(bound).map_err(|e| anyhow!("graceful {} {e}", self.role))?;
        (self.listen, self.admin) = (l.listen, l.admin);
        Ok(())
    }

    /// Every JSON log line so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.process.events()
    }

    /// Timestamp of the first log event whose message is `name`.
    pub fn event_time(&self, name: &str) -> Option<SystemTime> {
        self.events()
            .into_iter()
            .find(|v| v["message"] == name)
            .and_then(|v| v["timestamp"].as_str().and_then(|t| humantime::parse_rfc3339(t).ok()))
    }

    pub fn log_tail(&self, n: usize) -> String {
        self.process.log_tail(n)
    }

    pub fn signal(&self, sig: Signal) {
        self.process.signal(sig);
    }

    /// Waits for the process to end; the time is taken the moment the kernel reports it.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<(ExitStatus, SystemTime)> {
        self.process.wait_exit(bound)
    }

    /// Ends it now (SIGKILL) if it still runs.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn mem(&self) -> Result<Mem> {
        Mem::of(self.pid)
    }
}

/// Resident memory from /proc/PID/status, in KiB.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Mem {
    /// VmRSS: resident now.
    pub rss_kib: u64,
    /// VmHWM: the peak resident size since the process started.
    pub hwm_kib: u64,
}

impl Mem {
    pub fn of(pid: i32) -> Result<Mem> {
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow!("{name} missing in /proc/{pid}/status"))
        };
        Ok(Mem { rss_kib: field("VmRSS:")?, hwm_kib: field("VmHWM:")? })
    }
}

/// CPU time a process has used so far, all threads, in nanoseconds.
///
/// schedstat counts nanoseconds on the CPU per thread; /proc/PID/stat (10 ms ticks) is the fallback.
/// Threads that have already ended are not counted, which is why this is sampled around a run of
/// the long-lived server threads only.
pub fn cpu_ns(pid: i32) -> u64 {
    let mut total = 0u64;
    let mut any = false;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
                if let Some(ns) = s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()) {
                    total += ns;
                    any = true;
                }
            }
        }
    }
    if any {
        return total;
    }
    // utime + stime, fields 14 and 15, counted after the `(comm)` field that may hold spaces.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0 };
    // rest starts at field 3 (state): utime is field 14 -> index 11.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    match (num(11), num(12)) {
        (Some(u), Some(s)) => (u + s) * 1_000_000_000 / tick,
        _ => 0,
    }
}

/// CPU time of several processes at once.
pub fn cpu_snapshot(pids: &[i32]) -> HashMap<i32, u64> {
    pids.iter().map(|p| (*p, cpu_ns(*p))).collect()
}

/// Distinct loopback ports that were free a moment ago (all bound at once, then released).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}
