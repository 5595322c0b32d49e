//! The built-in load source: an open-model generator (constant arrival rate, so a stalled server
//! cannot slow the offered load and hide errors) through the frontend Service, with a keep-alive
//! connection pool like real clients keep: idle connections are reused (most recent first),
//! checked for a peer close before reuse, and dropped after `pool_idle`, below the servers'
//! keep-alive. Every request carries its own W3C `traceparent` so the pods' spans join it.
//!
//! Hook for other load sources (k6): anything that yields `RequestRecord`s for requests sent to
//! the frontend Service address can feed `scenario`, which only needs a `LoadRun`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::lab::api::cluster::{ser_ms, Clock};
use crate::lab::network::http_client::{self, Conn, HttpError};
use crate::lab::network::service_proxy::{Outcome as ProxyOutcome, ProxyLog};

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: SocketAddr,
    /// Host header (the Service name, as an ingress would forward it).
    pub host: String,
    pub path: String,
    /// Requests per second.
    pub rate: f64,
    /// Per request, from its scheduled start: connect, send and the whole response.
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub pool_idle: Duration,
}

/// What the client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// Refused: on a fresh connection, no endpoint or the pod's address refused.
    Refused,
    /// Reset by the peer before a complete response.
    Reset,
    /// Closed (FIN) before any response byte.
    Closed,
    /// The connection went to a pod whose address was gone: it hung, then "no route to host".
    Unreachable,
    Timeout,
    /// An HTTP error status (5xx, or 4xx).
    Http(u16),
    /// A response arrived, but short, malformed, or this project's JSON not saying `"status":"ok"`.
    BadBody,
    /// The generator itself had too many requests in flight (counted, never hidden).
    Overload,
}

impl Outcome {
    pub fn is_ok(self) -> bool {
        self == Outcome::Ok
    }

    pub fn class(self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Refused => "refused".into(),
            Outcome::Reset => "reset".into(),
            Outcome::Closed => "closed".into(),
            Outcome::Unreachable => "unreachable".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Http(c) => format!("http_{c}"),
            Outcome::BadBody => "bad_body".into(),
            Outcome::Overload => "overload".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub id: u64,
    /// Scheduled start, from the run's start.
    #[serde(serialize_with = "ser_ms", rename = "start_ms")]
    pub start: Duration,
    #[serde(serialize_with = "ser_ms", rename = "latency_ms")]
    pub latency: Duration,
    #[serde(serialize_with = "ser_outcome")]
    pub outcome: Outcome,
    pub status: Option<u16>,
    /// The frontend's error class from a JSON error body, or the client's own error.
    pub error: Option<String>,
    pub retries: u32,
    pub trace_id: String,
    /// The local socket that carried it (joins the Service proxy's record).
    pub local: Option<SocketAddr>,
    pub reused: bool,
    pub frontend_pod: Option<String>,
    pub backend_pod: Option<String>,
}

impl RequestRecord {
    /// A record with what every source knows; the optional details start empty.
    pub fn new(id: u64, start: Duration, latency: Duration, outcome: Outcome) -> RequestRecord {
        RequestRecord {
            id,
            start,
            latency,
            outcome,
            status: None,
            error: None,
            retries: 0,
            trace_id: String::new(),
            local: None,
            reused: false,
            frontend_pod: None,
            backend_pod: None,
        }
    }
}

fn ser_outcome<S: serde::Serializer>(o: &Outcome, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&o.class())
}

/// Counters for the progress line.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub in_flight: AtomicU64,
}

/// A running load source.
pub struct LoadRun {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<RequestRecord>>,
    pub stats: Arc<LiveStats>,
}

impl LoadRun {
    /// Stops issuing requests, waits for those in flight (each bounded by its timeout).
    pub async fn finish(self) -> Vec<RequestRecord> {
        self.stop.send_replace(true);
        self.task.await.unwrap_or_default()
    }
}

type Pool = Arc<Mutex<Vec<Conn>>>;

pub fn start(cfg: LoadConfig, clock: Clock, proxy: Option<Arc<ProxyLog>>) -> LoadRun {
    let (stop, stop_rx) = watch::channel(false);
    let stats = Arc::new(LiveStats::default());
    let task = tokio::spawn(generate(cfg, clock, proxy, stop_rx, stats.clone()));
    LoadRun { stop, task, stats }
}

