//! What every role shares: the public and admin listeners, probes, `/metrics`, the lifecycle
//! middleware, and the shutdown sequence driven by signals and `/prestop`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Extensions, ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::ConnectionType;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpMessage, HttpRequest, HttpResponse, HttpServer};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tracing::Span;
use tracing_actix_web::{RootSpan, TracingLogger};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::Config;
use crate::identity::Identity;
use crate::lifecycle::{DrainTrigger, Lifecycle, Phase};
use crate::metrics::{Metrics, RequestLabels};
use crate::telemetry::{self, RequestSpan};

pub const POD_HEADER: &str = "x-graceful-pod";
pub const TRACE_HEADER: &str = "x-trace-id";

/// Exit codes a shell would report for a death by signal; kubelet shows them.
const EXIT_SIGTERM: u8 = 143;
const EXIT_SIGINT: u8 = 130;

/// State shared by both listeners and every worker of one role.
pub struct Ctx {
    pub role: &'static str,
    pub config: Config,
    pub identity: Identity,
    pub lifecycle: Lifecycle,
    pub metrics: Metrics,
    /// Open connections on the public listener (idle keep-alive ones included).
    connections: Arc<AtomicUsize>,
    /// Covers the life of the process; events mark each step of termination.
    lifecycle_span: Mutex<Option<Span>>,
}

pub type Shared = web::Data<Ctx>;

impl Ctx {
    pub fn new(role: &'static str, config: Config, identity: Identity) -> Shared {
        let lifecycle_span = tracing::info_span!(
            "lifecycle",
            otel.name = "lifecycle",
            graceful.role = role,
            graceful.pod = %identity.pod_name,
        );
        web::Data::new(Ctx {
            role,
            metrics: Metrics::new(role),
            config,
            identity,
            lifecycle: Lifecycle::new(),
            connections: Arc::default(),
            lifecycle_span: Mutex::new(Some(lifecycle_span)),
        })
    }

