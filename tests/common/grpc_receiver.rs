//! An OTLP/gRPC trace receiver for tests: a tonic server on its own runtime thread on
//! 127.0.0.1, keeping every export it is sent; it ends by itself after `bound`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};

/// What the receiver was sent.
#[derive(Clone, Default)]
pub struct GrpcCollect(pub Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for GrpcCollect {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Starts the receiver; returns its address.
pub fn grpc_receiver(store: GrpcCollect, bound: Duration) -> SocketAddr {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    std_listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            // Bounded: a stray server cannot outlive the test binary's purpose.
            let server = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(store))
                .serve_with_incoming(incoming);
            let _ = tokio::time::timeout(bound, server).await;
        });
    });
    addr
}
