//! Finished spans as the bytes of an OTLP `ExportTraceServiceRequest`, written straight from the
//! SDK's `SpanData`.
//!
//! Why not opentelemetry-proto's conversion and prost: profiled, they cost ~18 k instructions per
//! exported span (an owned `String` for every attribute key and value, then prost's encoding,
//! which works each nested length out again at every level, then freeing it all) — as much as
//! building the span on the request path. Here each length is worked out once per level, nothing
//! is copied but the bytes themselves, and the resource is encoded once. The unit tests decode
//! the bytes with opentelemetry-proto and compare them with its own conversion of the same spans.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::SpanData;
use opentelemetry_sdk::Resource;

// Wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// W3C flags plus OTLP's "has is-remote" bit and, for a remote parent, its "is remote" bit.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// Encodes batches of spans for one resource.
#[derive(Debug, Clone, Default)]
pub struct Encoder {
    /// The `Resource` message's fields, encoded once.
    resource: Vec<u8>,
    schema_url: String,
}

impl Encoder {
    pub fn new(resource: &Resource) -> Encoder {
        let mut bytes = Vec::new();
        for (k, v) in resource.iter() {
            put_key_value(&mut bytes, 1, k.as_str(), v);
        }
        Encoder { resource: bytes, schema_url: resource.schema_url().unwrap_or_default().to_string() }
    }

    /// One `ExportTraceServiceRequest`: one `ResourceSpans`, one `ScopeSpans` per instrumentation
    /// scope in the order they first appear.
    pub fn encode(&self, spans: &[SpanData]) -> Vec<u8> {
        let mut scopes: Vec<(&InstrumentationScope, Vec<(&SpanData, usize)>)> = Vec::new();
        for s in spans {
            let sized = (s, span_len(s));
            match scopes.iter_mut().find(|(scope, _)| *scope == &s.instrumentation_scope) {
                Some((_, group)) => group.push(sized),
                None => scopes.push((&s.instrumentation_scope, vec![sized])),
            }
        }
        let scope_spans: Vec<(usize, usize)> = scopes
            .iter()
            .map(|(scope, group)| {
                let scope_len = scope_len(scope);
                let len = message_len(1, scope_len)
                    + group.iter().map(|(_, n)| message_len(2, *n)).sum::<usize>()
                    + str_len(3, scope.schema_url().unwrap_or_default());
                (scope_len, len)
            })
            .collect();
        let resource_spans = message_len(1, self.resource.len())
            + scope_spans.iter().map(|(_, n)| message_len(2, *n)).sum::<usize>()
            + str_len(3, &self.schema_url);

        let mut out = Vec::with_capacity(message_len(1, resource_spans));
        put_header(&mut out, 1, resource_spans);
        put_header(&mut out, 1, self.resource.len());
        out.extend_from_slice(&self.resource);
        for ((scope, group), (scope_len, len)) in scopes.iter().zip(&scope_spans) {
            put_header(&mut out, 2, *len);
            put_header(&mut out, 1, *scope_len);
            put_scope(&mut out, scope);
            for (span, n) in group {
                put_header(&mut out, 2, *n);
                put_span(&mut out, span);
            }
            put_str(&mut out, 3, scope.schema_url().unwrap_or_default());
        }
        put_str(&mut out, 3, &self.schema_url);
        debug_assert_eq!(out.len(), out.capacity());
        out
    }
}

impl Encoder {
    /// One `ExportTraceServiceRequest` of spans recorded by `request_span`: `spans` holds their
    /// `ScopeSpans.spans` fields back to back, all of scope `scope`.
    pub fn encode_recorded(&self, scope: &str, spans: &[u8]) -> Vec<u8> {
        let scope_len = str_len(1, scope);
        let scope_spans = message_len(1, scope_len) + spans.len();
        let resource_spans =
            message_len(1, self.resource.len()) + message_len(2, scope_spans) + str_len(3, &self.schema_url);
        let mut out = Vec::with_capacity(message_len(1, resource_spans));
        put_header(&mut out, 1, resource_spans);
        put_header(&mut out, 1, self.resource.len());
        out.extend_from_slice(&self.resource);
        put_header(&mut out, 2, scope_spans);
        put_header(&mut out, 1, scope_len);
        put_str(&mut out, 1, scope);
        out.extend_from_slice(spans);
        put_str(&mut out, 3, &self.schema_url);
        debug_assert_eq!(out.len(), out.capacity());
        out
    }
}

