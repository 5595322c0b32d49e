//! `--otlp-forward URL` (or `OTEL_EXPORTER_OTLP_ENDPOINT`): every export the pods send to the
//! lab's receiver also goes to a user's OTLP endpoint (a local Jaeger, a Collector), over
//! http/protobuf or gRPC. A bounded queue sits between the receiver and one sender task: a slow
//! or dead endpoint costs dropped exports, counted per run, never the pods' time.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde::Serialize;
use tokio::sync::mpsc;
use url::Url;

use crate::lab::network::http_client;

/// How the forwarded spans travel (the names of `OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies, `POST <URL>/v1/traces` (Jaeger's and the Collector's 4318).
    #[value(name = "http/protobuf")]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC (Jaeger's and the Collector's 4317).
    #[value(name = "grpc")]
    #[serde(rename = "grpc")]
    Grpc,
}

impl Protocol {
    /// The flag's value, else `OTEL_EXPORTER_OTLP_PROTOCOL` (read only when forwarding, so a value
    /// meant for other programs cannot stop a lab that forwards nothing), else http/protobuf.
    pub fn chosen(flag: Option<Protocol>) -> Result<Protocol> {
        Protocol::resolve(flag, std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").ok().as_deref())
    }

    fn resolve(flag: Option<Protocol>, env: Option<&str>) -> Result<Protocol> {
        use clap::ValueEnum;
        match (flag, env.map(str::trim).filter(|v| !v.is_empty())) {
            (Some(p), _) => Ok(p),
            (None, None) => Ok(Protocol::HttpProtobuf),
            (None, Some(v)) => Protocol::from_str(v, true).map_err(|_| {
                anyhow::anyhow!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL={v}: the lab forwards http/protobuf or grpc \
                     (or set --otlp-forward-protocol)"
                )
            }),
        }
    }
}

/// Exports waiting to be sent; more are dropped (and counted) rather than queued without bound.
const QUEUE_EXPORTS: usize = 1024;
/// Bound on one export to the endpoint, connection included.
const SEND_TIMEOUT: Duration = Duration::from_secs(3);

/// Where to forward: the endpoint as given, checked before any pod starts.
#[derive(Debug, Clone)]
pub struct ForwardTarget {
    /// The base endpoint, as in `OTEL_EXPORTER_OTLP_ENDPOINT` (http/protobuf appends `/v1/traces`).
    pub url: Url,
    pub protocol: Protocol,
}

impl ForwardTarget {
    /// `flag` names where the URL came from, for the error.
    pub fn parse(url: &str, protocol: Protocol) -> Result<ForwardTarget> {
        let flag = "--otlp-forward (or OTEL_EXPORTER_OTLP_ENDPOINT)";
        let parsed =
            Url::parse(url).with_context(|| format!("{flag} {url}: not a URL (e.g. http://localhost:4318)"))?;
        if parsed.scheme() != "http" {
            bail!(
                "{flag} {url}: scheme `{}` is not supported; the lab forwards plain http:// to a local endpoint",
                parsed.scheme()
            );
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            bail!("{flag} {url}: no host");
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            bail!("{flag} {url}: a base endpoint takes no query or fragment");
        }
        Ok(ForwardTarget { url: parsed, protocol })
    }

    /// The URL the exports go to: `/v1/traces` under the base for http/protobuf, the base for gRPC.
    pub fn export_url(&self) -> String {
        match self.protocol {
            Protocol::Grpc => self.url.as_str().trim_end_matches('/').to_string(),
            Protocol::HttpProtobuf => format!("{}/v1/traces", self.url.as_str().trim_end_matches('/')),
        }
    }
}

