//! Prometheus metrics (`/metrics` on the admin port).

use std::borrow::Cow;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::lifecycle::Phase;

/// Counted on every request: no label is allocated that need not be (the method is `'static`
/// for the usual ones).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: Cow<'static, str>,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `ok` or an `error.type` value.
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub in_flight: Gauge,
    pub phase: Family<PhaseLabels, Gauge>,
    pub upstream_attempts: Family<AttemptLabels, Counter>,
    pub retries: Counter,
    pub game_over: Counter,
    pub dropped: Counter,
}

impl Metrics {
    pub fn new(role: &str) -> Self {
        let mut root = Registry::with_prefix("graceful");
        let registry = root.sub_registry_with_label(("role".into(), role.to_string().into()));
        let requests = Family::<RequestLabels, Counter>::default();
        let in_flight = Gauge::default();
        let phase = Family::<PhaseLabels, Gauge>::default();
        let upstream_attempts = Family::<AttemptLabels, Counter>::default();
        let retries = Counter::default();
        let game_over = Counter::default();
        let dropped = Counter::default();
        registry.register("http_requests", "HTTP requests served, by route and status", requests.clone());
        registry.register("http_requests_in_flight", "HTTP requests being served", in_flight.clone());
        registry.register("shutdown_phase", "1 for the current lifecycle phase", phase.clone());
        registry.register("upstream_attempts", "Upstream attempts by outcome", upstream_attempts.clone());
        registry.register("upstream_retries", "Upstream retries (attempts after the first)", retries.clone());
        registry.register("game_over", "game-over notifications received", game_over.clone());
        registry.register(
            "requests_dropped",
            "Requests dropped at exit: a naive (non-graceful) exit, or shutdown_timeout reached",
            dropped.clone(),
        );
        let m = Metrics { registry: root, requests, in_flight, phase, upstream_attempts, retries, game_over, dropped };
        m.set_phase(Phase::Starting);
        m
    }

    pub fn set_phase(&self, current: Phase) {
        for p in Phase::ALL {
            self.phase.get_or_create(&PhaseLabels { phase: p.as_str() }).set(i64::from(p == current));
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_role_and_phase() {
        let m = Metrics::new("backend");
        m.set_phase(Phase::Draining);
        m.requests.get_or_create(&RequestLabels { method: "GET".into(), route: "/api/data".into(), status: 200 }).inc();
        let text = m.render();
        assert!(text.contains(r#"graceful_shutdown_phase{role="backend",phase="draining"} 1"#), "{text}");
        assert!(text.contains(r#"graceful_shutdown_phase{role="backend",phase="serving"} 0"#), "{text}");
        assert!(text.contains("graceful_http_requests_total{"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
