//! A small OTLP/HTTP trace receiver (protobuf, the official definitions): the lab attributes failures
//! from what it collects, and the black-box tests assert on it. Not a collector: it keeps spans in
//! memory — or, for the benchmark, only counts them (keeping thousands a second would weigh on the
//! very machine being measured). An [`ExportTap`] sees each export whole: the lab writes every run's
//! spans to a file and forwards them (src/lab/report/trace_export.rs). HTTP only: the pods it serves
//! are told to export http/protobuf.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use prost::Message;
use serde::Serialize;

/// One received span, flattened for easy assertions.
#[derive(Debug, Clone, Serialize)]
pub struct SpanRecord {
    pub service_name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP SpanKind number: 1 internal, 2 server, 3 client.
    pub kind: i32,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub status_error: bool,
    pub status_message: String,
    pub attributes: BTreeMap<String, serde_json::Value>,
    pub resource: BTreeMap<String, serde_json::Value>,
    pub events: Vec<EventRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub name: String,
    pub time_unix_nanos: u64,
    pub attributes: BTreeMap<String, serde_json::Value>,
}

pub const KIND_SERVER: i32 = 2;
pub const KIND_CLIENT: i32 = 3;

impl SpanRecord {
    pub fn attr(&self, key: &str) -> Option<&serde_json::Value> {
        self.attributes.get(key)
    }

    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(|v| v.as_str())
    }

    pub fn attr_i64(&self, key: &str) -> Option<i64> {
        self.attributes.get(key).and_then(|v| v.as_i64())
    }
}

/// What arrived, by count: every receiver keeps these.
#[derive(Default, Debug, Clone)]
pub struct Counts {
    /// service.name -> spans received
    pub spans: BTreeMap<String, u64>,
    pub exports: u64,
    pub bytes: u64,
}

/// Sees every export a keeping receiver accepts, before it is flattened (the lab writes and
/// forwards them). Called on the receiver's thread: it must not block.
pub trait ExportTap: Send + Sync {
    fn export(&self, request: &ExportTraceServiceRequest);
}

#[derive(Default)]
struct Received {
    keep_spans: bool,
    spans: Vec<SpanRecord>,
    counts: Counts,
    tap: Option<Arc<dyn ExportTap>>,
}

type Store = Arc<Mutex<Received>>;

