//! A lab run's traces leave the lab: written per run as OTLP JSON lines that an independent
//! decoder (Python's `opentelemetry-proto` with `google.protobuf.json_format`) reads, and
//! forwarded live — http/protobuf or gRPC — to OTLP receivers on 127.0.0.1, every span tagged
//! with the run's name. A dead endpoint costs counted spans, never the run.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::grpc_receiver::{grpc_receiver, GrpcCollect};
use common::wait_bounded;
use graceful::otlp_receiver::OtlpReceiver;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;

const RUN_ATTRIBUTE: &str = "graceful.lab.run";

fn lab(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_graceful"));
    c.arg("lab").args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT").env_remove("OTEL_EXPORTER_OTLP_PROTOCOL");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Runs one short lab over `overlay` into `dir`; returns its `--json` run and its stdout.
fn run_lab(dir: &Path, overlay: &str, extra: &[&str], env: &[(&str, &str)]) -> (serde_json::Value, String) {
    let report = dir.join("lab.json");
    let (out, json) = (dir.join("runs"), report.to_str().unwrap().to_string());
    let mut args = vec!["--overlay", overlay, "--profile", "short", "--quiet", "--json", &json];
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    let child = lab(&args, env).spawn().unwrap();
    let (status, stdout, stderr) = wait_bounded(child, Duration::from_secs(180));
    assert!(status.success(), "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let run = doc["runs"][0].clone();
    assert_eq!(run["name"], overlay);
    // The per-run line (stderr, kept under --quiet) names the run and the figures.
    let name = run["traces"]["run"].as_str().unwrap().to_string();
    assert!(stderr.contains(&format!("{RUN_ATTRIBUTE}={name}")), "{stderr}");
    (run, stdout + &stderr)
}

/// (trace id, span id) of every span in a run's file, read with the crate's own OTLP/JSON
/// decoder; every resource must carry the run's name.
fn file_spans(run: &serde_json::Value) -> BTreeSet<(String, String)> {
    let name = run["traces"]["run"].as_str().unwrap();
    let text = std::fs::read_to_string(run["traces"]["file"].as_str().unwrap()).unwrap();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let req: ExportTraceServiceRequest = serde_json::from_str(line).unwrap();
        for rs in req.resource_spans {
            assert_eq!(run_of(rs.resource.as_ref().map(|r| &r.attributes[..]).unwrap_or(&[])), Some(name.into()));
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                out.insert((hex(&s.trace_id), hex(&s.span_id)));
            }
        }
    }
    out
}

