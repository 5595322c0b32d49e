//! The frontend's client to the backend: timeouts, retries of idempotent calls with backoff,
//! W3C propagation, one client span per attempt, and an honest error class for every failure.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderValue;
use actix_web::http::{Method, StatusCode};
use awc::error::{ConnectError, PayloadError, SendRequestError};
use backon::{ExponentialBuilder, Retryable};
use bytes_compat::Bytes;
use url::Url;

use crate::config::{Config, ResolveRule};
use crate::metrics::{AttemptLabels, Metrics};
use crate::request_span::Attr;
use crate::server::{POD_HEADER, POD_HEADER_NAME};
use crate::telemetry::{self, RequestSpan, RequestTrace};
use opentelemetry::trace::SpanKind;

/// Re-exported through actix so we don't pin another `bytes`.
mod bytes_compat {
    pub use actix_web::web::Bytes;
}

/// Largest upstream body we read.
const BODY_LIMIT: usize = 1024 * 1024;
/// "Off" still needs a number for awc; an hour is unbounded for any request we make.
const UNBOUNDED: Duration = Duration::from_secs(3600);

/// The closed set of `error.type` values an attempt can end with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    ConnectionRefused,
    ConnectFailed,
    ConnectionReset,
    ClosedBeforeResponse,
    Timeout,
    Http5xx,
    BodyIncomplete,
    DeadlineExceeded,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::ConnectionRefused => "connection_refused",
            ErrorType::ConnectFailed => "connect_failed",
            ErrorType::ConnectionReset => "connection_reset",
            ErrorType::ClosedBeforeResponse => "closed_before_response",
            ErrorType::Timeout => "timeout",
            ErrorType::Http5xx => "http_5xx",
            ErrorType::BodyIncomplete => "body_incomplete",
            ErrorType::DeadlineExceeded => "deadline_exceeded",
        }
    }

    /// What the frontend answers: a gateway error, or a gateway timeout.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorType::Timeout | ErrorType::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamError {
    pub kind: ErrorType,
    pub detail: String,
    /// The backend's status for `http_5xx`.
    pub status: Option<u16>,
}

impl UpstreamError {
    fn new(kind: ErrorType, detail: impl Into<String>) -> Self {
        UpstreamError { kind, detail: detail.into(), status: None }
    }

    /// What the frontend answers: a backend that is unavailable (503: draining, or no ready
    /// endpoint behind a proxy) stays 503; other failures are the gateway's 502 or 504.
    pub fn status(&self) -> StatusCode {
        match (self.kind, self.status) {
            (ErrorType::Http5xx, Some(503)) => StatusCode::SERVICE_UNAVAILABLE,
            (kind, _) => kind.status(),
        }
    }

    /// Transport failures and the statuses in `upstream.retry_on` (502/503/504 by default) may go
    /// to another pod; any other 5xx is the app's own answer.
    fn retryable(&self, retry_on: &[u16]) -> bool {
        match self.kind {
            ErrorType::Http5xx => self.status.is_some_and(|s| retry_on.contains(&s)),
            ErrorType::DeadlineExceeded => false,
            _ => true,
        }
    }
}

#[derive(Debug)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub body: Bytes,
    /// The backend pod that answered (its `x-graceful-pod` header).
    pub pod: Option<String>,
}

/// The outcome of a call with how many attempts it took.
pub struct Outcome {
    pub result: Result<UpstreamResponse, UpstreamError>,
    pub attempts: usize,
}

impl Outcome {
    pub fn retries(&self) -> usize {
        self.attempts.saturating_sub(1)
    }
}

/// Where every call goes, worked out once: a call's absolute path replaces the base URL's, so
/// only the origin, its host and port (for the span) and its `--resolve` address matter.
struct Target {
    origin: String,
    host: String,
    port: u16,
    addr: Option<SocketAddr>,
    /// `addr` as a span attribute's text.
    addr_text: Option<String>,
}

impl Target {
    fn new(base: &Url, resolve: &[ResolveRule]) -> Self {
        let host = base.host_str().unwrap_or("").to_ascii_lowercase();
        let port = base.port_or_known_default().unwrap_or(80);
        let addr = resolve.iter().find(|r| r.host == host && r.port == port).map(|r| r.addr);
        let addr_text = addr.map(|a| a.to_string());
        Target { origin: base[..url::Position::BeforePath].to_string(), host, port, addr, addr_text }
    }