fn span_len(s: &SpanData) -> usize {
    let cx = &s.span_context;
    let parent = if s.parent_span_id == opentelemetry::trace::SpanId::INVALID { 0 } else { 8 };
    bytes_len(1, 16)
        + bytes_len(2, 8)
        + str_len(3, &cx.trace_state().header())
        + bytes_len(4, parent)
        + str_len(5, &s.name)
        + varint_len_field(6, kind(&s.span_kind))
        + fixed64_len(7, nanos(s.start_time))
        + fixed64_len(8, nanos(s.end_time))
        + attributes_len(9, &s.attributes)
        + varint_len_field(10, u64::from(s.dropped_attributes_count))
        + s.events.iter().map(|e| message_len(11, event_len(e))).sum::<usize>()
        + varint_len_field(12, u64::from(s.events.dropped_count))
        + s.links.iter().map(|l| message_len(13, link_len(l))).sum::<usize>()
        + varint_len_field(14, u64::from(s.links.dropped_count))
        + message_len(15, status_len(&s.status))
        + fixed32_len(16, span_flags(s.parent_span_is_remote, cx.trace_flags().to_u8()))
}

fn put_span(out: &mut Vec<u8>, s: &SpanData) {
    let cx = &s.span_context;
    put_bytes(out, 1, &cx.trace_id().to_bytes());
    put_bytes(out, 2, &cx.span_id().to_bytes());
    put_str(out, 3, &cx.trace_state().header());
    if s.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        put_bytes(out, 4, &s.parent_span_id.to_bytes());
    }
    put_str(out, 5, &s.name);
    put_varint_field(out, 6, kind(&s.span_kind));
    put_fixed64(out, 7, nanos(s.start_time));
    put_fixed64(out, 8, nanos(s.end_time));
    put_attributes(out, 9, &s.attributes);
    put_varint_field(out, 10, u64::from(s.dropped_attributes_count));
    for e in s.events.iter() {
        put_header(out, 11, event_len(e));
        put_fixed64(out, 1, nanos(e.timestamp));
        put_str(out, 2, &e.name);
        put_attributes(out, 3, &e.attributes);
        put_varint_field(out, 4, u64::from(e.dropped_attributes_count));
    }
    put_varint_field(out, 12, u64::from(s.events.dropped_count));
    for l in s.links.iter() {
        put_header(out, 13, link_len(l));
        put_bytes(out, 1, &l.span_context.trace_id().to_bytes());
        put_bytes(out, 2, &l.span_context.span_id().to_bytes());
        put_str(out, 3, &l.span_context.trace_state().header());
        put_attributes(out, 4, &l.attributes);
        put_varint_field(out, 5, u64::from(l.dropped_attributes_count));
        put_fixed32(out, 6, span_flags(l.span_context.is_remote(), l.span_context.trace_flags().to_u8()));
    }
    put_varint_field(out, 14, u64::from(s.links.dropped_count));
    put_header(out, 15, status_len(&s.status));
    put_status(out, &s.status);
    put_fixed32(out, 16, span_flags(s.parent_span_is_remote, cx.trace_flags().to_u8()));
}

fn event_len(e: &opentelemetry::trace::Event) -> usize {
    fixed64_len(1, nanos(e.timestamp))
        + str_len(2, &e.name)
        + attributes_len(3, &e.attributes)
        + varint_len_field(4, u64::from(e.dropped_attributes_count))
}

fn link_len(l: &opentelemetry::trace::Link) -> usize {
    let cx = &l.span_context;
    bytes_len(1, 16)
        + bytes_len(2, 8)
        + str_len(3, &cx.trace_state().header())
        + attributes_len(4, &l.attributes)
        + varint_len_field(5, u64::from(l.dropped_attributes_count))
        + fixed32_len(6, span_flags(cx.is_remote(), cx.trace_flags().to_u8()))
}

