//! OTLP over gRPC: the exporter's runtime trap (tonic binds to the runtime current at build time;
//! built inside actix's it exports nothing at shutdown) would show here as missing spans or a hung exit.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};

#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collect {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Runs a tonic server on its own runtime thread; returns its address.
fn grpc_receiver(store: Collect) -> SocketAddr {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    std_listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            // Bounded: the test process ends it; a stray server cannot outlive the test binary.
            let _ = tokio::time::timeout(
                Duration::from_secs(120),
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(store))
                    .serve_with_incoming(incoming),
            )
            .await;
        });
    });
    addr
}

#[test]
fn grpc_export_delivers_every_span_and_exits_promptly() {
    let store = Collect::default();
    let addr = grpc_receiver(store.clone());
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