async fn generate(
    cfg: LoadConfig,
    clock: Clock,
    proxy: Option<Arc<ProxyLog>>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<LiveStats>,
) -> Vec<RequestRecord> {
    let pool: Pool = Arc::default();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t0 = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / cfg.rate.max(0.001));
    let cfg = Arc::new(cfg);
    let mut records = Vec::new();
    let mut id: u64 = 0;
    loop {
        let due = t0 + interval.mul_f64(id as f64);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        // Drain finished ones as we go so memory stays flat.
        while let Ok(r) = rx.try_recv() {
            records.push(r);
        }
        let start = clock.at(due);
        stats.sent.fetch_add(1, Ordering::Relaxed);
        if stats.in_flight.load(Ordering::Relaxed) as usize >= cfg.max_in_flight {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            records.push(RequestRecord::new(id, start, Duration::ZERO, Outcome::Overload));
        } else {
            stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let (cfg, pool, proxy, stats, tx, clock) =
                (cfg.clone(), pool.clone(), proxy.clone(), stats.clone(), tx.clone(), clock);
            tokio::spawn(async move {
                let r = one_request(id, start, due, &cfg, &pool, proxy.as_deref(), &clock).await;
                if !r.outcome.is_ok() {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                }
                stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                let _ = tx.send(r);
            });
        }
        id += 1;
    }
    drop(tx);
    // Every request task ends within its own timeout; the margin only guards against bugs.
    let until = tokio::time::Instant::now() + cfg.timeout + Duration::from_secs(2);
    while let Ok(Some(r)) = tokio::time::timeout_at(until, rx.recv()).await {
        records.push(r);
    }
    records.sort_by_key(|r| r.id);
    records
}

fn take_idle(pool: &Pool, idle: Duration) -> Option<Conn> {
    let mut p = pool.lock().unwrap();
    while let Some(c) = p.pop() {
        if c.last_used.elapsed() < idle && !c.is_stale() {
            return Some(c);
        }
    }
    None
}

fn hex_id(bytes: usize) -> String {
    let mut out = String::new();
    while out.len() < bytes * 2 {
        out.push_str(&format!("{:016x}", rand::random::<u64>().max(1)));
    }
    out.truncate(bytes * 2);
    out
}