/// `Status { message = 2, code = 3 }`: only an error carries a message.
fn status_parts(s: &Status) -> (&str, u64) {
    match s {
        Status::Unset => ("", 0),
        Status::Ok => ("", 1),
        Status::Error { description } => (description, 2),
    }
}

fn status_len(s: &Status) -> usize {
    let (message, code) = status_parts(s);
    str_len(2, message) + varint_len_field(3, code)
}

fn put_status(out: &mut Vec<u8>, s: &Status) {
    let (message, code) = status_parts(s);
    put_str(out, 2, message);
    put_varint_field(out, 3, code);
}

fn scope_len(scope: &InstrumentationScope) -> usize {
    str_len(1, scope.name())
        + str_len(2, scope.version().unwrap_or_default())
        + scope.attributes().map(|kv| message_len(3, key_value_len(kv.key.as_str(), &kv.value))).sum::<usize>()
}

fn put_scope(out: &mut Vec<u8>, scope: &InstrumentationScope) {
    put_str(out, 1, scope.name());
    put_str(out, 2, scope.version().unwrap_or_default());
    for kv in scope.attributes() {
        put_key_value(out, 3, kv.key.as_str(), &kv.value);
    }
}

fn kind(k: &SpanKind) -> u64 {
    match k {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn span_flags(remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A span recorded by `request_span`: its attributes and events already encoded as they were
/// set (fields 9 and 11 of `Span`, tags included), the rest given here at its end.
pub struct RecordedSpan<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub trace_state: &'a str,
    /// None for a root.
    pub parent_span_id: Option<[u8; 8]>,
    pub parent_is_remote: bool,
    pub name: &'a str,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: &'a [u8],
    pub events: &'a [u8],
    pub status: &'a Status,
    pub trace_flags: u8,
}

impl RecordedSpan<'_> {
    fn len(&self) -> usize {
        bytes_len(1, 16)
            + bytes_len(2, 8)
            + str_len(3, self.trace_state)
            + bytes_len(4, if self.parent_span_id.is_some() { 8 } else { 0 })
            + str_len(5, self.name)
            + varint_len_field(6, kind(&self.kind))
            + fixed64_len(7, nanos(self.start))
            + fixed64_len(8, nanos(self.end))
            + self.attributes.len()
            + self.events.len()
            + message_len(15, status_len(self.status))
            + fixed32_len(16, span_flags(self.parent_is_remote, self.trace_flags))
    }

    /// Appends the span as field `field` of its parent message (`ScopeSpans.spans` = 2).
    pub fn put(&self, out: &mut Vec<u8>, field: u64) {
        let len = self.len();
        out.reserve(message_len(field, len));
        put_header(out, field, len);
        put_bytes(out, 1, &self.trace_id);
        put_bytes(out, 2, &self.span_id);
        put_str(out, 3, self.trace_state);
        if let Some(parent) = &self.parent_span_id {
            put_bytes(out, 4, parent);
        }
        put_str(out, 5, self.name);
        put_varint_field(out, 6, kind(&self.kind));
        put_fixed64(out, 7, nanos(self.start));
        put_fixed64(out, 8, nanos(self.end));
        out.extend_from_slice(self.attributes);
        out.extend_from_slice(self.events);
        put_header(out, 15, status_len(self.status));
        put_status(out, self.status);
        put_fixed32(out, 16, span_flags(self.parent_is_remote, self.trace_flags));
    }
}

/// A span attribute's value as `request_span` records it: borrowed, encoded at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttrValue<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
}

impl<'a> AttrValue<'a> {
    fn scalar(self) -> Scalar<'a> {
        match self {
            AttrValue::Str(s) => Scalar::Str(s),
            AttrValue::Bool(b) => Scalar::Bool(b),
            AttrValue::Int(i) => Scalar::Int(i),
        }
    }
}