/// What became of one run's forwarded spans.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ForwardStats {
    pub url: String,
    pub protocol: String,
    /// Spans the endpoint accepted.
    pub forwarded_spans: u64,
    /// Spans not forwarded, for whatever reason (the three below).
    pub dropped_spans: u64,
    /// The queue was full when they arrived.
    pub dropped_queue_full: u64,
    /// The endpoint refused them, failed or did not answer in time.
    pub dropped_send_failed: u64,
    /// Still queued when the run's flush bound passed.
    pub dropped_unsent_at_end: u64,
    /// The last send error, if any (e.g. `connect: Connection refused`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl ForwardStats {
    /// `forwarded N spans to URL, dropped M`, with the reason when some were dropped.
    pub fn line(&self) -> String {
        let mut s = format!(
            "forwarded {} spans to {} ({}), dropped {}",
            self.forwarded_spans, self.url, self.protocol, self.dropped_spans
        );
        if self.dropped_spans > 0 {
            let mut why = Vec::new();
            for (n, what) in [
                (self.dropped_queue_full, "queue full"),
                (self.dropped_send_failed, "send failed"),
                (self.dropped_unsent_at_end, "unsent at the run's end"),
            ] {
                if n > 0 {
                    why.push(format!("{n} {what}"));
                }
            }
            s.push_str(&format!(" ({})", why.join(", ")));
            if let Some(e) = &self.last_error {
                s.push_str(&format!("; last error: {e}"));
            }
        }
        s
    }
}

/// One run's counters; once closed, late outcomes no longer change them.
#[derive(Default)]
struct RunCounters {
    stats: ForwardStats,
    /// Spans queued or being sent.
    pending: u64,
    closed: bool,
}

/// The handle a run holds: what it enqueues is counted here.
#[derive(Clone)]
pub struct RunForward {
    counters: Arc<Mutex<RunCounters>>,
    tx: mpsc::Sender<Job>,
}

struct Job {
    request: ExportTraceServiceRequest,
    spans: u64,
    counters: Arc<Mutex<RunCounters>>,
}

/// The sender task and its queue; dropping it ends the task once the queue is empty.
pub struct Forwarder {
    target: ForwardTarget,
    tx: mpsc::Sender<Job>,
}

impl Forwarder {
    /// Starts the sender on the current tokio runtime.
    pub fn start(target: ForwardTarget) -> Forwarder {
        Forwarder::start_on(&tokio::runtime::Handle::current(), target)
    }

    /// Starts the sender on `rt` (the kernel node's lab sends from the host's network namespace).
    pub fn start_on(rt: &tokio::runtime::Handle, target: ForwardTarget) -> Forwarder {
        let (tx, rx) = mpsc::channel(QUEUE_EXPORTS);
        rt.spawn(send_loop(target.clone(), rx));
        Forwarder { target, tx }
    }

    /// Counters for a new run.
    pub fn begin_run(&self) -> RunForward {
        let stats = ForwardStats {
            url: self.target.export_url(),
            protocol: serde_json::to_value(self.target.protocol)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            ..Default::default()
        };
        RunForward { counters: Arc::new(Mutex::new(RunCounters { stats, ..Default::default() })), tx: self.tx.clone() }
    }
}

impl RunForward {
    /// Queues one export without waiting; a full queue drops it (counted).
    pub fn offer(&self, request: ExportTraceServiceRequest, spans: u64) {
        let mut c = self.counters.lock().unwrap();
        if c.closed {
            return;
        }
        match self.tx.try_send(Job { request, spans, counters: self.counters.clone() }) {
            Ok(()) => c.pending += spans,
            Err(_) => {
                c.stats.dropped_queue_full += spans;
                c.stats.dropped_spans += spans;
            }
        }
    }

    /// Waits (at most `bound`) for the run's queued exports to be sent, then closes its counters:
    /// whatever is still queued counts as dropped and will not be sent.
    pub async fn finish(self, bound: Duration) -> ForwardStats {
        let deadline = tokio::time::Instant::now() + bound;
        while self.counters.lock().unwrap().pending > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut c = self.counters.lock().unwrap();
        c.closed = true;
        let unsent = std::mem::take(&mut c.pending);
        c.stats.dropped_unsent_at_end += unsent;
        c.stats.dropped_spans += unsent;
        c.stats.clone()
    }
}

