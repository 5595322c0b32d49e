//! Traces from the real binaries into a real OTLP/HTTP receiver (the official protobuf messages).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use graceful::otlp_receiver::{OtlpReceiver, SpanRecord, KIND_CLIENT, KIND_SERVER};

fn receiver() -> OtlpReceiver {
    OtlpReceiver::start("127.0.0.1:0".parse().unwrap()).unwrap()
}

fn traced(rx: &OtlpReceiver, pod: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint()),
        ("POD_NAME", pod.to_string()),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test".to_string()),
    ]
}

fn spawn_traced(role: &str, args: &[&str], env: &[(&'static str, String)]) -> Proc {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    spawn(role, args, &env)
}

fn by_name<'a>(spans: &'a [SpanRecord], service: &str, kind: i32) -> Vec<&'a SpanRecord> {
    spans.iter().filter(|s| s.service_name == service && s.kind == kind).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[test]
fn one_request_is_one_trace_across_both_hops_continuing_the_callers_trace() {
    let rx = receiver();
    let mut backend = spawn_traced("backend", &["--drain-delay", "0s"], &traced(&rx, "backend-1"));
    let backend_url = format!("http://{}", backend.addr);
    let mut frontend =
        spawn_traced("frontend", &["--backend-url", &backend_url, "--drain-delay", "0s"], &traced(&rx, "frontend-1"));

    let mut s = connect(frontend.addr).unwrap();
    let req = format!(
        "GET /api/data?work_ms=5 HTTP/1.1\r\nHost: t\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\nContent-Length: 0\r\n\r\n"
    );
    std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("x-trace-id: {TRACE}")), "trace id header: {head}");
    assert!(head.contains(&format!("\"trace_id\":\"{TRACE}\"")), "trace id in body: {head}");
    drop(s);

    let spans = rx.wait_until(Duration::from_secs(10), |s| s.iter().filter(|s| s.trace_id == TRACE).count() >= 3);
    let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == TRACE).cloned().collect();
    let f_server = by_name(&ours, "graceful-frontend", KIND_SERVER);
    let f_client = by_name(&ours, "graceful-frontend", KIND_CLIENT);
    let b_server = by_name(&ours, "graceful-backend", KIND_SERVER);
    assert_eq!((f_server.len(), f_client.len(), b_server.len()), (1, 1, 1), "{ours:#?}");
    let (fs, fc, bs) = (f_server[0], f_client[0], b_server[0]);
    assert_eq!(fs.parent_span_id, PARENT, "the caller's traceparent is continued");
    assert_eq!(fc.parent_span_id, fs.span_id, "attempt span is a child of the server span");
    assert_eq!(bs.parent_span_id, fc.span_id, "backend server span is a child of the attempt");
    assert_eq!(fs.attr_str("http.route"), Some("/api/data"));
    assert_eq!(fs.attr_i64("http.response.status_code"), Some(200));
    assert_eq!(fs.attr_str("graceful.shutdown.phase"), Some("serving"));
    assert_eq!(fc.attr_str("graceful.peer.pod"), Some("backend-1"));
    assert_eq!(fc.attr_i64("http.request.resend_count"), Some(0));
    assert_eq!(bs.resource.get("k8s.pod.name").and_then(|v| v.as_str()), Some("backend-1"));
    assert_eq!(bs.resource.get("deployment.environment").and_then(|v| v.as_str()), Some("test"));
    assert_eq!(bs.resource.get("graceful.features.graceful").and_then(|v| v.as_bool()), Some(true));
    assert!(bs.resource.contains_key("service.instance.id") && bs.resource.contains_key("service.version"));

    frontend.signal(libc::SIGTERM);
    backend.signal(libc::SIGTERM);
    assert!(frontend.wait_exit(Duration::from_secs(5)).is_some());
    assert!(backend.wait_exit(Duration::from_secs(5)).is_some());
}

