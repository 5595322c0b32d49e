//! Head sampling on the real binaries: an unsampled request builds no span, yet keeps a trace id
//! in its response and passes it on to the backend with the sampled flag off.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use graceful::otlp_receiver::{OtlpReceiver, SpanRecord, KIND_CLIENT, KIND_SERVER};

fn receiver() -> OtlpReceiver {
    OtlpReceiver::start("127.0.0.1:0".parse().unwrap()).unwrap()
}

fn traced(rx: &OtlpReceiver, service: &str, sampler: &str, arg: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint()),
        ("OTEL_SERVICE_NAME", service.to_string()),
        ("OTEL_TRACES_SAMPLER", sampler.to_string()),
        ("OTEL_TRACES_SAMPLER_ARG", arg.to_string()),
    ]
}

fn start(role: &str, args: &[&str], env: &[(&'static str, String)]) -> Proc {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    spawn(role, args, &env)
}

/// SIGTERM and a bounded clean exit: the exporter is flushed, so the receiver has every span.
fn stop(p: &mut Proc) {
    p.signal(libc::SIGTERM);
    let st = p.wait_exit(Duration::from_secs(5)).expect("a bounded exit");
    assert_eq!(st.code(), Some(0), "{}", p.log_text());
}

fn is_trace_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) && s != "0".repeat(32)
}

/// GET /api/data; returns the response's `x-trace-id` after checking the body carries the same.
fn trace_id_of_a_request(addr: SocketAddr) -> String {
    let r = get(addr, "/api/data?work_ms=0").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let tid = r.header("x-trace-id").expect("a trace id header although unsampled").to_string();
    assert!(is_trace_id(&tid), "{tid}");
    assert_eq!(r.json()["trace_id"], tid.as_str(), "the body names the same trace: {}", r.body);
    tid
}

/// One raw request with the caller's `traceparent` (Connection: close); the response head.
fn get_with_traceparent(addr: SocketAddr, traceparent: &str) -> String {
    let mut s = connect(addr).unwrap();
    let req = format!(
        "GET /api/data?work_ms=0 HTTP/1.1\r\nHost: t\r\ntraceparent: {traceparent}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.to_ascii_lowercase()
}

fn not_lifecycle(spans: &[SpanRecord]) -> Vec<&SpanRecord> {
    spans.iter().filter(|s| s.name != "lifecycle").collect()
}

/// The frontend samples nothing; a backend that samples everything regardless of its caller
/// shows what arrived: each request's trace id, under a parent span id nobody exported.
#[test]
fn an_unsampled_request_passes_its_trace_id_to_the_backend() {
    let rx = receiver();
    let mut backend = start("backend", &["--drain-delay", "0s"], &traced(&rx, "be-always", "always_on", "1"));
    let url = format!("http://{}", backend.addr);
    let mut frontend = start(
        "frontend",
        &["--backend-url", &url, "--drain-delay", "0s"],
        &traced(&rx, "fe-none", "parentbased_traceidratio", "0"),
    );
    let ids: Vec<String> = (0..5).map(|_| trace_id_of_a_request(frontend.addr)).collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 5, "a new trace id per request: {ids:?}");
    stop(&mut frontend);
    stop(&mut backend);

    let spans = rx.wait_until(Duration::from_secs(5), |s| {
        ids.iter().all(|id| s.iter().any(|s| &s.trace_id == id && s.kind == KIND_SERVER))
    });
    assert!(spans.iter().all(|s| s.service_name != "fe-none"), "the frontend exported a span: {spans:#?}");
    let exported_ids: HashSet<_> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for id in &ids {
        let at_backend: Vec<_> = spans.iter().filter(|s| &s.trace_id == id).collect();
        assert_eq!(at_backend.len(), 1, "the backend's server span only: {at_backend:#?}");
        let parent = &at_backend[0].parent_span_id;
        assert_eq!(parent.len(), 16, "the frontend passed a parent span id: {:?}", at_backend[0]);
        assert!(!exported_ids.contains(parent.as_str()), "that parent was never exported");
    }
}

