//! The spans of a sampled request: its server span and one client span per upstream attempt,
//! built with the OpenTelemetry SDK itself rather than as `tracing` spans.
//!
//! Why: as `tracing` spans, every field went through tracing-opentelemetry (a `SpanBuilder` and
//! an owned `KeyValue` per field at creation, a visitor per `record`), every layer's per-span
//! callbacks and the registry's slab, before the SDK built the same span again at close: about
//! 23 k instructions per span, as much as the rest of a request. Here a span is the SDK's, its
//! attributes written once, and a handle is one `Arc` (`Context`) that handlers, the in-flight
//! registry and the attempts share. The process's lifecycle span stays a `tracing` span: it is one
//! per process, and its log lines and span events come from the same `tracing` calls.
//!
//! A log line inside a request carries its ids as fields (`trace_id`, `span_id`, `span.name`),
//! and an event worth seeing in the trace is also added to the span (`event`).

use std::borrow::Cow;
use std::sync::OnceLock;

use opentelemetry::trace::{SpanBuilder, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::Tracer;

static TRACER: OnceLock<Tracer> = OnceLock::new();

/// Set once, with the tracer provider (`telemetry::init`); without it no span is ever built.
pub fn install(tracer: Tracer) {
    let _ = TRACER.set(tracer);
}

/// A span of a request, or none (tracing off, unsampled, a probe). Cheap to clone; the span ends
/// at `end`, or when the last handle is dropped (a request future dropped by a forced stop).
#[derive(Clone, Default)]
pub struct RequestSpan {
    cx: Option<Context>,
    /// What log lines name it (`span.name`): "HTTP request", "upstream attempt".
    kind_name: &'static str,
}

impl RequestSpan {
    pub const fn none() -> RequestSpan {
        RequestSpan { cx: None, kind_name: "" }
    }

    /// A span under `parent` (the caller's remote context, or an empty one for a root).
    pub fn start(
        kind_name: &'static str,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: &Context,
        attributes: Vec<KeyValue>,
    ) -> RequestSpan {
        let Some(tracer) = TRACER.get() else { return RequestSpan::none() };
        let builder = SpanBuilder::from_name(name).with_kind(kind).with_attributes(attributes);
        let span = tracer.build_with_context(builder, parent);
        RequestSpan { cx: Some(parent.with_span(span)), kind_name }
    }

    /// A child of this span; none when this one is none.
    pub fn child(
        &self,
        kind_name: &'static str,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> RequestSpan {
        match &self.cx {
            Some(cx) => RequestSpan::start(kind_name, name, kind, cx, attributes()),
            None => RequestSpan::none(),
        }
    }

    pub fn is_recording(&self) -> bool {
        self.cx.is_some()
    }

    pub fn set(&self, attribute: KeyValue) {
        if let Some(cx) = &self.cx {
            cx.span().set_attribute(attribute);
        }
    }

    /// The span failed; `description` may be empty.
    pub fn set_error(&self, description: impl Into<Cow<'static, str>>) {
        if let Some(cx) = &self.cx {
            cx.span().set_status(Status::error(description));
        }
    }

    pub fn set_ok(&self) {
        if let Some(cx) = &self.cx {
            cx.span().set_status(Status::Ok);
        }
    }

    /// An event on the span, at this moment.
    pub fn event(&self, name: impl Into<Cow<'static, str>>, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(cx) = &self.cx {
            cx.span().add_event(name, attributes());
        }
    }

    /// Ends the span now; later calls change nothing.
    pub fn end(&self) {
        if let Some(cx) = &self.cx {
            cx.span().end();
        }
    }

    /// The span's ids (for propagation), when there is a span.
    pub fn span_context(&self) -> Option<SpanContext> {
        self.cx.as_ref().map(|cx| cx.span().span_context().clone())
    }

    /// `span_id` and `span.name` for a log line inside this span (both absent when none).
    pub fn log_ids(&self) -> (Option<String>, Option<&'static str>) {
        match self.span_context() {
            Some(sc) => (Some(sc.span_id().to_string()), Some(self.kind_name)),
            None => (None, None),
        }
    }
}

impl std::fmt::Debug for RequestSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.span_context() {
            Some(sc) => write!(f, "RequestSpan({} {})", self.kind_name, sc.span_id()),
            None => f.write_str("RequestSpan(none)"),
        }
    }
}
