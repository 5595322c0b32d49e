//! Faults found by trying the binary as a hostile user would (issue 11), each reproduced black-box
//! against the real binary on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn probe(args: &[&str]) -> (i32, String) {
    let child = Command::new(BIN)
        .arg("shutdown-probe")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, out, err) = wait_bounded(child, Duration::from_secs(10));
    (status.code().unwrap_or(-1), format!("{out}{err}"))
}

#[test]
fn probe_urls_a_person_got_wrong_are_usage_errors() {
    for url in ["http:///prestop", "http://bücher.invalid/", "http://127.0.0.1:1/pre stop", "http://"] {
        let (code, text) = probe(&["--drain", url, "--timeout", "300ms"]);
        assert_eq!(code, 2, "{url}: {text}");
        assert!(text.contains("--drain") && text.contains(url), "{text}");
    }
}

#[test]
fn probe_says_the_server_closed_without_answering() {
    // A server that reads the request and closes: what a pod killed mid-request looks like.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(2) {
            let mut s = s.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
        }
    });
    let (code, text) = probe(&["--drain", &format!("http://{addr}/prestop"), "--timeout", "2s"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("closed the connection without answering"), "{text}");
    assert!(!text.contains("connector has been disconnected"), "{text}");
}

#[test]
fn game_over_log_line_keeps_its_text_in_json() {
    let backend = spawn("backend", &[], &[]);
    let r = post(backend.addr, "/game-over", r#"{"from":"frontend-x","message":"bye now"}"#).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        eventually(Duration::from_secs(2), || backend.log_text().contains("\"message\":\"game over\"")),
        "grep \"game over\" must find the line: {}",
        backend.log_text()
    );
    let line = backend.log.lock().unwrap().lines.iter().find(|l| l.contains("\"game over\"")).cloned().unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["from"], "frontend-x");
    assert_eq!(v["note"], "bye now", "{line}");
}

#[test]
fn no_empty_trace_id_in_bodies_with_tracing_off() {
    let backend = spawn("backend", &[], &[]);
    let frontend = spawn("frontend", &["--backend-url", &format!("http://{}", backend.addr)], &[]);
    let ok = get(frontend.addr, "/api/data?work_ms=1").unwrap();
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.json().get("trace_id").is_none(), "{}", ok.body);
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let f2 = spawn("frontend", &["--backend-url", &format!("http://{dead}"), "--retry=false"], &[]);
    drop(frontend);
    let failed = get(f2.addr, "/api/data").unwrap();
    assert_eq!(failed.status, 502);
    assert!(failed.json().get("trace_id").is_none(), "{}", failed.body);
}

/// A backend that answers 500 to the first `fail` requests, then 200.
fn flaky_backend(fail: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().take(20) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let n = count.fetch_add(1, Ordering::SeqCst);
            let (status, body) = if n < fail { ("500 Internal Server Error", "{}") } else { ("200 OK", "{\"ok\":1}") };
            let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    (addr, seen)
}

#[test]
fn retry_on_decides_which_statuses_are_retried() {
    // Default: a 500 is the app's answer, passed on, not retried.
    let (addr, seen) = flaky_backend(1);
    let f = spawn("frontend", &["--backend-url", &format!("http://{addr}")], &[]);
    assert_eq!(get(f.addr, "/api/data").unwrap().status, 502);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    // With 500 listed, the same failure is retried and the caller gets the second answer.
    let (addr, seen) = flaky_backend(1);
    let f = spawn(
        "frontend",
        &["--backend-url", &format!("http://{addr}")],
        &[("GRACEFUL_UPSTREAM__RETRY_ON", "[500, 502, 503, 504]")],
    );
    let r = get(f.addr, "/api/data").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["retries"], 1);
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

fn metric(admin: std::net::SocketAddr, name: &str) -> Option<f64> {
    let text = get(admin, "/metrics").ok()?.body;
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_request_cut_at_shutdown_timeout_exits_one_and_is_named() {
    for _ in 0..3 {
        let mut backend = spawn("backend", &["--drain-delay", "100ms", "--shutdown-timeout", "1s"], &[]);
        let addr = backend.addr;
        let slow = std::thread::spawn(move || get(addr, "/api/data?work_ms=4000"));
        std::thread::sleep(Duration::from_millis(150));
        backend.signal(libc::SIGTERM);
        let status = backend.wait_exit(Duration::from_secs(4)).expect("exits at the bound");
        assert_eq!(status.code(), Some(1), "{}", backend.log_text());
        let logs = backend.log_text();
        assert!(logs.contains("shutdown_timeout reached") && logs.contains("GET /api/data?work_ms=4000"), "{logs}");
        let drained = backend.log.lock().unwrap().lines.iter().find(|l| l.contains("\"message\":\"drained\"")).cloned();
        let drained: serde_json::Value = serde_json::from_str(&drained.expect("a drained event")).unwrap();
        assert_eq!(drained["in_flight"], 1, "the drained event counts what was cut: {drained}");
        assert!(slow.join().unwrap().is_err(), "the cut request got no answer");
    }
}

/// The inner process of `unshare --pid --fork`, found as soon as it exists.
fn pid_one_child(wrapper: u32) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children")) {
            if let Some(pid) = c.split_whitespace().next().and_then(|p| p.parse().ok()) {
                return Some(pid);
            }
        }
        std::hint::spin_loop();
    }
    None
}

