//! Logs and traces: JSON (or pretty) logs with trace ids, OTLP export, W3C propagation, a
//! request's start and end on its server span, flush at exit.
//!
//! Traps handled here (see the tests): the exporter is built before any async runtime exists
//! (HTTP uses our blocking exporter, `otlp_export`; gRPC gets a runtime of its own), and the
//! provider is shut down from a plain thread with a bound, never from inside actix's
//! current-thread runtime.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::Registry;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat, OtlpProtocol};
use crate::identity::Identity;
pub use crate::request_span::RequestSpan;
use crate::request_span::{http_span_name, Attr};
pub use crate::sampling::RequestTrace;
use crate::sampling::{self, HeadSampler};
use crate::span_queue::{self, BatchConfig};

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
/// Set with the provider: decides each request's sampling before its spans exist.
static HEAD: OnceLock<HeadSampler> = OnceLock::new();
/// Keeps the gRPC exporter's runtime alive for the life of the process.
static GRPC_RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// Where spans go, resolved from config (`OTEL_*` already folded in by `config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTarget {
    pub url: String,
    pub protocol: OtlpProtocol,
}

pub fn export_target(cfg: &Config) -> Option<ExportTarget> {
    let t = &cfg.telemetry;
    if t.sdk_disabled {
        return None;
    }
    let url = match (&t.otlp_traces_endpoint, &t.otlp_endpoint) {
        (Some(full), _) => full.to_string(),
        (None, Some(base)) => match t.otlp_protocol {
            OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.as_str().trim_end_matches('/')),
            OtlpProtocol::Grpc => base.to_string(),
        },
        (None, None) => return None,
    };
    Some(ExportTarget { url, protocol: t.otlp_protocol })
}

/// Installs the global subscriber. Call before any async runtime starts.
///
/// Each layer has its own filter: the log level decides what is printed, never what is traced
/// (a global `warn` filter would drop the info-level request spans, and with them every trace).
/// A span the log filter rejects also costs the log layer nothing.
pub fn init(role: &str, cfg: &Config, identity: &Identity) -> anyhow::Result<()> {
    let directives = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => v,
        _ => cfg.telemetry.log_level.clone(),
    };
    let log_filter = EnvFilter::try_new(quiet_parse_errors(&directives))
        .map_err(|e| anyhow::anyhow!("log filter `{directives}`: {e}"))?;
    let json = match cfg.telemetry.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let fmt = if json {
        crate::log_format::json_layer(std::io::stdout, log_filter).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_writer(std::io::stdout).with_filter(log_filter).boxed()
    };
    let otel = match export_target(cfg) {
        Some(target) => {
            let resource = resource(role, cfg, identity);
            let provider = build_provider(&resource, &target)?;
            let tracer = provider.tracer("graceful");
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            let _ = HEAD.set(HeadSampler::new(cfg));
            span_queue::install(BatchConfig::from_env(), request_span_sink(&resource, &target)?)?;
            let _ = POD.set(identity.pod_name.clone());
            let _ = PROVIDER.set(provider);
            // The layer carries the `tracing` spans that remain (the process's lifecycle span and
            // its events); a request's spans are recorded by `request_span` and sent through
            // `span_queue`, beside the provider's batches, to the same endpoint. Per-span extras
            // (code location, thread, busy/idle timers, level, target) say nothing about where a
            // request died, and nothing reads an activated context.
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_error_records_to_exceptions(true)
                    .with_location(false)
                    .with_threads(false)
                    .with_tracked_inactivity(false)
                    .with_level(false)
                    .with_target(false)
                    .with_context_activation(false)
                    .with_filter(trace_filter()),
            )
        }
        None => None,
    };
    let mut layers = vec![fmt];
    layers.extend(otel.map(Layer::boxed));
    subscriber(layers).try_init()?;
    Ok(())
}

