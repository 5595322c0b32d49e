//! Head sampling: whether a request is traced is decided once, from its `traceparent` and the
//! configured sampler (`OTEL_TRACES_SAMPLER[_ARG]`), before any span data is built.
//!
//! A sampled request gets its spans as before. An unsampled one gets none at all: nothing for
//! the OpenTelemetry layer to build, record or activate, nothing for the log layer to format. It
//! keeps a trace id (the caller's, or a new random one) for its response header, its bodies and
//! log lines, and passes it on in `traceparent` with the sampled flag off, so the next hop makes
//! the same decision and the ids still join up.

use std::str::FromStr;

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState};
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

/// The caller's context from its W3C `traceparent` (and `tracestate`), read by the letter of the
/// spec: `version-traceid-parentid-flags`, lowercase hex of exactly 2, 32, 16 and 2 digits, ids
/// not all zero, version `ff` refused, and a later version's extra fields ignored. An empty
/// context when there is none or it is malformed (the request then starts a trace of its own).
/// Not the SDK's propagator: it splits into a `Vec`, parses each part through `from_str_radix`
/// and costs ~4 k instructions on every request, sampled or not.
pub fn caller_context(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    match traceparent.and_then(|tp| parse_traceparent(tp.trim())) {
        Some((trace_id, span_id, flags)) => {
            // A malformed tracestate is dropped, the traceparent still holds (as the SDK does).
            let state = tracestate.and_then(|s| TraceState::from_str(s).ok()).unwrap_or_default();
            Context::new().with_remote_span_context(SpanContext::new(trace_id, span_id, flags, true, state))
        }
        None => Context::new(),
    }
}

fn parse_traceparent(tp: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let b = tp.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = hex_u128(&b[0..2])? as u8;
    // Version 00 is exactly 55 characters; a later one may add fields after a dash.
    if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    let trace_id = hex_u128(&b[3..35])?;
    let span_id = hex_u128(&b[36..52])? as u64;
    let flags = hex_u128(&b[53..55])? as u8;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    // Flags other than `sampled` are accepted and cleared.
    Some((TraceId::from(trace_id), SpanId::from(span_id), TraceFlags::new(flags) & TraceFlags::SAMPLED))
}

/// Lowercase hex digits only (the spec refuses uppercase); at most 32 of them.
fn hex_u128(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |acc, d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(v))
    })
}

/// `traceparent` (version 00) naming `sc` as the parent.
pub fn traceparent(sc: &SpanContext) -> String {
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    hex_into(&sc.trace_id().to_bytes(), &mut out[3..35]);
    out[35] = b'-';
    hex_into(&sc.span_id().to_bytes(), &mut out[36..52]);
    out[52] = b'-';
    hex_into(&[sc.trace_flags().to_u8()], &mut out[53..55]);
    String::from_utf8(out.to_vec()).unwrap_or_default()
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

    /// The SDK's propagator, the reference for well-formed headers.
    fn sdk_reads(tp: &str, ts: Option<&str>) -> SpanContext {
        use opentelemetry::propagation::TextMapPropagator;
        use opentelemetry_sdk::propagation::TraceContextPropagator;
        let mut headers = std::collections::HashMap::from([("traceparent".to_string(), tp.to_string())]);
        if let Some(ts) = ts {
            headers.insert("tracestate".to_string(), ts.to_string());
        }
        TraceContextPropagator::new().extract(&headers).span().span_context().clone()
    }

    fn ours(tp: &str, ts: Option<&str>) -> SpanContext {
        caller_context(Some(tp), ts).span().span_context().clone()
    }

    #[test]
    fn well_formed_traceparents_read_as_the_sdk_reads_them() {
        let mut rng = rand::rng();
        let mut cases = vec![
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(), None),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".to_string(), Some("vendor=x,other=y")),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff".to_string(), Some("not a state")),
            ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-future".to_string(), None),
            (" 00-00000000000000000000000000000001-0000000000000001-01 ".to_string(), None),
        ];
        for _ in 0..500 {
            let (t, s, f): (u128, u64, u8) =
                (rand::Rng::random(&mut rng), rand::Rng::random(&mut rng), rand::Rng::random(&mut rng));
            cases.push((format!("00-{t:032x}-{s:016x}-{f:02x}"), None));
        }
        for (tp, ts) in &cases {
            let (a, b) = (ours(tp, *ts), sdk_reads(tp, *ts));
            assert!(b.is_valid(), "{tp}");
            assert_eq!(a, b, "{tp} {ts:?}");
            assert!(a.is_remote());
        }
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for tp in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902g7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!ours(tp, None).is_valid(), "{tp:?} must be refused");
        }
        assert!(!caller_context(None, Some("a=b")).span().span_context().is_valid());
    }

    #[test]
    fn a_written_traceparent_reads_back_through_the_sdk() {
        let sc = ours("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None);
        assert_eq!(traceparent(&sc), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(sdk_reads(&traceparent(&sc), None), sc);
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