#[test]
fn nothing_is_lost_at_a_clean_stop() {
    let rx = receiver();
    let mut backend = spawn_traced("backend", &["--drain-delay", "0s"], &traced(&rx, "backend-n"));
    const N: usize = 40;
    for _ in 0..N {
        assert_eq!(get(backend.addr, "/api/data?work_ms=0").unwrap().status, 200);
    }
    // Stop at once: the batch exporter still holds most of these spans.
    let t0 = Instant::now();
    backend.signal(libc::SIGTERM);
    let status = backend.wait_exit(Duration::from_secs(5)).expect("exit with the exporter configured is bounded");
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(3), "flush at exit must not hang: {:?}", t0.elapsed());
    let spans = rx.wait_until(Duration::from_secs(3), |s| s.iter().filter(|s| s.kind == KIND_SERVER).count() >= N);
    let traces: HashSet<_> = spans
        .iter()
        .filter(|s| s.kind == KIND_SERVER && s.attr_str("http.route") == Some("/api/data"))
        .map(|s| &s.trace_id)
        .collect();
    assert_eq!(traces.len(), N, "every request's trace arrived");
    let lifecycle: Vec<_> = spans.iter().filter(|s| s.name == "lifecycle").collect();
    assert_eq!(lifecycle.len(), 1, "the lifecycle span is flushed too");
    // A batch exporter whose thread panicked ("no reactor running") drops every span silently.
    let log = backend.log_text();
    assert!(!log.contains("panicked") && !log.contains("no reactor"), "{log}");
}

#[test]
fn lifecycle_events_come_in_order() {
    let rx = receiver();
    let mut backend = spawn_traced("backend", &["--drain-delay", "300ms"], &traced(&rx, "backend-l"));
    let addr = backend.addr;
    let slow = std::thread::spawn(move || get(addr, "/api/data?work_ms=600"));
    std::thread::sleep(Duration::from_millis(100));
    backend.signal(libc::SIGTERM);
    assert_eq!(backend.wait_exit(Duration::from_secs(5)).unwrap().code(), Some(0));
    assert_eq!(slow.join().unwrap().unwrap().status, 200);
    let spans = rx.wait_until(Duration::from_secs(3), |s| s.iter().any(|s| s.name == "lifecycle"));
    let life = spans.iter().find(|s| s.name == "lifecycle").expect("lifecycle span");
    let names: Vec<&str> = life.events.iter().map(|e| e.name.as_str()).collect();
    let expected = ["serving", "sigterm_received", "readiness_failing", "listener_closed", "drained", "exit"];
    assert_eq!(names, expected, "{:#?}", life.events);
    let times: Vec<u64> = life.events.iter().map(|e| e.time_unix_nanos).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let sigterm_in_flight = life.events[1].attributes.get("in_flight").and_then(|v| v.as_i64());
    assert_eq!(sigterm_in_flight, Some(1));
    // The slow request's span knows it started serving and ended during the shutdown.
    let req = spans.iter().find(|s| s.kind == KIND_SERVER && s.attr_str("http.route") == Some("/api/data")).unwrap();
    assert_eq!(req.attr_str("graceful.shutdown.phase"), Some("serving"));
    assert_eq!(req.attr_str("graceful.shutdown.phase_end"), Some("stopping"));
    assert!(req.attr_i64("graceful.ms_since_sigterm").unwrap() >= 300);
}

#[test]
fn a_request_dropped_by_a_naive_exit_is_marked_on_both_hops() {
    let rx = receiver();
    let mut backend = spawn_traced("backend", &["--graceful=false"], &traced(&rx, "backend-naive"));
    let backend_url = format!("http://{}", backend.addr);
    let frontend =
        spawn_traced("frontend", &["--backend-url", &backend_url, "--retry=false"], &traced(&rx, "frontend-d"));
    let faddr = frontend.addr;
    let call = std::thread::spawn(move || get(faddr, "/api/data?work_ms=3000"));
    std::thread::sleep(Duration::from_millis(300));
    backend.signal(libc::SIGTERM);
    assert_eq!(backend.wait_exit(Duration::from_secs(2)).unwrap().code(), Some(143));
    let r = call.join().unwrap().unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    let v = r.json();
    let tid = v["trace_id"].as_str().unwrap().to_string();
    assert_eq!(tid.len(), 32, "failed responses carry the trace id: {v}");
    assert_eq!(r.header("x-trace-id"), Some(tid.as_str()));

    let spans = rx.wait_until(Duration::from_secs(8), |s| s.iter().filter(|s| s.trace_id == tid).count() >= 3);
    let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == tid).cloned().collect();
    let dropped = by_name(&ours, "graceful-backend", KIND_SERVER);
    assert_eq!(dropped.len(), 1, "the dropped request's span was flushed before exit: {ours:#?}");
    let d = dropped[0];
    assert_eq!(d.attr("graceful.dropped"), Some(&serde_json::json!(true)));
    assert!(d.status_error);
    assert!(d.attr_i64("graceful.ms_since_sigterm").is_some());
    let attempt = by_name(&ours, "graceful-frontend", KIND_CLIENT);
    assert_eq!(attempt.len(), 1);
    let et = attempt[0].attr_str("error.type").unwrap();
    assert!(["closed_before_response", "connection_reset"].contains(&et), "error.type {et}");
    let fs = by_name(&ours, "graceful-frontend", KIND_SERVER);
    assert!(fs[0].status_error, "a 502 marks the server span as an error");
    assert_eq!(fs[0].attr_str("error.type"), Some(et));
}

