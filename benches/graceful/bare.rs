//! Reference servers built into the benchmark: a bare actix-web handler, and a bare
//! actix → awc → actix hop in front of it. No retry, timeouts, metrics, lifecycle or tracing:
//! what this stack costs on this machine, so each graceful hop can be read against it.
//!
//! They run as child processes of the bench binary itself (`--bare-serve ROLE`), so their CPU is
//! read per process exactly like the real roles'.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::SystemTime;

use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::json;

/// As the binary under test: two workers (`server.workers`' default).
const WORKERS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BareRole {
    /// `/api/data` answers the backend's JSON body itself
    Backend,
    /// `/api/data` relays the upstream's `/api/data` through awc
    Frontend,
}

impl BareRole {
    pub fn flag(self) -> &'static str {
        match self {
            BareRole::Backend => "backend",
            BareRole::Frontend => "frontend",
        }
    }
}

/// Serves until killed; prints a `serving` JSON line naming its address (the harness reads it).
pub fn serve(role: BareRole, upstream: Option<SocketAddr>) -> ExitCode {
    if role == BareRole::Frontend && upstream.is_none() {
        eprintln!("graceful bench: --bare-serve frontend needs --bare-upstream ADDR");
        return ExitCode::from(2);
    }
    let url = upstream.map(|a| format!("http://{a}/api/data")).unwrap_or_default();
    let result = actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            let app = App::new();
            match role {
                BareRole::Backend => app.route("/api/data", web::get().to(bare_data)),
                // awc::Client is not Send: one per worker, built in the worker.
                BareRole::Frontend => app
                    .app_data(web::Data::new(awc::Client::default()))
                    .app_data(web::Data::new(url.clone()))
                    .route("/api/data", web::get().to(relay)),
            }
        })
        .workers(WORKERS)
        .disable_signals()
        .bind(("127.0.0.1", 0))?;
        let addr = server.addrs()[0];
        let line = json!({"message": "serving", "listen": addr.to_string(), "admin": addr.to_string()});
        let mut out = std::io::stdout();
        writeln!(out, "{line}")?;
        out.flush()?;
        server.run().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("graceful bench: bare {}: {e}", role.flag());
            ExitCode::FAILURE
        }
    }
}

/// The same body the backend builds at 0 ms of work, so the comparison is of the server.
async fn bare_data() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "pod": "bare",
        "work_ms": 0,
        "timestamp": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "phase": "serving",
    }))
}

async fn relay(client: web::Data<awc::Client>, url: web::Data<String>) -> HttpResponse {
    match client.get(url.as_str()).send().await {
        Ok(mut res) => match res.body().await {
            Ok(body) => HttpResponse::build(res.status()).content_type("application/json").body(body),
            Err(e) => HttpResponse::BadGateway().body(e.to_string()),
        },
        Err(e) => HttpResponse::BadGateway().body(e.to_string()),
    }
}
