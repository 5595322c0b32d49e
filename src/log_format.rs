//! JSON log lines that carry the OpenTelemetry `trace_id` and `span_id` at the top level, so a log
//! pipeline can jump from any line (an upstream attempt's warning, a lifecycle event) to its trace.
//! tracing-subscriber's JSON format only nests the current span's own fields.
//!
//! Span fields are kept for logs as they are recorded, on every request, whether or not anything
//! is logged: tracing-subscriber's `JsonFields` re-parses and re-serialises the whole object on
//! each `record` (measured: a quarter of the frontend's CPU under load). [`SpanFieldsForLogs`]
//! appends a JSON fragment instead, and only for the fields a log line needs.

use std::fmt;
use std::time::SystemTime;

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// `{"timestamp","level","target","message",…event fields,"span":{name,…fields},"trace_id","span_id"}`.
/// Use with `fmt::layer().fmt_fields(SpanFieldsForLogs)`.
pub struct JsonWithTraceIds;

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), humantime::format_rfc3339_micros(SystemTime::now()).to_string().into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        event.record(&mut JsonVisitor(&mut line));
        // The event's own span: its explicit parent (`parent: &span`) or the current one.
        if let Some(span) = ctx.event_scope().and_then(|mut scope| scope.next()) {
            let mut fields = Map::new();
            fields.insert("name".into(), span.name().into());
            if let Some(f) = span.extensions().get::<FormattedFields<N>>() {
                // `,"k":v ,"k2":v2` as SpanFieldsForLogs appends it; a later value of a key wins.
                let inner = f.trim_start().trim_start_matches(',');
                if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&format!("{{{inner}}}")) {
                    fields.extend(m);
                }
            }
            line.insert("span".into(), Value::Object(fields));
            // The global dispatcher is the one formatting this line; it owns the OTel layer.
            let cx = tracing::dispatcher::get_default(|d| tracing_opentelemetry::get_otel_context(&span.id(), d));
            if let Some(cx) = cx {
                let sc = cx.span().span_context().clone();
                if sc.is_valid() {
                    line.insert("trace_id".into(), sc.trace_id().to_string().into());
                    line.insert("span_id".into(), sc.span_id().to_string().into());
                }
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(w, "{text}")
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

/// The span fields worth repeating on a log line (the rest are in the trace).
const LOGGED_SPAN_FIELDS: &[&str] = &[
    "http.request.method",
    "http.route",
    "url.path",
    "graceful.pod",
    "graceful.shutdown.phase",
    "server.address",
    "http.request.resend_count",
    "error.type",
];

/// Stores a span's loggable fields as JSON fragments, appended on each record.
pub struct SpanFieldsForLogs;

impl<'w> FormatFields<'w> for SpanFieldsForLogs {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(&self, mut w: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = FragmentVisitor { w: &mut w, result: Ok(()) };
        fields.record(&mut v);
        v.result
    }
}

struct FragmentVisitor<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl FragmentVisitor<'_, '_> {
    fn put(&mut self, field: &Field, json: impl FnOnce() -> Value) {
        if self.result.is_ok() && LOGGED_SPAN_FIELDS.contains(&field.name()) {
            self.result = write!(self.w, ",\"{}\":{}", field.name(), json());
        }
    }
}

impl Visit for FragmentVisitor<'_, '_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, || format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, || value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, || value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, || value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, || value.into());
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

    #[test]
    fn lines_are_json_with_the_span_fields_that_matter() {
        let buf = Buf::default();
        let writer = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(SpanFieldsForLogs)
            .event_format(JsonWithTraceIds)
            .with_writer(move || writer.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "HTTP request",
                http.route = "/api/data",
                url.path = "/api/\"data\"",
                otel.kind = "server",
                graceful.shutdown.phase = tracing::field::Empty,
                error.type = tracing::field::Empty,
            );
            span.record("graceful.shutdown.phase", "serving");
            span.record("graceful.shutdown.phase", "draining");
            span.record("error.type", "timeout");
            span.in_scope(|| tracing::warn!(retries = 2_i64, detail = %"no answer", "backend call failed"));
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["message"], "backend call failed");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["retries"], 2);
        assert_eq!(v["detail"], "no answer");
        assert_eq!(v["span"]["name"], "HTTP request");
        assert_eq!(v["span"]["http.route"], "/api/data");
        assert_eq!(v["span"]["url.path"], "/api/\"data\"");
        assert_eq!(v["span"]["graceful.shutdown.phase"], "draining", "the last value wins");
        assert_eq!(v["span"]["error.type"], "timeout");
        assert!(v["span"].get("otel.kind").is_none(), "only the fields a log line needs");
        assert!(v.get("trace_id").is_none(), "no OpenTelemetry layer, no trace id");
        assert!(humantime::parse_rfc3339(v["timestamp"].as_str().unwrap()).is_ok());
    }
}