#[test]
fn no_endpoint_means_no_exporter_and_no_trace_ids() {
    let backend = spawn("backend", &[], &[]);
    let r = get(backend.addr, "/api/data?work_ms=1").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("x-trace-id").is_none());
    assert!(!backend.log_text().to_lowercase().contains("otlp"), "no exporter noise: {}", backend.log_text());
}

#[test]
fn logs_are_json_lines_carrying_the_trace_id() {
    let rx = receiver();
    let backend = spawn_traced("backend", &[], &traced(&rx, "backend-log"));
    let mut frontend = spawn_traced(
        "frontend",
        &["--backend-url", &format!("http://127.0.0.1:{}", 1), "--retry=false", "--drain-delay", "0s"],
        &traced(&rx, "frontend-log"),
    );
    let r = get(frontend.addr, "/api/data").unwrap();
    assert_eq!(r.status, 502);
    let tid = r.json()["trace_id"].as_str().unwrap().to_string();
    // Both lines, not just the first: the harness reads the log as it comes.
    assert!(eventually(Duration::from_secs(2), || {
        let text = frontend.log_text();
        text.lines().filter(|l| l.contains(&tid) && l.contains("failed")).count() >= 2
    }));
    let logged = |message: &str| -> serde_json::Value {
        let text = frontend.log_text();
        let line = text.lines().find(|l| l.contains(&tid) && l.contains(message));
        let line = line.unwrap_or_else(|| panic!("`{message}` is logged with trace id {tid}:\n{text}"));
        serde_json::from_str(line).unwrap()
    };
    // Top-level ids on every line inside a span: the request's and its attempt's.
    let request = logged("backend call failed");
    let attempt = logged("upstream attempt failed");
    for v in [&request, &attempt] {
        assert_eq!(v["trace_id"], tid.as_str(), "{v}");
        assert_eq!(v["span_id"].as_str().map(str::len), Some(16), "{v}");
        assert_eq!(v["level"], "WARN");
    }
    assert_ne!(request["span_id"], attempt["span_id"], "each line names its own span");
    assert_eq!(request["span"]["name"], "HTTP request");
    assert_eq!(attempt["span"]["name"], "upstream attempt");
    assert_eq!(attempt["error.type"], "connection_refused");
    // The ids are the exported spans' own. The batch exporter sends every 5 s; a clean stop
    // flushes it at once.
    frontend.signal(libc::SIGTERM);
    assert_eq!(frontend.wait_exit(Duration::from_secs(5)).expect("bounded exit").code(), Some(0));
    let spans = rx.wait_until(Duration::from_secs(5), |s| s.iter().any(|s| s.trace_id == tid && s.kind == 3));
    let client = spans.iter().find(|s| s.trace_id == tid && s.kind == 3).expect("attempt span exported");
    assert_eq!(attempt["span_id"], client.span_id.as_str());
    drop(backend);
}

