//! The lab's OCI runtime (src/lab/node/oci) against real images under runc: the CI-built graceful
//! image as the solution overlay declares its backend (securityContext, ConfigMap, preStop), and a
//! static C server built here that has no SIGTERM handler. Each test re-runs itself inside a fresh
//! private world (network + mount namespaces) and runs its containers in a pod network namespace
//! it creates there (`ip netns add`); the outer half checks the host is unchanged afterwards
//! (links, named namespaces, mounts, cgroups). Skipped, with the reason printed, when not root or
//! when runc/umoci/ip (or, for the C image, gcc/buildah) are missing; under CI=true a missing tool
//! fails the graceful-image test when the archive exists.

mod common;
#[path = "common/oci_test_image.rs"]
mod oci_test_image;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::image::{archive_path, tool_missing};
use graceful::lab::kernel_node::netns::Netns;
use graceful::lab::kernel_node::private_world;
use graceful::lab::node::oci::{BindMount, Container, ContainerSpec, ImageStore, Resources, Runtime, Security};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use nix::sys::signal::Signal;
use serde::Deserialize;

const INNER: &str = "OCI_RUNTIME_TEST_INNER";
const WORLD_BOUND: Duration = Duration::from_secs(120);
const RENDERED: &str = include_str!("../deploy/rendered/solution.yaml");

/// Why the runtime cannot be tested here, if it cannot.
fn skip_reason(extra_tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (runc and network namespaces need it)".into());
    }
    let mut tools = vec!["runc", "umoci", "ip"];
    tools.extend_from_slice(extra_tools);
    tool_missing(&tools).or_else(|| private_world::probe().err().map(|e| format!("{e:#}")))
}

/// What the host shows that a leak would change. (Cgroups are checked per world: other tests
/// of this binary run containers at the same time.)
#[derive(Debug, PartialEq, Eq)]
struct HostSnapshot {
    links: String,
    netns: String,
    overlay_mounts: usize,
}

impl HostSnapshot {
    fn take() -> HostSnapshot {
        let run = |args: &[&str]| {
            let out = Command::new(args[0]).args(&args[1..]).output().expect("host tool");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        HostSnapshot {
            links: run(&["ip", "-o", "link"]),
            netns: run(&["ip", "netns", "list"]),
            overlay_mounts: mounts.lines().filter(|l| l.contains(" - overlay ")).count(),
        }
    }
}

/// Cgroup directories the runtime of process `pid` creates (`graceful-PID-…`), one level below
/// each hierarchy.
fn graceful_cgroups(pid: u32) -> Vec<String> {
    let prefix = format!("graceful-{pid}-");
    let mut found = Vec::new();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(hierarchy.path()).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                found.push(entry.path().display().to_string());
            }
        }
    }
    found.sort();
    found
}

