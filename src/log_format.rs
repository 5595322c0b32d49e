//! JSON log lines that carry the OpenTelemetry `trace_id` and `span_id` at the top level, so a log
//! pipeline can jump from any line (an upstream attempt's warning, a lifecycle event) to its trace.
//!
//! The JSON log layer takes events only, never spans: a request span built for the log layer
//! cost every request its fields' formatting although almost no request prints a line (measured:
//! 26 k instructions per request, untraced). A line inside a span names it and its ids by looking
//! the span up in the registry, where the OpenTelemetry layer keeps it (the lifecycle span). A
//! request's spans are recorded by us (`request_span`), not `tracing` spans: its lines carry `trace_id`, `span_id` and
//! `span.name` as fields.

use std::fmt;
use std::time::SystemTime;

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::Layer;

/// The JSON log layer: `filter` (the log level) decides which events print; no span is ever
/// built for it.
pub fn json_layer<S, W>(writer: W, filter: EnvFilter) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    let events_only = filter_fn(|meta: &Metadata<'_>| meta.is_event());
    tracing_subscriber::fmt::layer()
        .event_format(JsonWithTraceIds)
        .with_writer(writer)
        .with_filter(filter.and(events_only))
}

/// `{"timestamp","level","target","message",…event fields,"span":{"name"},"trace_id","span_id"}`.
pub struct JsonWithTraceIds;

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), humantime::format_rfc3339_micros(SystemTime::now()).to_string().into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        event.record(&mut JsonVisitor(&mut line));
        // A request's spans are the SDK's, not `tracing`'s: its lines name theirs in fields
        // (`span_id`, `span.name`), laid out as a `tracing` span's are.
        if let Some(name) = line.remove("span.name") {
            line.insert("span".into(), serde_json::json!({ "name": name }));
        }
        // The global dispatcher formatting this line owns the registry and the OTel layer (a
        // scoped one, as in unit tests, is not reachable from inside its own event).
        tracing::dispatcher::get_default(|d| add_span(d, event, &mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(w, "{text}")
    }
}

/// The event's own span (its explicit parent, or the current one), looked up in the registry
/// itself: this layer's filtered view has no spans.
fn add_span(d: &tracing::Dispatch, event: &Event<'_>, line: &mut Map<String, Value>) {
    let Some(registry) = d.downcast_ref::<Registry>() else { return };
    let id = match event.parent() {
        Some(id) => id.clone(),
        None if event.is_contextual() => match registry.current_span().id() {
            Some(id) => id.clone(),
            None => return,
        },
        None => return,
    };
    let Some(span) = registry.span(&id) else { return };
    let mut fields = Map::new();
    fields.insert("name".into(), span.name().into());
    line.insert("span".into(), Value::Object(fields));
    if let Some(cx) = tracing_opentelemetry::get_otel_context(&id, d) {
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            line.insert("trace_id".into(), sc.trace_id().to_string().into());
            line.insert("span_id".into(), sc.span_id().to_string().into());
        }
    }
}

/// An event's fields as JSON values (numbers and booleans stay typed).
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    /// The event's text comes first as `message`; a field of the same name must not replace it.
    fn key(&self, field: &Field) -> String {
        match field.name() {
            "message" if self.0.contains_key("message") => "field.message".into(),
            name => name.into(),
        }
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let key = self.key(field);
        self.0.insert(key, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let key = self.key(field);
        self.0.insert(key, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        let key = self.key(field);
        self.0.insert(key, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        let key = self.key(field);
        self.0.insert(key, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        let key = self.key(field);
        self.0.insert(key, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        let key = self.key(field);
        self.0.insert(key, value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(buf: &Buf) -> Vec<Value> {
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn request_span() -> tracing::Span {
        tracing::info_span!("HTTP request", http.route = "/api/data", url.path = "/api/data")
    }

    #[test]
    fn lines_are_json_and_no_span_is_built_for_them() {
        let buf = Buf::default();
        let writer = buf.clone();
        let layer = json_layer(move || writer.clone(), EnvFilter::new("info"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = request_span();
            assert!(span.is_disabled(), "the log layer alone builds no span");
            span.in_scope(|| tracing::warn!(retries = 2_i64, detail = %"no answer", "backend call failed"));
            tracing::debug!("below the level");
        });
        let lines = lines(&buf);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let v = &lines[0];
        assert_eq!(v["message"], "backend call failed");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["retries"], 2);
        assert_eq!(v["detail"], "no answer");
        assert!(v.get("span").is_none() && v.get("trace_id").is_none(), "{v}");
        assert!(humantime::parse_rfc3339(v["timestamp"].as_str().unwrap()).is_ok());
    }
    // A line naming its span and ids needs the global dispatcher (a scoped one is not reachable
    // from inside its own event): tests/telemetry.rs checks it on the real binary.
}
