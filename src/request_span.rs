//! The spans of a sampled request: its server span and one client span per upstream attempt,
//! recorded by us and written as OTLP protobuf as they go.
//!
//! Why not `tracing` spans: every field went through tracing-opentelemetry (a `SpanBuilder` and
//! an owned `KeyValue` per field at creation, a visitor per `record`), every layer's callbacks and
//! the registry's slab, ≈ 23 k instructions per span. Why not the SDK's spans either: each still
//! cost ≈ 14 k (an owned `KeyValue` and `String` per attribute, a `SpanData` moved through the
//! batch processor's channel, converted again for the wire, then freed). Here an attribute is
//! encoded into the span's buffer when it is set, from borrowed text; at its end the span is
//! written once into the export queue (`span_queue`), which sends batches from its own thread.
//! The bytes are checked against opentelemetry-proto's decoding in the tests.
//!
//! A handle is one `Arc`, shared by handlers, the in-flight registry and the attempts. The span
//! ends at `end`, or when its last handle is dropped (a request future dropped by a forced stop).
//! The process's lifecycle span stays a `tracing` span through the SDK: it is one per process.
//!
//! A log line inside a request carries its ids as fields (`trace_id`, `span_id`, `span.name`),
//! and an event worth seeing in the trace is also added to the span (`event`).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

pub use crate::otlp_wire::AttrValue;
use crate::otlp_wire::{put_attr, put_event, RecordedSpan};
use crate::span_queue;

/// The instrumentation scope of every request span.
pub const SCOPE: &str = "graceful";

/// A span attribute: a fixed key and a borrowed value, encoded when it is set.
#[derive(Debug, Clone, Copy)]
pub struct Attr<'a> {
    pub key: &'static str,
    pub value: AttrValue<'a>,
}

impl<'a> Attr<'a> {
    pub fn new(key: &'static str, value: impl Into<AttrValue<'a>>) -> Attr<'a> {
        Attr { key, value: value.into() }
    }
}

impl<'a> From<&'a str> for AttrValue<'a> {
    fn from(s: &'a str) -> Self {
        AttrValue::Str(s)
    }
}

impl<'a> From<&'a String> for AttrValue<'a> {
    fn from(s: &'a String) -> Self {
        AttrValue::Str(s)
    }
}

impl From<i64> for AttrValue<'_> {
    fn from(i: i64) -> Self {
        AttrValue::Int(i)
    }
}

impl From<bool> for AttrValue<'_> {
    fn from(b: bool) -> Self {
        AttrValue::Bool(b)
    }
}

/// A span of a request, or none (tracing off, unsampled, a probe). Cheap to clone.
#[derive(Clone, Default)]
pub struct RequestSpan {
    live: Option<Arc<Live>>,
    /// What log lines name it (`span.name`): "HTTP request", "upstream attempt".
    kind_name: &'static str,
}

struct Live {
    cx: SpanContext,
    parent: Option<SpanId>,
    parent_is_remote: bool,
    /// None once ended.
    draft: Mutex<Option<Draft>>,
}

/// What is known of a span before its end.
struct Draft {
    name: Cow<'static, str>,
    kind: SpanKind,
    start: SystemTime,
    /// `Span.attributes` fields, encoded.
    attributes: Vec<u8>,
    /// `Span.events` fields, encoded.
    events: Vec<u8>,
    status: Status,
}

impl RequestSpan {
    pub const fn none() -> RequestSpan {
        RequestSpan { live: None, kind_name: "" }
    }

    /// A span of trace `trace_id` (the one its sampling was decided on: the caller's, or a new
    /// one for a root) under `parent` (the caller's remote span context, or an invalid one for a
    /// root). None when no export queue is installed (tracing off).
    pub fn start(
        kind_name: &'static str,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        trace_id: TraceId,
        parent: &SpanContext,
        attributes: &[Attr<'_>],
    ) -> RequestSpan {
        if span_queue::get().is_none() {
            return RequestSpan::none();
        }
        let span_id = RandomIdGenerator::default().new_span_id();
        let cx = SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, parent.trace_state().clone());
        let mut encoded = Vec::with_capacity(384);
        for a in attributes {
            put_attr(&mut encoded, 9, a.key, a.value);
        }
        let draft = Draft {
            name: name.into(),
            kind,
            start: SystemTime::now(),
            attributes: encoded,
            events: Vec::new(),
            status: Status::Unset,
        };
        let live = Live {
            cx,
            parent: parent.is_valid().then(|| parent.span_id()),
            parent_is_remote: parent.is_remote(),
            draft: Mutex::new(Some(draft)),
        };
        RequestSpan { live: Some(Arc::new(live)), kind_name }
    }