/// True once the process catches SIGTERM (its `SigCgt` mask in /proc has bit 15).
fn catches_sigterm(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:")).map(str::trim).unwrap_or("0");
    u64::from_str_radix(mask, 16).is_ok_and(|m| m & (1 << (libc::SIGTERM - 1)) != 0)
}

/// A SIGTERM that lands while the binary is still loading its configuration (held there by a
/// config file that is a FIFO nobody writes to): as PID 1 it must end the process at once with
/// 143. Before the fix no handler existed yet, so the kernel discarded the signal.
#[test]
fn an_early_sigterm_as_pid_one_exits_143_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("graceful.toml");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    for _ in 0..3 {
        let child = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "--mount-proc", BIN, "--config", fifo.to_str().unwrap()])
            .args(["backend", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let inner = pid_one_child(child.id()).expect("unshare forked");
        let t = Instant::now();
        while !catches_sigterm(inner) && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(1));
        }
        unsafe { libc::kill(inner, libc::SIGTERM) };
        let t0 = Instant::now();
        let (status, out, err) = wait_bounded(child, Duration::from_secs(5));
        assert_eq!(status.code(), Some(143), "{out} {err}");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }
}

#[test]
fn a_body_that_stops_arriving_gets_408_and_does_not_hold_the_drain() {
    let mut backend = spawn(
        "backend",
        &["--drain-delay", "100ms", "--shutdown-timeout", "10s"],
        &[("GRACEFUL_SERVER__BODY_READ_TIMEOUT", "500ms")],
    );
    let mut s = connect(backend.addr).unwrap();
    s.write_all(b"POST /game-over HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"").unwrap();
    let t0 = Instant::now();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // read_to_string returned: the server closed the connection.
    // At SIGTERM, a slow sender holds the drain only for the body bound, not shutdown_timeout.
    let mut slow = connect(backend.addr).unwrap();
    slow.write_all(b"POST /api/data HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nab").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    backend.signal(libc::SIGTERM);
    let status = backend.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", backend.log_text());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn work_stops_when_the_client_hangs_up() {
    let backend = spawn("backend", &[], &[]);
    let mut s = connect(backend.addr).unwrap();
    s.write_all(b"GET /api/data?work_ms=10000 HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert!(
        eventually(Duration::from_secs(2), || metric(backend.admin, "graceful_http_requests_in_flight") == Some(1.0))
    );
    drop(s);
    assert!(
        eventually(Duration::from_secs(1), || metric(backend.admin, "graceful_http_requests_in_flight") == Some(0.0)),
        "the abandoned request is still running: {}",
        backend.log_text()
    );
    assert!(backend.log_text().contains("client disconnected"));
}

#[test]
fn no_backend_attempt_outlives_the_frontends_504() {
    let backend = spawn("backend", &[], &[]);
    let frontend = spawn(
        "frontend",
        &["--backend-url", &format!("http://{}", backend.addr)],
        &[("GRACEFUL_UPSTREAM__ATTEMPT_TIMEOUT", "200ms"), ("GRACEFUL_UPSTREAM__DEADLINE", "700ms")],
    );
    let r = get(frontend.addr, "/api/data?work_ms=10000").unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(
        eventually(Duration::from_millis(500), || metric(backend.admin, "graceful_http_requests_in_flight")
            == Some(0.0)),
        "backend attempts still running after the 504: {:?}",
        metric(backend.admin, "graceful_http_requests_in_flight")
    );
}

#[test]
fn a_lone_prestop_ends_and_the_pod_serves_again() {
    let backend = spawn("backend", &["--drain-delay", "200ms"], &[("GRACEFUL_SHUTDOWN__PRESTOP_TIMEOUT", "1s")]);
    assert_eq!(get(backend.admin, "/prestop").unwrap().status, 200);
    assert_eq!(get(backend.addr, "/readyz").unwrap().status, 503);
    assert!(
        eventually(Duration::from_secs(3), || get(backend.addr, "/readyz").map(|r| r.status).ok() == Some(200)),
        "still draining: {}",
        backend.log_text()
    );
    assert!(backend.log_text().contains("prestop_expired"), "{}", backend.log_text());
}

#[test]
fn sighup_and_sigusr1_do_not_kill() {
    let mut backend = spawn("backend", &[], &[]);
    backend.signal(libc::SIGHUP);
    backend.signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(backend.child.try_wait().unwrap().is_none(), "{}", backend.log_text());
    assert_eq!(get(backend.addr, "/readyz").unwrap().status, 200);
    assert!(backend.log_text().contains("SIGHUP ignored"));
}

#[test]
fn malformed_requests_cannot_flood_the_log() {
    let backend = spawn("backend", &[], &[]);
    for _ in 0..40 {
        let mut s = connect(backend.addr).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    std::thread::sleep(Duration::from_millis(100));
    let errors = backend.log.lock().unwrap().lines.iter().filter(|l| l.contains("\"target\":\"actix_http")).count();
    let sample = backend.log.lock().unwrap().lines.iter().find(|l| l.contains("actix_http")).cloned();
    assert!(errors <= 2, "{errors} actix_http lines for 40 bad requests: {sample:?}");
}

#[test]
fn admin_livez_answers_when_the_public_listener_is_flooded() {
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=256:256", BIN]);
    let backend = spawn_with(cmd, "backend", &[], &[]);
    let idle: Vec<TcpStream> = (0..600).filter_map(|_| TcpStream::connect(backend.addr).ok()).collect();
    assert!(idle.len() >= 300, "{}", idle.len());
    std::thread::sleep(Duration::from_millis(300));
    let mut s = TcpStream::connect_timeout(&backend.admin, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let r = request(&mut s, "GET", "/livez", "").expect("admin /livez answers");
    assert_eq!(r.status, 200);
}

fn rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
    kb / 1024
}

/// Memory a connection flood took is given back once the flood is over (glibc kept all of it).
#[test]
fn memory_taken_by_a_connection_flood_is_given_back() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(20_000);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let n = (lim.rlim_cur as usize).saturating_sub(200).min(4000);
    let backend = spawn("backend", &[], &[]);
    let start = rss_mib(backend.pid());
    let mut conns: Vec<TcpStream> = (0..n).filter_map(|_| TcpStream::connect(backend.addr).ok()).collect();
    for c in &mut conns {
        let _ = c.write_all(b"GET /api/data?work_ms=1 HTTP/1.1\r\nHost: t\r\n\r\n");
    }
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.read(&mut [0u8; 512]);
    }
    let peak = rss_mib(backend.pid());
    drop(conns);
    let grown = peak.saturating_sub(start);
    assert!(grown >= 20, "{n} connections should take memory: {start} → {peak} MiB");
    let settled = eventually(Duration::from_secs(6), || rss_mib(backend.pid()) <= start + grown / 2);
    let after = rss_mib(backend.pid());
    assert!(settled, "{n} connections: {start} MiB → peak {peak} MiB → {after} MiB after the flood");
}

