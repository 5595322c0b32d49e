//! A run's spans leave the lab: every export the pods send is written to the run directory as
//! OTLP JSON lines (the OpenTelemetry file-exporter encoding, which Jaeger's UI, a Collector's
//! `otlpjsonfile` receiver and any OTLP reader load) and, with `--otlp-forward`, sent on to a
//! live endpoint. Both carry the run's name in the resource attribute `graceful.lab.run`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::Serialize;

use crate::lab::otlp_forward::{ForwardStats, ForwardTarget, Forwarder, Protocol, RunForward};
use crate::otlp_receiver::{ExportTap, OtlpReceiver};

/// The resource attribute naming the run: search Jaeger by `graceful.lab.run=<name>`.
pub const RUN_ATTRIBUTE: &str = "graceful.lab.run";
/// The spans' file in each run directory.
pub const FILE_NAME: &str = "traces.jsonl";
/// Longest wait at a run's end for its forwarded exports to leave.
const FORWARD_FLUSH: Duration = Duration::from_secs(5);

/// Where one run's spans went (`--json`: `runs[].traces`).
#[derive(Debug, Clone, Serialize)]
pub struct TraceOutput {
    /// The value of `graceful.lab.run` on every span of the run.
    pub run: String,
    /// OTLP JSON lines, one export per line.
    pub file: PathBuf,
    pub spans_written: u64,
    /// Why the file is incomplete, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward: Option<ForwardStats>,
}

impl TraceOutput {
    /// The run's trace line for the progress output.
    pub fn line(&self) -> String {
        let mut s = format!("{RUN_ATTRIBUTE}={}: {} spans in {}", self.run, self.spans_written, self.file.display());
        if let Some(e) = &self.write_error {
            s.push_str(&format!(" (incomplete: {e})"));
        }
        if let Some(f) = &self.forward {
            s.push_str("; ");
            s.push_str(&f.line());
        }
        s
    }
}

/// The run now receiving spans.
struct OpenRun {
    name: String,
    path: PathBuf,
    /// None once a write failed: the rest of the run is not written (the error says so).
    file: Option<BufWriter<File>>,
    spans_written: u64,
    write_error: Option<String>,
    forward: Option<RunForward>,
}

/// Shown every export by the lab's receiver; one run open at a time.
pub struct TraceExport {
    forwarder: Option<Forwarder>,
    open: Mutex<Option<OpenRun>>,
}

/// The lab's trace output from its flags: none without a receiver (`--no-tracing`; a forward
/// endpoint then only gets a note), else the file per run and, with `--otlp-forward` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, the forwarder (its URL checked first).
/// The forwarder runs on `send_from` when given (a runtime in the host's network namespace),
/// else on the current runtime.
pub fn start(
    args: &crate::lab::LabArgs,
    receiver: Option<&OtlpReceiver>,
    send_from: Option<tokio::runtime::Handle>,
) -> Result<Option<Arc<TraceExport>>> {
    let target = match &args.otlp_forward {
        Some(url) => Some(ForwardTarget::parse(url, Protocol::chosen(args.otlp_forward_protocol)?)?),
        None => None,
    };
    let Some(receiver) = receiver else {
        if let Some(t) = target {
            eprintln!("note: --no-tracing: no spans are collected, so none are forwarded to {}", t.url);
        }
        return Ok(None);
    };
    Ok(Some(TraceExport::attach(receiver, target, send_from)))
}

impl TraceExport {
    /// Taps `receiver`; with a target, starts the forwarder (on `send_from`, else the current
    /// tokio runtime).
    pub fn attach(
        receiver: &OtlpReceiver,
        forward: Option<ForwardTarget>,
        send_from: Option<tokio::runtime::Handle>,
    ) -> Arc<TraceExport> {
        let rt = send_from.unwrap_or_else(tokio::runtime::Handle::current);
        let forwarder = forward.map(|t| Forwarder::start_on(&rt, t));
        let export = Arc::new(TraceExport { forwarder, open: Mutex::new(None) });
        receiver.set_tap(Some(export.clone()));
        export
    }

    /// Opens `<run_dir>/traces.jsonl` for the run named `run` (see [`run_name`]).
    pub fn begin_run(&self, run: &str, run_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let path = run_dir.join(FILE_NAME);
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        *self.open.lock().unwrap() = Some(OpenRun {
            name: run.to_string(),
            path,
            file: Some(BufWriter::new(file)),
            spans_written: 0,
            write_error: None,
            forward: self.forwarder.as_ref().map(Forwarder::begin_run),
        });
        Ok(())
    }

