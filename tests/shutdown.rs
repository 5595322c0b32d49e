//! The shutdown sequence, black-box: the real binary, real signals, real sockets.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const GRACEFUL_FAST: &[&str] = &["--graceful=true", "--drain-delay", "1s", "--shutdown-timeout", "5s"];

#[test]
fn graceful_drain_serves_then_refuses_and_exits_zero() {
    let mut backend = spawn("backend", GRACEFUL_FAST, &[]);
    let addr = backend.addr;
    assert_eq!(get(addr, "/readyz").unwrap().status, 200);

    // A 2 s request is in flight when SIGTERM lands.
    let slow = std::thread::spawn(move || get(addr, "/api/data?work_ms=2000"));
    std::thread::sleep(Duration::from_millis(200));
    // A keep-alive connection opened before the signal.
    let mut kept = connect(addr).unwrap();
    assert_eq!(request(&mut kept, "GET", "/api/data?work_ms=1", "").unwrap().status, 200);

    let t0 = Instant::now();
    backend.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));

    // Lame duck: not ready, still alive, still serving, and telling clients to reconnect.
    let ready = get(addr, "/readyz").unwrap();
    assert_eq!(ready.status, 503, "readiness must fail while draining");
    assert_eq!(ready.json()["phase"], "draining");
    assert_eq!(get(backend.admin, "/livez").unwrap().status, 200, "liveness never follows draining");
    let fresh = get(addr, "/api/data?work_ms=1").unwrap();
    assert_eq!(fresh.status, 200, "new requests are served during the drain");
    assert_eq!(fresh.header("connection"), Some("close"));
    let on_kept = request(&mut kept, "GET", "/api/data?work_ms=1", "").unwrap();
    assert_eq!(on_kept.status, 200);
    assert_eq!(on_kept.header("connection"), Some("close"), "old keep-alive connections are told to close");

    // After drain_delay the listener is closed.
    assert!(
        eventually(Duration::from_secs(3), || get(addr, "/livez").is_err()),
        "new connections must be refused after the drain"
    );
    let refused = get(addr, "/livez").unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");

    let done = slow.join().unwrap().expect("in-flight request completes");
    assert_eq!(done.status, 200, "the in-flight request finishes: {}", done.body);
    assert_eq!(done.json()["work_ms"], 2000);

    let status = backend.wait_exit(Duration::from_secs(5)).expect("exits after the drain");
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "{}", backend.log_text());
    // drain 1 s + the rest of the 2 s request + a margin
    assert!(took < Duration::from_millis(2000 + 800), "exit took {took:?}");
    let logs = backend.log_text();
    let order = ["sigterm_received", "readiness_failing", "listener_closed", "drained", "\"exit\""];
    let mut at = 0;
    for step in order {
        let found = logs[at..].find(step).unwrap_or_else(|| panic!("{step} missing or out of order in {logs}"));
        at += found;
    }
}

#[test]
fn naive_exit_drops_in_flight_at_once() {
    let mut backend = spawn("backend", &["--graceful=false"], &[]);
    let addr = backend.addr;
    let slow = std::thread::spawn(move || get(addr, "/api/data?work_ms=3000"));
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    backend.signal(libc::SIGTERM);
    let status = backend.wait_exit(Duration::from_secs(2)).expect("exits at once");
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(143));
    assert!(took < Duration::from_millis(700), "naive exit took {took:?}");
    assert!(slow.join().unwrap().is_err(), "the in-flight request is dropped");
    assert!(backend.log_text().contains("dropping_in_flight"), "{}", backend.log_text());
}

#[test]
fn readiness_never_flips_when_graceful_is_off() {
    let backend = spawn("backend", &["--graceful=false"], &[]);
    let r = post(backend.admin, "/prestop", "").unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(get(backend.addr, "/readyz").unwrap().status, 200);
}

#[test]
fn prestop_starts_lame_duck_and_sigterm_then_stops_without_waiting_twice() {
    let mut backend = spawn("backend", &["--graceful=true", "--drain-delay", "800ms"], &[]);
    let r = get(backend.admin, "/prestop").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(backend.addr, "/readyz").unwrap().status, 503);
    assert_eq!(get(backend.admin, "/livez").unwrap().status, 200);
    // Still serving until SIGTERM, however long the hook holds.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(get(backend.addr, "/api/data?work_ms=1").unwrap().status, 200);
    let t0 = Instant::now();
    backend.signal(libc::SIGTERM);
    let status = backend.wait_exit(Duration::from_secs(3)).expect("exits");
    assert_eq!(status.code(), Some(0));
    // The lame-duck time was already spent during the hook.
    assert!(t0.elapsed() < Duration::from_millis(500), "took {:?}", t0.elapsed());
}

#[test]
fn second_signal_exits_at_once() {
    // SIGTERM then SIGINT (130), SIGTERM then SIGTERM again (143).
    for (second, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut backend = spawn("backend", &["--graceful=true", "--drain-delay", "10s"], &[]);
        backend.signal(libc::SIGTERM);
        // The first signal is handled once readiness says 503 (bounded; a loaded machine can
        // take a while), so the next one is truly the second.
        let admin = backend.admin;
        let draining = eventually(Duration::from_secs(5), || get(admin, "/readyz").is_ok_and(|r| r.status == 503));
        assert!(draining, "the first signal started the drain");
        assert!(backend.child.try_wait().unwrap().is_none(), "still draining");
        let t0 = Instant::now();
        backend.signal(second);
        let status = backend.wait_exit(Duration::from_secs(2)).expect("second signal exits");
        assert!(t0.elapsed() < Duration::from_millis(500));
        assert_eq!(status.code(), Some(code), "second signal {second}");
    }
}

#[test]
fn idle_keep_alive_connections_do_not_hold_the_exit() {
    let mut backend = spawn("backend", &["--graceful=true", "--drain-delay", "300ms"], &[]);
    let mut conns: Vec<_> = (0..5).map(|_| connect(backend.addr).unwrap()).collect();
    for c in &mut conns {
        assert_eq!(request(c, "GET", "/api/data?work_ms=1", "").unwrap().status, 200);
    }
    let t0 = Instant::now();
    backend.signal(libc::SIGTERM);
    let status = backend.wait_exit(Duration::from_secs(3)).expect("exits");
    assert_eq!(status.code(), Some(0));
    // 300 ms drain; actix alone would hold an idle connection for a 1 s poll tick.
    assert!(t0.elapsed() < Duration::from_millis(900), "took {:?}", t0.elapsed());
}

/// As PID 1 of its own PID namespace (a container with no init), SIGTERM from outside still
/// starts the graceful sequence: the kernel delivers it only because the binary handles it.
#[test]
fn handles_sigterm_as_pid_one() {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child", "--mount-proc", BIN]);
    let mut wrapper = spawn_with(cmd, "backend", &["--graceful=true", "--drain-delay", "200ms"], &[]);
    // The binary is unshare's child; find it through /proc.
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", wrapper.pid(), wrapper.pid()))
        .expect("read unshare's children");
    let inner: i32 = children.split_whitespace().next().expect("one child").parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{inner}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.trim_end().ends_with("\t1"), "not PID 1 in its namespace: {nspid}");
    assert_eq!(get(wrapper.addr, "/readyz").unwrap().status, 200);
    unsafe {
        libc::kill(inner, libc::SIGTERM);
    }
    let status = wrapper.wait_exit(Duration::from_secs(3)).expect("PID 1 exits on SIGTERM");
    assert!(status.success(), "{status:?}: {}", wrapper.log_text());
    assert!(wrapper.log_text().contains("listener_closed"));
}