/// Runs `body` inside a fresh private world (this test re-run there), then checks the host.
fn in_private_world(name: &str, extra_tools: &[&str], body: impl FnOnce()) {
    if std::env::var(INNER).as_deref() == Ok(name) {
        body();
        return;
    }
    let image_tools = || if extra_tools.is_empty() { None } else { oci_test_image::missing_tools() };
    if let Some(reason) = skip_reason(extra_tools).or_else(image_tools) {
        eprintln!("skipped: {reason}");
        return;
    }
    let before = HostSnapshot::take();
    let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"]).env(INNER, name);
    let child = private_world::command_in_new_world(cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn the inner test");
    let world = child.id();
    let (status, out, err) = common::wait_bounded(child, WORLD_BOUND);
    println!("{out}\n{err}");
    assert!(status.success(), "inner half of {name} failed ({status}):\n{out}\n{err}");
    assert!(out.contains("1 passed"), "the inner half of {name} did not run:\n{out}");
    assert_eq!(HostSnapshot::take(), before, "the host changed");
    assert_eq!(graceful_cgroups(world), Vec::<String>::new(), "cgroups left by the world's runtime");
}

/// A pod network namespace inside the world, loopback up.
fn pod_netns(name: &str) -> Netns {
    for args in [vec!["netns", "add", name], vec!["-n", name, "link", "set", "lo", "up"]] {
        let out = Command::new("ip").args(&args).output().expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Netns::new(name)
}

/// GET from inside `netns`: the status, or the error's text.
fn get_in(netns: &Netns, addr: SocketAddr, path: &'static str) -> Result<u16, String> {
    netns.run(move || common::get(addr, path).map(|r| r.status).map_err(|e| e.to_string())).unwrap()
}

/// Reads a field of /proc/PID/status.
fn status_field(pid: i32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("{name}"));
    line[name.len() + 1..].split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The backend container of the rendered solution overlay, as the kubelet would resolve it:
/// the merged securityContext, args, env (Downward API stand-ins, no collector, a 1 s drain),
/// the ConfigMap's files under `dir` mounted read-only; and its preStop command.
fn backend_spec(dir: &Path, netns: &Netns) -> (ContainerSpec, Vec<String>) {
    let mut deployment = None;
    let mut maps = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(RENDERED) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("Deployment") if v["metadata"]["name"].as_str() == Some("backend") => {
                deployment = Some(serde_yaml::from_value::<Deployment>(v).unwrap())
            }
            Some("ConfigMap") => maps.push(serde_yaml::from_value::<ConfigMap>(v).unwrap()),
            _ => {}
        }
    }
    let pod = deployment.unwrap().spec.unwrap().template.spec.unwrap();
    let c = pod.containers.iter().find(|c| c.name == "backend").unwrap();
    let mount = c.volume_mounts.iter().flatten().find(|m| m.mount_path == "/etc/graceful").unwrap();
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
    let map_name = &volume.config_map.as_ref().unwrap().name;
    let map = maps.iter().find(|m| m.metadata.name.as_deref() == Some(map_name)).unwrap();
    let files = dir.join("configmap");
    std::fs::create_dir_all(&files).unwrap();
    for (name, text) in map.data.iter().flatten() {
        std::fs::write(files.join(name), text).unwrap();
    }

    let downward = |name: &str| match name {
        "POD_NAME" => "backend-0",
        "POD_NAMESPACE" => "graceful",
        "POD_IP" => "127.0.0.1",
        _ => "oci-test-node",
    };
    let mut env: Vec<(String, String)> = c
        .env
        .iter()
        .flatten()
        .filter(|e| e.name != "OTEL_EXPORTER_OTLP_ENDPOINT")
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_else(|| downward(&e.name).into())))
        .collect();
    env.push(("GRACEFUL_SHUTDOWN__DRAIN_DELAY".into(), "1s".into()));
    let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap().exec.as_ref().unwrap();
    // A single file mounted as the kubelet mounts /etc/hosts.
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 backend-0\n").unwrap();
    let mounts = vec![
        BindMount {
            source: files,
            destination: mount.mount_path.clone().into(),
            read_only: mount.read_only == Some(true),
        },
        BindMount { source: hosts, destination: "/etc/hosts".into(), read_only: true },
    ];
    let spec = ContainerSpec::from_kubernetes(&pod, c, env, mounts, netns.path(), "backend-0").unwrap();
    (spec, pre_stop.command.clone().unwrap())
}

/// How many processes share the pid namespace of `pid` (the container's init).
fn processes_in_pid_namespace_of(pid: i32) -> usize {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter(|e| std::fs::read_link(e.path().join("ns/pid")).is_ok_and(|p| p == ns))
        .count()
}

/// The C server's container spec: the image's own entrypoint, user and no securityContext.
fn plain_spec(netns: &Netns, hostname: &str) -> ContainerSpec {
    ContainerSpec {
        command: None,
        args: None,
        env: vec![],
        working_dir: None,
        security: Security::default(),
        mounts: vec![],
        netns: netns.path(),
        hostname: hostname.into(),
        resources: Resources::default(),
    }
}