/// `/prestop` from a pod-external address is refused unless `server.prestop_allow_remote`; from
/// loopback (the exec hook) it works. Run in a network namespace of its own, where 10.99.0.1 is a
/// local but non-loopback address, so the fixed ports cannot clash with anything.
#[test]
fn prestop_is_for_loopback_callers_only() {
    let script = r#"
        set -e
        ip link set lo up
        ip addr add 10.99.0.1/32 dev lo
        run() {
            "$BIN" backend --listen 10.99.0.1:5000 --admin-listen 0.0.0.0:5001 --drain-delay 0s >/dev/null 2>&1 &
            pid=$!
            for _ in $(seq 50); do (exec 3<>/dev/tcp/10.99.0.1/5001) 2>/dev/null && break; sleep 0.1; done
            code=0; "$BIN" shutdown-probe --drain "$1" --timeout 1s >&2 || code=$?
            kill $pid; wait $pid || true
            echo "$1 $code"
        }
        run http://10.99.0.1:5001/prestop
        run http://127.0.0.1:5001/prestop
        GRACEFUL_SERVER__PRESTOP_ALLOW_REMOTE=true run http://10.99.0.1:5001/prestop
    "#;
    let child = Command::new("unshare")
        .args(["--net", "bash", "-c", script])
        .env("BIN", BIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, out, err) = wait_bounded(child, Duration::from_secs(30));
    assert!(status.success(), "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["http://10.99.0.1:5001/prestop 1", "http://127.0.0.1:5001/prestop 0", "http://10.99.0.1:5001/prestop 0"],
        "{err}"
    );
    assert!(err.contains("403"), "the refusal is a 403: {err}");
}