fn run_of(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Option<String> {
    attrs.iter().find(|kv| kv.key == RUN_ATTRIBUTE).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Python's decoder: strict `json_format.ParseDict` of each line into the official
/// `ExportTraceServiceRequest`, after turning OTLP/JSON's hex ids into the base64 the protobuf
/// JSON mapping has. Prints `trace_id run` per span.
const PY_READER: &str = r#"
import base64, json, sys
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

def ids_to_base64(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("traceId", "spanId", "parentSpanId") and isinstance(v, str):
                node[k] = base64.b64encode(bytes.fromhex(v)).decode()
            else:
                ids_to_base64(v)
    elif isinstance(node, list):
        for v in node:
            ids_to_base64(v)

for line in open(sys.argv[1]):
    doc = json.loads(line)
    ids_to_base64(doc)
    req = json_format.ParseDict(doc, ExportTraceServiceRequest())
    for rs in req.resource_spans:
        run = [a.value.string_value for a in rs.resource.attributes if a.key == "graceful.lab.run"]
        for ss in rs.scope_spans:
            for s in ss.spans:
                assert len(s.trace_id) == 16 and len(s.span_id) == 8, s
                print(s.trace_id.hex(), run[0] if run else "-")
"#;

/// Python's view of the file (trace id, run) per span, or why it cannot be had here. Missing
/// python3 or package: a skip with the reason, except under CI (`CI=true`), where it fails.
fn python_read(file: &Path) -> Option<Vec<(String, String)>> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let probe = Command::new("python3")
        .args(["-c", "import google.protobuf.json_format, opentelemetry.proto.collector.trace.v1.trace_service_pb2"])
        .output();
    let missing = match &probe {
        Err(e) => Some(format!("python3: {e}")),
        Ok(o) if !o.status.success() => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Ok(_) => None,
    };
    if let Some(why) = missing {
        assert!(!ci, "CI=true: the Python decoder is required (pip install opentelemetry-proto): {why}");
        eprintln!("SKIPPED the Python decoding check: {why} (pip install opentelemetry-proto)");
        return None;
    }
    let mut child = Command::new("python3")
        .arg("-")
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(PY_READER.as_bytes()).unwrap();
    let (status, stdout, stderr) = wait_bounded(child, Duration::from_secs(60));
    assert!(status.success(), "the Python decoder refused {}: {stderr}", file.display());
    Some(
        stdout
            .lines()
            .map(|l| {
                let (t, r) = l.split_once(' ').unwrap();
                (t.to_string(), r.to_string())
            })
            .collect(),
    )
}

/// The problem overlay, forwarded over http/protobuf to a receiver on 127.0.0.1: every span is
/// in the run's file and at the receiver, tagged; Python decodes the file and finds the failed
/// requests' traces; the failure table offers one to paste.
#[test]
fn failed_traces_are_in_the_file_python_reads_and_at_the_forwarded_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let forward_to = OtlpReceiver::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = forward_to.endpoint();
    let (run, output) = run_lab(dir.path(), "problem", &["--otlp-forward", &endpoint], &[]);
    let traces = &run["traces"];
    let name = traces["run"].as_str().unwrap();
    assert!(name.starts_with("problem-"), "{traces}");

    // Every span the pods exported is in the file.
    let in_file = file_spans(&run);
    let written = traces["spans_written"].as_u64().unwrap();
    assert_eq!(in_file.len() as u64, written, "{traces}");
    assert!(written >= run["spans_received"].as_u64().unwrap() && written > 100, "{traces}");

    // ... and reached the forward endpoint, unchanged but for the run's name.
    let fwd = &traces["forward"];
    assert_eq!(fwd["url"], format!("{endpoint}/v1/traces"));
    assert_eq!(fwd["protocol"], "http/protobuf");
    assert_eq!((fwd["forwarded_spans"].as_u64(), fwd["dropped_spans"].as_u64()), (Some(written), Some(0)), "{fwd}");
    assert!(output.contains(&format!("forwarded {written} spans to {endpoint}/v1/traces")), "{output}");
    let arrived = forward_to.spans();
    assert!(arrived.iter().all(|s| s.resource.get(RUN_ATTRIBUTE).and_then(|v| v.as_str()) == Some(name)));
    let arrived_ids: BTreeSet<(String, String)> =
        arrived.iter().map(|s| (s.trace_id.clone(), s.span_id.clone())).collect();
    assert_eq!((arrived.len(), &arrived_ids), (in_file.len(), &in_file));

    // --json carries every failed request's trace id; those with spans are in the file.
    let attribution = &run["attribution"];
    let items = attribution["items"].as_array().unwrap();
    let failed = attribution["failed"].as_u64().unwrap();
    assert!(failed > 0, "the problem overlay loses requests: {}", run["summary"]);
    let unexplained = attribution["unexplained"].as_array().unwrap();
    assert_eq!((items.len() + unexplained.len()) as u64, failed);
    assert!(items.iter().chain(unexplained).all(|i| i["trace_id"].as_str().is_some_and(|t| t.len() == 32)));
    let with_spans: Vec<&str> =
        items.iter().filter(|i| i["trace_spans"].as_u64() > Some(0)).map(|i| i["trace_id"].as_str().unwrap()).collect();
    assert!(!with_spans.is_empty(), "some failure left spans: {attribution}");
    let file_traces: BTreeSet<&str> = in_file.iter().map(|(t, _)| t.as_str()).collect();
    assert!(with_spans.iter().all(|t| file_traces.contains(t)));

    // The failure table: an example trace per row that has one, and it is in the file.
    let examples: Vec<&str> =
        run["groups"].as_array().unwrap().iter().filter_map(|g| g["example_trace"].as_str()).collect();
    assert!(!examples.is_empty());
    for t in &examples {
        assert!(file_traces.contains(t), "{t}");
        assert!(output.contains(t), "the failure table shows {t}:\n{output}");
    }

    // An independent decoder reads the same spans, ids and run name included.
    let file = Path::new(traces["file"].as_str().unwrap());
    if let Some(py) = python_read(file) {
        assert_eq!(py.len() as u64, written);
        assert!(py.iter().all(|(_, r)| r == name), "every span names the run");
        let py_traces: BTreeSet<&str> = py.iter().map(|(t, _)| t.as_str()).collect();
        assert!(with_spans.iter().all(|t| py_traces.contains(t)), "Python finds every failed request's trace");
    }
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT` + `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`, as a user with a local
/// Jaeger on 4317 would set them: every span arrives over gRPC with the run's name.
#[test]
fn the_environment_forwards_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let store = GrpcCollect::default();
    let endpoint = format!("http://{}", grpc_receiver(store.clone(), Duration::from_secs(200)));
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
    let (run, _) = run_lab(dir.path(), "solution", &["--expect-clean", "solution"], &env);
    let traces = &run["traces"];
    let fwd = &traces["forward"];
    let written = traces["spans_written"].as_u64().unwrap();
    assert!(written > 100, "{traces}");
    assert_eq!(fwd["protocol"], "grpc");
    assert_eq!((fwd["forwarded_spans"].as_u64(), fwd["dropped_spans"].as_u64()), (Some(written), Some(0)), "{fwd}");
    let mut arrived = BTreeSet::new();
    for req in store.0.lock().unwrap().iter() {
        for rs in &req.resource_spans {
            let run_name = run_of(rs.resource.as_ref().map(|r| &r.attributes[..]).unwrap_or(&[]));
            assert_eq!(run_name.as_deref(), traces["run"].as_str());
            for s in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                arrived.insert((hex(&s.trace_id), hex(&s.span_id)));
            }
        }
    }
    assert_eq!(arrived, file_spans(&run));
}

/// A closed port on 127.0.0.1: the run finishes clean all the same, the file is whole, and the
/// report counts every span as not forwarded.
#[test]
fn a_dead_endpoint_is_counted_and_does_not_fail_the_lab() {
    let dir = tempfile::tempdir().unwrap();
    // Held (bound, never listening) for the whole run, so no other test's server can take it.
    let holder = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    holder.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let port = holder.local_addr().unwrap().as_socket().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let (run, output) =
        run_lab(dir.path(), "solution", &["--otlp-forward", &endpoint, "--expect-clean", "solution"], &[]);
    let traces = &run["traces"];
    let written = traces["spans_written"].as_u64().unwrap();
    assert_eq!(file_spans(&run).len() as u64, written);
    let fwd = &traces["forward"];
    assert_eq!((fwd["forwarded_spans"].as_u64(), fwd["dropped_spans"].as_u64()), (Some(0), Some(written)), "{fwd}");
    assert!(written > 100 && fwd["last_error"].as_str().is_some_and(|e| e.contains("refused")), "{fwd}");
    assert!(output.contains(&format!("forwarded 0 spans to {endpoint}/v1/traces (http/protobuf), dropped {written}")));
}

/// A bad endpoint is refused before any pod starts, naming the flag.
#[test]
fn a_bad_forward_endpoint_is_named() {
    for (args, env, says) in [
        (vec!["--otlp-forward", "https://jaeger:4318"], vec![], "scheme `https`"),
        (vec![], vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318")], "scheme `localhost`"),
        (vec!["--otlp-forward", "http://127.0.0.1:4318", "--otlp-forward-protocol", "http/json"], vec![], "http/json"),
        (vec!["--otlp-forward", "http://127.0.0.1:4318"], vec![("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")], "OTEL_"),
    ] {
        let child = lab(&args, &env).spawn().unwrap();
        let (status, _, stderr) = wait_bounded(child, Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says) && stderr.to_lowercase().contains("otlp"), "{args:?}: {stderr}");
    }
}