/// One `KeyValue` as field `field` (`Span.attributes` = 9, `Event.attributes` = 3).
pub fn put_attr(out: &mut Vec<u8>, field: u64, key: &str, value: AttrValue<'_>) {
    // Nearly every attribute is a short text under a short key: every length fits one byte, so
    // the bytes are written in one go (a third of the general path's instructions, measured).
    if let (AttrValue::Str(s), true) = (value, field < 16) {
        let (k, v) = (key.len(), s.len());
        let kv = 2 + k + 2 + 2 + v;
        if kv < 128 {
            out.reserve(2 + kv);
            out.extend_from_slice(&[(field << 3 | LEN) as u8, kv as u8, 0x0a, k as u8]);
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&[0x12, (2 + v) as u8, 0x0a, v as u8]);
            out.extend_from_slice(s.as_bytes());
            return;
        }
    }
    let value = value.scalar();
    put_header(out, field, str_len(1, key) + message_len(2, value.len()));
    put_str(out, 1, key);
    put_header(out, 2, value.len());
    value.put(out);
}

/// One `Span.Event` as field `field` (11), its attributes already encoded as field 3.
pub fn put_event(out: &mut Vec<u8>, field: u64, at: SystemTime, name: &str, attributes: &[u8]) {
    let len = fixed64_len(1, nanos(at)) + str_len(2, name) + attributes.len();
    put_header(out, field, len);
    put_fixed64(out, 1, nanos(at));
    put_str(out, 2, name);
    out.extend_from_slice(attributes);
}

// Attributes: `KeyValue { key = 1, value = 2 }`, the value an `AnyValue` whose one field is set
// even when it holds its type's default (a oneof member is always written).

fn attributes_len(field: u64, attrs: &[KeyValue]) -> usize {
    attrs.iter().map(|kv| message_len(field, key_value_len(kv.key.as_str(), &kv.value))).sum()
}

fn put_attributes(out: &mut Vec<u8>, field: u64, attrs: &[KeyValue]) {
    for kv in attrs {
        put_key_value(out, field, kv.key.as_str(), &kv.value);
    }
}

fn key_value_len(key: &str, value: &Value) -> usize {
    str_len(1, key) + message_len(2, any_len(value))
}

fn put_key_value(out: &mut Vec<u8>, field: u64, key: &str, value: &Value) {
    put_header(out, field, key_value_len(key, value));
    put_str(out, 1, key);
    put_header(out, 2, any_len(value));
    put_any(out, value);
}

/// One scalar of an `AnyValue`: `string = 1, bool = 2, int = 3, double = 4`.
#[derive(Clone, Copy)]
enum Scalar<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
}