async fn send_loop(target: ForwardTarget, mut rx: mpsc::Receiver<Job>) {
    let mut sender = Sender::new(&target);
    while let Some(job) = rx.recv().await {
        if job.counters.lock().unwrap().closed {
            continue;
        }
        let outcome = tokio::time::timeout(SEND_TIMEOUT, sender.send(job.request))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", SEND_TIMEOUT.as_secs())));
        let mut c = job.counters.lock().unwrap();
        if c.closed {
            continue;
        }
        c.pending = c.pending.saturating_sub(job.spans);
        match outcome {
            Ok(()) => c.stats.forwarded_spans += job.spans,
            Err(e) => {
                c.stats.dropped_send_failed += job.spans;
                c.stats.dropped_spans += job.spans;
                c.stats.last_error = Some(e);
            }
        }
    }
}

/// One export on the wire; errors are short texts for the report.
enum Sender {
    Http { url: Url, path: String },
    Grpc { url: String, client: Option<TraceServiceClient<tonic::transport::Channel>> },
}

impl Sender {
    fn new(target: &ForwardTarget) -> Sender {
        match target.protocol {
            Protocol::HttpProtobuf => {
                let path = format!("{}/v1/traces", target.url.path().trim_end_matches('/'));
                Sender::Http { url: target.url.clone(), path }
            }
            Protocol::Grpc => Sender::Grpc { url: target.export_url(), client: None },
        }
    }

    async fn send(&mut self, request: ExportTraceServiceRequest) -> Result<(), String> {
        match self {
            Sender::Http { url, path } => {
                let addrs = resolve(url).await?;
                let host = match url.port() {
                    Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
                    None => url.host_str().unwrap_or_default().to_string(),
                };
                let call = http_client::post(
                    &host,
                    path,
                    &[("content-type", "application/x-protobuf")],
                    request.encode_to_vec(),
                    true,
                );
                let resp = call_first_reachable(&addrs, call).await?;
                if (200..300).contains(&resp.status) {
                    Ok(())
                } else {
                    let body = String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)]).into_owned();
                    Err(format!("HTTP {}: {}", resp.status, body.trim()))
                }
            }
            Sender::Grpc { url, client } => {
                if client.is_none() {
                    let channel = tonic::transport::Channel::from_shared(url.clone())
                        .map_err(|e| e.to_string())?
                        .connect_timeout(SEND_TIMEOUT)
                        .timeout(SEND_TIMEOUT)
                        .connect_lazy();
                    *client = Some(TraceServiceClient::new(channel));
                }
                let c = client.as_mut().expect("set above");
                c.export(request).await.map(|_| ()).map_err(|s| format!("gRPC {:?}: {}", s.code(), s.message()))
            }
        }
    }
}

/// The endpoint's addresses (a name such as `localhost` is looked up on each send).
async fn resolve(url: &Url) -> Result<Vec<SocketAddr>, String> {
    let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<SocketAddr> =
        tokio::net::lookup_host((host, port)).await.map_err(|e| format!("resolving {host}: {e}"))?.collect();
    if addrs.is_empty() {
        return Err(format!("resolving {host}: no address"));
    }
    Ok(addrs)
}

