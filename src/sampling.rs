//! Head sampling: whether a request is traced is decided once, from its `traceparent` and the
//! configured sampler (`OTEL_TRACES_SAMPLER[_ARG]`), before any span data is built.
//!
//! A sampled request gets its spans as before. An unsampled one gets none at all: nothing for
//! the OpenTelemetry layer to build, record or activate, nothing for the log layer to format. It
//! keeps a trace id (the caller's, or a new random one) for its response header, its bodies and
//! log lines, and passes it on in `traceparent` with the sampled flag off, so the next hop makes
//! the same decision and the ids still join up.

use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample};

use crate::config::Config;

/// The sampler `telemetry.sampler` / `telemetry.sampler_arg` name, as the SDK implements it.
pub fn configured(cfg: &Config) -> Sampler {
    let ratio = cfg.telemetry.sampler_arg.unwrap_or(1.0);
    match cfg.telemetry.sampler.as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
        _ => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
    }
}

/// Decides, with the SDK's own sampler, before a span exists. The tracer provider itself then
/// samples everything it is given (`AlwaysOn`): every span it sees was already chosen here.
#[derive(Debug)]
pub struct HeadSampler {
    sampler: Sampler,
    ids: RandomIdGenerator,
}

impl HeadSampler {
    pub fn new(sampler: Sampler) -> Self {
        HeadSampler { sampler, ids: RandomIdGenerator::default() }
    }

    /// `parent`: the caller's context as extracted from its headers (it may hold no span).
    pub fn decide(&self, parent: &Context, name: &str, kind: SpanKind) -> RequestTrace {
        let span = parent.span();
        let caller = span.span_context();
        let trace_id = if caller.is_valid() { caller.trace_id() } else { self.ids.new_trace_id() };
        let result = self.sampler.should_sample(Some(parent), trace_id, name, &kind, &[], &[]);
        RequestTrace { trace_id, sampled: result.decision == SamplingDecision::RecordAndSample }
    }

    /// A span with no caller (the process's lifecycle span).
    pub fn decide_root(&self, name: &str) -> bool {
        self.decide(&Context::new(), name, SpanKind::Internal).sampled
    }

    /// `traceparent` context for a call made by an unsampled request: its trace id, a fresh
    /// span id (no span of ours has it; the next hop sees a parent that was not recorded, as
    /// the SDK's non-recording spans do), the sampled flag off.
    pub fn unsampled_child(&self, trace: &RequestTrace) -> Context {
        let sc =
            SpanContext::new(trace.trace_id, self.ids.new_span_id(), TraceFlags::default(), false, TraceState::NONE);
        Context::new().with_remote_span_context(sc)
    }
}

/// A request's trace: decided at its start, kept in its extensions (cheap to copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestTrace {
    pub trace_id: TraceId,
    pub sampled: bool,
}

impl RequestTrace {
    /// 32 lowercase hex digits, as in `traceparent`, `x-trace-id` and the logs.
    pub fn hex(&self) -> String {
        self.trace_id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::SpanId;

    fn caller(sampled: bool) -> Context {
        let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let sc = SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            SpanId::from(7),
            flags,
            true,
            TraceState::NONE,
        );
        Context::new().with_remote_span_context(sc)
    }

    fn config(sampler: &str, arg: Option<f64>) -> Sampler {
        let mut cfg = Config::default();
        cfg.telemetry.sampler = sampler.into();
        cfg.telemetry.sampler_arg = arg;
        configured(&cfg)
    }

    #[test]
    fn parent_based_follows_the_callers_flag_and_keeps_its_trace_id() {
        let head = HeadSampler::new(config("parentbased_traceidratio", Some(0.0)));
        let on = head.decide(&caller(true), "HTTP request", SpanKind::Server);
        let off = head.decide(&caller(false), "HTTP request", SpanKind::Server);
        assert!(on.sampled && !off.sampled);
        assert_eq!(on.hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(off.trace_id, on.trace_id, "an unsampled request keeps the caller's trace id");
    }

    #[test]
    fn roots_get_a_new_trace_id_and_the_ratio_decides() {
        let none = HeadSampler::new(config("parentbased_traceidratio", Some(0.0)));
        let all = HeadSampler::new(config("parentbased_traceidratio", Some(1.0)));
        let tenth = HeadSampler::new(config("parentbased_traceidratio", Some(0.1)));
        let root = Context::new();
        let a = none.decide(&root, "HTTP request", SpanKind::Server);
        let b = none.decide(&root, "HTTP request", SpanKind::Server);
        assert!(!a.sampled && a.trace_id != TraceId::INVALID && a.trace_id != b.trace_id);
        assert!(all.decide(&root, "HTTP request", SpanKind::Server).sampled);
        let n = (0..4000).filter(|_| tenth.decide(&root, "HTTP request", SpanKind::Server).sampled).count();
        assert!((280..=520).contains(&n), "about 10 % of 4000 sampled, got {n}");
        assert!(!HeadSampler::new(config("always_off", None)).decide_root("lifecycle"));
        assert!(HeadSampler::new(config("parentbased_always_on", None)).decide_root("lifecycle"));
    }

    #[test]
    fn an_unsampled_child_carries_the_trace_id_with_the_flag_off() {
        let head = HeadSampler::new(config("parentbased_always_off", None));
        let trace = head.decide(&Context::new(), "HTTP request", SpanKind::Server);
        let (a, b) = (head.unsampled_child(&trace), head.unsampled_child(&trace));
        let (a, b) = (a.span().span_context().clone(), b.span().span_context().clone());
        assert_eq!(a.trace_id(), trace.trace_id);
        assert!(a.is_valid() && !a.is_sampled());
        assert_ne!(a.span_id(), b.span_id(), "each call gets its own parent id");
    }
}
