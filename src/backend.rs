//! The upstream service: `/api/data` does simulated work; task-03 endpoints for compatibility.

use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use actix_web::{web, HttpRequest, HttpResponse};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::Config;
use crate::identity::Identity;
use crate::server::{self, Ctx, Listeners, Shared};

/// Longest work a caller may ask for with `?work_ms=`, so no request can pin a pod forever.
const MAX_WORK: Duration = Duration::from_secs(60);
/// Game-over records kept in memory.
const MAX_RECORDS: usize = 1000;

struct BackendState {
    code: String,
    game_over: Mutex<Vec<GameOver>>,
}

#[derive(Debug, Clone, Serialize)]
struct GameOver {
    from: String,
    peer: String,
    at: String,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WorkQuery {
    work_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
struct GameOverBody {
    #[serde(alias = "pod", alias = "name")]
    from: Option<String>,
    message: Option<String>,
}

pub fn run(config: Config) -> ExitCode {
    let listeners = Listeners {
        public: config.backend.listen,
        public_key: "backend.listen",
        admin: config.backend.admin_listen,
        admin_key: "backend.admin_listen",
    };
    let ctx = Ctx::new("backend", config, Identity::from_env());
    let state = web::Data::new(BackendState {
        code: format!("BACKEND-{:04}", rand::rng().random_range(0..10_000)),
        game_over: Mutex::new(Vec::new()),
    });
    let body_limit = ctx.config.backend.game_over_body_limit;
    server::run(ctx, listeners, move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(state.clone())
            .app_data(web::PayloadConfig::new(body_limit))
            .route("/api/data", web::get().to(api_data))
            .route("/api/data", web::post().to(api_data))
            .route("/get-config", web::get().to(get_config))
            .route("/ping", web::get().to(ping))
            .route("/game-over", web::post().to(game_over))
            .route("/game-over", web::get().to(game_over_list))
            .route("/health", web::get().to(server::health_as_readiness));
    })
}

async fn api_data(ctx: Shared, q: web::Query<WorkQuery>) -> HttpResponse {
    let b = &ctx.config.backend;
    let work = match q.work_ms {
        Some(ms) => Duration::from_millis(ms).min(MAX_WORK),
        None if b.work_max > b.work_min => rand::rng().random_range(b.work_min..=b.work_max),
        None => b.work_min,
    };
    simulate_work(work).await;
    HttpResponse::Ok().json(Work {
        phase: ctx.lifecycle.phase(),
        pod: &ctx.identity.pod_name,
        timestamp: humantime::format_rfc3339_millis(SystemTime::now()),
        work_ms: work.as_millis() as u64,
    })
}

/// `/api/data`'s answer, typed (no map built per request), keys in the order `json!` gave them.
#[derive(Serialize)]
struct Work<'a> {
    phase: crate::lifecycle::Phase,
    pod: &'a str,
    #[serde(serialize_with = "serialize_display")]
    timestamp: humantime::Rfc3339Timestamp,
    work_ms: u64,
}

fn serialize_display<S: serde::Serializer>(v: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Waits `work`. Zero work touches no timer: even a 0 ms sleep waits for the timer's next tick
/// (about 1 ms), which capped the backend near 13 000 req/s with the CPU mostly idle.
async fn simulate_work(work: Duration) {
    if !work.is_zero() {
        tokio::time::sleep(work).await;
    }
}

async fn get_config(state: web::Data<BackendState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"code": state.code, "status": "ready"}))
}

async fn ping(ctx: Shared) -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "pong", "pod": ctx.identity.pod_name}))
}

async fn game_over(ctx: Shared, state: web::Data<BackendState>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    // The body is optional: JSON {"from": ..., "message": ...} or plain text.
    let parsed: GameOverBody = if body.is_empty() {
        GameOverBody::default()
    } else {
        serde_json::from_slice(&body).unwrap_or_else(|_| GameOverBody {
            from: None,
            message: Some(String::from_utf8_lossy(&body).chars().take(256).collect()),
        })
    };
    let peer = req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let from = parsed
        .from
        .or_else(|| req.headers().get(server::POD_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string))
        .unwrap_or_else(|| peer.clone());
    let record = GameOver {
        from: from.chars().take(253).collect(),
        peer,
        at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        message: parsed.message,
    };
    ctx.metrics.game_over.inc();
    // Not `message`: that name is the log line's own text in JSON logs.
    let note = record.message.as_deref().unwrap_or("");
    tracing::info!(from = %record.from, peer = %record.peer, note, "game over");
    let count = {
        let mut list = state.game_over.lock().unwrap();
        if list.len() >= MAX_RECORDS {
            list.remove(0);
        }
        list.push(record.clone());
        list.len()
    };
    HttpResponse::Ok()
        .json(json!({"status": "recorded", "record": record, "count": count, "pod": ctx.identity.pod_name}))
}

async fn game_over_list(state: web::Data<BackendState>) -> HttpResponse {
    let list = state.game_over.lock().unwrap().clone();
    HttpResponse::Ok().json(json!({"count": list.len(), "records": list}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime without a timer panics on any sleep, so zero work passing here proves it never
    /// waits for a tick.
    #[test]
    fn zero_work_never_touches_the_timer() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(simulate_work(Duration::ZERO));
        let timed = std::panic::catch_unwind(|| {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(simulate_work(Duration::from_millis(1)));
        });
        assert!(timed.is_err(), "the check itself can fail: real work needs the timer");
    }
}
