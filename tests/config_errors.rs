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

/// Arguments, environment, what stderr must name.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);

/// Values that used to validate and then panic (exit 101) or overflow at SIGTERM.
#[test]
fn out_of_range_values_are_refused_at_load() {
    let cases: &[Case] = &[
        (
            &["config"],
            &[("GRACEFUL_SERVER__WORKERS", "513")],
            &["server.workers", "GRACEFUL_SERVER__WORKERS", "1 to 64"],
        ),
        (&["config"], &[("GRACEFUL_SERVER__WORKERS", "0")], &["server.workers", "1 to 64"]),
        (
            &["config"],
            &[("GRACEFUL_SERVER__KEEP_ALIVE", "300000000000years")],
            &["server.keep_alive", "GRACEFUL_SERVER__KEEP_ALIVE"],
        ),
        (
            &["backend", "--shutdown-timeout", "300000000000years"],
            &[],
            &["shutdown.shutdown_timeout", "--shutdown-timeout", "10m"],
        ),
        (&["config"], &[("GRACEFUL_UPSTREAM__MAX_ATTEMPTS", "1000")], &["upstream.max_attempts", "1 to 20"]),
        (&["config"], &[("GRACEFUL_BACKEND__GAME_OVER_BODY_LIMIT", "0")], &["backend.game_over_body_limit"]),
        (&["config"], &[("GRACEFUL_BACKEND__WORK_MAX", "2h")], &["backend.work_max", "1m"]),
        (&["config"], &[("GRACEFUL_SERVER__BODY_READ_TIMEOUT", "0s")], &["server.body_read_timeout"]),
    ];
    for (args, env, needles) in cases {
        let out = run(args, env);
        fails_naming(&out, needles);
    }
}

#[test]
fn inconsistent_upstream_bounds_and_urls_are_refused() {
    let out = run(&["config"], &[("GRACEFUL_UPSTREAM__DEADLINE", "500ms")]);
    fails_naming(&out, &["upstream.deadline", "GRACEFUL_UPSTREAM__DEADLINE", "attempt_timeout"]);
    for url in ["http://svc-backend:5000/v2", "http://svc-backend:5000/?x=1", "http://user@svc-backend:5000"] {
        let out = run(&["frontend", "--backend-url", url], &[]);
        fails_naming(&out, &["frontend.backend_url", "--backend-url", "no path"]);
    }
}

#[test]
fn port_zero_only_when_a_flag_asks_for_it() {
    let out = run(&["config"], &[("GRACEFUL_BACKEND__LISTEN", "0.0.0.0:0")]);
    fails_naming(&out, &["backend.listen", "GRACEFUL_BACKEND__LISTEN", "port 0"]);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("g.toml");
    std::fs::write(&f, "[frontend]\nadmin_listen = \"127.0.0.1:0\"\n").unwrap();
    let out = run(&["--config", f.to_str().unwrap(), "config"], &[]);
    fails_naming(&out, &["frontend.admin_listen", "file", "port 0"]);
    let out = run(&["config"], &[]);
    assert!(out.status.success());
}

#[test]
fn retry_on_takes_only_5xx_statuses() {
    let out = run(&["config"], &[("GRACEFUL_UPSTREAM__RETRY_ON", "[502, 404]")]);
    fails_naming(&out, &["upstream.retry_on", "GRACEFUL_UPSTREAM__RETRY_ON", "404", "500-599"]);
    let out = run(&["config"], &[("GRACEFUL_UPSTREAM__RETRY_ON", "[]")]);
    fails_naming(&out, &["upstream.retry_on"]);
    let out = run(&["config", "--json"], &[("GRACEFUL_UPSTREAM__RETRY_ON", "[500, 503]")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows.iter().find(|r| r["key"] == "upstream.retry_on").unwrap();
    assert_eq!(row["value"], serde_json::json!([500, 503]));
}