    /// Records a lifecycle step as a log line and as an event on the lifecycle span.
    pub fn event(&self, name: &'static str, in_flight: Option<usize>) {
        // i64: tracing-opentelemetry turns unsigned fields into strings.
        let since_sigterm = self.lifecycle.since_signal().map(|d| d.as_millis() as i64);
        let in_flight = in_flight.map(|n| n as i64);
        let phase = self.lifecycle.phase().as_str();
        let guard = self.lifecycle_span.lock().unwrap();
        let parent = guard.as_ref().cloned().unwrap_or_else(Span::none);
        match (in_flight, since_sigterm) {
            (Some(n), Some(ms)) => {
                tracing::info!(parent: &parent, in_flight = n, ms_since_sigterm = ms, phase, "{name}")
            }
            (Some(n), None) => tracing::info!(parent: &parent, in_flight = n, phase, "{name}"),
            (None, Some(ms)) => tracing::info!(parent: &parent, ms_since_sigterm = ms, phase, "{name}"),
            (None, None) => tracing::info!(parent: &parent, phase, "{name}"),
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.lifecycle.advance(phase);
        self.metrics.set_phase(self.lifecycle.phase());
    }

    /// Enters lame-duck mode; returns false when already draining.
    pub fn begin_drain(&self, trigger: DrainTrigger) -> bool {
        if trigger == DrainTrigger::PreStop {
            self.event(trigger.event_name(), None);
        }
        if self.lifecycle.begin_drain() {
            self.metrics.set_phase(Phase::Draining);
            self.event("readiness_failing", None);
            return true;
        }
        false
    }

    fn end_lifecycle_span(&self) {
        self.lifecycle_span.lock().unwrap().take();
    }
}

/// Counts a connection for as long as actix keeps its extensions (the connection's life).
struct ConnectionGuard(Arc<AtomicUsize>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Phase, in-flight tracking, `Connection: close` while draining, pod and trace headers, metrics.
async fn lifecycle_middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let ctx = req.app_data::<Shared>().cloned().expect("Ctx is registered on every app");
    let span = req.extensions().get::<RootSpan>().map(|s| Span::clone(s));
    let phase_start = ctx.lifecycle.phase();
    if let Some(span) = &span {
        span.record("graceful.shutdown.phase", phase_start.as_str());
        span.record("graceful.pod", ctx.identity.pod_name.as_str());
    }
    let tid = telemetry::request_trace_id(&req.extensions());
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let _in_flight = ctx.lifecycle.track(span.clone());
    let result = next.call(req).await;
    let phase_end = ctx.lifecycle.phase();
    if let Some(span) = &span {
        span.record("graceful.shutdown.phase_end", phase_end.as_str());
        if let Some(since) = ctx.lifecycle.since_signal() {
            span.record("graceful.ms_since_sigterm", since.as_millis() as i64);
        }
    }
    let mut res = result?;
    let status = res.status().as_u16();
    ctx.metrics.requests.get_or_create(&RequestLabels { method, route, status }).inc();
    if ctx.config.features.graceful && phase_end >= Phase::Draining {
        // Keep-alive clients would otherwise stay pinned to this pod (conntrack keeps them).
        res.response_mut().head_mut().set_connection_type(ConnectionType::Close);
    }
    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::try_from(ctx.identity.pod_name.as_str()) {
        headers.insert(HeaderName::from_static(POD_HEADER), v);
    }
    if !tid.is_empty() {
        if let Ok(v) = HeaderValue::try_from(tid) {
            headers.insert(HeaderName::from_static(TRACE_HEADER), v);
        }
    }
    Ok(res)
}

async fn livez(ctx: Shared) -> HttpResponse {
    // Liveness never depends on draining or on a downstream: failing it only gets us restarted.
    HttpResponse::Ok().json(json!({"status": "alive", "phase": ctx.lifecycle.phase()}))
}

async fn readyz(ctx: Shared) -> HttpResponse {
    let phase = ctx.lifecycle.phase();
    if ctx.lifecycle.ready() {
        HttpResponse::Ok().json(json!({"status": "ready", "phase": phase}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({"status": "not ready", "phase": phase}))
    }
}

async fn metrics(ctx: Shared) -> HttpResponse {
    ctx.metrics.in_flight.set(ctx.lifecycle.in_flight() as i64);
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(ctx.metrics.render())
}

/// GET too: kubelet's httpGet preStop hook can only GET.
async fn prestop(ctx: Shared, req: HttpRequest) -> HttpResponse {
    if !ctx.config.features.graceful {
        return HttpResponse::Conflict().json(json!({
            "status": "ignored",
            "error": "features.graceful is off: this pod has no lame-duck mode",
            "pod": ctx.identity.pod_name,
        }));
    }
    let first = ctx.begin_drain(DrainTrigger::PreStop);
    tracing::info!(from = ?req.peer_addr(), first, "preStop: draining");
    HttpResponse::Ok().json(json!({
        "status": "draining",
        "pod": ctx.identity.pod_name,
        "phase": ctx.lifecycle.phase(),
        "drain_delay_ms": ctx.config.shutdown.drain_delay.as_millis() as u64,
    }))
}

/// Read-only probes, served on the public port too (Kubernetes probes and the task-03 rubric use it).
pub fn public_probes(cfg: &mut web::ServiceConfig) {
    cfg.route("/livez", web::get().to(livez))
        .route("/alive", web::get().to(livez))
        .route("/readyz", web::get().to(readyz));
}

fn admin_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/livez", web::get().to(livez))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/prestop", web::get().to(prestop))
        .route("/prestop", web::post().to(prestop));
}

/// Readiness handler for roles whose `/health` means "ready".
pub async fn health_as_readiness(ctx: Shared) -> HttpResponse {
    readyz(ctx).await
}