/// Both hops parent-based: a request sampled out at the frontend is sampled out at the backend
/// too (the flag went off with it), and nothing of it is exported; a caller's sampled flag is
/// still followed, with every span of a sampled request as before.
#[test]
fn the_sampled_flag_goes_off_with_the_trace_id_and_nothing_is_exported() {
    let rx = receiver();
    let mut backend =
        start("backend", &["--drain-delay", "0s"], &traced(&rx, "be-parent", "parentbased_always_on", "1"));
    let url = format!("http://{}", backend.addr);
    let mut frontend = start(
        "frontend",
        &["--backend-url", &url, "--drain-delay", "0s"],
        &traced(&rx, "fe-parent", "parentbased_traceidratio", "0"),
    );
    let ids: Vec<String> = (0..5).map(|_| trace_id_of_a_request(frontend.addr)).collect();
    const CALLER: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let head = get_with_traceparent(frontend.addr, &format!("00-{CALLER}-00f067aa0ba902b7-01"));
    assert!(head.contains(&format!("x-trace-id: {CALLER}")), "{head}");
    let unsampled_caller = "0af7651916cd43dd8448eb211c80319c";
    let head = get_with_traceparent(frontend.addr, &format!("00-{unsampled_caller}-b7ad6b7169203331-00"));
    assert!(head.contains(&format!("x-trace-id: {unsampled_caller}")), "the caller's id is kept: {head}");
    stop(&mut frontend);
    stop(&mut backend);

    let spans = rx.wait_until(Duration::from_secs(5), |s| {
        s.iter().filter(|s| s.trace_id == CALLER).count() >= 3 && s.iter().any(|s| s.name == "lifecycle")
    });
    let ours = not_lifecycle(&spans);
    assert!(ours.iter().all(|s| s.trace_id == CALLER), "only the caller-sampled request is exported: {ours:#?}");
    let kinds: Vec<_> = ours.iter().map(|s| (s.service_name.as_str(), s.kind)).collect();
    assert_eq!(kinds.len(), 3, "{ours:#?}");
    for want in [("fe-parent", KIND_SERVER), ("fe-parent", KIND_CLIENT), ("be-parent", KIND_SERVER)] {
        assert!(kinds.contains(&want), "{want:?} in {kinds:?}");
    }
    let server = ours.iter().find(|s| s.service_name == "fe-parent" && s.kind == KIND_SERVER).unwrap();
    assert_eq!(server.attr_str("http.route"), Some("/api/data"), "sampled spans keep their attributes");
    assert_eq!(server.attr_i64("http.response.status_code"), Some(200));
    let client = ours.iter().find(|s| s.kind == KIND_CLIENT).unwrap();
    assert_eq!(client.name, "GET /api/data");
    assert_eq!(client.attr_str("url.full"), Some(format!("{url}/api/data?work_ms=0").as_str()));
    assert_eq!(client.attr_str("server.address"), Some("127.0.0.1"));
    assert_eq!(client.attr_i64("server.port"), Some(i64::from(backend.addr.port())));
    assert_eq!(client.attr_i64("http.response.status_code"), Some(200));
    assert!(spans.iter().all(|s| !ids.contains(&s.trace_id)), "no span of an unsampled request");
}

/// A failed unsampled request's log lines carry its trace id themselves (no span lends it).
#[test]
fn an_unsampled_requests_log_lines_carry_its_trace_id() {
    let rx = receiver();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut frontend = start(
        "frontend",
        &["--backend-url", &format!("http://{dead}"), "--retry=false", "--drain-delay", "0s"],
        &traced(&rx, "fe-log", "parentbased_always_off", "1"),
    );
    let r = get(frontend.addr, "/api/data").unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    let tid = r.header("x-trace-id").expect("a trace id header").to_string();
    assert_eq!(r.json()["trace_id"], tid.as_str());
    assert!(eventually(Duration::from_secs(2), || {
        frontend.log_text().lines().filter(|l| l.contains(&tid) && l.contains("failed")).count() >= 2
    }));
    for message in ["upstream attempt failed", "backend call failed"] {
        let text = frontend.log_text();
        let line = text.lines().find(|l| l.contains(message)).unwrap_or_else(|| panic!("`{message}`:\n{text}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["trace_id"], tid.as_str(), "{v}");
        assert_eq!(v["level"], "WARN");
    }
    stop(&mut frontend);
    std::thread::sleep(Duration::from_millis(300));
    assert!(rx.spans().is_empty(), "nothing exported: {:#?}", rx.spans());
}