/// For tests that read spans while the pods still run: the batch exporter's default 5 s delay
/// would race their bounded waits.
fn quick_export(mut env: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "200".to_string()));
    env
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port with nothing listening on it.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A retried request: one attempt span per try, numbered by `http.request.resend_count`, each
/// failed one with its `error.type`, the last one naming the pod that answered; the backoff
/// waits are `retry` events on the request's span.
#[test]
fn retries_show_as_numbered_attempts_and_backoff_events() {
    let rx = receiver();
    let port = dead_port();
    let mut env = quick_export(traced(&rx, "frontend-retry"));
    env.extend([
        ("GRACEFUL_UPSTREAM__MAX_ATTEMPTS", "12".to_string()),
        ("GRACEFUL_UPSTREAM__BACKOFF_MIN", "100ms".to_string()),
        ("GRACEFUL_UPSTREAM__BACKOFF_MAX", "200ms".to_string()),
        ("GRACEFUL_UPSTREAM__DEADLINE", "8s".to_string()),
    ]);
    let frontend = spawn_traced("frontend", &["--backend-url", &format!("http://127.0.0.1:{port}"), "--retry"], &env);
    let addr = frontend.addr;
    let call = std::thread::spawn(move || get(addr, "/api/data?work_ms=1"));
    std::thread::sleep(Duration::from_millis(400));
    let _backend = KillOnDrop(
        std::process::Command::new(BIN)
            .args(["backend", "--listen", &format!("127.0.0.1:{port}"), "--admin-listen", "127.0.0.1:0"])
            .envs(quick_export(traced(&rx, "backend-came-back")))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let r = call.join().unwrap().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let retries = r.json()["retries"].as_u64().unwrap() as usize;
    assert!(retries >= 1, "{}", r.body);
    let tid = r.json()["trace_id"].as_str().unwrap().to_string();

    let spans = rx.wait_until(Duration::from_secs(5), |s| {
        s.iter().filter(|s| s.trace_id == tid && s.kind == KIND_CLIENT).count() > retries
            && s.iter().any(|s| s.trace_id == tid && s.service_name == "graceful-backend")
    });
    let mut attempts: Vec<&SpanRecord> = spans.iter().filter(|s| s.trace_id == tid && s.kind == KIND_CLIENT).collect();
    attempts.sort_by_key(|s| s.attr_i64("http.request.resend_count"));
    assert_eq!(attempts.len(), retries + 1, "one span per attempt");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a.attr_i64("http.request.resend_count"), Some(i as i64));
    }
    let (last, failed) = attempts.split_last().unwrap();
    for a in failed {
        assert_eq!(a.attr_str("error.type"), Some("connection_refused"), "{a:?}");
        assert!(a.status_error);
    }
    assert_eq!(last.attr_str("error.type"), None);
    assert_eq!(last.attr_str("graceful.peer.pod"), Some("backend-came-back"));
    let server =
        spans.iter().find(|s| s.trace_id == tid && s.kind == KIND_SERVER && s.service_name == "graceful-frontend");
    let server = server.expect("the frontend's server span");
    let waits: Vec<_> = server.events.iter().filter(|e| e.name == "retry").collect();
    assert_eq!(waits.len(), retries, "{:?}", server.events);
    assert!(waits.iter().all(|e| e.attributes.get("backoff_ms").and_then(|v| v.as_i64()).is_some_and(|ms| ms > 0)));
}

/// The overall deadline cancels the attempt in flight: its span still ends as an error.
#[test]
fn an_attempt_cut_by_the_deadline_ends_with_its_error_type() {
    let rx = receiver();
    let backend = spawn("backend", &[], &[]);
    let mut env = quick_export(traced(&rx, "frontend-deadline"));
    // The deadline may not be shorter than one attempt: the second attempt is the one it cuts.
    env.extend([
        ("GRACEFUL_UPSTREAM__ATTEMPT_TIMEOUT", "300ms".to_string()),
        ("GRACEFUL_UPSTREAM__DEADLINE", "500ms".to_string()),
        ("GRACEFUL_UPSTREAM__BACKOFF_MIN", "10ms".to_string()),
        ("GRACEFUL_UPSTREAM__BACKOFF_MAX", "50ms".to_string()),
    ]);
    let frontend = spawn_traced("frontend", &["--backend-url", &format!("http://{}", backend.addr)], &env);
    let t0 = Instant::now();
    let r = get(frontend.addr, "/api/data?work_ms=2000").unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.json()["error"], "deadline_exceeded");
    assert!(t0.elapsed() < Duration::from_millis(1500), "{:?}", t0.elapsed());
    let tid = r.json()["trace_id"].as_str().unwrap().to_string();
    let cut = |s: &&SpanRecord| {
        s.trace_id == tid && s.kind == KIND_CLIENT && s.attr_str("error.type") == Some("deadline_exceeded")
    };
    let spans = rx.wait_until(Duration::from_secs(5), |s| s.iter().any(|s| cut(&s)));
    let attempt = spans.iter().find(cut).expect("an attempt span cut by the deadline");
    assert!(attempt.status_error, "{attempt:?}");
}

