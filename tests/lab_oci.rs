//! Black-box tests of `graceful lab --node kernel --runtime oci`: the real binary runs each pod as
//! a container of the image its manifest names, under runc, in the pod's network namespace.
//! (1) The CI-built graceful image through both embedded overlays; the test watches /proc while
//! the lab runs to see the containers' processes for itself (uid 65532, their own root).
//! (2) Any image: a static C server built here (PID 1, no SIGTERM handler) in a small manifest;
//! the lab's records must show each old pod ignoring SIGTERM until SIGKILL ends the grace period,
//! and attribute the failures without a single span.
//! Root only; skipped with the reason printed otherwise. Under CI=true a missing tool fails.

mod common;
#[path = "common/oci_test_image.rs"]
mod oci_test_image;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::host::{kernel_node_unavailable, HostSnapshot};
use common::image::{archive_path, tool_missing};
use common::lab_run::graceful;
use common::wait_bounded;

const LAB_BOUND: Duration = Duration::from_secs(300);

/// One lab at a time from this file: two at once on a 2-core machine turn the solution's
/// latency into timeouts, which is the machine's limit, not the runtime's.
static ONE_LAB: Mutex<()> = Mutex::new(());

fn one_lab() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why this test cannot run here. Under CI=true, with the archive present, a missing tool is a
/// failure, not a skip.
fn skip_reason(archive: Option<&Path>, extra: Option<String>) -> Option<String> {
    if let Some(a) = archive.filter(|a| !a.is_file()) {
        return Some(format!("no image archive at {} (built by .ci/run)", a.display()));
    }
    let why = kernel_node_unavailable().or_else(|| tool_missing(&["runc", "umoci"])).or(extra)?;
    if std::env::var("CI").as_deref() == Ok("true") && !why.starts_with("not root") {
        panic!("CI=true and the image archive exists, but: {why}");
    }
    Some(why)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn run_named<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["runs"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no run {name}"))
}

fn events<'a>(run: &'a serde_json::Value, pod: &str) -> Vec<&'a serde_json::Value> {
    run["events"].as_array().unwrap().iter().filter(|e| e["pod"] == pod).collect()
}

/// The pid each `container_started` event names.
fn container_pids(run: &serde_json::Value) -> Vec<i32> {
    run["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "container_started")
        .map(|e| {
            let detail = e["detail"].as_str().unwrap();
            assert!(detail.contains(", container "), "not a container: {detail}");
            detail.trim_start_matches("pid ").split(',').next().unwrap().parse().unwrap()
        })
        .collect()
}

/// What /proc says of a process: its real uid, and whether it is PID 1 of a pid namespace of
/// its own (a container's init; the process runtime's pods are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    uid: u32,
    pid_1: bool,
}

fn seen(pid: i32) -> Option<Seen> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::split_whitespace);
    let uid = field("Uid:")?.next()?.parse().ok()?;
    let pid_1 = field("NSpid:")?.last() == Some("1");
    Some(Seen { uid, pid_1 })
}

/// Polls /proc while the lab runs, recording every process whose command line starts with
/// `argv0` (the image's binary as the container sees it).
struct ProcWatch {
    stop: Arc<AtomicBool>,
    found: Arc<Mutex<BTreeMap<i32, Seen>>>,
    thread: std::thread::JoinHandle<()>,
}

impl ProcWatch {
    fn start(argv0: &'static str) -> ProcWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let found = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, f) = (stop.clone(), found.clone());
        let thread = std::thread::spawn(move || {
            let want: Vec<u8> = argv0.bytes().chain([0]).collect();
            while !s.load(Ordering::Relaxed) {
                for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                    let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
                    if f.lock().unwrap().contains_key(&pid) {
                        continue;
                    }
                    let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                    if cmdline.starts_with(&want) {
                        if let Some(x) = seen(pid) {
                            f.lock().unwrap().insert(pid, x);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        ProcWatch { stop, found, thread }
    }

    fn finish(self) -> BTreeMap<i32, Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let found = self.found.lock().unwrap();
        found.clone()
    }
}

/// No cgroup of these containers is left (the runtime names them `graceful-<lab>-<id>`), in
/// any hierarchy.
fn assert_no_cgroups(ids: &[String]) {
    let roots = std::iter::once(PathBuf::from("/sys/fs/cgroup"))
        .chain(std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten().map(|e| e.path()));
    for root in roots {
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with("graceful-") && ids.iter().any(|id| name.ends_with(&format!("-{id}")));
            assert!(!(ours && e.path().is_dir()), "cgroup left: {}", e.path().display());
        }
    }
}

/// The container ids the `container_started` events name.
fn container_ids(run: &serde_json::Value) -> Vec<String> {
    let started = run["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "container_started");
    started
        .filter_map(|e| e["detail"].as_str()?.split(", container ").nth(1)?.split(' ').next().map(str::to_string))
        .collect()
}

/// Nothing of the runtime is left in the run dir: no bundle (so no overlay mount), no runc state.
fn assert_runtime_cleaned(out: &Path) {
    let bundles: Vec<_> = std::fs::read_dir(out.join("oci/containers")).unwrap().flatten().collect();
    assert!(bundles.is_empty(), "container bundles left: {bundles:?}");
    let list = Command::new("runc").arg("--root").arg(out.join("oci/runc")).args(["list", "-q"]).output().unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).trim().is_empty(), "runc still lists containers");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&out.display().to_string()), "a mount under {} is left", out.display());
}

