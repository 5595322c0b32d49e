//! Head sampling: whether a request is traced is decided once, from its `traceparent` and the
//! configured sampler (`OTEL_TRACES_SAMPLER[_ARG]`), before any span data is built.
//!
//! A sampled request gets its spans as before. An unsampled one gets none at all: nothing for
//! the OpenTelemetry layer to build, record or activate, nothing for the log layer to format. It
//! keeps a trace id (the caller's, or a new random one) for its response header, its bodies and
//! log lines, and passes it on in `traceparent` with the sampled flag off, so the next hop makes
//! the same decision and the ids still join up.

use opentelemetry::trace::{SpanKind, TraceContextExt, TraceId};
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
        RequestTrace::new(trace_id, result.decision == SamplingDecision::RecordAndSample)
    }

    /// A span with no caller (the process's lifecycle span).
    pub fn decide_root(&self, name: &str) -> bool {
        self.decide(&Context::new(), name, SpanKind::Internal).sampled
    }

    /// `traceparent` for a call made by an unsampled request (W3C version 00): its trace id, a
    /// fresh parent id (no span of ours has it; the next hop sees a parent that was not recorded,
    /// as with the SDK's non-recording spans), the sampled flag off. Written from the request's
    /// hex digits, not through a Context and the propagator's formatting, on every such call.
    pub fn unsampled_traceparent(&self, trace: &RequestTrace) -> String {
        let mut parent = [0u8; 16];
        hex_into(&self.ids.new_span_id().to_bytes(), &mut parent);
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        out.push_str(trace.hex());
        out.push('-');
        out.push_str(std::str::from_utf8(&parent).unwrap_or_default());
        out.push_str("-00");
        out
    }
}

/// Lowercase hex of `bytes` into `out` (twice as long): ids are formatted on every request, and
/// `format!("{:032x}")` costs several times more.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

/// A request's trace: decided at its start, kept in its extensions (cheap to copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestTrace {
    pub trace_id: TraceId,
    pub sampled: bool,
    /// The trace id's hex digits, written once: the response header, the body and the next
    /// hop's `traceparent` all need them.
    hex: [u8; 32],
}

impl RequestTrace {
    pub fn new(trace_id: TraceId, sampled: bool) -> Self {
        let mut hex = [0u8; 32];
        hex_into(&trace_id.to_bytes(), &mut hex);
        RequestTrace { trace_id, sampled, hex }
    }

    /// 32 lowercase hex digits, as in `traceparent`, `x-trace-id` and the logs.
    pub fn hex(&self) -> &str {
        std::str::from_utf8(&self.hex).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceState};

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
    fn an_unsampled_traceparent_carries_the_trace_id_with_the_flag_off() {
        use opentelemetry::propagation::TextMapPropagator;
        use opentelemetry_sdk::propagation::TraceContextPropagator;
        let head = HeadSampler::new(config("parentbased_always_off", None));
        let trace = head.decide(&Context::new(), "HTTP request", SpanKind::Server);
        assert_eq!(trace.hex(), trace.trace_id.to_string(), "the same digits as the SDK's");
        // Read back by the SDK's own propagator, as the next hop does.
        let read = |tp: String| {
            let headers = std::collections::HashMap::from([("traceparent".to_string(), tp)]);
            TraceContextPropagator::new().extract(&headers).span().span_context().clone()
        };
        let (a, b) = (read(head.unsampled_traceparent(&trace)), read(head.unsampled_traceparent(&trace)));
        assert_eq!(a.trace_id(), trace.trace_id);
        assert!(a.is_valid() && a.is_remote() && !a.is_sampled());
        assert_ne!(a.span_id(), b.span_id(), "each call gets its own parent id");
    }
}
