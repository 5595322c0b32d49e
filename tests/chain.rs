//! The frontend → backend chain, the upstream client's timeouts and retries, and the task-03 endpoints.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn frontend_for(backend: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut args = vec!["--backend-url", backend];
    args.extend_from_slice(extra);
    spawn("frontend", &args, env)
}

/// A loopback port with nothing listening on it.
fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn the_chain_answers_with_both_pods() {
    let backend = spawn("backend", &[], &[("POD_NAME", "backend-a")]);
    let frontend = frontend_for(&format!("http://{}", backend.addr), &[], &[("POD_NAME", "frontend-a")]);
    let r = get(frontend.addr, "/").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["pod"], "frontend-a");
    assert_eq!(v["backend"]["pod"], "backend-a");
    assert_eq!(v["retries"], 0);
    let work = v["backend"]["work_ms"].as_u64().unwrap();
    assert!((100..=200).contains(&work), "default work 100–200 ms, got {work}");
    assert_eq!(r.header("x-graceful-pod"), Some("frontend-a"));
}

#[test]
fn task03_endpoints_work() {
    let backend = spawn("backend", &[], &[("POD_NAME", "backend-b")]);
    let frontend = frontend_for(&format!("http://{}", backend.addr), &[], &[("POD_NAME", "frontend-b")]);
    let cfg = get(backend.addr, "/get-config").unwrap().json();
    let code = cfg["code"].as_str().unwrap().to_string();
    assert!(code.starts_with("BACKEND-") && code.len() == 12, "{code}");
    assert_eq!(cfg["status"], "ready");
    assert_eq!(get(backend.addr, "/get-config").unwrap().json()["code"], code.as_str(), "code fixed for life");
    assert_eq!(get(backend.addr, "/ping").unwrap().status, 200);
    assert_eq!(get(backend.addr, "/health").unwrap().status, 200);
    assert_eq!(get(backend.addr, "/alive").unwrap().status, 200);

    let who = get(frontend.addr, "/who-am-i").unwrap().json();
    assert_eq!(who["name"], "frontend-b");
    assert!(who["code"].is_null(), "no code before /startup");
    let s = get(frontend.addr, "/startup").unwrap();
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(get(frontend.addr, "/who-am-i").unwrap().json()["code"], code.as_str());
    assert_eq!(get(frontend.addr, "/health").unwrap().status, 200);
}

#[test]
fn startup_is_503_until_the_backend_answers() {
    let frontend = frontend_for(&format!("http://127.0.0.1:{}", dead_port()), &["--retry=false"], &[]);
    let s = get(frontend.addr, "/startup").unwrap();
    assert_eq!(s.status, 503);
    assert_eq!(s.json()["error"], "connection_refused");
    assert_eq!(get(frontend.addr, "/health").unwrap().status, 503);
    // Liveness is ours alone: a dead backend must not get the frontend restarted.
    assert_eq!(get(frontend.addr, "/livez").unwrap().status, 200);
}

#[test]
fn refused_is_502_with_the_cause_and_no_retry_when_off() {
    let frontend = frontend_for(&format!("http://127.0.0.1:{}", dead_port()), &["--retry=false"], &[]);
    let r = get(frontend.addr, "/").unwrap();
    assert_eq!(r.status, 502);
    let v = r.json();
    assert_eq!(v["status"], "error");
    assert_eq!(v["error"], "connection_refused");
    assert_eq!(v["retries"], 0);
}

#[test]
fn slow_backend_gives_504_within_the_attempt_bound() {
    let backend = spawn("backend", &[], &[]);
    let env = [
        ("GRACEFUL_UPSTREAM__ATTEMPT_TIMEOUT", "300ms"),
        ("GRACEFUL_UPSTREAM__DEADLINE", "2s"),
        ("GRACEFUL_UPSTREAM__MAX_ATTEMPTS", "2"),
    ];
    let frontend = frontend_for(&format!("http://{}", backend.addr), &["--timeouts=true"], &env);
    let t0 = Instant::now();
    let r = get(frontend.addr, "/api/data?work_ms=5000").unwrap();
    let took = t0.elapsed();
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.json()["error"], "timeout");
    assert_eq!(r.json()["retries"], 1, "a timed-out idempotent call is retried once");
    // two attempts of 300 ms plus backoff, never the 5 s of work
    assert!(took < Duration::from_millis(1200), "took {took:?}");
}

#[test]
fn overall_deadline_bounds_all_attempts() {
    let backend = spawn("backend", &[], &[]);
    let env = [
        ("GRACEFUL_UPSTREAM__ATTEMPT_TIMEOUT", "400ms"),
        ("GRACEFUL_UPSTREAM__DEADLINE", "600ms"),
        ("GRACEFUL_UPSTREAM__MAX_ATTEMPTS", "5"),
    ];
    let frontend = frontend_for(&format!("http://{}", backend.addr), &[], &env);
    let t0 = Instant::now();
    let r = get(frontend.addr, "/api/data?work_ms=5000").unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"], "deadline_exceeded");
    assert!(t0.elapsed() < Duration::from_millis(1000), "took {:?}", t0.elapsed());
}

#[test]
fn without_timeouts_the_frontend_waits_for_a_slow_backend() {
    let backend = spawn("backend", &[], &[]);
    let env = [("GRACEFUL_UPSTREAM__ATTEMPT_TIMEOUT", "200ms")];
    let frontend = frontend_for(&format!("http://{}", backend.addr), &["--timeouts=false"], &env);
    let r = get(frontend.addr, "/api/data?work_ms=1200").unwrap();
    assert_eq!(r.status, 200, "timeouts off: the attempt timeout is not applied");
}

