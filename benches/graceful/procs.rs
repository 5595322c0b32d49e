//! The real `graceful` binary as a child process: spawn with a clean environment, collect its
//! JSON log lines, read its memory and CPU from /proc, signal it, time its exit.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};

/// Built by cargo with the bench profile (which inherits `[profile.release]`).
const BUILT: &str = env!("CARGO_BIN_EXE_graceful");

/// The binary under test: the one cargo built, or `GRACEFUL_BENCH_BIN` (a candidate build to
/// compare against, measured the same way).
pub fn bin() -> String {
    std::env::var("GRACEFUL_BENCH_BIN").ok().filter(|b| !b.is_empty()).unwrap_or_else(|| BUILT.to_string())
}

/// Log lines kept per process; the rest are read (so the pipe never blocks the child) and counted.
const MAX_LINES: usize = 20_000;

#[derive(Default)]
struct Log {
    lines: Vec<String>,
    dropped: usize,
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

pub struct Proc {
    pub role: &'static str,
    child: Child,
    pub pid: i32,
    log: Arc<Mutex<Log>>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    exit: Option<(ExitStatus, SystemTime)>,
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
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {bin}"))?;
        let log = Arc::new(Mutex::new(Log::default()));
        if let Some(out) = child.stdout.take() {
            pump(out, log.clone());
        }
        if let Some(err) = child.stderr.take() {
            pump(err, log.clone());
        }
        let pid = child.id() as i32;
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        Ok(Proc { role: spec.role, child, pid, log, listen: unknown, admin: unknown, exit: None })
    }

    /// Spawns and waits for the `serving` log line, which names both listeners.
    pub fn start(spec: &Spec) -> Result<Proc> {
        let mut p = Proc::spawn(spec)?;
        p.wait_serving(Duration::from_secs(20))?;
        Ok(p)
    }

    pub fn wait_serving(&mut self, bound: Duration) -> Result<()> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(v) = self.events().into_iter().find(|v| v["message"] == "serving" && v.get("listen").is_some())
            {
                let parse = |k: &str| -> Result<SocketAddr> {
                    v[k].as_str().and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("no `{k}` in the serving line"))
                };
                self.listen = parse("listen")?;
                self.admin = parse("admin")?;
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!("graceful {} exited before serving ({st}):\n{}", self.role, self.log_tail(20));
            }
            if Instant::now() >= deadline {
                bail!("graceful {} not serving within {bound:?}:\n{}", self.role, self.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Every JSON log line so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let log = self.log.lock().unwrap();
        log.lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Timestamp of the first log event whose message is `name`.
    pub fn event_time(&self, name: &str) -> Option<SystemTime> {
        self.events()
            .into_iter()
            .find(|v| v["message"] == name)
            .and_then(|v| v["timestamp"].as_str().and_then(|t| humantime::parse_rfc3339(t).ok()))
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        let from = log.lines.len().saturating_sub(n);
        let mut out = log.lines[from..].join("\n");
        if log.dropped > 0 {
            out.push_str(&format!("\n({} more lines not kept)", log.dropped));
        }
        out
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped while `exit` is None.
        if self.exit.is_none() {
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
    }

    /// Waits for the process to end; the time is taken the moment the kernel reports it
    /// (polled every 100 µs).
    pub fn wait_exit(&mut self, bound: Duration) -> Option<(ExitStatus, SystemTime)> {
        if self.exit.is_some() {
            return self.exit;
        }
        let deadline = Instant::now() + bound;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    self.exit = Some((st, SystemTime::now()));
                    return self.exit;
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(100)),
                _ => return None,
            }
        }
    }

    /// Ends it now (SIGKILL) if it still runs.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            if let Ok(st) = self.child.wait() {
                self.exit = Some((st, SystemTime::now()));
            }
        }
    }

    pub fn mem(&self) -> Result<Mem> {
        Mem::of(self.pid)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pump<R: Read + Send + 'static>(r: R, log: Arc<Mutex<Log>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            let mut log = log.lock().unwrap();
            if log.lines.len() < MAX_LINES {
                log.lines.push(line);
            } else {
                log.dropped += 1;
            }
        }
    });
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
