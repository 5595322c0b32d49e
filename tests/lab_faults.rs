//! The lab as a hostile user tries it: manifests and flags it must refuse (clearly, quickly, with
//! no panic), and a lab killed mid-run that must leave no process behind. Each test spawns the
//! real binary; runs are bounded.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::lab_run::graceful;
use common::procs::{alive, cmdline, descendants, ProcId};
use common::wait_bounded;

const HOOK: &str = include_str!("fixtures/lab/hook.yaml");

/// `graceful lab -f - ARGS` on `manifest`; returns (exit code, stderr) within `limit`.
fn lab_on(manifest: &str, args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut child = graceful().args(["lab", "-f", "-", "--quiet"]).args(args).stdin(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The lab may refuse before reading everything: a broken pipe is then expected.
    let _ = stdin.write_all(manifest.as_bytes());
    drop(stdin);
    let (status, _, stderr) = wait_bounded(child, limit);
    (status.code(), stderr)
}

fn hook_manifest(command: &str) -> String {
    HOOK.replace(r#"command: [/bin/sh, -c, "sleep SLEEP_SECONDS; true"]"#, &format!("command: {command}"))
}

#[test]
fn incomplete_handlers_are_refused_with_the_field_named() {
    let cases = [
        // The empty exec command used to pass validation and panic the lab.
        (hook_manifest("[]"), "lifecycle.preStop.exec.command is empty"),
        (hook_manifest(r#"[""]"#), "lifecycle.preStop.exec.command is empty"),
        (
            HOOK.replace(
                "exec:\n              command: [/bin/sh, -c, \"sleep SLEEP_SECONDS; true\"]",
                "sleep: {seconds: -1}",
            ),
            "lifecycle.preStop.sleep.seconds -1",
        ),
        (
            HOOK.replace(
                "exec:\n              command: [/bin/sh, -c, \"sleep SLEEP_SECONDS; true\"]",
                "httpGet: {path: /prestop, port: nope}",
            ),
            "lifecycle.preStop.httpGet.port `nope`",
        ),
        (
            HOOK.replace(
                "exec:\n              command: [/bin/sh, -c, \"sleep SLEEP_SECONDS; true\"]",
                "httpGet: {path: /prestop, port: 5001}\n            sleep: {seconds: 1}",
            ),
            "lifecycle.preStop needs exactly one of",
        ),
        (HOOK.replace("port: admin}", "port: 70000}"), "readinessProbe.httpGet.port `70000`"),
        (HOOK.replace("periodSeconds: 1", "periodSeconds: -3"), "readinessProbe.periodSeconds -3"),
        (
            HOOK.replace("terminationGracePeriodSeconds: 600", "terminationGracePeriodSeconds: -5"),
            "terminationGracePeriodSeconds -5",
        ),
    ];
    for (manifest, want) in &cases {
        assert_ne!(manifest, HOOK, "the case for `{want}` changed nothing");
        let started = Instant::now();
        let (code, stderr) = lab_on(manifest, &["--allow-host-exec"], Duration::from_secs(60));
        assert_eq!(code, Some(2), "{want}: {stderr}");
        assert!(stderr.contains("Deployment/web") && stderr.contains(want), "want `{want}` in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(10), "refused before any run");
    }
}

#[test]
fn host_programs_need_allow_host_exec_in_hooks_probes_and_commands() {
    let dir = tempfile::tempdir().unwrap();
    let touched = dir.path().join("touched");
    let shell = format!(r#"[/bin/sh, -c, "touch {}"]"#, touched.display());
    // The fixture with this binary in its preStop: only the part under test names a host program.
    let own = hook_manifest("[/usr/local/bin/graceful, shutdown-probe]");
    let cases = [
        (hook_manifest(&shell), "containers[0].lifecycle.preStop.exec.command: `/bin/sh`"),
        (
            own.replace("httpGet: {path: /readyz, port: admin}", &format!("exec: {{command: {shell}}}")),
            "containers[0].readinessProbe.exec.command: `/bin/sh`",
        ),
        (
            own.replace("args: [backend]", "command: [/bin/sh]\n        args: [backend]"),
            "containers[0].command: `/bin/sh`",
        ),
    ];
    for (manifest, want) in &cases {
        let (code, stderr) = lab_on(manifest, &[], Duration::from_secs(60));
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains("Deployment/web") && stderr.contains(want), "want `{want}` in: {stderr}");
        assert!(stderr.contains("--allow-host-exec"), "{stderr}");
    }
    assert!(!touched.exists(), "a refused manifest ran a host command");
    // This binary stays allowed without the flag: the embedded overlays' hooks run it.
    // (A claim about a run that does not exist is refused just after admission.)
    let (code, stderr) = lab_on(&own, &["--expect-clean", "nope"], Duration::from_secs(30));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("no run named `nope`"), "admission refused this binary: {stderr}");
}

#[test]
fn out_of_range_flags_are_refused_with_the_flag_named() {
    for (args, want) in [
        (&["--timeout", "0s"][..], "--timeout 0s"),
        (&["--max-in-flight", "0"], "--max-in-flight 0"),
        (&["--expect-attributed", "200"], "--expect-attributed 200"),
        (&["--expect-attributed=-1"], "--expect-attributed -1"),
        (&["--sweep-lag=1,-2"], "--sweep-lag -2"),
        (&["--sweep-lag", "NaN"], "--sweep-lag NaN"),
        (&["--path", "api"], "--path api"),
        (&["--rollouts", "0"], "--rollouts"),
        (&["--restart", "backend,nope"], "--restart nope: no such Deployment in solution"),
        (&["--entry", "svc-nope"], "--entry svc-nope: no such Service in solution"),
    ] {
        let started = Instant::now();
        let child = graceful().args(["lab", "--overlay", "solution", "--quiet"]).args(args).spawn().unwrap();
        let (status, _, stderr) = wait_bounded(child, Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "want `{want}` in: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(10), "{args:?}: refused before any run");
        assert!(!stderr.contains("run dir"), "{args:?}: refused before any pod started: {stderr}");
    }
}

#[test]
fn deep_and_huge_manifests_are_refused_at_once() {
    // 200 KB of nested flow collections took the YAML parser 47 s before it gave up.
    let n = 50_000;
    let deep = format!("kind: Deployment\nmetadata: {{name: x}}\nspec: {}1{}\n", "{a: ".repeat(n), "}".repeat(n));
    assert!(deep.len() > 200_000);
    let started = Instant::now();
    let (code, stderr) = lab_on(&deep, &[], Duration::from_secs(120));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("stdin: line 3") && stderr.contains("nested deeper than"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.yaml");
    let mut text = HOOK.to_string();
    while text.len() <= 2 << 20 {
        text.push_str("# padding padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&huge, text).unwrap();
    let child = graceful().args(["lab", "--quiet", "-f"]).arg(&huge).spawn().unwrap();
    let (status, _, stderr) = wait_bounded(child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("huge: larger than 1048576 bytes"), "{stderr}");
}

/// Starts a run whose old pod's preStop hook is a shell running `sleep`, waits (bounded) until
/// that sleep runs, and returns the lab with every process of its run.
fn lab_in_prestop(out: &std::path::Path, seconds: &str) -> (Child, BTreeSet<ProcId>) {
    let mut child = graceful()
        .args(["lab", "-f", "-", "--quiet", "--allow-host-exec", "--profile", "short", "--rate", "20"])
        .args(["--entry", "svc-web", "--no-tracing", "--out"])
        .arg(out)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(HOOK.replace("SLEEP_SECONDS", seconds).as_bytes()).unwrap();
    let lab = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let procs = descendants(lab);
        if procs.iter().any(|(pid, _)| cmdline(*pid) == format!("sleep {seconds} ")) {
            return (child, procs);
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let (status, stdout, stderr) = wait_bounded(child, Duration::from_secs(10));
            panic!("the preStop hook's sleep never ran ({status}); stdout:\n{stdout}\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_none_survive(procs: &BTreeSet<ProcId>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> =
            procs.iter().filter(|p| alive(p)).map(|(pid, _)| format!("{pid} {}", cmdline(*pid))).collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            // Leave nothing behind for the next test either.
            for (pid, _) in procs.iter().filter(|p| alive(p)) {
                unsafe {
                    libc::kill(*pid, libc::SIGKILL);
                }
            }
            panic!("processes of the run outlived the lab by 10 s: {left:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_lab_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let seconds = format!("3600.{}1", std::process::id());
    let (mut lab, procs) = lab_in_prestop(&dir.path().join("runs"), &seconds);
    // The lab, its guard, the pods, the hook's shell and its sleep.
    assert!(procs.len() >= 4, "{procs:?}");
    lab.kill().unwrap();
    lab.wait().unwrap();
    assert_none_survive(&procs);
}

#[test]
fn a_terminated_lab_says_interrupted_and_leaves_no_process_behind() {
    let dir = tempfile::tempdir().unwrap();
    let seconds = format!("3600.{}2", std::process::id());
    let (lab, procs) = lab_in_prestop(&dir.path().join("runs"), &seconds);
    unsafe {
        libc::kill(lab.id() as i32, libc::SIGTERM);
    }
    let (status, _, stderr) = wait_bounded(lab, Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "{status}: {stderr}");
    assert!(stderr.contains("interrupted (SIGTERM)"), "{stderr}");
    assert_none_survive(&procs);
}
