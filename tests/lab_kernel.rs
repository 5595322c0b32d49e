//! Black-box tests of `graceful lab --node kernel`: the real binary builds a node of namespaces,
//! a bridge, kube-proxy's nftables rules and conntrack inside a private world, runs copies of
//! itself as pods there, and must leave the host's network namespace exactly as it found it,
//! even when killed. Skipped, with the reason printed, where the kernel node cannot run.

mod common;

use std::time::{Duration, Instant};

use common::host::{kernel_node_unavailable, HostSnapshot};
use common::lab_run::{graceful, json, run_named};
use common::procs::{alive, cmdline, descendants};
use common::wait_bounded;

fn skipped() -> bool {
    match kernel_node_unavailable() {
        Some(why) => {
            eprintln!("skipped: {why}");
            true
        }
        None => false,
    }
}

fn by_class(run: &serde_json::Value, class: &str) -> u64 {
    run["summary"]["by_class"][class].as_u64().unwrap_or(0)
}

/// The headline on the kernel node: the problem loses requests to the kernel's own verdicts
/// (refused by a pod whose process is gone, unreachable once its sandbox is torn down), every
/// one attributed; the solution loses none; the load entered from the client namespace through
/// the NodePort; the host is untouched.
#[test]
fn on_the_kernel_node_problem_fails_with_the_kernels_errors_and_solution_is_clean() {
    if skipped() {
        return;
    }
    let before = HostSnapshot::take();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("lab.json");
    let child = graceful()
        .args(["lab", "--node", "kernel", "--profile", "short", "--expect", "--expect-attributed", "98", "--quiet"])
        .arg("--json")
        .arg(&report)
        .arg("--out")
        .arg(dir.path().join("runs"))
        .spawn()
        .unwrap();
    let (status, stdout, stderr) = wait_bounded(child, Duration::from_secs(240));
    assert!(status.success(), "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("on the kernel node"), "{stdout}");

    let doc = json(&report);
    let problem = run_named(&doc, "problem");
    let solution = run_named(&doc, "solution");
    for run in [problem, solution] {
        assert_eq!(run["node"], "kernel");
        let nft = &run["datapath"]["nft"];
        assert!(nft["transactions"].as_u64().unwrap() >= 4, "{nft}");
        assert_eq!(nft["failures"], 0, "{nft}");
        for pod in run["pods"].as_array().unwrap() {
            let ip = pod["ip"].as_str().unwrap();
            assert!(ip.starts_with("10.244.0."), "pod address from the pod CIDR: {ip}");
        }
        // Every old pod's sandbox went away after its container, for real.
        let gone = run["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "gone").count();
        assert_eq!(gone, 6, "sandboxes torn down");
        // The generator's sockets are the client namespace's.
        let local = run["requests"][0]["local"].as_str().unwrap();
        assert!(local.starts_with("10.250.0.2:"), "{local}");
    }
    assert_eq!(solution["summary"]["failed"], 0, "{}", solution["summary"]);
    assert!(by_class(problem, "refused") > 0, "{}", problem["summary"]);
    assert!(by_class(problem, "unreachable") > 0, "{}", problem["summary"]);
    assert_eq!(problem["attribution"]["attributed"], problem["attribution"]["failed"], "{}", problem["attribution"]);
    assert_eq!(HostSnapshot::take(), before, "the host's network namespace changed");
}

/// `--dead-pod blackhole`: the node keeps the torn-down pod's neighbour entry, so SYNs to its
/// address vanish and the client times out instead of hearing "no route to host".
#[test]
fn a_blackholed_dead_pod_makes_clients_time_out() {
    if skipped() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("lab.json");
    let child = graceful()
        .args(["lab", "--node", "kernel", "--overlay", "problem", "--profile", "short", "--quiet"])
        .args(["--dead-pod", "blackhole", "--timeout", "2s", "--expect-failures", "problem", "--json"])
        .arg(&report)
        .arg("--out")
        .arg(dir.path().join("runs"))
        .spawn()
        .unwrap();
    let (status, stdout, stderr) = wait_bounded(child, Duration::from_secs(180));
    assert!(status.success(), "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let doc = json(&report);
    let problem = run_named(&doc, "problem");
    assert!(by_class(problem, "timeout") > 0, "{}", problem["summary"]);
    assert_eq!(by_class(problem, "unreachable"), 0, "{}", problem["summary"]);
}

/// SIGKILL gives the lab no chance to clean up: its private world must vanish anyway.
#[test]
fn a_sigkilled_kernel_lab_leaves_the_host_as_it_was() {
    if skipped() {
        return;
    }
    let before = HostSnapshot::take();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let mut child = graceful()
        .args(["lab", "--node", "kernel", "--overlay", "solution", "--quiet", "--rate", "20", "--warmup", "60s"])
        .arg("--out")
        .arg(&runs)
        .spawn()
        .unwrap();
    // Wait (bounded) until the pods run: their logs appear under the run directory.
    let deadline = Instant::now() + Duration::from_secs(60);
    let pods = runs.join("solution/pods");
    while std::fs::read_dir(&pods).map(|d| d.filter(|e| e.is_ok()).count()).unwrap_or(0) < 6 {
        assert!(Instant::now() < deadline, "the pods never started");
        assert!(child.try_wait().unwrap().is_none(), "the lab ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let procs = descendants(child.id() as i32);
    // The world's lab, its guard, six pods, conntrack.
    assert!(procs.len() >= 8, "{procs:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    // The world's processes get SIGKILL from the kernel as their parent dies; none may stay.
    let left = || procs.iter().filter(|p| alive(p)).map(|(pid, _)| cmdline(*pid)).collect::<Vec<_>>();
    assert!(common::eventually(Duration::from_secs(10), || left().is_empty()), "outlived the lab: {:?}", left());
    assert_eq!(HostSnapshot::take(), before, "the host's network namespace changed");
}

/// Where the kernel node cannot run, `--node kernel` names what is missing and `--node auto`
/// says in one line that it falls back to the process node.
#[test]
fn without_the_kernels_tools_kernel_is_refused_and_auto_falls_back() {
    let empty = tempfile::tempdir().unwrap();
    let out = graceful().args(["lab", "--node", "kernel", "--quiet"]).env("PATH", empty.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--node kernel") && stderr.contains("`ip` is missing"), "{stderr}");

    let out = graceful()
        .args(["lab", "--node", "auto", "--quiet", "-f", "/nonexistent/overlay.yaml"])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("node: process (the kernel node is not available here: `ip` is missing"), "{stderr}");
    assert!(stderr.contains("/nonexistent/overlay.yaml"), "{stderr}");
}