    /// The URL of `path_and_query` (absolute: it starts with `/`), without parsing a URL again.
    fn url(&self, path_and_query: &str) -> String {
        let mut url = String::with_capacity(self.origin.len() + path_and_query.len());
        url.push_str(&self.origin);
        url.push_str(path_and_query);
        url
    }
}

/// One per worker (awc's client is not `Send`).
pub struct Upstream {
    client: awc::Client,
    target: Target,
    cfg: crate::config::Upstream,
    retry: bool,
    timeouts: bool,
    /// This pod's name as a header value, made once (not parsed again on every call).
    pod: Option<HeaderValue>,
}

impl Upstream {
    pub fn new(config: &Config, pod: &str) -> Self {
        let u = &config.upstream;
        let timeouts = config.features.timeouts;
        let mut connector = awc::Connector::new();
        let mut builder = awc::Client::builder().disable_redirects();
        if timeouts {
            // Idle time below the server's keep-alive: never reuse a connection the server is closing.
            connector = connector.timeout(u.connect_timeout).conn_keep_alive(u.pool_idle);
            builder = builder.timeout(u.attempt_timeout);
        } else {
            // The naive client: awc's 15 s pool idle outlives the server's 5 s keep-alive.
            connector = connector.timeout(UNBOUNDED);
            builder = builder.disable_timeout();
        }
        Upstream {
            client: builder.connector(connector).finish(),
            target: Target::new(
                &config.frontend.backend_url,
                &u.resolve.iter().filter_map(|r| ResolveRule::parse(r).ok()).collect::<Vec<_>>(),
            ),
            cfg: u.clone(),
            retry: config.features.retry,
            timeouts,
            pod: HeaderValue::try_from(pod).ok(),
        }
    }

    fn backoff(&self) -> ExponentialBuilder {
        let mut b = ExponentialBuilder::default()
            .with_min_delay(self.cfg.backoff_min)
            .with_max_delay(self.cfg.backoff_max)
            .with_max_times(self.cfg.max_attempts.saturating_sub(1))
            .with_jitter();
        if self.timeouts {
            b = b.with_total_delay(Some(self.cfg.deadline));
        }
        b
    }