/// The layers in a `Vec`, not as `Option` layers: a `None` layer counts as one that wants every
/// span, so with tracing off every request span was still built for the log layer whose filter
/// takes none (measured: 26 k instructions per request).
fn subscriber(layers: Vec<Box<dyn Layer<Registry> + Send + Sync>>) -> impl tracing::Subscriber + Send + Sync {
    tracing_subscriber::registry().with(layers)
}

/// What is exported, whatever the log level: our spans and events at info and above. The
/// exporter's own HTTP/gRPC stack stays out, so an export can never trace itself.
fn trace_filter() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("actix_http::h1::dispatcher", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
        .with_target("reqwest", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("h2", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
}

/// actix_http logs an ERROR line for every malformed request a client sends, so any client could
/// flood the pod's log. They are off unless the filter names `actix_http` itself.
fn quiet_parse_errors(directives: &str) -> String {
    if directives.contains("actix_http") {
        directives.to_string()
    } else {
        format!("{directives},actix_http::h1::dispatcher=off")
    }
}

/// True when spans are exported (and so trace ids exist).
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// Where the request spans' batches go: the same endpoint and protocol as the provider's.
fn request_span_sink(resource: &Resource, target: &ExportTarget) -> anyhow::Result<span_queue::Sink> {
    let timeout = EXPORT_TIMEOUT;
    Ok(match target.protocol {
        OtlpProtocol::HttpProtobuf => {
            let headers = crate::otlp_export::headers_from_env();
            let headers = headers.as_ref().map(|(var, v)| (*var, v.as_str()));
            let exporter = crate::otlp_export::HttpExporter::new(&target.url, headers, timeout)?.for_resource(resource);
            Box::new(move |spans: &[u8]| exporter.export_recorded(crate::request_span::SCOPE, spans))
        }
        OtlpProtocol::Grpc => {
            let exporter = crate::otlp_export::GrpcExporter::new(&target.url, resource, timeout)?;
            Box::new(move |spans: &[u8]| exporter.export_recorded(crate::request_span::SCOPE, spans))
        }
    })
}

/// Bounds one export, its retries included (both exporters).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

fn build_provider(resource: &Resource, target: &ExportTarget) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::{SpanExporter, WithExportConfig};
    let timeout = EXPORT_TIMEOUT;
    let builder = SdkTracerProvider::builder()
        // Sampling was decided before the span was built (`sampling::HeadSampler`, from the same
        // configuration): what reaches the provider is exported.
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(resource.clone());
    let builder = match target.protocol {
        OtlpProtocol::HttpProtobuf => {
            let headers = crate::otlp_export::headers_from_env();
            let headers = headers.as_ref().map(|(var, v)| (*var, v.as_str()));
            builder.with_batch_exporter(crate::otlp_export::HttpExporter::new(&target.url, headers, timeout)?)
        }
        OtlpProtocol::Grpc => {
            // tonic binds to the runtime current at build(); give it one that outlives actix's.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-grpc")
                .enable_all()
                .build()?;
            let exporter = rt.block_on(async {
                SpanExporter::builder().with_tonic().with_endpoint(&target.url).with_timeout(timeout).build()
            })?;
            let _ = GRPC_RUNTIME.set(rt);
            builder.with_batch_exporter(exporter)
        }
    };
    Ok(builder.build())
}

pub fn service_name(role: &str, cfg: &Config) -> String {
    cfg.telemetry.service_name.clone().unwrap_or_else(|| format!("graceful-{role}"))
}

fn resource(role: &str, cfg: &Config, identity: &Identity) -> Resource {
    let mut attrs = vec![
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", format!("{}-{}", identity.pod_name, std::process::id())),
        KeyValue::new("k8s.pod.name", identity.pod_name.clone()),
        KeyValue::new("k8s.namespace.name", identity.pod_namespace.clone()),
        KeyValue::new("k8s.node.name", identity.node_name.clone()),
        KeyValue::new("graceful.role", role.to_string()),
        KeyValue::new("graceful.features.graceful", cfg.features.graceful),
        KeyValue::new("graceful.features.retry", cfg.features.retry),
        KeyValue::new("graceful.features.timeouts", cfg.features.timeouts),
    ];
    if !identity.pod_ip.is_empty() {
        attrs.push(KeyValue::new("k8s.pod.ip", identity.pod_ip.clone()));
    }
    for (k, v) in parse_resource_attributes(&cfg.telemetry.resource_attributes) {
        attrs.push(KeyValue::new(k, v));
    }
    Resource::builder_empty().with_service_name(service_name(role, cfg)).with_attributes(attrs).build()
}

/// `k=v,k2=v2` as `OTEL_RESOURCE_ATTRIBUTES` has it (values may be percent-encoded).
pub fn parse_resource_attributes(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let k = k.trim();
            if k.is_empty() {
                return None;
            }
            let v = url::form_urlencoded::parse(format!("v={}", v.trim()).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            Some((k.to_string(), v))
        })
        .collect()
}

