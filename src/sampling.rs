//! Head sampling: whether a request is traced is decided once, from its `traceparent` and the
//! configured sampler (`OTEL_TRACES_SAMPLER[_ARG]`), before any span data is built.
//!
//! A sampled request gets its spans as before. An unsampled one gets none at all: nothing for
//! the OpenTelemetry layer to build, record or activate, nothing for the log layer to format. It
//! keeps a trace id (the caller's, or a new random one) for its response header, its bodies and
//! log lines, and passes it on in `traceparent` with the sampled flag off, so the next hop makes
//! the same decision and the ids still join up.

use std::str::FromStr;

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

use crate::config::Config;

/// The configured sampler's rule, decided on plain values. The SDK's `should_sample` needs an
/// OpenTelemetry `Context` for the parent (an allocation) and returns a trace state and an
/// attribute list (more), on every request, sampled or not; these rules are the SDK's own,
/// written out (tested against its `Sampler`), for the names in `config::SAMPLERS`.
#[derive(Clone, Debug, PartialEq)]
enum Rule {
    AlwaysOn,
    AlwaysOff,
    /// Sampled when the trace id's low 63 bits fall under the bound (the SDK's ratio rule). A
    /// ratio of 1 or more gives a bound of 2^63 or more (the cast saturates): every id.
    Ratio(u64),
    /// The caller's flag when there is a caller, else the root rule.
    ParentBased(Box<Rule>),
}

impl Rule {
    fn configured(cfg: &Config) -> Rule {
        let ratio = cfg.telemetry.sampler_arg.unwrap_or(1.0);
        let by_ratio = Rule::Ratio((ratio.max(0.0) * (1u64 << 63) as f64) as u64);
        match cfg.telemetry.sampler.as_str() {
            "always_on" => Rule::AlwaysOn,
            "always_off" => Rule::AlwaysOff,
            "traceidratio" => by_ratio,
            "parentbased_always_off" => Rule::ParentBased(Box::new(Rule::AlwaysOff)),
            "parentbased_traceidratio" => Rule::ParentBased(Box::new(by_ratio)),
            _ => Rule::ParentBased(Box::new(Rule::AlwaysOn)),
        }
    }

    /// `caller_sampled`: the caller's sampled flag, when a valid caller context came in.
    fn samples(&self, caller_sampled: Option<bool>, trace_id: TraceId) -> bool {
        match self {
            Rule::AlwaysOn => true,
            Rule::AlwaysOff => false,
            Rule::Ratio(bound) => {
                let low = u64::from_be_bytes(trace_id.to_bytes()[8..].try_into().unwrap_or_default());
                low >> 1 < *bound
            }
            Rule::ParentBased(root) => caller_sampled.unwrap_or_else(|| root.samples(None, trace_id)),
        }
    }
}

/// Decides before a span exists. The tracer provider itself then samples everything it is given
/// (`AlwaysOn`): every span it sees was already chosen here.
#[derive(Debug)]
pub struct HeadSampler {
    rule: Rule,
    ids: RandomIdGenerator,
}

impl HeadSampler {
    pub fn new(cfg: &Config) -> Self {
        HeadSampler { rule: Rule::configured(cfg), ids: RandomIdGenerator::default() }
    }

    /// `caller`: the caller's context as read from its `traceparent` (none: a new trace).
    pub fn decide(&self, caller: Option<&Caller>) -> RequestTrace {
        match caller {
            Some(c) => RequestTrace::new(c.trace_id, self.rule.samples(Some(c.flags.is_sampled()), c.trace_id)),
            None => {
                let trace_id = self.ids.new_trace_id();
                RequestTrace::new(trace_id, self.rule.samples(None, trace_id))
            }
        }
    }

    /// A span with no caller (the process's lifecycle span).
    pub fn decide_root(&self) -> bool {
        self.decide(None).sampled
    }

    /// `traceparent` for a call made by an unsampled request (W3C version 00): its trace id, a
    /// fresh parent id (no span of ours has it; the next hop sees a parent that was not recorded,
    /// as with the SDK's non-recording spans), the sampled flag off. Written from the request's
    /// hex digits on the stack, on every such call.
    pub fn unsampled_traceparent(&self, trace: &RequestTrace) -> [u8; 55] {
        write_traceparent(&trace.hex, self.ids.new_span_id(), TraceFlags::default())
    }
}

/// The caller's trace context, as its W3C `traceparent` carried it (always remote).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// Only `sampled` is kept; other flags are cleared.
    pub flags: TraceFlags,
}