    /// A child of this span; none when this one is none (its attributes are then not built).
    pub fn child(
        &self,
        kind_name: &'static str,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: &[Attr<'_>],
    ) -> RequestSpan {
        match &self.live {
            Some(live) => RequestSpan::start(kind_name, name, kind, live.cx.trace_id(), &live.cx, attributes),
            None => RequestSpan::none(),
        }
    }

    pub fn is_recording(&self) -> bool {
        self.live.is_some()
    }

    fn with_draft(&self, f: impl FnOnce(&mut Draft)) {
        if let Some(live) = &self.live {
            if let Some(d) = live.draft.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                f(d);
            }
        }
    }

    pub fn set(&self, attribute: Attr<'_>) {
        self.with_draft(|d| put_attr(&mut d.attributes, 9, attribute.key, attribute.value));
    }

    /// The span failed; `description` may be empty. As in OpenTelemetry, Ok is final.
    pub fn set_error(&self, description: impl Into<Cow<'static, str>>) {
        self.with_draft(|d| {
            if d.status != Status::Ok {
                d.status = Status::error(description);
            }
        });
    }

    pub fn set_ok(&self) {
        self.with_draft(|d| d.status = Status::Ok);
    }

    /// An event on the span, at this moment.
    pub fn event(&self, name: &str, attributes: &[Attr<'_>]) {
        self.with_draft(|d| {
            let mut encoded = Vec::new();
            for a in attributes {
                put_attr(&mut encoded, 3, a.key, a.value);
            }
            put_event(&mut d.events, 11, SystemTime::now(), name, &encoded);
        });
    }

    /// Ends the span now; later calls change nothing.
    pub fn end(&self) {
        if let Some(live) = &self.live {
            live.end();
        }
    }

    /// The span's ids (for propagation), when there is a span.
    pub fn span_context(&self) -> Option<&SpanContext> {
        self.live.as_ref().map(|l| &l.cx)
    }

    /// `span_id` and `span.name` for a log line inside this span (both absent when none).
    pub fn log_ids(&self) -> (Option<String>, Option<&'static str>) {
        match self.span_context() {
            Some(sc) => (Some(sc.span_id().to_string()), Some(self.kind_name)),
            None => (None, None),
        }
    }
}

impl Live {
    fn end(&self) {
        let Some(d) = self.draft.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let Some(queue) = span_queue::get() else { return };
        let span = RecordedSpan {
            trace_id: self.cx.trace_id().to_bytes(),
            span_id: self.cx.span_id().to_bytes(),
            trace_state: &self.cx.trace_state().header(),
            parent_span_id: self.parent.map(|p| p.to_bytes()),
            parent_is_remote: self.parent_is_remote,
            name: &d.name,
            kind: d.kind,
            start: d.start,
            end: SystemTime::now(),
            attributes: &d.attributes,
            events: &d.events,
            status: &d.status,
            trace_flags: self.cx.trace_flags().to_u8(),
        };
        queue.push(|out| span.put(out, 2));
    }
}

impl Drop for Live {
    /// A span whose handles are all gone ends then (as an SDK span does when dropped).
    fn drop(&mut self) {
        self.end();
    }
}

/// A span's name as OpenTelemetry's HTTP conventions have it: `{method} {route or path}`.
pub fn http_span_name(method: &str, target: &str) -> String {
    let mut name = String::with_capacity(method.len() + 1 + target.len());
    name.push_str(method);
    name.push(' ');
    name.push_str(target);
    name
}