/// Flushes and shuts the exporter down within `bound`, from a plain thread (never blocks forever).
pub fn shutdown(bound: Duration) {
    let started = std::time::Instant::now();
    if let Some(queue) = span_queue::get() {
        if !queue.close(bound) {
            eprintln!("graceful: request spans still waiting for export after {bound:?}");
        }
        let counts = queue.counts();
        if counts.dropped > 0 {
            eprintln!("graceful: {} request spans dropped (export queue full)", counts.dropped);
        }
    }
    let bound = bound.saturating_sub(started.elapsed());
    let Some(provider) = PROVIDER.get() else { return };
    let provider = provider.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(provider.shutdown_with_timeout(bound));
    });
    match rx.recv_timeout(bound + Duration::from_millis(100)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("graceful: trace export at exit failed: {e}"),
        Err(_) => eprintln!("graceful: trace export at exit did not finish within {bound:?}"),
    }
}

/// Whether a span with no caller (the lifecycle span) is traced; true when tracing is off, so
/// that pretty logs still show it.
pub fn root_sampled() -> bool {
    HEAD.get().is_none_or(HeadSampler::decide_root)
}

/// `traceparent` (and `tracestate`) for a call made by a request: from the call's own span when
/// the request is sampled (its parent is that span), else the request's trace id with the
/// sampled flag off. Nothing when tracing is off. Built on the stack, copied once into each value.
pub fn inject(span: &RequestSpan, trace: Option<RequestTrace>) -> [Option<(HeaderName, HeaderValue)>; 2] {
    let (Some(head), Some(t)) = (HEAD.get(), trace) else { return [None, None] };
    let header = |value: &[u8]| HeaderValue::from_bytes(value).ok().map(|v| (TRACEPARENT, v));
    match span.span_context() {
        Some(sc) if t.sampled => {
            let state = sc.trace_state().header();
            let state =
                if state.is_empty() { None } else { HeaderValue::try_from(state).ok().map(|v| (TRACESTATE, v)) };
            [header(&sampling::traceparent(sc)), state]
        }
        _ => [header(&head.unsampled_traceparent(&t)), None],
    }
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The trace of the request being served (`None` when tracing is off) and its server span (none
/// when it has none), from within its task.
pub fn current_request() -> (Option<RequestTrace>, RequestSpan) {
    REQUEST.try_with(|t| (Some(t.trace), t.span.clone())).unwrap_or_default()
}

/// Probe paths create no spans: kubelet polls them every second and they would bury real traces.
/// (Here, not in `server`, so that `server` depends on `telemetry` and not the other way round.)
pub fn is_probe_path(path: &str) -> bool {
    matches!(path, "/livez" | "/readyz" | "/alive" | "/metrics" | "/prestop") || path == "/health"
}

/// The pod's name, for every server span's `graceful.pod`.
static POD: OnceLock<String> = OnceLock::new();

/// The method as a `'static` string for the common ones: no allocation per request.
pub fn method_label(method: &actix_web::http::Method) -> std::borrow::Cow<'static, str> {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET".into(),
        Method::POST => "POST".into(),
        Method::PUT => "PUT".into(),
        Method::DELETE => "DELETE".into(),
        Method::HEAD => "HEAD".into(),
        Method::OPTIONS => "OPTIONS".into(),
        Method::PATCH => "PATCH".into(),
        _ => method.as_str().to_string().into(),
    }
}