#[test]
fn a_refusing_backend_that_comes_back_is_retried() {
    let port = dead_port();
    let env = [
        ("GRACEFUL_UPSTREAM__MAX_ATTEMPTS", "12"),
        ("GRACEFUL_UPSTREAM__BACKOFF_MIN", "100ms"),
        ("GRACEFUL_UPSTREAM__BACKOFF_MAX", "200ms"),
        ("GRACEFUL_UPSTREAM__DEADLINE", "8s"),
    ];
    let frontend = frontend_for(&format!("http://127.0.0.1:{port}"), &["--retry=true"], &env);
    let addr = frontend.addr;
    let call = std::thread::spawn(move || get(addr, "/api/data?work_ms=1"));
    std::thread::sleep(Duration::from_millis(400));
    let mut cmd = Command::new(BIN);
    cmd.args(["backend", "--listen", &format!("127.0.0.1:{port}"), "--admin-listen", "127.0.0.1:0"]);
    let mut backend = cmd.stdout(std::process::Stdio::null()).spawn().unwrap();
    let r = call.join().unwrap().unwrap();
    let _ = backend.kill();
    let _ = backend.wait();
    assert_eq!(r.status, 200, "{}", r.body);
    let retries = r.json()["retries"].as_u64().unwrap();
    assert!(retries >= 1, "the refused attempts were retried and counted: {retries}");
}

#[test]
fn non_idempotent_requests_are_never_retried() {
    let frontend = frontend_for(&format!("http://127.0.0.1:{}", dead_port()), &["--retry=true"], &[]);
    let post_r = post(frontend.addr, "/api/data", "{}").unwrap();
    assert_eq!(post_r.status, 502);
    assert_eq!(post_r.json()["retries"], 0, "POST must not be retried");
    let get_r = get(frontend.addr, "/api/data").unwrap();
    assert_eq!(get_r.status, 502);
    assert_eq!(get_r.json()["retries"], 2, "GET is retried up to max_attempts (3) - 1");
    let metrics = get(frontend.admin, "/metrics").unwrap().body;
    assert!(metrics.contains("graceful_upstream_retries_total{role=\"frontend\"} 2"), "{metrics}");
}

#[test]
fn resolve_override_reaches_a_service_name() {
    let backend = spawn("backend", &[], &[("POD_NAME", "via-resolve")]);
    let rule = format!("svc-backend:5000:{}", backend.addr);
    let frontend = spawn("frontend", &["--backend-url", "http://svc-backend:5000", "--resolve", &rule], &[]);
    let r = get(frontend.addr, "/").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["backend"]["pod"], "via-resolve");
}

#[test]
fn game_over_from_the_shutdown_probe_is_recorded() {
    let backend = spawn("backend", &[], &[]);
    let out = Command::new(BIN)
        .args(["shutdown-probe", "--game-over", &format!("http://{}/game-over", backend.addr), "--sleep", "50ms"])
        .env("POD_NAME", "frontend-xyz")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("game-over ok") && stdout.contains("sleep ok"), "{stdout}");
    let list = get(backend.addr, "/game-over").unwrap().json();
    assert_eq!(list["count"], 1);
    assert_eq!(list["records"][0]["from"], "frontend-xyz");
    let metrics = get(backend.admin, "/metrics").unwrap().body;
    assert!(metrics.contains("graceful_game_over_total{role=\"backend\"} 1"), "{metrics}");
}

#[test]
fn shutdown_probe_drains_the_local_pod_and_reports_failures() {
    let backend = spawn("backend", &[], &[]);
    let ok = Command::new(BIN)
        .args(["shutdown-probe", "--drain", &format!("http://{}/prestop", backend.admin)])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(get(backend.addr, "/readyz").unwrap().status, 503);

    let t0 = Instant::now();
    let bad = Command::new(BIN)
        .args(["shutdown-probe", "--game-over", &format!("http://127.0.0.1:{}/game-over", dead_port())])
        .args(["--timeout", "500ms", "--sleep", "100ms"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("game-over FAILED") && err.contains("sleep ok"), "the sleep still runs: {err}");
    assert!(t0.elapsed() < Duration::from_secs(3), "bounded: {:?}", t0.elapsed());

    let none = Command::new(BIN).arg("shutdown-probe").output().unwrap();
    assert_eq!(none.status.code(), Some(2));
}

#[test]
fn metrics_and_probes_on_the_admin_port() {
    let backend = spawn("backend", &[], &[]);
    get(backend.addr, "/api/data?work_ms=1").unwrap();
    let m = get(backend.admin, "/metrics").unwrap();
    assert_eq!(m.status, 200);
    assert!(
        m.body
            .contains(r#"graceful_http_requests_total{role="backend",method="GET",route="/api/data",status="200"} 1"#),
        "{}",
        m.body
    );
    assert!(m.body.contains(r#"graceful_shutdown_phase{role="backend",phase="serving"} 1"#));
    assert_eq!(get(backend.admin, "/readyz").unwrap().status, 200);
    // The control endpoint is not on the public port.
    assert_eq!(post(backend.addr, "/prestop", "").unwrap().status, 404);
    assert_eq!(get(backend.addr, "/metrics").unwrap().status, 404);
}