    /// Calls the backend. Only idempotent methods are retried, and only when `features.retry` is on.
    /// `trace`: the calling request's (`None` with tracing off); an unsampled one gets no attempt
    /// spans, only its trace id passed on. `parent`: its server span, the attempts' parent.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
        metrics: &Metrics,
        trace: Option<RequestTrace>,
        parent: &RequestSpan,
    ) -> Outcome {
        let attempts = Cell::new(0usize);
        let idempotent = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE);
        let once = || async {
            let n = attempts.get();
            attempts.set(n + 1);
            let res = self.attempt(&method, path_and_query, body.clone(), n, trace, parent).await;
            let outcome = match &res {
                Ok(_) => "ok",
                Err(e) => e.kind.as_str(),
            };
            metrics.upstream_attempts.get_or_create(&AttemptLabels { outcome }).inc();
            res
        };
        let calls = async {
            if self.retry && idempotent && self.cfg.max_attempts > 1 {
                once.retry(self.backoff())
                    .sleep(tokio::time::sleep)
                    .when(|e: &UpstreamError| e.retryable(&self.cfg.retry_on))
                    .notify(|e: &UpstreamError, wait: Duration| {
                        metrics.retries.inc();
                        let (attempt, backoff_ms) = (attempts.get() as i64, wait.as_millis() as i64);
                        let (span_id, span_name) = parent.log_ids();
                        tracing::info!(
                            trace_id = trace.as_ref().map(RequestTrace::hex),
                            span_id,
                            span.name = span_name,
                            error.type = e.kind.as_str(),
                            attempt,
                            backoff_ms,
                            "retry"
                        );
                        parent.event(
                            "retry",
                            &[
                                Attr::new("error.type", e.kind.as_str()),
                                Attr::new("attempt", attempt),
                                Attr::new("backoff_ms", backoff_ms),
                            ],
                        );
                    })
                    .await
            } else {
                once().await
            }
        };
        let result = if self.timeouts {
            match tokio::time::timeout(self.cfg.deadline, calls).await {
                Ok(r) => r,
                Err(_) => Err(UpstreamError::new(
                    ErrorType::DeadlineExceeded,
                    format!("no answer within the {} deadline", humantime::format_duration(self.cfg.deadline)),
                )),
            }
        } else {
            calls.await
        };
        Outcome { result, attempts: attempts.get() }
    }

    async fn attempt(
        &self,
        method: &Method,
        path_and_query: &str,
        body: Bytes,
        resend: usize,
        trace: Option<RequestTrace>,
        parent: &RequestSpan,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let (url, addr) = (self.target.url(path_and_query), self.target.addr);
        // Only a sampled request's attempts are spans (a probe's are not): its server span is one.
        let span = attempt_span(parent, method, &url, path_and_query, &self.target, resend);
        let started = Instant::now();
        let mut cancelled = CancelledAttempt { span: &span, started, finished: false };
        let result = self.send(method, url, addr, body, &span, trace).await;
        cancelled.finished = true;
        if span.is_recording() {
            span.set(Attr::new("duration_ms", started.elapsed().as_millis() as i64));
        }
        match &result {
            Ok(resp) if span.is_recording() => {
                span.set(Attr::new("http.response.status_code", i64::from(resp.status.as_u16())));
                if let Some(pod) = &resp.pod {
                    span.set(Attr::new("graceful.peer.pod", pod));
                }
            }
            Ok(_) => {}
            Err(e) => {
                span.set(Attr::new("error.type", e.kind.as_str()));
                span.set_error("");
                if let Some(s) = e.status {
                    span.set(Attr::new("http.response.status_code", i64::from(s)));
                }
                let (span_id, span_name) = span.log_ids();
                tracing::warn!(
                    trace_id = trace.as_ref().map(RequestTrace::hex),
                    span_id,
                    span.name = span_name,
                    error.type = e.kind.as_str(),
                    detail = %e.detail,
                    "upstream attempt failed"
                );
                span.event(
                    "upstream attempt failed",
                    &[Attr::new("error.type", e.kind.as_str()), Attr::new("detail", &e.detail)],
                );
            }
        }
        span.end();
        result
    }

    async fn send(
        &self,
        method: &Method,
        url: String,
        addr: Option<SocketAddr>,
        body: Bytes,
        span: &RequestSpan,
        trace: Option<RequestTrace>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let mut req = self.client.request(method.clone(), url);
        if let Some(pod) = &self.pod {
            req = req.insert_header((POD_HEADER_NAME, pod.clone()));
        }
        if let Some(a) = addr {
            req = req.address(a);
        }
        for (k, v) in telemetry::inject(span, trace).into_iter().flatten() {
            req = req.insert_header((k, v));
        }
        let resp = req.send_body(body).await.map_err(classify_send)?;
        let status = resp.status();
        let pod = resp.headers().get(POD_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let expected: Option<usize> =
            resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let body_timeout = if self.timeouts { self.cfg.attempt_timeout } else { UNBOUNDED };
        let mut resp = resp.timeout(body_timeout);
        let body = resp.body().limit(BODY_LIMIT).await.map_err(classify_payload)?;
        // A FIN mid-body can come back as Ok with a short body.
        if let Some(n) = expected {
            if body.len() < n {
                return Err(UpstreamError::new(
                    ErrorType::BodyIncomplete,
                    format!("got {} of {n} body bytes", body.len()),
                ));
            }
        }
        if status.is_server_error() {
            return Err(UpstreamError {
                kind: ErrorType::Http5xx,
                detail: format!("backend answered {status}"),
                status: Some(status.as_u16()),
            });
        }
        Ok(UpstreamResponse { status, body, pod })
    }
}

/// The client span of one attempt, under the request's server span (none when that is none).
fn attempt_span(
    parent: &RequestSpan,
    method: &Method,
    url: &str,
    path_and_query: &str,
    target: &Target,
    resend: usize,
) -> RequestSpan {
    if !parent.is_recording() {
        return RequestSpan::none();
    }
    let path = path_and_query.split('?').next().unwrap_or(path_and_query);
    let attributes = [
        Attr::new("http.request.method", method.as_str()),
        Attr::new("url.full", url),
        Attr::new("server.address", &target.host),
        Attr::new("server.port", i64::from(target.port)),
        Attr::new("http.request.resend_count", resend as i64),
        Attr::new("network.peer.address", target.addr_text.as_deref().unwrap_or_default()),
    ];
    let n = if target.addr_text.is_some() { 6 } else { 5 };
    let name = crate::request_span::http_span_name(method.as_str(), path);
    parent.child("upstream attempt", name, SpanKind::Client, &attributes[..n])
}