/// A cgroup v1 file of process `pid` in `controller` (e.g. memory, memory.limit_in_bytes).
fn cgroup_file(pid: i32, controller: &str, file: &str) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroups
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == controller).then(|| format!("/sys/fs/cgroup/{controllers}{path}"))
        })
        .unwrap_or_else(|| panic!("no {controller} cgroup in {cgroups}"));
    std::fs::read_to_string(format!("{path}/{file}"))
        .unwrap_or_else(|e| panic!("{path}/{file}: {e}"))
        .trim()
        .to_string()
}

/// After `delete`: no state, overlay or bundle left behind.
fn assert_removed(runtime_dir: &Path, id: &str) {
    let out = Command::new("runc").arg("--root").arg(runtime_dir.join("runc")).args(["list", "-q"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "", "runc still lists containers");
    let bundle = runtime_dir.join("containers").join(id);
    assert!(!bundle.exists(), "{} is left", bundle.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&bundle.display().to_string()), "the overlay is still mounted");
    assert_eq!(graceful_cgroups(std::process::id()), Vec::<String>::new(), "cgroups left");
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_graceful_image_runs_hardened_execs_and_drains_in_a_pod_namespace() {
    let archive = archive_path();
    if !archive.exists() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI builds {} first", archive.display());
        eprintln!("skipped: {} is absent (build it with .ci/build-image)", archive.display());
        return;
    }
    if std::env::var("CI").as_deref() == Ok("true") && std::env::var(INNER).is_err() {
        assert_eq!(skip_reason(&[]), None, "CI has the tools and root to run the image");
    }
    in_private_world("the_graceful_image_runs_hardened_execs_and_drains_in_a_pod_namespace", &[], || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let netns = pod_netns("pod-1");
        let reference = format!("graceful:latest=oci-archive:{}", archive.display()).parse().unwrap();
        let store = ImageStore::new(dir.path().join("images"), vec![reference]).unwrap();
        let image = rt.block_on(store.image("graceful:latest")).unwrap();
        println!("image unpacked in {} ms", image.unpack_time.as_millis());
        assert!(image.rootfs.join("usr/local/bin/graceful").is_file());
        let again = rt.block_on(store.image("graceful:latest")).unwrap();
        assert!(std::sync::Arc::ptr_eq(&image, &again), "unpacked once per store");

        let runtime = rt.block_on(Runtime::new(&dir.path().join("runtime"))).unwrap();
        let (spec, pre_stop) = backend_spec(dir.path(), &netns);
        let log = dir.path().join("backend-0.log");
        let c: Container = rt.block_on(runtime.run("backend-0", &image, &spec, &log)).unwrap();
        let admin: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        let ready = common::eventually(Duration::from_secs(15), || get_in(&netns, admin, "/readyz") == Ok(200));
        let ready_in = c.created().elapsed();
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(ready, "not ready within 15 s: {}", log_text());
        println!("run -> init pid {} ms; run -> /readyz 200 {} ms", c.started_in().as_millis(), ready_in.as_millis());

        // The securityContext as the kernel applied it, read from the host.
        let pid = c.pid();
        assert_eq!(status_field(pid, "Uid"), "65532 65532 65532 65532");
        assert_eq!(status_field(pid, "Gid"), "65532 65532 65532 65532");
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}: drop ALL");
        }
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "Seccomp"), "2");
        assert!(status_field(pid, "NSpid").ends_with(" 1"), "PID 1 in its namespace");
        let pod_ns = std::fs::metadata(netns.path()).unwrap();
        let init_ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((init_ns.dev(), init_ns.ino()), (pod_ns.dev(), pod_ns.ino()), "in the pod's netns");
        // Writes to / and to the ConfigMap mount fail, even from the host's root through the
        // container's own mounts; the ConfigMap is there to read.
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        for path in [root.join("written-by-test"), root.join("etc/graceful/x")] {
            let err = std::fs::File::create(&path).expect_err("a write to a read-only mount");
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{}: {err}", path.display());
        }
        assert!(root.join("etc/graceful/graceful.toml").is_file());
        let hosts = std::fs::read_to_string(root.join("etc/hosts")).unwrap();
        assert!(hosts.contains("backend-0"), "the hosts file is mounted: {hosts}");

        // Exec inside: the probe's help, then the overlay's preStop (its sleep shortened).
        let help = strings(&["/usr/local/bin/graceful", "shutdown-probe", "--help"]);
        let out = rt.block_on(c.exec(&help, &[], Duration::from_secs(10))).unwrap();
        println!("exec {help:?}: {:?} in {} ms", out.status.map(|s| s.code()), out.took.as_millis());
        assert!(out.status.is_some_and(|s| s.success()), "{out:?}");
        assert!(out.stdout.contains("--drain"), "{}", out.stdout);
        // The exec's own environment reaches the command: the binary names the config file it was given.
        let env = [("GRACEFUL_CONFIG".to_string(), "/nope-from-exec.toml".to_string())];
        let backend = strings(&["/usr/local/bin/graceful", "backend"]);
        let out = rt.block_on(c.exec(&backend, &env, Duration::from_secs(10))).unwrap();
        assert!(out.status.is_some_and(|s| !s.success()), "{out:?}");
        assert!(out.stderr.contains("/nope-from-exec.toml (GRACEFUL_CONFIG)"), "{out:?}");
        let missing = rt.block_on(c.exec(&strings(&["/no/such/binary"]), &[], Duration::from_secs(10))).unwrap();
        assert!(missing.status.is_some_and(|s| !s.success()), "a missing binary fails: {missing:?}");

        let mut hook = pre_stop.clone();
        let sleep = hook.iter().position(|a| a == "--sleep").expect("the hook sleeps");
        hook[sleep + 1] = "1s".into();
        let out = rt.block_on(c.exec(&hook, &[], Duration::from_secs(20))).unwrap();
        println!("exec preStop {hook:?}: {:?} in {} ms", out.status.map(|s| s.code()), out.took.as_millis());
        assert!(out.status.is_some_and(|s| s.success()), "{out:?}");
        assert_eq!(get_in(&netns, admin, "/readyz"), Ok(503), "the hook put the pod in lame duck");

        // A bounded exec that overruns is killed at its timeout.
        let slow = strings(&["/usr/local/bin/graceful", "shutdown-probe", "--sleep", "30s"]);
        let out = rt.block_on(c.exec(&slow, &[], Duration::from_millis(500))).unwrap();
        assert!(out.status.is_none() && out.took < Duration::from_secs(3), "{out:?}");
        assert!(
            common::eventually(Duration::from_secs(2), || processes_in_pid_namespace_of(pid) == 1),
            "the timed-out command still runs in the container"
        );

        let t = Instant::now();
        rt.block_on(c.signal(Signal::SIGTERM)).unwrap();
        let status = rt.block_on(c.wait(Duration::from_secs(15))).unwrap();
        println!("SIGTERM -> exit {:?} in {} ms", status.code(), t.elapsed().as_millis());
        assert_eq!(status.code(), Some(0), "{}", log_text());
        assert_eq!(c.exit_status(), Some(status));
        rt.block_on(c.delete()).unwrap();
        assert_removed(&dir.path().join("runtime"), "backend-0");
    });
}