/// A running receiver on its own thread; dropped = stopped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    store: Store,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Binds `bind` (port 0 for an ephemeral port) and serves `POST /v1/traces`, keeping every span.
    pub fn start(bind: SocketAddr) -> std::io::Result<Self> {
        Self::serve(bind, true)
    }

    /// Like [`start`](Self::start), but only [`counts`](Self::counts) what arrives.
    pub fn start_counting(bind: SocketAddr) -> std::io::Result<Self> {
        Self::serve(bind, false)
    }

    fn serve(bind: SocketAddr, keep_spans: bool) -> std::io::Result<Self> {
        let store: Store = Arc::new(Mutex::new(Received { keep_spans, ..Default::default() }));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_store = store.clone();
        let thread = std::thread::Builder::new().name("otlp-receiver".into()).spawn(move || {
            let sys = actix_web::rt::System::new();
            sys.block_on(async move {
                let data = web::Data::new(thread_store);
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(data.clone())
                        .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                        .route("/v1/traces", web::post().to(receive))
                })
                .workers(1)
                .disable_signals()
                .shutdown_timeout(1)
                .bind(bind);
                let server = match server {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let addr = server.addrs()[0];
                let server = server.run();
                let _ = tx.send(Ok((addr, server.handle())));
                let _ = server.await;
            });
        })?;
        let (addr, handle) = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| std::io::Error::other("OTLP receiver did not start within 10 s"))??;
        Ok(OtlpReceiver { addr, store, handle, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base endpoint to put in `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<SpanRecord> {
        self.store.lock().unwrap().spans.clone()
    }

    pub fn counts(&self) -> Counts {
        self.store.lock().unwrap().counts.clone()
    }

    /// Every export accepted from now on is shown to `tap` first (a counting receiver has none).
    pub fn set_tap(&self, tap: Option<Arc<dyn ExportTap>>) {
        self.store.lock().unwrap().tap = tap;
    }

    pub fn clear(&self) {
        let mut r = self.store.lock().unwrap();
        r.spans.clear();
        r.counts = Counts::default();
    }

    /// Polls until `done` holds over the spans received so far, or `timeout` passes; returns them either way.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&[SpanRecord]) -> bool) -> Vec<SpanRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        // The server future ends on stop; joining bounds the thread's life to ours.
        let handle = self.handle.clone();
        let stopper = std::thread::spawn(move || actix_web::rt::System::new().block_on(handle.stop(false)));
        let _ = stopper.join();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn receive(body: web::Bytes, store: web::Data<Store>) -> HttpResponse {
    let len = body.len() as u64;
    let (keep, tap) = {
        let r = store.lock().unwrap();
        (r.keep_spans, r.tap.clone())
    };
    let decoded = if keep {
        ExportTraceServiceRequest::decode(body).map(|req| {
            if let Some(tap) = &tap {
                tap.export(&req);
            }
            let records = flatten(req);
            let mut per_service: BTreeMap<String, u64> = BTreeMap::new();
            for r in &records {
                *per_service.entry(r.service_name.clone()).or_default() += 1;
            }
            (per_service, records)
        })
    } else {
        light::Request::decode(body).map(|req| (light::count(req), Vec::new()))
    };
    let (per_service, records) = match decoded {
        Ok(d) => d,
        Err(e) => return HttpResponse::BadRequest().body(format!("not an OTLP protobuf trace export: {e}")),
    };
    let mut r = store.lock().unwrap();
    r.spans.extend(records);
    r.counts.exports += 1;
    r.counts.bytes += len;
    for (service, n) in per_service {
        *r.counts.spans.entry(service).or_default() += n;
    }
    drop(r);
    let resp = ExportTraceServiceResponse { partial_success: None };
    HttpResponse::Ok().content_type("application/x-protobuf").body(resp.encode_to_vec())
}

/// Just enough of an OTLP `ExportTraceServiceRequest` to count spans per service (same field
/// tags): each span stays an undecoded slice of the request. The counting receiver sits on the
/// machine it measures, so it must cost little next to the pods that export to it.
mod light {
    use std::collections::BTreeMap;

    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use prost::bytes::Bytes;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(bytes = "bytes", repeated, tag = "2")]
        pub spans: Vec<Bytes>,
    }

    pub fn count(req: Request) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| super::any_to_json(kv.value.as_ref()).as_str().map(str::to_string))
                .unwrap_or_default();
            *out.entry(service).or_default() += rs.scope_spans.iter().map(|s| s.spans.len() as u64).sum::<u64>();
        }
        out
    }
}

pub fn flatten(req: ExportTraceServiceRequest) -> Vec<SpanRecord> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = rs.resource.map(|r| attributes(&r.attributes)).unwrap_or_default();
        let service_name = resource.get("service.name").and_then(|v| v.as_str()).unwrap_or("").to_string();
        for ss in rs.scope_spans {
            for span in ss.spans {
                let status = span.status.unwrap_or_default();
                out.push(SpanRecord {
                    service_name: service_name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    start_unix_nanos: span.start_time_unix_nano,
                    end_unix_nanos: span.end_time_unix_nano,
                    // StatusCode 2 = Error
                    status_error: status.code == 2,
                    status_message: status.message,
                    attributes: attributes(&span.attributes),
                    resource: resource.clone(),
                    events: span
                        .events
                        .into_iter()
                        .map(|e| EventRecord {
                            name: e.name,
                            time_unix_nanos: e.time_unix_nano,
                            attributes: attributes(&e.attributes),
                        })
                        .collect(),
                });
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, serde_json::Value> {
    kvs.iter().map(|kv| (kv.key.clone(), any_to_json(kv.value.as_ref()))).collect()
}

fn any_to_json(v: Option<&AnyValue>) -> serde_json::Value {
    use any_value::Value as V;
    match v.and_then(|v| v.value.as_ref()) {
        Some(V::StringValue(s)) => s.clone().into(),
        Some(V::BoolValue(b)) => (*b).into(),
        Some(V::IntValue(i)) => (*i).into(),
        Some(V::DoubleValue(d)) => (*d).into(),
        Some(V::ArrayValue(a)) => a.values.iter().map(|v| any_to_json(Some(v))).collect(),
        Some(V::KvlistValue(l)) => serde_json::Value::Object(attributes(&l.values).into_iter().collect()),
        Some(V::BytesValue(b)) => hex(b).into(),
        _ => serde_json::Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::network::http_client;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn export(service: &str, spans: usize) -> Vec<u8> {
        let name = KeyValue {
            key: "service.name".into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(service.into())) }),
            ..Default::default()
        };
        let span = Span { trace_id: vec![1; 16], span_id: vec![2; 8], name: "GET /".into(), ..Default::default() };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource { attributes: vec![name], ..Default::default() }),
                scope_spans: vec![ScopeSpans { spans: vec![span; spans], ..Default::default() }],
                ..Default::default()
            }],
        }
        .encode_to_vec()
    }

    /// The status of one OTLP/HTTP export through the lab's HTTP client.
    async fn post(addr: SocketAddr, body: &[u8]) -> u16 {
        let ct = [("content-type", "application/x-protobuf")];
        let call = http_client::post("x", "/v1/traces", &ct, body.to_vec(), true);
        let r = tokio::time::timeout(Duration::from_secs(5), http_client::call_once(addr, call)).await;
        r.expect("answered within 5 s").expect("an HTTP response").status
    }

    #[tokio::test]
    async fn keeps_or_only_counts_what_arrives() {
        let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let keeping = OtlpReceiver::start(bind).unwrap();
        let counting = OtlpReceiver::start_counting(bind).unwrap();
        for r in [&keeping, &counting] {
            assert_eq!(post(r.addr(), &export("svc-a", 3)).await, 200);
            assert_eq!(post(r.addr(), &export("svc-b", 1)).await, 200);
            assert_eq!(post(r.addr(), b"not protobuf").await, 400);
            let c = r.counts();
            assert_eq!((c.spans["svc-a"], c.spans["svc-b"], c.exports), (3, 1, 2), "{c:?}");
        }
        assert_eq!(keeping.spans().len(), 4);
        assert_eq!(keeping.spans()[0].service_name, "svc-a");
        assert!(counting.spans().is_empty());
    }

    #[tokio::test]
    async fn a_tap_sees_each_accepted_export_whole() {
        struct Seen(Mutex<Vec<ExportTraceServiceRequest>>);
        impl ExportTap for Seen {
            fn export(&self, request: &ExportTraceServiceRequest) {
                self.0.lock().unwrap().push(request.clone());
            }
        }
        let receiver = OtlpReceiver::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let seen = Arc::new(Seen(Mutex::new(Vec::new())));
        receiver.set_tap(Some(seen.clone()));
        assert_eq!(post(receiver.addr(), &export("svc-a", 2)).await, 200);
        assert_eq!(post(receiver.addr(), b"not protobuf").await, 400);
        receiver.set_tap(None);
        assert_eq!(post(receiver.addr(), &export("svc-b", 1)).await, 200);
        let seen = seen.0.lock().unwrap();
        assert_eq!(seen.len(), 1, "only the valid export made while tapped");
        assert_eq!(seen[0].encode_to_vec(), export("svc-a", 2), "unchanged");
    }
}