pub struct Listeners {
    pub public: SocketAddr,
    pub public_key: &'static str,
    pub admin: SocketAddr,
    pub admin_key: &'static str,
}

/// Runs one role to completion: bind, serve, then the shutdown sequence. Never returns early on a
/// signal without having flushed telemetry.
pub fn run<F>(ctx: Shared, listeners: Listeners, routes: F) -> ExitCode
where
    F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
{
    let code = actix_web::rt::System::new().block_on(serve(ctx.clone(), listeners, routes));
    ctx.end_lifecycle_span();
    let bound = if ctx.config.features.graceful { Duration::from_secs(3) } else { Duration::from_millis(500) };
    telemetry::shutdown(bound);
    code
}

async fn serve<F>(ctx: Shared, listeners: Listeners, routes: F) -> ExitCode
where
    F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
{
    let cfg = &ctx.config;
    // Signals first: once we listen, a SIGTERM must never take the default (instant death) path.
    let (mut sigterm, mut sigint) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("graceful {}: cannot install signal handlers: {e}", ctx.role);
            return ExitCode::FAILURE;
        }
    };
    let shutdown_secs = cfg.shutdown.shutdown_timeout.as_secs_f64().ceil().max(1.0) as u64;
    let app_ctx = ctx.clone();
    let connections = ctx.connections.clone();
    let public = HttpServer::new(move || {
        App::new()
            .app_data(app_ctx.clone())
            .wrap(from_fn(lifecycle_middleware))
            .wrap(TracingLogger::<RequestSpan>::new())
            .configure(routes.clone())
            .configure(public_probes)
    })
    .workers(cfg.server.workers)
    .keep_alive(cfg.server.keep_alive)
    .shutdown_timeout(shutdown_secs)
    .disable_signals()
    .on_connect(move |_conn, ext: &mut Extensions| {
        connections.fetch_add(1, Ordering::SeqCst);
        ext.insert(ConnectionGuard(connections.clone()));
    });
    let (public, public_addr) = match public.bind(listeners.public) {
        Ok(s) => {
            let addr = s.addrs().first().copied().unwrap_or(listeners.public);
            (s.run(), addr)
        }
        Err(e) => {
            eprintln!("graceful {}: cannot listen on {} ({}): {e}", ctx.role, listeners.public, listeners.public_key);
            return ExitCode::from(2);
        }
    };
    let admin_ctx = ctx.clone();
    let admin = HttpServer::new(move || App::new().app_data(admin_ctx.clone()).configure(admin_routes))
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(listeners.admin);
    let (admin, admin_addr) = match admin {
        Ok(s) => {
            let addr = s.addrs().first().copied().unwrap_or(listeners.admin);
            (s.run(), addr)
        }
        Err(e) => {
            eprintln!("graceful {}: cannot listen on {} ({}): {e}", ctx.role, listeners.admin, listeners.admin_key);
            return ExitCode::from(2);
        }
    };
    let public_handle = public.handle();
    let admin_handle = admin.handle();
    actix_web::rt::spawn(public);
    actix_web::rt::spawn(admin);
    ctx.set_phase(Phase::Serving);
    tracing::info!(
        role = ctx.role,
        listen = %public_addr,
        admin = %admin_addr,
        graceful = cfg.features.graceful,
        retry = cfg.features.retry,
        timeouts = cfg.features.timeouts,
        "serving"
    );
    ctx.event("serving", None);

    let mut phases = ctx.lifecycle.subscribe();
    // 1. Serve until a termination signal (a preStop only starts the lame-duck period).
    let trigger = loop {
        tokio::select! {
            _ = sigterm.recv() => break DrainTrigger::Sigterm,
            _ = sigint.recv() => break DrainTrigger::Sigint,
            changed = phases.changed() => {
                if changed.is_err() { break DrainTrigger::Sigterm; }
            }
        }
    };
    ctx.lifecycle.signal_received();
    ctx.event(trigger.event_name(), Some(ctx.lifecycle.in_flight()));
    let exit_code = if trigger == DrainTrigger::Sigint { EXIT_SIGINT } else { EXIT_SIGTERM };
    if !cfg.features.graceful {
        return naive_exit(&ctx, &public_handle, &admin_handle, exit_code).await;
    }

    // 2. Lame duck: readiness fails, requests are still served (with Connection: close).
    ctx.begin_drain(trigger);
    let remaining = ctx.lifecycle.remaining_drain(cfg.shutdown.drain_delay);
    tokio::select! {
        _ = tokio::time::sleep(remaining) => {}
        _ = sigterm.recv() => return second_signal(&ctx, EXIT_SIGTERM),
        _ = sigint.recv() => return second_signal(&ctx, EXIT_SIGINT),
    }

    // 3. Close the listener; in-flight requests finish, idle keep-alive connections are closed.
    ctx.set_phase(Phase::Stopping);
    let stopping = public_handle.clone();
    actix_web::rt::spawn(async move { stopping.stop(true).await });
    ctx.event("listener_closed", Some(ctx.lifecycle.in_flight()));
    // Our own count, not actix's stop future: actix re-checks open connections only once a second.
    let drained = tokio::select! {
        left = wait_for_zero(&ctx.connections, cfg.shutdown.shutdown_timeout) => left,
        _ = sigterm.recv() => return second_signal(&ctx, EXIT_SIGTERM),
        _ = sigint.recv() => return second_signal(&ctx, EXIT_SIGINT),
    };
    let left = ctx.lifecycle.in_flight();
    if drained > 0 {
        tracing::warn!(connections = drained, in_flight = left, "shutdown_timeout reached; dropping the rest");
    }
    ctx.event("drained", Some(left));
    let admin_stop = admin_handle.clone();
    actix_web::rt::spawn(async move { admin_stop.stop(false).await });
    ctx.set_phase(Phase::Stopped);
    ctx.event("exit", Some(left));
    if drained > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn second_signal(ctx: &Ctx, code: u8) -> ExitCode {
    ctx.event("second_signal_exit", Some(ctx.lifecycle.in_flight()));
    ExitCode::from(code)
}