/// The server span of a sampled request: the attributes that say where a request died, in
/// OpenTelemetry's semantic-convention names, under the caller's context. Leaner than
/// tracing-actix-web's default (no request id, no duplicated pre-1.0 `http.*` names): every
/// attribute is paid for on every sampled request. What is known later is set then
/// (`http.response.status_code`, `graceful.shutdown.phase_end`, `error.type`, ...).
fn request_span(
    request: &ServiceRequest,
    route: &str,
    phase: &'static str,
    trace_id: TraceId,
    parent: &SpanContext,
) -> RequestSpan {
    let method = request.method().as_str();
    let mut peer = PeerText::default();
    let mut attributes = [
        Attr::new("http.request.method", method),
        Attr::new("http.route", route),
        Attr::new("url.path", request.path()),
        Attr::new("graceful.shutdown.phase", phase),
        Attr::new("graceful.pod", POD.get().map_or("", String::as_str)),
        Attr::new("client.address", ""),
    ];
    let n = match request.peer_addr() {
        Some(addr) => {
            attributes[5] = Attr::new("client.address", peer.write(addr.ip()));
            6
        }
        None => 5,
    };
    let name = http_span_name(method, route);
    RequestSpan::start("HTTP request", name, SpanKind::Server, trace_id, parent, &attributes[..n])
}

/// An IP address's text on the stack (no allocation per request).
struct PeerText {
    buf: [u8; 46],
    len: usize,
}

impl Default for PeerText {
    fn default() -> Self {
        PeerText { buf: [0; 46], len: 0 }
    }
}

impl PeerText {
    /// IPv4 by hand: `Display` for an address costs ≈ 1 k instructions.
    fn write(&mut self, ip: std::net::IpAddr) -> &str {
        self.len = 0;
        match ip {
            std::net::IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b'.');
                    }
                    if octet >= 100 {
                        self.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        self.push(b'0' + octet / 10 % 10);
                    }
                    self.push(b'0' + octet % 10);
                }
            }
            std::net::IpAddr::V6(_) => {
                use std::io::Write;
                let mut cur = std::io::Cursor::new(&mut self.buf[..]);
                let _ = write!(cur, "{ip}");
                self.len = cur.position() as usize;
            }
        }
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }
}

/// A request's trace and, when sampled, its server span, for its handlers (their attempt spans
/// are the span's children, their log lines name it).
pub struct RequestTelemetry {
    pub trace: RequestTrace,
    pub span: RequestSpan,
}

tokio::task_local! {
    /// The request being served by this task. A task-local, not the request's extensions: the
    /// first insert there allocates a map and a box, and frees them, on every request (≈ 700
    /// instructions); entering the scope is a swap at each poll.
    static REQUEST: RequestTelemetry;
}

/// Runs `serve` (a request's service future) with `telemetry` as its task's current request.
pub async fn serving<F: std::future::Future>(telemetry: Option<RequestTelemetry>, serve: F) -> F::Output {
    match telemetry {
        Some(t) => REQUEST.scope(t, serve).await,
        None => serve.await,
    }
}