/// The headline with real containers: problem fails, solution is clean, failures attributed;
/// every pod ran as a container of the CI image, as uid 65532 and PID 1 of its own pid namespace; the host's
/// network namespace is as it was.
#[test]
fn graceful_image_problem_fails_solution_clean_as_containers() {
    let archive = archive_path();
    if let Some(why) = skip_reason(Some(&archive), None) {
        eprintln!("skipped: {why}");
        return;
    }
    let _one = one_lab();
    let before = HostSnapshot::take();
    let dir = tempfile::tempdir().unwrap();
    let (report, out) = (dir.path().join("lab.json"), dir.path().join("runs"));
    let watch = ProcWatch::start("/usr/local/bin/graceful");
    let child = graceful()
        .args(["lab", "--node", "kernel", "--runtime", "oci", "--profile", "short", "--expect"])
        .args(["--expect-attributed", "98", "--quiet", "--json"])
        .arg(&report)
        .arg("--out")
        .arg(&out)
        .spawn()
        .unwrap();
    let (status, stdout, stderr) = wait_bounded(child, LAB_BOUND);
    let found = watch.finish();
    assert!(status.success(), "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("pods as OCI containers under runc"), "{stderr}");

    let doc = json(&report);
    let (problem, solution) = (run_named(&doc, "problem"), run_named(&doc, "solution"));
    assert!(problem["summary"]["failed"].as_u64().unwrap() > 0, "{}", problem["summary"]);
    assert_eq!(solution["summary"]["failed"], 0, "{}", solution["summary"]);
    let mut ours = 0;
    for run in [problem, solution] {
        assert_eq!(run["runtime"], "oci");
        assert_eq!(run["node"], "kernel");
        for pid in container_pids(run) {
            if let Some(s) = found.get(&pid) {
                assert_eq!(*s, Seen { uid: 65532, pid_1: true }, "container init {pid}");
                ours += 1;
            }
        }
        // Each pod's init was a container's, started by runc.
        for pod in run["pods"].as_array().unwrap() {
            let name = pod["name"].as_str().unwrap();
            let started = events(run, name).into_iter().filter(|e| e["kind"] == "container_started").count();
            assert_eq!(started, 1, "{name}: one container, no restarts");
        }
    }
    // The solution's preStop execs /usr/local/bin/graceful, a path only the image has (on a host
    // without it, a hook run outside the container could not have finished): all six finished.
    let solution_events = solution["events"].as_array().unwrap();
    let finished = solution_events.iter().filter(|e| e["kind"] == "pre_stop_finished").count();
    assert_eq!(finished, 6, "preStop hooks that finished inside the containers");
    assert!(ours >= 4, "the test saw only {ours} of the lab's containers in /proc (found {found:?})");
    assert_runtime_cleaned(&out);
    let ids: Vec<String> = [problem, solution].into_iter().flat_map(container_ids).collect();
    assert_eq!(ids.len(), 24, "{ids:?}");
    assert_no_cgroups(&ids);
    assert_eq!(HostSnapshot::take(), before, "the host's network namespace changed");
}

/// A manifest for the C server: 2 replicas, tcpSocket readiness, 3 s grace, no preStop.
const PLAIN_MANIFEST: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: plain}
spec:
  replicas: 2
  selector: {matchLabels: {app: plain}}
  template:
    metadata: {labels: {app: plain}}
    spec:
      terminationGracePeriodSeconds: 3
      containers:
      - name: server
        image: plain-server:latest
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: plain}
spec:
  type: NodePort
  selector: {app: plain}
  ports: [{port: 80, targetPort: http}]
"#;