impl std::fmt::Debug for RequestSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.span_context() {
            Some(sc) => write!(f, "RequestSpan({} {})", self.kind_name, sc.span_id()),
            None => f.write_str("RequestSpan(none)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    use opentelemetry::trace::TraceState;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use opentelemetry_proto::tonic::trace::v1::{span, status, Span};
    use prost::Message;

    /// The process's queue (one per test binary), its batches sent back on a channel.
    fn exported() -> &'static Mutex<mpsc::Receiver<Vec<u8>>> {
        static RX: std::sync::OnceLock<Mutex<mpsc::Receiver<Vec<u8>>>> = std::sync::OnceLock::new();
        RX.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            let cfg = span_queue::BatchConfig { schedule_delay: Duration::from_secs(3600), ..Default::default() };
            let tx = Mutex::new(tx);
            span_queue::install(
                cfg,
                Box::new(move |b: &[u8]| tx.lock().unwrap().send(b.to_vec()).map_err(|e| e.to_string())),
            )
            .unwrap();
            Mutex::new(rx)
        })
    }

    /// Every span exported so far, decoded by opentelemetry-proto.
    fn decoded(rx: &mpsc::Receiver<Vec<u8>>) -> Vec<Span> {
        assert!(span_queue::get().unwrap().flush(Duration::from_secs(5)));
        let mut spans = Vec::new();
        for batch in rx.try_iter() {
            let body = crate::otlp_wire::Encoder::default().encode_recorded(SCOPE, &batch);
            let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("valid OTLP protobuf");
            for rs in req.resource_spans {
                for ss in rs.scope_spans {
                    assert_eq!(ss.scope.unwrap().name, SCOPE);
                    spans.extend(ss.spans);
                }
            }
        }
        spans
    }

    fn attr(s: &Span, key: &str) -> Option<Any> {
        s.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()?.value)
    }

    #[test]
    fn spans_decode_as_opentelemetry_proto_reads_them() {
        let rx = exported().lock().unwrap();
        let caller = SpanContext::new(
            TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736),
            SpanId::from(0x00f067aa0ba902b7),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).unwrap(),
        );
        let path = String::from("/api/data");
        let server = RequestSpan::start(
            "HTTP request",
            "GET /api/data",
            SpanKind::Server,
            caller.trace_id(),
            &caller,
            &[Attr::new("url.path", &path), Attr::new("server.port", 8080_i64), Attr::new("graceful.dropped", false)],
        );
        let attempt =
            server.child("upstream attempt", "GET /api/data", SpanKind::Client, &[Attr::new("attempt", 1_i64)]);
        attempt.set(Attr::new("error.type", "connection_refused"));
        attempt.event("upstream attempt failed", &[Attr::new("detail", "refused")]);
        attempt.set_error("");
        let (attempt_sc, server_sc) = (attempt.span_context().unwrap().clone(), server.span_context().unwrap().clone());
        drop(attempt); // the last handle: the span ends
        server.set_ok();
        server.set_error("too late: Ok is final");
        server.end();
        server.set(Attr::new("after.end", true));
        server.end();

        let spans = decoded(&rx);
        let find = |id: SpanId| spans.iter().find(|s| s.span_id == id.to_bytes()).expect("span exported once");
        assert_eq!(spans.iter().filter(|s| s.trace_id == caller.trace_id().to_bytes()).count(), 2);
        let s = find(server_sc.span_id());
        assert_eq!((s.name.as_str(), s.kind), ("GET /api/data", span::SpanKind::Server as i32));
        assert_eq!(s.parent_span_id, caller.span_id().to_bytes());
        assert_eq!(s.trace_state, "vendor=x");
        assert_eq!(s.flags, 0x301, "sampled, has is-remote, remote parent");
        assert_eq!(attr(s, "url.path"), Some(Any::StringValue("/api/data".into())));
        assert_eq!(attr(s, "server.port"), Some(Any::IntValue(8080)));
        assert_eq!(attr(s, "graceful.dropped"), Some(Any::BoolValue(false)));
        assert_eq!(attr(s, "after.end"), None, "nothing changes after the end");
        assert_eq!(s.status.as_ref().unwrap().code, status::StatusCode::Ok as i32);
        assert!(s.start_time_unix_nano > 0 && s.end_time_unix_nano >= s.start_time_unix_nano);

        let a = find(attempt_sc.span_id());
        assert_eq!(a.trace_id, caller.trace_id().to_bytes());
        assert_eq!((a.parent_span_id.as_slice(), a.flags), (server_sc.span_id().to_bytes().as_slice(), 0x101));
        assert_eq!(a.kind, span::SpanKind::Client as i32);
        assert_eq!(attr(a, "attempt"), Some(Any::IntValue(1)));
        assert_eq!(attr(a, "error.type"), Some(Any::StringValue("connection_refused".into())));
        assert_eq!(a.events.len(), 1);
        assert_eq!(a.events[0].name, "upstream attempt failed");
        assert_eq!(a.events[0].attributes[0].key, "detail");
        assert!(a.events[0].time_unix_nano >= a.start_time_unix_nano);
        assert_eq!(a.status.as_ref().unwrap().code, status::StatusCode::Error as i32);
    }

    #[test]
    fn a_root_keeps_the_decided_trace_and_has_no_parent() {
        let rx = exported().lock().unwrap();
        let trace_id = RandomIdGenerator::default().new_trace_id();
        let root =
            RequestSpan::start("HTTP request", "GET /", SpanKind::Server, trace_id, &SpanContext::empty_context(), &[]);
        let sc = root.span_context().unwrap().clone();
        assert!(sc.is_valid() && sc.is_sampled());
        assert_eq!(sc.trace_id(), trace_id, "the trace its sampling was decided on");
        assert!(!RequestSpan::none().is_recording());
        assert!(!RequestSpan::none().child("x", "x", SpanKind::Client, &[]).is_recording());
        drop(root);
        let spans = decoded(&rx);
        let s = spans.iter().find(|s| s.span_id == sc.span_id().to_bytes()).unwrap();
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.trace_id, sc.trace_id().to_bytes());
        assert_eq!(s.flags, 0x101);
        assert_eq!(s.status.as_ref().unwrap().code, status::StatusCode::Unset as i32);
    }
}