impl Caller {
    /// Reads a `traceparent` by the letter of the spec: `version-traceid-parentid-flags`,
    /// lowercase hex of exactly 2, 32, 16 and 2 digits, ids not all zero, version `ff` refused,
    /// and a later version's extra fields ignored. None when there is none or it is malformed
    /// (the request then starts a trace of its own). From the header's bytes, through a table:
    /// the SDK's propagator splits into a `Vec` and parses each part with `from_str_radix`, ~4 k
    /// instructions on every request, sampled or not.
    pub fn read(traceparent: Option<&[u8]>) -> Option<Caller> {
        let b = traceparent?.trim_ascii();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_u64(&b[0..2])?;
        // Version 00 is exactly 55 characters; a later one may add fields after a dash.
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let (high, low) = (hex_u64(&b[3..19])?, hex_u64(&b[19..35])?);
        let span_id = hex_u64(&b[36..52])?;
        let flags = hex_u64(&b[53..55])? as u8;
        if (high | low) == 0 || span_id == 0 {
            return None;
        }
        Some(Caller {
            trace_id: TraceId::from(u128::from(high) << 64 | u128::from(low)),
            span_id: SpanId::from(span_id),
            flags: TraceFlags::new(flags) & TraceFlags::SAMPLED,
        })
    }

    /// As a parent span context, with the caller's `tracestate` (a malformed one is dropped and
    /// the traceparent still holds, as the SDK does). Built only for sampled requests.
    pub fn span_context(&self, tracestate: Option<&str>) -> SpanContext {
        let state = tracestate.and_then(|s| TraceState::from_str(s).ok()).unwrap_or_default();
        SpanContext::new(self.trace_id, self.span_id, self.flags, true, state)
    }
}

/// Each byte's hex value, or 0xff for anything but `0-9a-f` (the spec refuses uppercase).
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// At most 16 lowercase hex digits; no branch per digit.
fn hex_u64(digits: &[u8]) -> Option<u64> {
    let mut acc = 0u64;
    let mut bad = 0u8;
    for &d in digits {
        let v = HEX_VALUE[usize::from(d)];
        bad |= v;
        acc = acc << 4 | u64::from(v & 0x0f);
    }
    (bad & 0xf0 == 0).then_some(acc)
}

/// `traceparent` (version 00) naming `sc` as the parent.
pub fn traceparent(sc: &SpanContext) -> [u8; 55] {
    let mut trace_hex = [0u8; 32];
    hex_into(&sc.trace_id().to_bytes(), &mut trace_hex);
    write_traceparent(&trace_hex, sc.span_id(), sc.trace_flags())
}