impl Scalar<'_> {
    fn len(self) -> usize {
        match self {
            Scalar::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
            Scalar::Bool(_) => 2,
            Scalar::Int(i) => 1 + varint_len(i as u64),
            Scalar::Double(_) => 9,
        }
    }

    fn put(self, out: &mut Vec<u8>) {
        match self {
            Scalar::Str(s) => {
                put_tag(out, 1, LEN);
                put_varint(out, s.len() as u64);
                out.extend_from_slice(s.as_bytes());
            }
            Scalar::Bool(b) => {
                put_tag(out, 2, VARINT);
                out.push(u8::from(b));
            }
            Scalar::Int(i) => {
                put_tag(out, 3, VARINT);
                put_varint(out, i as u64);
            }
            Scalar::Double(d) => {
                put_tag(out, 4, FIXED64);
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
    }
}

/// The scalars of an array value, each an `AnyValue` of `ArrayValue { values = 1 }`.
fn elements(a: &Array) -> Box<dyn Iterator<Item = Scalar<'_>> + '_> {
    match a {
        Array::Bool(v) => Box::new(v.iter().map(|b| Scalar::Bool(*b))),
        Array::I64(v) => Box::new(v.iter().map(|i| Scalar::Int(*i))),
        Array::F64(v) => Box::new(v.iter().map(|d| Scalar::Double(*d))),
        Array::String(v) => Box::new(v.iter().map(|s| Scalar::Str(s.as_str()))),
        // A kind added to the API later: its text, rather than losing the attribute.
        _ => Box::new(std::iter::empty()),
    }
}

fn array_len(a: &Array) -> usize {
    elements(a).map(|e| message_len(1, e.len())).sum()
}

/// What an attribute value is on the wire; kinds the API may add later go as their text.
enum Any<'a> {
    Scalar(Scalar<'a>),
    Array(&'a Array),
    Text(String),
}

fn any(v: &Value) -> Any<'_> {
    match v {
        Value::String(s) => Any::Scalar(Scalar::Str(s.as_str())),
        Value::Bool(b) => Any::Scalar(Scalar::Bool(*b)),
        Value::I64(i) => Any::Scalar(Scalar::Int(*i)),
        Value::F64(d) => Any::Scalar(Scalar::Double(*d)),
        Value::Array(a) if matches!(a, Array::Bool(_) | Array::I64(_) | Array::F64(_) | Array::String(_)) => {
            Any::Array(a)
        }
        other => Any::Text(other.to_string()),
    }
}

fn any_len(v: &Value) -> usize {
    match any(v) {
        Any::Scalar(s) => s.len(),
        Any::Array(a) => message_len(5, array_len(a)),
        Any::Text(t) => Scalar::Str(&t).len(),
    }
}

fn put_any(out: &mut Vec<u8>, v: &Value) {
    match any(v) {
        Any::Scalar(s) => s.put(out),
        Any::Array(a) => {
            put_header(out, 5, array_len(a));
            for e in elements(a) {
                put_header(out, 1, e.len());
                e.put(out);
            }
        }
        Any::Text(t) => Scalar::Str(&t).put(out),
    }
}

// Fields. proto3 leaves a field at its default out; an embedded message that is present is
// written even when empty.

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag_len(field: u64) -> usize {
    varint_len(field << 3)
}

fn put_tag(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

fn message_len(field: u64, len: usize) -> usize {
    tag_len(field) + varint_len(len as u64) + len
}

fn put_header(out: &mut Vec<u8>, field: u64, len: usize) {
    put_tag(out, field, LEN);
    put_varint(out, len as u64);
}

fn bytes_len(field: u64, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        message_len(field, len)
    }
}

fn put_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    if !b.is_empty() {
        put_header(out, field, b.len());
        out.extend_from_slice(b);
    }
}

fn str_len(field: u64, s: &str) -> usize {
    bytes_len(field, s.len())
}

fn put_str(out: &mut Vec<u8>, field: u64, s: &str) {
    put_bytes(out, field, s.as_bytes());
}

fn varint_len_field(field: u64, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        tag_len(field) + varint_len(v)
    }
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    if v != 0 {
        put_tag(out, field, VARINT);
        put_varint(out, v);
    }
}

/// A fixed-width field of `width` bytes (8: fixed64/double, 4: fixed32), little-endian.
fn fixed_len(field: u64, v: u64, width: usize) -> usize {
    if v == 0 {
        0
    } else {
        tag_len(field) + width
    }
}

fn put_fixed(out: &mut Vec<u8>, field: u64, v: u64, width: usize) {
    if v != 0 {
        put_tag(out, field, if width == 8 { FIXED64 } else { FIXED32 });
        out.extend_from_slice(&v.to_le_bytes()[..width]);
    }
}

fn fixed64_len(field: u64, v: u64) -> usize {
    fixed_len(field, v, 8)
}

fn put_fixed64(out: &mut Vec<u8>, field: u64, v: u64) {
    put_fixed(out, field, v, 8);
}

fn fixed32_len(field: u64, v: u32) -> usize {
    fixed_len(field, u64::from(v), 4)
}