/// A request's start: decides its sampling and returns its trace and server span (the span is
/// none when unsampled); nothing for probe paths and with tracing off.
pub fn start_request(request: &ServiceRequest, route: &str, phase: &'static str) -> Option<RequestTelemetry> {
    if is_probe_path(request.path()) {
        return None;
    }
    let head = HEAD.get()?;
    let headers = request.headers();
    let caller = sampling::Caller::read(headers.get(&TRACEPARENT).map(HeaderValue::as_bytes));
    let trace = head.decide(caller.as_ref());
    if !trace.sampled {
        // No span at all: the trace id is kept for the response header, the bodies, the log
        // lines and the next hop's traceparent.
        return Some(RequestTelemetry { trace, span: RequestSpan::none() });
    }
    // The span carries the trace its sampling was decided on (a root's new id included).
    let parent = match caller {
        Some(c) => c.span_context(headers.get(&TRACESTATE).and_then(|v| v.to_str().ok())),
        None => SpanContext::NONE,
    };
    let span = request_span(request, route, phase, trace.trace_id, &parent);
    Some(RequestTelemetry { trace, span })
}

/// A request's end on its server span: the status, whether it failed, and the span's end. A 5xx
/// is an error, a 4xx is the client's (OTel makes OK final, so plain responses are marked too).
pub fn end_request<B>(span: &RequestSpan, outcome: &Result<ServiceResponse<B>, actix_web::Error>) {
    if !span.is_recording() {
        return;
    }
    let (status, error) = match outcome {
        Ok(res) => (res.status(), res.response().error().map(|e| e.as_response_error())),
        Err(e) => (e.as_response_error().status_code(), Some(e.as_response_error())),
    };
    span.set(Attr::new("http.response.status_code", i64::from(status.as_u16())));
    if let Some(e) = error {
        span.set(Attr::new("exception.message", &e.to_string()));
        span.set(Attr::new("exception.details", &format!("{e:?}")));
    }
    let failed = status.is_server_error() || (error.is_some() && !status.is_client_error());
    if failed {
        span.set_error("");
    } else {
        span.set_ok();
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_attributes_parse_like_the_spec() {
        let got = parse_resource_attributes("deployment.environment=lab, team=sre%20core,=x,bad");
        assert_eq!(got, vec![("deployment.environment".into(), "lab".into()), ("team".into(), "sre core".into())]);
    }

    #[test]
    fn with_tracing_off_no_span_is_built() {
        let json = crate::log_format::json_layer(std::io::sink, EnvFilter::new("info")).boxed();
        tracing::subscriber::with_default(subscriber(vec![json]), || {
            assert!(tracing::info_span!("HTTP request", http.route = "/api/data").is_disabled());
        });
        // What the Vec avoids: the same log layer beside a `None` layer builds every span.
        let json = crate::log_format::json_layer(std::io::sink, EnvFilter::new("info")).boxed();
        let none: Option<tracing_subscriber::fmt::Layer<_>> = None;
        let with_none = tracing_subscriber::registry().with(json).with(none);
        tracing::subscriber::with_default(with_none, || {
            assert!(!tracing::info_span!("HTTP request", http.route = "/api/data").is_disabled());
        });
    }

    #[test]
    fn peer_text_writes_addresses_as_display_does() {
        for ip in ["0.0.0.0", "10.244.0.12", "127.0.0.1", "255.255.255.255", "1.20.100.9", "::1", "fd00::a:1"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(PeerText::default().write(ip), ip.to_string());
        }
    }

    #[test]
    fn export_target_follows_endpoint_precedence() {
        let mut cfg = Config::default();
        assert_eq!(export_target(&cfg), None, "no endpoint, no exporter");
        cfg.telemetry.otlp_endpoint = Some("http://127.0.0.1:4318/".parse().unwrap());
        assert_eq!(export_target(&cfg).unwrap().url, "http://127.0.0.1:4318/v1/traces");
        cfg.telemetry.otlp_traces_endpoint = Some("http://127.0.0.1:9/custom".parse().unwrap());
        assert_eq!(export_target(&cfg).unwrap().url, "http://127.0.0.1:9/custom");
        cfg.telemetry.sdk_disabled = true;
        assert_eq!(export_target(&cfg), None);
    }
}