/// The log level decides what is printed, never what is traced: at `warn` the request spans
/// (info) are still exported, and no info line is logged.
#[test]
fn a_warn_log_level_keeps_trace_export_and_prints_no_request_lines() {
    let rx = receiver();
    // Spawned by hand: at `warn` there is no `serving` line for the harness to read the ports from.
    let (port, admin) = (dead_port(), dead_port());
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["backend", "--listen", &format!("127.0.0.1:{port}"), "--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--drain-delay", "0s"])
        .env_remove("RUST_LOG")
        .env("GRACEFUL_TELEMETRY__LOG_FORMAT", "json")
        .env("GRACEFUL_TELEMETRY__LOG_LEVEL", "warn")
        .envs(quick_export(traced(&rx, "backend-warn")));
    let mut backend = common::Process::spawn(cmd).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(eventually(Duration::from_secs(10), || get(addr, "/readyz").is_ok_and(|r| r.status == 200)));
    let mut ids = HashSet::new();
    for _ in 0..3 {
        let r = get(addr, "/api/data?work_ms=0").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        ids.insert(r.header("x-trace-id").expect("a trace id header").to_string());
    }
    let spans = rx.wait_until(Duration::from_secs(5), |s| {
        ids.iter().all(|id| s.iter().any(|s| &s.trace_id == id && s.kind == KIND_SERVER))
    });
    let exported: HashSet<_> = spans.iter().filter(|s| s.kind == KIND_SERVER).map(|s| s.trace_id.clone()).collect();
    assert!(ids.is_subset(&exported), "every request's span is exported at log level warn: {ids:?} vs {exported:?}");
    backend.signal(nix::sys::signal::Signal::SIGTERM);
    let exit = backend.wait_exit(Duration::from_secs(5)).map(|(st, _)| st.code());
    assert_eq!(exit, Some(Some(0)), "{}", backend.log_text());
    let lines = backend.events();
    let info: Vec<_> = lines.iter().filter(|v| v["level"] != "WARN" && v["level"] != "ERROR").collect();
    assert!(info.is_empty(), "nothing below warn is printed: {info:#?}");
    let log = backend.log_text();
    assert!(!log.contains("HTTP request") && !log.contains("/api/data"), "no request lines: {log}");
}

/// A collector on 127.0.0.1 that answers its first export 503 and keeps what comes after:
/// the head of each request and the body of the accepted one.
struct FlakyCollector {
    addr: std::net::SocketAddr,
    seen: std::sync::mpsc::Receiver<(String, Vec<u8>)>,
}

impl FlakyCollector {
    fn start() -> FlakyCollector {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Bounded: two exports are all the test needs.
            for answer in ["503 Service Unavailable", "200 OK"] {
                let Ok((conn, _)) = listener.accept() else { return };
                conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let mut conn = conn;
                let _ = write!(conn, "HTTP/1.1 {answer}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = tx.send((head, body));
            }
        });
        FlakyCollector { addr, seen }
    }
}

/// Our OTLP/HTTP exporter sends `OTEL_EXPORTER_OTLP_HEADERS` with each export, tries again when
/// the collector answers 503, and what arrives decodes as the OTLP request it must be.
#[test]
fn export_sends_the_configured_headers_and_retries_an_unavailable_collector() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let collector = FlakyCollector::start();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", collector.addr)),
        ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer ab+c%3D,x-tenant=lab%20one".to_string()),
        ("POD_NAME", "backend-h".to_string()),
    ];
    let mut backend = spawn_traced("backend", &["--drain-delay", "0s"], &env);
    assert_eq!(get(backend.addr, "/api/data?work_ms=0").unwrap().status, 200);
    backend.signal(libc::SIGTERM);
    assert!(backend.wait_exit(Duration::from_secs(10)).is_some());

    let (first, _) = collector.seen.recv_timeout(Duration::from_secs(10)).expect("a first export");
    let (second, body) =
        collector.seen.recv_timeout(Duration::from_secs(10)).expect("the export tried again after 503");
    for head in [&first, &second] {
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("post /v1/traces http/1.1"), "{head}");
        assert!(head.contains("content-type: application/x-protobuf"), "{head}");
        assert!(head.contains("authorization: bearer ab+c="), "{head}");
        assert!(head.contains("x-tenant: lab one"), "{head}");
    }
    let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP request");
    let resource = request.resource_spans[0].resource.as_ref().unwrap();
    let pod = resource.attributes.iter().find(|kv| kv.key == "k8s.pod.name").and_then(|kv| kv.value.clone());
    assert_eq!(format!("{pod:?}"), r#"Some(AnyValue { value: Some(StringValue("backend-h")) })"#);
    let spans: Vec<_> = request.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans).collect();
    assert!(spans.iter().any(|s| s.name == "GET /api/data"), "{spans:?}");
}