/// Sends on the first address that takes the connection: `localhost` may resolve to ::1 first
/// while the endpoint listens on 127.0.0.1 only.
async fn call_first_reachable(addrs: &[SocketAddr], call: http_client::Call) -> Result<http_client::Response, String> {
    let mut last = String::new();
    for addr in addrs {
        match http_client::call_once(*addr, call.clone()).await {
            Err(e @ http_client::HttpError::Connect(_)) => last = e.to_string(),
            other => return other.map_err(|e| e.to_string()),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_named() {
        let t = ForwardTarget::parse("http://localhost:4318", Protocol::HttpProtobuf).unwrap();
        assert_eq!(t.export_url(), "http://localhost:4318/v1/traces");
        let t = ForwardTarget::parse("http://127.0.0.1:4317/", Protocol::Grpc).unwrap();
        assert_eq!(t.export_url(), "http://127.0.0.1:4317");
        let t = ForwardTarget::parse("http://collector:4318/otlp/", Protocol::HttpProtobuf).unwrap();
        assert_eq!(t.export_url(), "http://collector:4318/otlp/v1/traces");
        for (bad, says) in [
            ("localhost:4318", "scheme `localhost`"),
            ("https://jaeger:4318", "scheme `https`"),
            ("not a url", "not a URL"),
            ("http://h:4318/?x=1", "no query"),
        ] {
            let e = ForwardTarget::parse(bad, Protocol::HttpProtobuf).unwrap_err().to_string();
            assert!(e.contains("--otlp-forward") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_flag_wins_then_the_environment() {
        let r = Protocol::resolve;
        assert_eq!(r(None, None).unwrap(), Protocol::HttpProtobuf);
        assert_eq!(r(None, Some("")).unwrap(), Protocol::HttpProtobuf);
        assert_eq!(r(None, Some("grpc")).unwrap(), Protocol::Grpc);
        assert_eq!(r(Some(Protocol::HttpProtobuf), Some("grpc")).unwrap(), Protocol::HttpProtobuf);
        assert_eq!(r(Some(Protocol::Grpc), Some("http/json")).unwrap(), Protocol::Grpc);
        let e = r(None, Some("http/json")).unwrap_err().to_string();
        assert!(e.contains("OTEL_EXPORTER_OTLP_PROTOCOL=http/json") && e.contains("grpc"), "{e}");
    }

    #[tokio::test]
    async fn a_dead_endpoint_is_counted_not_waited_for() {
        // A port nobody listens on, held (bound, never listening) for the whole test: a port
        // bound and released could be taken by another test's server meanwhile (seen in CI: the
        // forwarder reached an HTTP server that was not the lab's).
        let holder = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        holder.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        let port = holder.local_addr().unwrap().as_socket().unwrap().port();
        let target = ForwardTarget::parse(&format!("http://127.0.0.1:{port}"), Protocol::HttpProtobuf).unwrap();
        let forwarder = Forwarder::start(target);
        let run = forwarder.begin_run();
        for _ in 0..5 {
            run.offer(ExportTraceServiceRequest::default(), 3);
        }
        let started = std::time::Instant::now();
        let stats = run.finish(Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert_eq!((stats.forwarded_spans, stats.dropped_spans, stats.dropped_send_failed), (0, 15, 15), "{stats:?}");
        assert!(stats.last_error.as_deref().is_some_and(|e| e.contains("connect")), "{stats:?}");
        assert!(stats.line().contains("dropped 15 (15 send failed)"), "{}", stats.line());
    }

    #[tokio::test]
    async fn localhost_reaches_a_receiver_on_127_0_0_1() {
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        let receiver = crate::otlp_receiver::OtlpReceiver::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let url = format!("http://localhost:{}", receiver.addr().port());
        let forwarder = Forwarder::start(ForwardTarget::parse(&url, Protocol::HttpProtobuf).unwrap());
        let run = forwarder.begin_run();
        let span = Span { trace_id: vec![7; 16], span_id: vec![8; 8], name: "GET /".into(), ..Default::default() };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans { spans: vec![span; 2], ..Default::default() }],
                ..Default::default()
            }],
        };
        run.offer(request, 2);
        let stats = run.finish(Duration::from_secs(5)).await;
        assert_eq!((stats.forwarded_spans, stats.dropped_spans), (2, 0), "{stats:?}");
        assert_eq!(receiver.spans().len(), 2);
        assert_eq!(receiver.spans()[0].trace_id, "07".repeat(16));
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        // The sender task cannot run before this test yields (one thread; offers never await),
        // so nothing drains while the queue fills.
        let target = ForwardTarget::parse("http://127.0.0.1:9", Protocol::HttpProtobuf).unwrap();
        let forwarder = Forwarder::start(target);
        let run = forwarder.begin_run();
        for _ in 0..QUEUE_EXPORTS + 10 {
            run.offer(ExportTraceServiceRequest::default(), 1);
        }
        let c = run.counters.lock().unwrap().stats.clone();
        assert_eq!(c.dropped_queue_full, 10, "{c:?}");
    }
}
