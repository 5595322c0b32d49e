//! The shutdown state machine shared by all roles: Starting → Serving → Draining → Stopping → Stopped.
//!
//! Draining begins at the first of SIGTERM and a preStop notification; the listener may close only
//! once SIGTERM has arrived *and* `drain_delay` has passed since draining began, so a preStop hook
//! that already held the pod in lame-duck mode does not make it wait twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::gauge::Gauge;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Serving = 1,
    Draining = 2,
    Stopping = 3,
    Stopped = 4,
}

impl Phase {
    pub const ALL: [Phase; 5] = [Phase::Starting, Phase::Serving, Phase::Draining, Phase::Stopping, Phase::Stopped];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> Phase {
        Phase::ALL[v.min(4) as usize]
    }
}

/// Why draining began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainTrigger {
    Sigterm,
    Sigint,
    PreStop,
}

impl DrainTrigger {
    pub fn event_name(self) -> &'static str {
        match self {
            DrainTrigger::Sigterm => "sigterm_received",
            DrainTrigger::Sigint => "sigint_received",
            DrainTrigger::PreStop => "prestop_received",
        }
    }
}

/// One request in flight: its server span and what it is (`GET /api/data?work_ms=3000`).
#[derive(Debug)]
pub struct Request {
    pub span: crate::request_span::RequestSpan,
    pub what: RequestLine,
}

/// A request's method and URI, written out only when a request is named (it is dropped): every
/// request is tracked, almost none is ever named.
#[derive(Debug, Clone)]
pub struct RequestLine {
    pub method: actix_web::http::Method,
    pub uri: actix_web::http::Uri,
}

impl std::fmt::Display for RequestLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.uri)
    }
}