async fn one_request(
    id: u64,
    start: Duration,
    due: tokio::time::Instant,
    cfg: &LoadConfig,
    pool: &Pool,
    proxy: Option<&ProxyLog>,
    clock: &Clock,
) -> RequestRecord {
    let trace_id = hex_id(16);
    let traceparent = format!("00-{trace_id}-{}-01", hex_id(8));
    let mut rec = RequestRecord { trace_id, ..RequestRecord::new(id, start, Duration::ZERO, Outcome::Timeout) };
    let deadline = due + cfg.timeout;
    let request = http_client::get(&cfg.host, &cfg.path, &[("traceparent", &traceparent)], false);
    let conn = match take_idle(pool, cfg.pool_idle) {
        Some(c) => {
            rec.reused = true;
            Ok(c)
        }
        None => match tokio::time::timeout_at(deadline, Conn::connect_traced(cfg.target)).await {
            Ok((local, r)) => {
                rec.local = local;
                r
            }
            Err(_) => Err(HttpError::Connect(std::io::Error::from(std::io::ErrorKind::TimedOut))),
        },
    };
    let result = match conn {
        Ok(mut conn) => {
            rec.local = Some(conn.local);
            match tokio::time::timeout_at(deadline, conn.send(&request)).await {
                Ok(Ok(resp)) => {
                    if resp.keep_alive {
                        pool.lock().unwrap().push(conn);
                    }
                    Ok(resp)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(HttpError::Io(std::io::Error::from(std::io::ErrorKind::TimedOut))),
            }
        }
        Err(e) => Err(e),
    };
    rec.latency = tokio::time::Instant::now().saturating_duration_since(due);
    rec.outcome = match result {
        Ok(resp) => classify_response(&mut rec, &resp),
        Err(e) => {
            let o = classify_error(&rec, &e, proxy, clock);
            rec.error = Some(e.to_string());
            o
        }
    };
    rec
}

fn classify_response(rec: &mut RequestRecord, resp: &http_client::Response) -> Outcome {
    rec.status = Some(resp.status);
    let json: Option<serde_json::Value> = serde_json::from_slice(&resp.body).ok();
    if let Some(j) = &json {
        rec.retries = j.get("retries").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        rec.frontend_pod = j.get("pod").and_then(|v| v.as_str()).map(str::to_string);
        rec.backend_pod = j.pointer("/backend/pod").and_then(|v| v.as_str()).map(str::to_string);
        rec.error = j.get("error").and_then(|v| v.as_str()).map(str::to_string);
    }
    if resp.status >= 400 {
        return Outcome::Http(resp.status);
    }
    answered_ok(json.as_ref())
}

/// A 2xx/3xx answer is a success, unless it is this project's JSON (it has a `status`) saying
/// something other than `ok`. Any other service's body (`--runtime oci` runs any image) counts
/// as its own success, as a load balancer's health check would.
fn answered_ok(json: Option<&serde_json::Value>) -> Outcome {
    match json.and_then(|j| j.get("status")) {
        Some(s) if s.as_str() != Some("ok") => Outcome::BadBody,
        _ => Outcome::Ok,
    }
}

fn classify_error(rec: &RequestRecord, e: &HttpError, proxy: Option<&ProxyLog>, clock: &Clock) -> Outcome {
    // A fresh connection the Service proxy refused (no endpoint, or the pod's address refused)
    // is what iptables shows as "connection refused".
    let proxy_said = || -> Option<ProxyOutcome> {
        if rec.reused {
            return None;
        }
        let (local, log) = rec.local.zip(proxy)?;
        log.lookup(local, clock.now()).map(|r| r.outcome)
    };
    match e {
        HttpError::Connect(io) if io.kind() == std::io::ErrorKind::TimedOut => Outcome::Timeout,
        // The kernel's own verdicts (the kernel node): no route to the pod's address.
        HttpError::Connect(io) if matches!(io.raw_os_error(), Some(libc::EHOSTUNREACH | libc::ENETUNREACH)) => {
            Outcome::Unreachable
        }
        // Accepted and reset at once by the proxy: still a refusal.
        HttpError::Connect(_) => match proxy_said() {
            Some(ProxyOutcome::Blackholed) => Outcome::Unreachable,
            _ => Outcome::Refused,
        },
        HttpError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => Outcome::Timeout,
        HttpError::Reset { got_bytes: false } | HttpError::Closed { got_bytes: false } => match proxy_said() {
            Some(ProxyOutcome::Refused | ProxyOutcome::NoEndpoints) => Outcome::Refused,
            Some(ProxyOutcome::Blackholed) => Outcome::Unreachable,
            _ if matches!(e, HttpError::Reset { .. }) => Outcome::Reset,
            _ => Outcome::Closed,
        },
        HttpError::Reset { .. } => Outcome::Reset,
        HttpError::Closed { got_bytes: true } | HttpError::BodyIncomplete | HttpError::Malformed(_) => Outcome::BadBody,
        HttpError::Io(_) => Outcome::Reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_services_answer_is_ok_but_ours_must_say_ok() {
        assert_eq!(answered_ok(None), Outcome::Ok);
        assert_eq!(answered_ok(Some(&serde_json::json!({"hello": 1}))), Outcome::Ok);
        assert_eq!(answered_ok(Some(&serde_json::json!({"status": "ok"}))), Outcome::Ok);
        assert_eq!(answered_ok(Some(&serde_json::json!({"status": "degraded"}))), Outcome::BadBody);
    }

    #[tokio::test]
    async fn keeps_the_rate_and_reads_the_json() {
        let body = r#"{"status":"ok","pod":"fe-1","backend":{"pod":"be-1"},"retries":1}"#;
        let (addr, server) = crate::lab::network::fixed_http_server(body).await;
        let cfg = LoadConfig {
            target: addr,
            host: "svc".into(),
            path: "/api/data".into(),
            rate: 200.0,
            timeout: Duration::from_secs(2),
            max_in_flight: 100,
            pool_idle: Duration::from_secs(3),
        };
        let run = start(cfg, Clock::new(), None);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let recs = run.finish().await;
        assert!((90..=110).contains(&recs.len()), "{} requests in 0.5 s at 200/s", recs.len());
        assert!(recs.iter().all(|r| r.outcome == Outcome::Ok && r.retries == 1));
        assert_eq!(recs[5].backend_pod.as_deref(), Some("be-1"));
        assert!(recs.iter().filter(|r| r.reused).count() > recs.len() / 2, "keep-alive is used");
        server.abort();
    }

    #[tokio::test]
    async fn refused_and_timeouts_are_classified() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hang = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (s, _) = l.accept().await.unwrap();
                held.push(s);
            }
        });
        for (target, want) in [(dead, Outcome::Refused), (hang, Outcome::Timeout)] {
            let cfg = LoadConfig {
                target,
                host: "svc".into(),
                path: "/".into(),
                rate: 20.0,
                timeout: Duration::from_millis(300),
                max_in_flight: 100,
                pool_idle: Duration::from_secs(3),
            };
            let run = start(cfg, Clock::new(), None);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let recs = run.finish().await;
            assert!(!recs.is_empty() && recs.iter().all(|r| r.outcome == want), "{recs:?}");
        }
    }
}