fn put_fixed32(out: &mut Vec<u8>, field: u64, v: u32) {
    put_fixed(out, field, u64::from(v), 4);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use std::time::Duration;

    use opentelemetry::trace::{Event, Link, SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry::StringValue;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_765_000_000_000 + ms)
    }

    fn context(trace: u128, span: u64, remote: bool, state: &str) -> SpanContext {
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            remote,
            TraceState::from_key_value(if state.is_empty() { vec![] } else { vec![("vendor", state)] }).unwrap(),
        )
    }

    fn span(name: &'static str, scope: &InstrumentationScope, parent: u64, remote_parent: bool) -> SpanData {
        SpanData {
            span_context: context(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331 + parent, false, ""),
            parent_span_id: if parent == 0 { SpanId::INVALID } else { SpanId::from(parent) },
            parent_span_is_remote: remote_parent,
            span_kind: SpanKind::Server,
            name: Cow::Borrowed(name),
            start_time: at(0),
            end_time: at(12),
            attributes: vec![
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("http.route", "/api/data"),
                KeyValue::new("http.response.status_code", 503_i64),
                KeyValue::new("graceful.dropped", true),
                KeyValue::new("graceful.ms_since_sigterm", -3_i64),
                KeyValue::new("ratio", 0.25_f64),
                KeyValue::new("empty", ""),
                KeyValue::new("zero", 0_i64),
                KeyValue::new("no", false),
                KeyValue::new("long", "x".repeat(300)),
                KeyValue::new("strings", Value::Array(Array::String(vec![StringValue::from("a"), "".into()]))),
                KeyValue::new("ints", Value::Array(Array::I64(vec![0, 1, -1, i64::MAX]))),
                KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("doubles", Value::Array(Array::F64(vec![0.0, -1.5]))),
            ],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: scope.clone(),
        }
    }

    fn resource() -> Resource {
        Resource::builder_empty()
            .with_service_name("graceful-frontend")
            .with_attributes([
                KeyValue::new("k8s.pod.name", "frontend-1"),
                KeyValue::new("graceful.features.retry", true),
            ])
            .with_schema_url(Vec::<KeyValue>::new(), "https://opentelemetry.io/schemas/1.30.0")
            .build()
    }

    /// Our bytes, decoded by opentelemetry-proto, equal its own conversion of the same spans,
    /// and are exactly as long as prost's encoding of it (the same fields left out as defaults).
    fn assert_same_as_reference(spans: Vec<SpanData>) {
        let resource = resource();
        let ours = Encoder::new(&resource).encode(&spans);
        let reference = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans, &ResourceAttributesWithSchema::from(&resource)),
        };
        let decoded = ExportTraceServiceRequest::decode(ours.as_slice()).expect("our bytes decode");
        assert_eq!(decoded, reference);
        assert_eq!(ours.len(), reference.encoded_len());
    }

    #[test]
    fn a_batch_decodes_to_what_the_reference_conversion_gives() {
        let ours = InstrumentationScope::builder("graceful").build();
        let other = InstrumentationScope::builder("other")
            .with_version("1.2.3")
            .with_schema_url("https://example.test/schema")
            .with_attributes([KeyValue::new("scope.attr", 7_i64)])
            .build();
        let mut failed = span("GET /api/data", &ours, 0x1111, true);
        failed.span_kind = SpanKind::Client;
        failed.status = Status::error("shutdown_timeout reached");
        failed.dropped_attributes_count = 3;
        failed.events.events = vec![
            Event::new("exception", at(5), vec![KeyValue::new("exception.message", "reset")], 1),
            Event::new("", UNIX_EPOCH, vec![], 0),
        ];
        failed.events.dropped_count = 2;
        failed.links.links = vec![Link::new(context(7, 9, true, "abc"), vec![KeyValue::new("link.attr", "v")], 4)];
        failed.links.dropped_count = 1;
        failed.span_context = context(0x0af7651916cd43dd8448eb211c80319c, 0x2222, false, "state");
        let mut ok = span("internal", &other, 0, false);
        ok.span_kind = SpanKind::Internal;
        ok.status = Status::Ok;
        ok.attributes.clear();
        let mut producer = span("produce", &ours, 0x3333, false);
        producer.span_kind = SpanKind::Producer;
        let mut consumer = span("consume", &other, 0x4444, false);
        consumer.span_kind = SpanKind::Consumer;
        assert_same_as_reference(vec![failed, ok, producer, consumer]);
    }

    #[test]
    fn an_empty_batch_and_a_single_span_match_too() {
        assert_same_as_reference(vec![]);
        let scope = InstrumentationScope::builder("graceful").build();
        assert_same_as_reference(vec![span("GET /", &scope, 0, false)]);
    }

    #[test]
    fn varint_lengths_hold_at_every_boundary() {
        for v in [0, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX >> 1, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            assert_eq!(prost::encoding::decode_varint(&mut out.as_slice()).unwrap(), v);
        }
    }
}