#[derive(Debug)]
pub struct Lifecycle {
    phase: AtomicU8,
    started: Instant,
    drain_started: Mutex<Option<Instant>>,
    signalled: Mutex<Option<Instant>>,
    in_flight: Gauge,
    next_request: AtomicU64,
    /// In-flight requests, so an exit that drops them can mark their spans and name them.
    requests: Mutex<HashMap<u64, Request>>,
    changes: watch::Sender<Phase>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Lifecycle {
            phase: AtomicU8::new(Phase::Starting as u8),
            started: Instant::now(),
            drain_started: Mutex::new(None),
            signalled: Mutex::new(None),
            in_flight: Gauge::default(),
            next_request: AtomicU64::new(0),
            requests: Mutex::new(HashMap::new()),
            changes: watch::channel(Phase::Starting).0,
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::SeqCst))
    }

    /// Ready for new traffic: only while Serving.
    pub fn ready(&self) -> bool {
        self.phase() == Phase::Serving
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.changes.subscribe()
    }

    /// Moves forward only; returns whether the phase changed.
    pub fn advance(&self, to: Phase) -> bool {
        let mut cur = self.phase.load(Ordering::SeqCst);
        loop {
            if cur >= to as u8 {
                return false;
            }
            match self.phase.compare_exchange(cur, to as u8, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    self.changes.send_replace(to);
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Enters Draining (first call only returns true).
    pub fn begin_drain(&self) -> bool {
        let mut started = self.drain_started.lock().unwrap();
        if started.is_none() {
            *started = Some(Instant::now());
            drop(started);
            self.advance(Phase::Draining);
            return true;
        }
        false
    }

    /// Records the first termination signal; returns true the first time.
    pub fn signal_received(&self) -> bool {
        let mut s = self.signalled.lock().unwrap();
        if s.is_none() {
            *s = Some(Instant::now());
            return true;
        }
        false
    }

    pub fn since_signal(&self) -> Option<Duration> {
        self.signalled.lock().unwrap().map(|t| t.elapsed())
    }

    pub fn since_drain(&self) -> Option<Duration> {
        self.drain_started.lock().unwrap().map(|t| t.elapsed())
    }

    /// How long the lame-duck period still has to run before the listener may close.
    pub fn remaining_drain(&self, drain_delay: Duration) -> Duration {
        match self.since_drain() {
            Some(elapsed) => drain_delay.saturating_sub(elapsed),
            None => drain_delay,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Counts a request in flight until the guard drops (also when its future is dropped).
    pub fn track(&self, span: crate::request_span::RequestSpan, what: RequestLine) -> InFlight<'_> {
        self.in_flight.inc();
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        self.requests.lock().unwrap().insert(id, Request { span, what });
        InFlight { lifecycle: self, id }
    }

    /// Takes the requests still in flight (an exit that drops them marks and names them).
    pub fn take_in_flight(&self) -> Vec<Request> {
        self.requests.lock().unwrap().drain().map(|(_, r)| r).collect()
    }

    /// Ends a preStop drain that no signal followed: back to Serving. False once signalled.
    pub fn revert_drain(&self) -> bool {
        let signalled = self.signalled.lock().unwrap();
        let mut started = self.drain_started.lock().unwrap();
        if signalled.is_some() || started.is_none() {
            return false;
        }
        let reverted = self
            .phase
            .compare_exchange(Phase::Draining as u8, Phase::Serving as u8, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if reverted {
            *started = None;
            self.changes.send_replace(Phase::Serving);
        }
        reverted
    }

    /// Waits until no request is in flight, or `bound` passes; returns how many are left.
    pub async fn wait_idle(&self, bound: Duration) -> usize {
        self.in_flight.wait_zero(bound).await
    }
}

pub struct InFlight<'a> {
    lifecycle: &'a Lifecycle,
    id: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.lifecycle.requests.lock().unwrap().remove(&self.id);
        self.lifecycle.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let l = Lifecycle::new();
        assert_eq!(l.phase(), Phase::Starting);
        assert!(!l.ready());
        assert!(l.advance(Phase::Serving));
        assert!(l.ready());
        assert!(l.begin_drain());
        assert!(!l.begin_drain(), "draining starts once");
        assert!(!l.advance(Phase::Serving), "no way back to serving");
        assert_eq!(l.phase(), Phase::Draining);
        assert!(!l.ready());
    }

    #[test]
    fn a_prestop_drain_reverts_only_before_a_signal() {
        let l = Lifecycle::new();
        l.advance(Phase::Serving);
        assert!(!l.revert_drain(), "nothing to revert");
        l.begin_drain();
        assert!(l.revert_drain());
        assert_eq!(l.phase(), Phase::Serving);
        assert!(l.since_drain().is_none());
        l.begin_drain();
        l.signal_received();
        assert!(!l.revert_drain(), "a signalled pod never returns to serving");
        assert_eq!(l.phase(), Phase::Draining);
    }

    #[test]
    fn drain_time_counts_from_the_first_trigger() {
        let l = Lifecycle::new();
        let delay = Duration::from_millis(200);
        assert_eq!(l.remaining_drain(delay), delay);
        l.begin_drain();
        std::thread::sleep(Duration::from_millis(60));
        let left = l.remaining_drain(delay);
        assert!(left <= Duration::from_millis(140), "{left:?}");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(l.remaining_drain(delay), Duration::ZERO);
    }

    #[test]
    fn in_flight_guard_counts_and_releases_spans() {
        let l = Lifecycle::new();
        let line = |path: &str| RequestLine { method: actix_web::http::Method::GET, uri: path.parse().unwrap() };
        let g1 = l.track(crate::request_span::RequestSpan::none(), line("/a"));
        let g2 = l.track(crate::request_span::RequestSpan::none(), line("/b?x=1"));
        assert_eq!(l.in_flight(), 2);
        drop(g1);
        assert_eq!(l.in_flight(), 1);
        let left = l.take_in_flight();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].what.to_string(), "GET /b?x=1");
        drop(g2);
        assert_eq!(l.in_flight(), 0);
    }
}