/// Any image: PID 1 without a SIGTERM handler ignores SIGTERM and lives until SIGKILL at the end
/// of the grace period; the lab's timeline shows exactly that, and with an endpoint lag longer
/// than the grace period the requests sent to the killed pods fail, attributed from the lab's
/// records alone (the server exports no spans).
#[test]
fn any_image_pid_1_without_a_handler_lives_until_sigkill() {
    let missing = oci_test_image::missing_tools();
    if let Some(why) = skip_reason(None, missing) {
        eprintln!("skipped: {why}");
        return;
    }
    let before = HostSnapshot::take();
    let dir = tempfile::tempdir().unwrap();
    let archive = oci_test_image::build(dir.path());
    let _one = one_lab();
    let manifest = dir.path().join("plain.yaml");
    std::fs::write(&manifest, PLAIN_MANIFEST).unwrap();
    let (report, out) = (dir.path().join("lab.json"), dir.path().join("runs"));
    let child = graceful()
        .args(["lab", "--node", "kernel", "--runtime", "oci", "--profile", "short", "--quiet"])
        .args(["--entry", "plain", "--path", "/", "--endpoint-lag", "5s", "--rate", "100"])
        .arg("--image")
        .arg(format!("{}=oci-archive:{}:{}", oci_test_image::REF, archive.display(), oci_test_image::REF))
        .arg("-f")
        .arg(&manifest)
        .arg("--json")
        .arg(&report)
        .arg("--out")
        .arg(&out)
        .spawn()
        .unwrap();
    let (status, stdout, stderr) = wait_bounded(child, LAB_BOUND);
    assert!(status.success(), "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}");

    let doc = json(&report);
    let run = run_named(&doc, "plain");
    assert_eq!(run["runtime"], "oci");
    let old: Vec<&serde_json::Value> =
        run["pods"].as_array().unwrap().iter().filter(|p| !p["deleted_ms"].is_null()).collect();
    assert_eq!(old.len(), 2, "both old pods were deleted: {}", run["pods"]);
    // The SIGTERM's time is taken once runc has delivered it, the grace period counts from
    // deletion: how long after SIGTERM each pod was killed depends on runc's latency.
    let mut killed_after_sigterm = f64::MAX;
    for pod in &old {
        let name = pod["name"].as_str().unwrap();
        let evs = events(run, name);
        let kinds: Vec<&str> = evs.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        let at = |kind: &str| evs.iter().find(|e| e["kind"] == kind).map(|e| e["at_ms"].as_f64().unwrap());
        let pos = |kind: &str| kinds.iter().position(|k| *k == kind).unwrap_or_else(|| panic!("{name}: {kinds:?}"));
        assert!(pos("sigterm") < pos("sigkill") && pos("sigkill") < pos("exited"), "{name}: {kinds:?}");
        let sigkill = evs.iter().find(|e| e["kind"] == "sigkill").unwrap();
        assert_eq!(sigkill["detail"], "grace period over", "{name}");
        let exited = evs.iter().find(|e| e["kind"] == "exited").unwrap();
        assert_eq!(exited["detail"], "killed by SIGKILL", "{name}");
        let deleted = pod["deleted_ms"].as_f64().unwrap();
        let killed_after = at("sigkill").unwrap() - deleted;
        assert!((2900.0..3500.0).contains(&killed_after), "{name}: SIGKILL {killed_after:.0} ms after deletion");
        killed_after_sigterm = killed_after_sigterm.min(at("sigkill").unwrap() - pod["sigterm_ms"].as_f64().unwrap());
        let lived = pod["exited_ms"].as_f64().unwrap() - deleted;
        assert!((2900.0..4000.0).contains(&lived), "{name}: exited {lived:.0} ms after deletion, not at the grace end");
    }
    let failed = run["summary"]["failed"].as_u64().unwrap();
    assert!(failed > 0, "requests routed to the killed pods must fail: {}", run["summary"]);
    // Only the kernel's verdicts on a dead pod: the connections the SIGKILL cut (reset or
    // closed), then its port refused, then its address gone. No HTTP error, no timeout.
    for (class, _) in run["summary"]["by_class"].as_object().unwrap() {
        let verdicts = ["ok", "reset", "closed", "refused", "unreachable"];
        assert!(verdicts.contains(&class.as_str()), "{class}: {}", run["summary"]);
    }
    assert_eq!(run["spans_received"], 0, "the C server exports no spans");
    assert_eq!(run["attribution"]["attributed"], failed, "{}", run["groups"]);
    for g in run["groups"].as_array().unwrap() {
        assert_eq!(g["source"], "lab", "{g}");
    }
    // The failures are the kill's: each on an old pod, after its SIGKILL. The one-thread server
    // leaves SYNs in its full backlog under load, so a request may start up to a SYN retry
    // (1 s) before the kill and be refused after it; a stray one elsewhere is allowed (1 in 10).
    let sigkill_after_sigterm = |pod: &str| {
        let p = run["pods"].as_array().unwrap().iter().find(|p| p["name"] == pod)?;
        let sigkill = events(run, pod).iter().find(|e| e["kind"] == "sigkill")?["at_ms"].as_f64()?;
        Some(sigkill - p["sigterm_ms"].as_f64()?)
    };
    let items = run["attribution"]["items"].as_array().unwrap();
    let (after_kill, other): (Vec<_>, Vec<_>) = items.iter().partition(|a| {
        let (Some(pod), Some(at)) = (a["pod"].as_str(), a["ms_after_sigterm"].as_f64()) else { return false };
        sigkill_after_sigterm(pod).is_some_and(|kill| at >= kill - 1000.0)
    });
    assert!(
        after_kill.len() * 10 >= items.len() * 9,
        "{} of {} failures came after their pod's SIGKILL (killed {killed_after_sigterm:.0} ms after SIGTERM); the others: {other:?}",
        after_kill.len(),
        items.len()
    );
    assert!(stdout.contains("lab records"), "the failure table names its source: {stdout}");
    assert_runtime_cleaned(&out);
    assert_eq!(HostSnapshot::take(), before, "the host's network namespace changed");
}