#[test]
fn pid_one_without_a_handler_ignores_sigterm_and_only_sigkill_ends_it() {
    in_private_world("pid_one_without_a_handler_ignores_sigterm_and_only_sigkill_ends_it", &["gcc", "buildah"], || {
        if let Some(reason) = oci_test_image::missing_tools() {
            panic!("{reason}");
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let archive = oci_test_image::build(&dir.path().join("build"));
        println!("C server image built and packed in {} ms", t.elapsed().as_millis());

        // Also as a layout directory with a tag: the `oci:DIR:TAG` source.
        let layout = dir.path().join("layout");
        graceful::lab::node::oci::layout::extract_archive(&archive, &layout).unwrap();
        let refs = vec![
            format!("plain=oci-archive:{}", archive.display()).parse().unwrap(),
            format!("plain-dir=oci:{}:{}", layout.display(), oci_test_image::REF).parse().unwrap(),
        ];
        let store = ImageStore::new(dir.path().join("images"), refs).unwrap();
        let image = rt.block_on(store.image("plain")).unwrap();
        let from_dir = rt.block_on(store.image("plain-dir")).unwrap();
        assert_eq!(image.manifest_digest, from_dir.manifest_digest);
        assert_eq!(image.config.entrypoint, ["/server"]);
        assert_eq!(image.config.user.as_deref(), Some("65532:65532"));

        let runtime = rt.block_on(Runtime::new(&dir.path().join("runtime"))).unwrap();
        let netns = pod_netns("pod-2");
        // Limits as a manifest gives them: 64Mi of memory, a quarter of a CPU.
        let resources = serde_yaml::from_str("limits: {cpu: 250m, memory: 64Mi}\nrequests: {cpu: 100m}\n").unwrap();
        let spec = ContainerSpec {
            resources: Resources::from_kubernetes(Some(&resources)).unwrap(),
            ..plain_spec(&netns, "plain-0")
        };
        let log = dir.path().join("plain.log");
        let c = rt.block_on(runtime.run("plain-0", &from_dir, &spec, &log)).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", oci_test_image::PORT).parse().unwrap();
        assert!(
            common::eventually(Duration::from_secs(10), || get_in(&netns, addr, "/") == Ok(200)),
            "the C server does not answer: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        println!("run -> 200 in {} ms", c.created().elapsed().as_millis());
        assert_eq!(status_field(c.pid(), "SigCgt"), "0000000000000000", "no handler at all");
        assert_eq!(cgroup_file(c.pid(), "memory", "memory.limit_in_bytes"), (64 << 20).to_string());
        assert_eq!(cgroup_file(c.pid(), "cpu", "cpu.cfs_quota_us"), "25000");
        assert_eq!(cgroup_file(c.pid(), "cpu", "cpu.shares"), "102");

        rt.block_on(c.signal(Signal::SIGTERM)).unwrap();
        let e = rt.block_on(c.wait(Duration::from_secs(1))).unwrap_err().to_string();
        assert!(e.contains("still running after 1s"), "{e}");
        assert_eq!(get_in(&netns, addr, "/"), Ok(200), "still serving after SIGTERM");

        let t = Instant::now();
        rt.block_on(c.signal(Signal::SIGKILL)).unwrap();
        let status = rt.block_on(c.wait(Duration::from_secs(5))).unwrap();
        println!("SIGKILL -> exit {:?} in {} ms", status.code(), t.elapsed().as_millis());
        assert_eq!(status.code(), Some(128 + 9), "runc reports 128 + SIGKILL");
        let e = rt.block_on(c.signal(Signal::SIGTERM)).unwrap_err();
        assert!(format!("{e:#}").contains("plain-0"), "{e:#}");
        rt.block_on(c.delete()).unwrap();
        assert_removed(&dir.path().join("runtime"), "plain-0");

        // A command missing from the image is named, and leaves nothing behind.
        let mut bad = spec.clone();
        bad.command = Some(strings(&["/bin/sh", "-c", "true"]));
        let outcome = rt.block_on(runtime.run("plain-1", &image, &bad, &log));
        let failed = match outcome {
            Err(e) => format!("{e:#}"),
            Ok(c) => {
                let status = rt.block_on(c.wait(Duration::from_secs(5))).unwrap();
                assert!(!status.success());
                rt.block_on(c.delete()).unwrap();
                std::fs::read_to_string(&log).unwrap()
            }
        };
        assert!(failed.contains("/bin/sh"), "{failed}");
        assert_removed(&dir.path().join("runtime"), "plain-1");

        // A spec the runtime refuses names the field and leaves no bundle or mount behind.
        let bad = ContainerSpec { working_dir: Some("srv".into()), ..spec.clone() };
        let e = rt.block_on(runtime.run("plain-3", &image, &bad, &log)).err().expect("refused");
        assert!(format!("{e:#}").contains("workingDir `srv`"), "{e:#}");
        assert_removed(&dir.path().join("runtime"), "plain-3");

        // Dropped without `delete`, a running container is still removed.
        let c = rt.block_on(runtime.run("plain-2", &image, &spec, &log)).unwrap();
        drop(c);
        assert_removed(&dir.path().join("runtime"), "plain-2");
    });
}

/// Set in the killed-lab test's victim: the directory of its runtime.
const VICTIM: &str = "OCI_RUNTIME_TEST_VICTIM";

/// The victim: a "lab" that runs one container, says its init's pid, and waits to be killed.
fn victim(dir: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let archive = dir.join("build/plain-server.oci.tar");
    let refs = vec![format!("plain=oci-archive:{}", archive.display()).parse().unwrap()];
    let store = ImageStore::new(dir.join("images"), refs).unwrap();
    let image = rt.block_on(store.image("plain")).unwrap();
    let runtime = rt.block_on(Runtime::new(&dir.join("runtime"))).unwrap();
    let spec = plain_spec(&Netns::new("pod-3"), "plain-0");
    let c = rt.block_on(runtime.run("plain-0", &image, &spec, &dir.join("plain.log"))).unwrap();
    println!("INIT {}", c.pid());
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_killed_lab_leaves_no_container_running() {
    if let Some(dir) = std::env::var_os(VICTIM) {
        victim(Path::new(&dir));
        return;
    }
    in_private_world("a_killed_lab_leaves_no_container_running", &["gcc", "buildah"], || {
        if let Some(reason) = oci_test_image::missing_tools() {
            panic!("{reason}");
        }
        let dir = tempfile::tempdir().unwrap();
        oci_test_image::build(&dir.path().join("build"));
        let netns = pod_netns("pod-3");
        let mut lab = Command::new(std::env::current_exe().unwrap())
            .args(["a_killed_lab_leaves_no_container_running", "--exact", "--nocapture"])
            .env(VICTIM, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = lab.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(pid) = line.split("INIT ").nth(1) {
                    let _ = tx.send(pid.trim().parse::<i32>().unwrap());
                }
            }
        });
        let init = rx.recv_timeout(Duration::from_secs(30)).expect("the victim lab started its container");
        let addr: SocketAddr = format!("127.0.0.1:{}", oci_test_image::PORT).parse().unwrap();
        assert!(common::eventually(Duration::from_secs(5), || get_in(&netns, addr, "/") == Ok(200)));

        // SIGKILL: the lab runs no clean-up code of its own.
        lab.kill().unwrap();
        lab.wait().unwrap();
        let init = nix::unistd::Pid::from_raw(init);
        let gone = common::eventually(Duration::from_secs(10), || nix::sys::signal::kill(init, None).is_err());
        assert!(gone, "the container outlived the lab");
        assert!(get_in(&netns, addr, "/").is_err(), "something still serves in the pod");
        let out = Command::new("runc").arg("--root").arg(dir.path().join("runtime/runc")).args(["list", "-q"]).output();
        assert_eq!(String::from_utf8_lossy(&out.unwrap().stdout).trim(), "", "runc still lists it");
        assert_eq!(graceful_cgroups(lab.id()), Vec::<String>::new(), "its cgroup is left");

        // Files and the overlay mount stay for a sweep by the next runtime over the same directory.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let runtime = rt.block_on(Runtime::new(&dir.path().join("runtime"))).unwrap();
        assert_eq!(rt.block_on(runtime.sweep()).unwrap(), 0, "the guard already deleted the container");
        assert_removed(&dir.path().join("runtime"), "plain-0");
    });
}