/// `00-{trace}-{parent}-{flags}` on the stack, from the trace id's hex digits.
fn write_traceparent(trace_hex: &[u8; 32], parent: SpanId, flags: TraceFlags) -> [u8; 55] {
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    out[3..35].copy_from_slice(trace_hex);
    out[35] = b'-';
    hex_into(&parent.to_bytes(), &mut out[36..52]);
    out[52] = b'-';
    hex_into(&[flags.to_u8()], &mut out[53..55]);
    out
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

/// A request's trace: decided at its start, kept with the request while it is served (cheap
/// to copy).
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
    use opentelemetry::trace::{SpanKind, TraceContextExt};
    use opentelemetry::Context;
    use opentelemetry_sdk::trace::{Sampler, SamplingDecision, ShouldSample};

    /// The sampler `telemetry.sampler` / `telemetry.sampler_arg` name, as the SDK implements it (the
    /// reference the head sampler's rule is tested against).
    fn configured(cfg: &Config) -> Sampler {
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

    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn caller(sampled: bool) -> Caller {
        let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        Caller { trace_id: TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736), span_id: SpanId::from(7), flags }
    }

    fn cfg(sampler: &str, arg: Option<f64>) -> Config {
        let mut cfg = Config::default();
        cfg.telemetry.sampler = sampler.into();
        cfg.telemetry.sampler_arg = arg;
        cfg
    }

    #[test]
    fn the_rules_decide_as_the_sdks_samplers_do() {
        let mut rng = rand::rng();
        let callers = [None, Some(caller(true)), Some(caller(false))];
        for &name in crate::config::SAMPLERS {
            for arg in [None, Some(0.0), Some(0.1), Some(0.5), Some(0.999), Some(1.0), Some(-1.0), Some(2.0)] {
                let cfg = cfg(name, arg);
                let (rule, sdk) = (Rule::configured(&cfg), configured(&cfg));
                for _ in 0..400 {
                    let trace_id = TraceId::from(rand::Rng::random::<u128>(&mut rng));
                    for c in &callers {
                        let parent = match c {
                            Some(c) => Context::new().with_remote_span_context(c.span_context(None)),
                            None => Context::new(),
                        };
                        let r = sdk.should_sample(Some(&parent), trace_id, "HTTP request", &SpanKind::Server, &[], &[]);
                        let theirs = r.decision == SamplingDecision::RecordAndSample;
                        let ours = rule.samples(c.map(|c| c.flags.is_sampled()), trace_id);
                        assert_eq!(ours, theirs, "{name} {arg:?} {trace_id} caller {c:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn parent_based_follows_the_callers_flag_and_keeps_its_trace_id() {
        let head = HeadSampler::new(&cfg("parentbased_traceidratio", Some(0.0)));
        let on = head.decide(Some(&caller(true)));
        let off = head.decide(Some(&caller(false)));
        assert!(on.sampled && !off.sampled);
        assert_eq!(on.hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(off.trace_id, on.trace_id, "an unsampled request keeps the caller's trace id");
    }

    #[test]
    fn roots_get_a_new_trace_id_and_the_ratio_decides() {
        let none = HeadSampler::new(&cfg("parentbased_traceidratio", Some(0.0)));
        let all = HeadSampler::new(&cfg("parentbased_traceidratio", Some(1.0)));
        let tenth = HeadSampler::new(&cfg("parentbased_traceidratio", Some(0.1)));
        let (a, b) = (none.decide(None), none.decide(None));
        assert!(!a.sampled && a.trace_id != TraceId::INVALID && a.trace_id != b.trace_id);
        assert!(all.decide(None).sampled);
        let n = (0..4000).filter(|_| tenth.decide(None).sampled).count();
        assert!((280..=520).contains(&n), "about 10 % of 4000 sampled, got {n}");
        assert!(!HeadSampler::new(&cfg("always_off", None)).decide_root());
        assert!(HeadSampler::new(&cfg("parentbased_always_on", None)).decide_root());
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

    fn ours(tp: &str, ts: Option<&str>) -> Option<SpanContext> {
        Caller::read(Some(tp.as_bytes())).map(|c| c.span_context(ts))
    }

    #[test]
    fn well_formed_traceparents_read_as_the_sdk_reads_them() {
        let mut rng = rand::rng();
        let mut cases = vec![
            (CALLER.to_string(), None),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".to_string(), Some("vendor=x,other=y")),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff".to_string(), Some("not a state")),
            ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-future".to_string(), None),
            (" 00-00000000000000000000000000000001-0000000000000001-01 ".to_string(), None),
            ("00-00000000000000010000000000000000-ffffffffffffffff-01".to_string(), None),
        ];
        for _ in 0..500 {
            let (t, s, f): (u128, u64, u8) =
                (rand::Rng::random(&mut rng), rand::Rng::random(&mut rng), rand::Rng::random(&mut rng));
            cases.push((format!("00-{t:032x}-{s:016x}-{f:02x}"), None));
        }
        for (tp, ts) in &cases {
            let (a, b) = (ours(tp, *ts), sdk_reads(tp, *ts));
            assert!(b.is_valid(), "{tp}");
            assert_eq!(a.as_ref(), Some(&b), "{tp} {ts:?}");
            assert!(b.is_remote());
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
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}",
        ] {
            assert_eq!(ours(tp, None), None, "{tp:?} must be refused");
            assert!(!sdk_reads(tp, None).is_valid(), "the SDK refuses {tp:?} too");
        }
        assert_eq!(Caller::read(None), None);
        assert_eq!(Caller::read(Some(&b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\xff"[..])), None);
    }

    #[test]
    fn a_written_traceparent_reads_back_through_the_sdk() {
        let sc = ours(CALLER, None).unwrap();
        assert_eq!(&traceparent(&sc)[..], CALLER.as_bytes());
        assert_eq!(sdk_reads(std::str::from_utf8(&traceparent(&sc)).unwrap(), None), sc);
    }

    #[test]
    fn an_unsampled_traceparent_carries_the_trace_id_with_the_flag_off() {
        let head = HeadSampler::new(&cfg("parentbased_always_off", None));
        let trace = head.decide(None);
        assert_eq!(trace.hex(), trace.trace_id.to_string(), "the same digits as the SDK's");
        // Read back by the SDK's own propagator, as the next hop does.
        let read = |tp: [u8; 55]| sdk_reads(std::str::from_utf8(&tp).unwrap(), None);
        let (a, b) = (read(head.unsampled_traceparent(&trace)), read(head.unsampled_traceparent(&trace)));
        assert_eq!(a.trace_id(), trace.trace_id);
        assert!(a.is_valid() && a.is_remote() && !a.is_sampled());
        assert_ne!(a.span_id(), b.span_id(), "each call gets its own parent id");
    }
}