/// The overall deadline cancels an attempt by dropping its future: the attempt span must still
/// end with an error, or the trace would show an attempt that simply stopped.
struct CancelledAttempt<'a> {
    span: &'a RequestSpan,
    started: Instant,
    finished: bool,
}

impl Drop for CancelledAttempt<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.span.set(Attr::new("duration_ms", self.started.elapsed().as_millis() as i64));
            self.span.set(Attr::new("error.type", ErrorType::DeadlineExceeded.as_str()));
            self.span.set_error("");
            self.span.end();
        }
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
}

/// Maps awc's errors onto the closed set (see NOTES: a server closing after reading the request
/// surfaces as `Connect(Disconnected)`).
pub fn classify_send(e: SendRequestError) -> UpstreamError {
    let detail = e.to_string();
    let kind = match &e {
        SendRequestError::Connect(ConnectError::Io(io)) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            ErrorType::ConnectionRefused
        }
        SendRequestError::Connect(ConnectError::Io(io)) if is_reset(io) => ErrorType::ConnectionReset,
        SendRequestError::Connect(ConnectError::Timeout) => ErrorType::Timeout,
        SendRequestError::Connect(ConnectError::Disconnected) => ErrorType::ClosedBeforeResponse,
        SendRequestError::Connect(_) => ErrorType::ConnectFailed,
        SendRequestError::Send(io) if is_reset(io) => ErrorType::ConnectionReset,
        SendRequestError::Send(_) => ErrorType::ClosedBeforeResponse,
        SendRequestError::Response(actix_http::error::ParseError::Io(io)) if is_reset(io) => ErrorType::ConnectionReset,
        SendRequestError::Response(_) => ErrorType::ClosedBeforeResponse,
        SendRequestError::Timeout => ErrorType::Timeout,
        _ => ErrorType::ConnectFailed,
    };
    UpstreamError::new(kind, detail)
}

fn classify_payload(e: PayloadError) -> UpstreamError {
    let detail = e.to_string();
    let kind = match &e {
        PayloadError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => ErrorType::Timeout,
        PayloadError::Io(io) if is_reset(io) => ErrorType::ConnectionReset,
        _ if detail.to_ascii_lowercase().contains("timeout") => ErrorType::Timeout,
        _ => ErrorType::BodyIncomplete,
    };
    UpstreamError::new(kind, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes_map_to_honest_statuses() {
        assert_eq!(ErrorType::ConnectionRefused.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(ErrorType::ConnectionReset.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(ErrorType::Timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(ErrorType::DeadlineExceeded.status(), StatusCode::GATEWAY_TIMEOUT);
        let backend = |s| UpstreamError { kind: ErrorType::Http5xx, detail: String::new(), status: Some(s) };
        assert_eq!(backend(503).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(backend(500).status(), StatusCode::BAD_GATEWAY);
        assert_eq!(backend(504).status(), StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn only_listed_5xx_are_retryable() {
        let e = |s| UpstreamError { kind: ErrorType::Http5xx, detail: String::new(), status: Some(s) };
        let gateway = crate::config::Upstream::default().retry_on;
        assert!(e(502).retryable(&gateway) && e(503).retryable(&gateway) && e(504).retryable(&gateway));
        assert!(!e(500).retryable(&gateway));
        assert!(e(500).retryable(&[500, 503]) && !e(502).retryable(&[500, 503]));
        assert!(UpstreamError::new(ErrorType::ConnectionRefused, "").retryable(&gateway));
        assert!(!UpstreamError::new(ErrorType::DeadlineExceeded, "").retryable(&gateway));
    }

    #[test]
    fn classifies_refused_connect() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = classify_send(SendRequestError::Connect(ConnectError::Io(io)));
        assert_eq!(e.kind, ErrorType::ConnectionRefused);
        let e = classify_send(SendRequestError::Connect(ConnectError::Disconnected));
        assert_eq!(e.kind, ErrorType::ClosedBeforeResponse);
        assert_eq!(classify_send(SendRequestError::Timeout).kind, ErrorType::Timeout);
    }
}
