//! Span exporters. OTLP/HTTP (protobuf): behind the SDK's batch processor (the lifecycle span)
//! and behind `span_queue` (request spans); each batch encoded by `otlp_wire` and POSTed with
//! reqwest's blocking client from the exporting thread, never from a request's. OTLP/gRPC: the
//! stock exporter for the lifecycle span, `GrpcExporter` for request spans.
//!
//! As the stock exporter does: `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` are sent with every export,
//! and a 429, 502, 503 or 504 answer or a failed connection is tried again with backoff while the
//! export's time bound lasts.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use crate::otlp_wire::Encoder;

/// The exporter's extra headers, as OpenTelemetry names them (the traces-only one wins).
pub const HEADER_VARS: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"];

#[derive(Debug)]
pub struct HttpExporter {
    url: String,
    client: reqwest::blocking::Client,
    headers: HeaderMap,
    /// Bounds one export, its retries included.
    timeout: Duration,
    encoder: Encoder,
}

impl HttpExporter {
    /// Builds the client; call before any async runtime exists (reqwest's blocking client runs
    /// one of its own). `headers`: `k=v,k2=v2` (values percent-encoded), and where they came from.
    pub fn new(url: &str, headers: Option<(&str, &str)>, timeout: Duration) -> anyhow::Result<HttpExporter> {
        let mut map = HeaderMap::new();
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        if let Some((source, list)) = headers {
            for (k, v) in parse_headers(list).map_err(|e| anyhow::anyhow!("{source}: {e}"))? {
                let name = HeaderName::try_from(k).map_err(|e| anyhow::anyhow!("{source}: header name `{k}`: {e}"))?;
                let value = HeaderValue::try_from(v).map_err(|e| anyhow::anyhow!("{source}: header `{k}`: {e}"))?;
                map.insert(name, value);
            }
        }
        let client = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| anyhow::anyhow!("OTLP exporter for {url}: {e}"))?;
        Ok(HttpExporter { url: url.to_string(), client, headers: map, timeout, encoder: Encoder::default() })
    }

    /// The same exporter with `resource` in every batch (the SDK sets it through
    /// `set_resource`; the request spans' queue has no SDK around it).
    pub fn for_resource(mut self, resource: &Resource) -> HttpExporter {
        self.encoder = Encoder::new(resource);
        self
    }

    /// Sends spans recorded by `request_span` (their `ScopeSpans.spans` fields) under `scope`.
    pub fn export_recorded(&self, scope: &str, spans: &[u8]) -> Result<(), String> {
        self.post(self.encoder.encode_recorded(scope, spans)).map_err(|e| e.to_string())
    }

    fn post(&self, body: Vec<u8>) -> OTelSdkResult {
        // Shared, not copied, by each try.
        let body = bytes::Bytes::from(body);
        let deadline = Instant::now() + self.timeout;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(1))
            .with_max_times(3)
            .with_jitter()
            .build();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let sent =
                self.client.post(&self.url).headers(self.headers.clone()).timeout(left).body(body.clone()).send();
            let failure = match sent {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => {
                    let status = resp.status();
                    let retry = matches!(status.as_u16(), 429 | 502 | 503 | 504);
                    let text = resp.text().unwrap_or_default();
                    let text: String = text.chars().take(200).collect();
                    (retry, format!("{}: HTTP {status}: {}", self.url, text.trim()))
                }
                Err(e) => (e.is_connect() || e.is_timeout(), format!("{}: {e}", self.url)),
            };
            match (failure, backoff.next()) {
                ((true, _), Some(pause)) if Instant::now() + pause < deadline => std::thread::sleep(pause),
                ((_, message), _) => return Err(OTelSdkError::InternalFailure(message)),
            }
        }
    }
}

impl SpanExporter for HttpExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let body = self.encoder.encode(&batch);
        drop(batch);
        self.post(body)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.encoder = Encoder::new(resource);
    }
}