/// The naive app: exits at once. It first ends the spans of the requests it is about to drop,
/// marked, so the trace shows what died and why.
async fn naive_exit(ctx: &Ctx, public: &ServerHandle, admin: &ServerHandle, code: u8) -> ExitCode {
    let spans = ctx.lifecycle.take_in_flight_spans();
    let ms = ctx.lifecycle.since_signal().map(|d| d.as_millis() as i64).unwrap_or(0);
    for span in &spans {
        span.record("graceful.dropped", true);
        span.record("error.type", "dropped_by_exit");
        span.record("graceful.ms_since_sigterm", ms);
        span.record("graceful.shutdown.phase_end", Phase::Stopped.as_str());
        span.set_status(opentelemetry::trace::Status::error("process exited on SIGTERM without draining"));
        ctx.metrics.dropped.inc();
    }
    ctx.event("dropping_in_flight", Some(spans.len()));
    drop(spans);
    ctx.set_phase(Phase::Stopped);
    // A forced stop drops the connections (and with them the request futures and their spans).
    let (p, a) = (public.clone(), admin.clone());
    actix_web::rt::spawn(async move { p.stop(false).await });
    actix_web::rt::spawn(async move { a.stop(false).await });
    wait_for_zero(&ctx.connections, Duration::from_millis(200)).await;
    ctx.lifecycle.wait_idle(Duration::from_millis(100)).await;
    ctx.event("exit", Some(ctx.lifecycle.in_flight()));
    ExitCode::from(code)
}

async fn wait_for_zero(counter: &AtomicUsize, bound: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let n = counter.load(Ordering::SeqCst);
        if n == 0 || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
