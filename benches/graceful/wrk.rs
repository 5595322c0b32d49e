//! wrk, the load tool: found on PATH or installed with apt-get, driven with a Lua `done()` hook that
//! prints the figures as one JSON line.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

/// wrk's `done(summary, latency, requests)`: latencies and duration are microseconds.
const SCRIPT: &str = r#"-- graceful bench: the run's figures as one JSON line (written by benches/graceful/wrk.rs)
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'GRACEFUL_WRK {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,' ..
    '"mean_us":%.1f,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"max_us":%.0f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#;

pub struct Wrk {
    exe: PathBuf,
    script: PathBuf,
    pub version: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Raw {
    requests: f64,
    duration_us: f64,
    connect: f64,
    read: f64,
    write: f64,
    status: f64,
    timeout: f64,
    mean_us: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
}

/// One wrk run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Socket errors (connect, read, write, timeout) plus responses with status >= 400.
    pub errors: u64,
    pub status_errors: u64,
}

impl Wrk {
    /// wrk on PATH, or `apt-get install -y wrk` (root only), bounded in time.
    pub fn ensure() -> Result<Wrk> {
        let exe = match which("wrk") {
            Some(p) => p,
            None => {
                install()?;
                which("wrk").ok_or_else(|| anyhow!("wrk is still not on PATH after apt-get install"))?
            }
        };
        let out = Command::new(&exe).arg("-v").output().context("running wrk -v")?;
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        let version = text.lines().next().unwrap_or("wrk").trim().to_string();
        let script = std::env::temp_dir().join(format!("graceful-bench-{}.lua", std::process::id()));
        std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
        Ok(Wrk { exe, script, version })
    }

    /// Closed-loop load: `connections` connections kept busy for `seconds` seconds.
    pub fn run(&self, url: &str, threads: u32, connections: u32, seconds: u32) -> Result<Run> {
        self.run_with(Ok, url, threads, connections, seconds)
    }

    /// The same, with wrk's command adjusted first (started in a network namespace).
    pub fn run_with(
        &self,
        adjust: impl FnOnce(Command) -> Result<Command>,
        url: &str,
        threads: u32,
        connections: u32,
        seconds: u32,
    ) -> Result<Run> {
        let mut child = adjust(Command::new(&self.exe))?
            .args(["-t", &threads.to_string(), "-c", &connections.to_string(), "-d", &format!("{seconds}s")])
            .args(["--timeout", "5s", "-s"])
            .arg(&self.script)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning wrk")?;
        // Bounded: wrk stops by itself after `seconds`; anything much longer is a hang.
        let deadline = Instant::now() + Duration::from_secs(u64::from(seconds) + 30);
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("wrk did not finish within {seconds} s + 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().find_map(|l| l.strip_prefix("GRACEFUL_WRK ")).ok_or_else(|| {
            anyhow!("wrk printed no result line ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
        })?;
        let r: Raw = serde_json::from_str(line).with_context(|| format!("parsing wrk's line {line}"))?;
        let seconds = r.duration_us / 1e6;
        Ok(Run {
            requests: r.requests as u64,
            seconds,
            rps: if seconds > 0.0 { r.requests / seconds } else { 0.0 },
            mean_ms: r.mean_us / 1e3,
            p50_ms: r.p50_us / 1e3,
            p90_ms: r.p90_us / 1e3,
            p99_ms: r.p99_us / 1e3,
            max_ms: r.max_us / 1e3,
            errors: (r.connect + r.read + r.write + r.timeout + r.status) as u64,
            status_errors: r.status as u64,
        })
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(name)).find(|p| p.is_file())
}

fn install() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("wrk is not installed and this is not root: `sudo apt-get install -y wrk` (or put wrk on PATH)");
    }
    if which("apt-get").is_none() {
        bail!("wrk is not installed and there is no apt-get: install wrk and put it on PATH");
    }
    eprintln!("graceful bench: wrk not found; apt-get install -y wrk");
    let apt = |args: &[&str]| -> Result<bool> {
        let mut child = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("running apt-get")?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st.success());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("apt-get {} took over 300 s", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    if apt(&["install", "-y", "-q", "wrk"])? {
        return Ok(());
    }
    // A fresh machine may have no package lists yet.
    if !apt(&["update", "-q"])? || !apt(&["install", "-y", "-q", "wrk"])? {
        bail!("apt-get install -y wrk failed");
    }
    Ok(())
}