    /// Closes the run's file and, waiting a bounded time for the queue, its forwarding figures.
    pub async fn end_run(&self) -> Option<TraceOutput> {
        let mut run = self.open.lock().unwrap().take()?;
        if let Some(mut f) = run.file.take() {
            if let Err(e) = f.flush() {
                run.write_error.get_or_insert(format!("{e}"));
            }
        }
        let forward = match run.forward {
            Some(f) => Some(f.finish(FORWARD_FLUSH).await),
            None => None,
        };
        Some(TraceOutput {
            run: run.name,
            file: run.path,
            spans_written: run.spans_written,
            write_error: run.write_error,
            forward,
        })
    }
}

impl ExportTap for TraceExport {
    fn export(&self, request: &ExportTraceServiceRequest) {
        let mut guard = self.open.lock().unwrap();
        // Between runs (a straggler from a killed pod): nothing to file it under.
        let Some(run) = guard.as_mut() else { return };
        let mut request = request.clone();
        name_run(&mut request, &run.name);
        let spans = span_count(&request);
        if let Some(file) = run.file.as_mut() {
            let written = serde_json::to_writer(&mut *file, &request)
                .map_err(|e| e.to_string())
                .and_then(|()| file.write_all(b"\n").map_err(|e| e.to_string()));
            match written {
                Ok(()) => run.spans_written += spans,
                Err(e) => {
                    run.write_error = Some(e);
                    run.file = None;
                }
            }
        }
        if let Some(f) = &run.forward {
            f.offer(request, spans);
        }
    }
}

/// A run's name, unique across invocations: the run directory's name and the Unix time.
pub fn run_name(dir_name: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{dir_name}-{}", now.as_secs())
}

/// Adds `graceful.lab.run` to every resource of the export (replacing a value already there).
fn name_run(request: &mut ExportTraceServiceRequest, run: &str) {
    for rs in &mut request.resource_spans {
        let resource = rs.resource.get_or_insert_with(Resource::default);
        resource.attributes.retain(|kv| kv.key != RUN_ATTRIBUTE);
        resource.attributes.push(KeyValue {
            key: RUN_ATTRIBUTE.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(run.into())) }),
            ..Default::default()
        });
    }
}

fn span_count(request: &ExportTraceServiceRequest) -> u64 {
    request.resource_spans.iter().flat_map(|rs| &rs.scope_spans).map(|ss| ss.spans.len() as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

    fn export(trace: u8) -> ExportTraceServiceRequest {
        let span = Span {
            trace_id: vec![trace; 16],
            span_id: vec![0xab; 8],
            name: "GET /api/data".into(),
            kind: 2,
            start_time_unix_nano: 1_765_000_000_000_000_001,
            end_time_unix_nano: 1_765_000_000_100_000_000,
            status: Some(Status { code: 2, message: "upstream reset".into() }),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: None,
                scope_spans: vec![ScopeSpans { spans: vec![span.clone(), span], ..Default::default() }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn each_export_becomes_one_otlp_json_line_naming_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let export_tap = TraceExport { forwarder: None, open: Mutex::new(None) };
        export_tap.export(&export(1)); // before any run: not filed
        export_tap.begin_run("problem-1", dir.path()).unwrap();
        export_tap.export(&export(0x0a));
        export_tap.export(&export(0x0b));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let out = rt.block_on(export_tap.end_run()).unwrap();
        assert_eq!((out.run.as_str(), out.spans_written), ("problem-1", 4));
        let text = std::fs::read_to_string(&out.file).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        let span = &lines[0]["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        // The OTLP/JSON mapping: hex ids, 64-bit integers as strings, enums as numbers.
        assert_eq!(span["traceId"], "0a".repeat(16));
        assert_eq!(span["spanId"], "ab".repeat(8));
        assert_eq!(span["startTimeUnixNano"], "1765000000000000001");
        assert_eq!(span["kind"], 2);
        assert_eq!(span["status"]["code"], 2);
        let attrs = &lines[1]["resourceSpans"][0]["resource"]["attributes"];
        assert_eq!(attrs[0]["key"], RUN_ATTRIBUTE);
        assert_eq!(attrs[0]["value"]["stringValue"], "problem-1");
        // Read back by the same crate's decoder: the lines are its own encoding, ids and all.
        let back: ExportTraceServiceRequest = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(back.resource_spans[0].scope_spans[0].spans[0].trace_id, vec![0x0b; 16]);
    }

    #[test]
    fn the_run_attribute_is_set_once() {
        let mut req = export(1);
        name_run(&mut req, "a");
        name_run(&mut req, "b");
        let attrs = &req.resource_spans[0].resource.as_ref().unwrap().attributes;
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].value, Some(AnyValue { value: Some(any_value::Value::StringValue("b".into())) }));
    }
}