/// Recorded request spans over OTLP/gRPC: the batch decoded into opentelemetry-proto's request
/// and sent with its tonic client, on a runtime of its own (tonic needs one; actix's
/// current-thread runtimes cannot serve it). gRPC export is not the path the benchmark measures.
pub struct GrpcExporter {
    runtime: tokio::runtime::Runtime,
    client: TraceServiceClient<tonic::transport::Channel>,
    encoder: Encoder,
    timeout: Duration,
    metadata: Vec<(tonic::metadata::AsciiMetadataKey, tonic::metadata::AsciiMetadataValue)>,
}

impl GrpcExporter {
    pub fn new(url: &str, resource: &Resource, timeout: Duration) -> anyhow::Result<GrpcExporter> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("OTLP/gRPC exporter for {url}: {e}"))?;
        let channel = {
            let _guard = runtime.enter();
            tonic::transport::Channel::from_shared(url.to_string())
                .map_err(|e| anyhow::anyhow!("OTLP/gRPC endpoint `{url}`: {e}"))?
                .connect_timeout(timeout)
                .timeout(timeout)
                .connect_lazy()
        };
        let mut metadata = Vec::new();
        if let Some((source, list)) = headers_from_env() {
            for (k, v) in parse_headers(&list).map_err(|e| anyhow::anyhow!("{source}: {e}"))? {
                let key = k.to_ascii_lowercase().parse().map_err(|_| anyhow::anyhow!("{source}: header name `{k}`"))?;
                let value = v.parse().map_err(|_| anyhow::anyhow!("{source}: header `{k}`"))?;
                metadata.push((key, value));
            }
        }
        Ok(GrpcExporter {
            runtime,
            client: TraceServiceClient::new(channel),
            encoder: Encoder::new(resource),
            timeout,
            metadata,
        })
    }

    pub fn export_recorded(&self, scope: &str, spans: &[u8]) -> Result<(), String> {
        use prost::Message;
        let body = self.encoder.encode_recorded(scope, spans);
        let request = ExportTraceServiceRequest::decode(body.as_slice()).map_err(|e| e.to_string())?;
        let mut request = tonic::Request::new(request);
        for (k, v) in &self.metadata {
            request.metadata_mut().insert(k.clone(), v.clone());
        }
        let mut client = self.client.clone();
        self.runtime.block_on(async {
            match tokio::time::timeout(self.timeout, client.export(request)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(s)) => Err(format!("gRPC {:?}: {}", s.code(), s.message())),
                Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            }
        })
    }
}

/// `k=v,k2=v2` as OpenTelemetry's header variables have them: values percent-decoded (a `+`
/// stays a `+`: tokens are often base64), blank entries skipped, an entry without `=` refused.
fn parse_headers(list: &str) -> Result<Vec<(&str, String)>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').ok_or_else(|| format!("`{pair}` is not `name=value`"))?;
            let v = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy().into_owned();
            Ok((k.trim(), v))
        })
        .collect()
}

/// The headers the environment asks for, and which variable named them.
pub fn headers_from_env() -> Option<(&'static str, String)> {
    HEADER_VARS.iter().find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()).map(|v| (*var, v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_like_the_variables_say() {
        let got = parse_headers(" authorization=Basic dXNlcg+%3D%3D , x-tenant = lab%20one ,, ").unwrap();
        assert_eq!(got, vec![("authorization", "Basic dXNlcg+==".to_string()), ("x-tenant", "lab one".to_string())]);
        assert_eq!(parse_headers("a=1,oops").unwrap_err(), "`oops` is not `name=value`");
    }

    #[test]
    fn a_bad_header_is_refused_naming_its_variable() {
        let refusal = |var: &str, list: &str| {
            let built = HttpExporter::new("http://127.0.0.1:9/v1/traces", Some((var, list)), Duration::from_secs(1));
            built.unwrap_err().to_string()
        };
        let err = refusal("OTEL_EXPORTER_OTLP_HEADERS", "bad name=x");
        assert!(err.contains("OTEL_EXPORTER_OTLP_HEADERS") && err.contains("bad name"), "{err}");
        let err = refusal("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "k=a%0Ab");
        assert!(err.contains("OTEL_EXPORTER_OTLP_TRACES_HEADERS") && err.contains("header `k`"), "{err}");
        let err = refusal("OTEL_EXPORTER_OTLP_HEADERS", "a=1,oops");
        assert!(err.contains("`oops` is not `name=value`"), "{err}");
    }
}