/// Flags that cannot work together are refused before anything starts, naming the flag.
#[test]
fn runtime_flags_are_checked_before_anything_starts() {
    let cases: [(&[&str], &str); 3] = [
        (&["--node", "process", "--runtime", "oci"], "--runtime oci: needs the kernel node"),
        (
            &["--image", "x=oci-archive:/nonexistent.tar"],
            "--image x=oci-archive:/nonexistent.tar: images are only run with --runtime oci",
        ),
        (&["--runtime", "oci", "--image", "x=docker://x"], "transport `docker` is not supported"),
    ];
    for (args, want) in cases {
        let child = graceful().arg("lab").args(args).spawn().unwrap();
        let (status, _, stderr) = wait_bounded(child, Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want `{want}` in {stderr}");
    }
}

/// An image the manifest names with no local source: an error naming the image and the
/// Deployment, before any pod starts.
#[test]
fn an_image_without_a_source_is_refused_before_any_pod_starts() {
    if let Some(why) = skip_reason(None, None) {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("plain.yaml");
    let out = dir.path().join("runs");
    // The lab on `text`: refused, before any run started; its stderr.
    let refused = |text: &str| -> String {
        std::fs::write(&manifest, text).unwrap();
        let child = graceful()
            .args(["lab", "--node", "kernel", "--runtime", "oci", "--quiet", "--entry", "plain", "-f"])
            .arg(&manifest)
            .arg("--out")
            .arg(&out)
            .spawn()
            .unwrap();
        let (status, _, stderr) = wait_bounded(child, Duration::from_secs(60));
        assert!(!status.success(), "{stderr}");
        assert!(!out.join("plain").exists(), "a run started: {}", out.display());
        stderr
    };
    let stderr = refused(PLAIN_MANIFEST);
    assert!(
        stderr.contains("Deployment plain") && stderr.contains("image `plain-server:latest` has no local source"),
        "{stderr}"
    );

    // A securityContext the runtime cannot honour, in an image it has: refused the same way.
    if !archive_path().is_file() {
        return;
    }
    let privileged = PLAIN_MANIFEST
        .replace("plain-server:latest", "graceful:latest")
        .replace("        ports:", "        securityContext: {privileged: true}\n        ports:");
    let stderr = refused(&privileged);
    assert!(stderr.contains("Deployment plain") && stderr.contains("securityContext.privileged"), "{stderr}");
}

/// SIGTERM while containers run (and others are being created): exit 2, and no container, bundle
/// or mount of the run is left.
#[test]
fn an_interrupted_lab_leaves_no_container_behind() {
    let archive = archive_path();
    if let Some(why) = skip_reason(Some(&archive), None) {
        eprintln!("skipped: {why}");
        return;
    }
    let _one = one_lab();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    let child = graceful()
        .args(["lab", "--node", "kernel", "--runtime", "oci", "--overlay", "solution", "--profile", "short", "-q"])
        .arg("--out")
        .arg(&out)
        .spawn()
        .unwrap();
    let bundles = out.join("oci/containers");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut ids = std::collections::BTreeSet::new();
    while ids.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "no containers started within 60 s");
        std::thread::sleep(Duration::from_millis(50));
        let names = std::fs::read_dir(&bundles).into_iter().flatten().flatten();
        ids.extend(names.map(|e| e.file_name().to_string_lossy().into_owned()));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let (status, _, stderr) = wait_bounded(child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("interrupted (SIGTERM)"), "{stderr}");
    assert_runtime_cleaned(&out);
    assert_no_cgroups(&ids.into_iter().collect::<Vec<_>>());
}
