//! OTLP over gRPC: the exporter's runtime trap (tonic binds to the runtime current at build time;
//! built inside actix's it exports nothing at shutdown) would show here as missing spans or a hung exit.

mod common;

use std::time::{Duration, Instant};

use common::grpc_receiver::{grpc_receiver, GrpcCollect};
use common::*;

#[test]
fn grpc_export_delivers_every_span_and_exits_promptly() {
    let store = GrpcCollect::default();
    let addr = grpc_receiver(store.clone(), Duration::from_secs(120));
    let endpoint = format!("http://{addr}");
    let mut backend = spawn(
        "backend",
        &["--drain-delay", "0s"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
    );
    const N: usize = 15;
    for _ in 0..N {
        assert_eq!(get(backend.addr, "/api/data?work_ms=0").unwrap().status, 200);
    }
    let t0 = Instant::now();
    backend.signal(libc::SIGTERM);
    let status = backend.wait_exit(Duration::from_secs(6)).expect("bounded exit");
    assert_eq!(status.code(), Some(0), "{}", backend.log_text());
    assert!(t0.elapsed() < Duration::from_secs(4), "flush must not hang: {:?}", t0.elapsed());
    let ok = eventually(Duration::from_secs(3), || {
        let reqs = store.0.lock().unwrap();
        let spans: Vec<_> = reqs
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .filter(|s| s.kind == 2 && s.name == "GET /api/data")
            .collect();
        spans.len() >= N
    });
    assert!(ok, "all {N} server spans arrive over gRPC");
    let log = backend.log_text();
    assert!(!log.contains("panicked") && !log.contains("no reactor"), "{log}");
}
