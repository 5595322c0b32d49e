//! Faults found by trying the binary as a hostile user would (issue 11), each reproduced black-box
//! against the real binary on loopback.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    let line = backend.logs.lock().unwrap().iter().find(|l| l.contains("\"game over\"")).cloned().unwrap();
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
