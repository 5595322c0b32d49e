//! Every class of bad input exits non-zero before listening, naming the key (or flag) and its source.

mod common;

use std::process::{Command, Output};

use common::BIN;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("GRACEFUL_CONFIG").env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // `config` never listens; `backend` would, so give it ports that cannot clash.
    cmd.output().unwrap()
}

fn fails_naming(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {err}");
    assert_eq!(out.status.code(), Some(2), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn unknown_key_in_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("g.toml");
    std::fs::write(&f, "[shutdown]\ndrain_dealy = \"1s\"\n").unwrap();
    let out = run(&["--config", f.to_str().unwrap(), "config"], &[]);
    fails_naming(&out, &["shutdown.drain_dealy", f.to_str().unwrap()]);
}

#[test]
fn unknown_section_in_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("g.toml");
    std::fs::write(&f, "[shutdwon]\ndrain_delay = \"1s\"\n").unwrap();
    let out = run(&["--config", f.to_str().unwrap(), "backend"], &[]);
    fails_naming(&out, &["shutdwon", "file"]);
}

#[test]
fn bad_duration_in_env() {
    let out = run(&["backend"], &[("GRACEFUL_SHUTDOWN__DRAIN_DELAY", "5 parsecs")]);
    fails_naming(&out, &["shutdown.drain_delay", "GRACEFUL_SHUTDOWN__DRAIN_DELAY"]);
}

#[test]
fn unknown_key_in_env() {
    let out = run(&["config"], &[("GRACEFUL_SHUTDOWN__DRAIN_DEALY", "1s")]);
    fails_naming(&out, &["drain_dealy", "GRACEFUL_SHUTDOWN__DRAIN_DEALY"]);
}

#[test]
fn bad_port_in_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("g.toml");
    std::fs::write(&f, "[backend]\nlisten = \"0.0.0.0:70000\"\n").unwrap();
    let out = run(&["--config", f.to_str().unwrap(), "backend"], &[]);
    fails_naming(&out, &["backend.listen", "file"]);
}

#[test]
fn bad_url_in_flag() {
    let out = run(&["frontend", "--backend-url", "not a url"], &[]);
    fails_naming(&out, &["frontend.backend_url", "--backend-url"]);
}

#[test]
fn bad_otel_endpoint_in_standard_env() {
    // `collector:4318` parses as a URL whose scheme is "collector": not what anyone means.
    let out = run(&["config"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]);
    fails_naming(&out, &["telemetry.otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", "http://"]);
    let out = run(&["config"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", "::bad")]);
    fails_naming(&out, &["telemetry.otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"]);
}

#[test]
fn inconsistent_values_name_the_key() {
    let out = run(&["config"], &[("GRACEFUL_UPSTREAM__POOL_IDLE", "9s")]);
    fails_naming(&out, &["upstream.pool_idle", "GRACEFUL_UPSTREAM__POOL_IDLE", "keep_alive"]);
    let out = run(&["config"], &[("GRACEFUL_BACKEND__WORK_MIN", "2s")]);
    fails_naming(&out, &["backend.work_min"]);
    let out = run(&["config"], &[("GRACEFUL_TELEMETRY__SAMPLER", "sometimes")]);
    fails_naming(&out, &["telemetry.sampler"]);
}

#[test]
fn missing_config_file() {
    let out = run(&["--config", "/nonexistent/graceful.toml", "backend"], &[]);
    fails_naming(&out, &["/nonexistent/graceful.toml", "--config"]);
    let out = run(&["backend"], &[("GRACEFUL_CONFIG", "/nonexistent/g.toml")]);
    fails_naming(&out, &["/nonexistent/g.toml", "GRACEFUL_CONFIG"]);
}

#[test]
fn bad_flag_value_is_named_by_clap() {
    let out = run(&["backend", "--listen", "localhost"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
    let out = run(&["backend", "--graceful=maybe"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--graceful"));
}

#[test]
fn config_shows_each_source() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("g.toml");
    std::fs::write(&f, "[shutdown]\nshutdown_timeout = \"20s\"\n").unwrap();
    let out = run(
        &["--config", f.to_str().unwrap(), "config", "--json"],
        &[("GRACEFUL_SHUTDOWN__DRAIN_DELAY", "7s"), ("OTEL_SERVICE_NAME", "svc-x")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let find = |k: &str| rows.iter().find(|r| r["key"] == k).unwrap().clone();
    assert_eq!(find("shutdown.drain_delay")["value"], "7s");
    assert_eq!(find("shutdown.drain_delay")["source"], "environment variable GRACEFUL_SHUTDOWN__DRAIN_DELAY");
    assert_eq!(find("shutdown.shutdown_timeout")["source"], format!("file {}", f.display()));
    assert_eq!(find("telemetry.service_name")["source"], "environment variable OTEL_SERVICE_NAME");
    assert_eq!(find("server.keep_alive")["source"], "built-in default");
}

#[test]
fn help_documents_env_vars() {
    for args in [&["--help"][..], &["backend", "--help"], &["frontend", "--help"], &["config", "--help"]] {
        let out = run(args, &[]);
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        for v in ["GRACEFUL_CONFIG", "GRACEFUL_<SECTION>__<KEY>", "OTEL_EXPORTER_OTLP_ENDPOINT", "POD_NAME"] {
            assert!(text.contains(v), "{args:?} lacks {v}");
        }
    }
}
