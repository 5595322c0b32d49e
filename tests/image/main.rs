//! The real image (.ci/build-image → target/image/graceful.oci.tar): static checks on what was
//! built, then the backend container under runc with the securityContext, ConfigMap mount and
//! preStop hook of the rendered solution overlay, in a network namespace each test creates.
//! Skipped, with the reason printed, when the archive or the tools are absent (CI builds it first).

#[path = "../common/mod.rs"]
mod common;

mod archive;
mod container;
mod netns;
mod pod;
mod spec;

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use archive::Image;
use common::image::archive_path;
use container::Container;
use netns::Netns;
use pod::Backend;

/// The compressed layer (what a node pulls) and the unpacked binary, in bytes. Measured here:
/// see docs/deploy.md; the budget leaves room for growth, not for a second layer or a base image.
const LAYER_BUDGET: u64 = 12 * 1024 * 1024;
const BINARY_BUDGET: u64 = 24 * 1024 * 1024;

const BACKEND: &str = "127.0.0.1:5000";
const ADMIN: &str = "127.0.0.1:5001";

/// The built image, or None (with the reason printed) when it has not been built here.
fn image() -> Option<Image> {
    let path = archive_path();
    if !path.exists() {
        eprintln!("skipped: {} is absent (build it with .ci/build-image)", path.display());
        return None;
    }
    Some(Image::open(&path))
}

/// The image plus what running it needs (root for runc and namespaces; runc, umoci, unshare,
/// nsenter, ip), or None with the reason printed.
fn runnable() -> Option<(Image, Backend)> {
    let image = image()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: running the container needs root (runc, network namespaces)");
        return None;
    }
    for tool in ["runc", "umoci", "unshare", "nsenter", "ip"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        if !found.map(|o| o.status.success()).unwrap_or(false) {
            eprintln!("skipped: '{tool}' is not installed (apt-get install runc umoci util-linux iproute2)");
            return None;
        }
    }
    Some((image, pod::backend()))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// GET from inside the container's network namespace; the status, or the error's text.
fn get_in(netns: &Netns, a: &'static str, path: &'static str) -> Result<u16, String> {
    netns.run(move || common::get(addr(a), path).map(|r| r.status).map_err(|e| e.to_string()))
}

/// Starts the backend and waits (bounded) for /readyz 200; returns it and create → ready.
fn start_ready(image: &Image, backend: &Backend, netns: &Netns, env: &[(&str, Option<&str>)]) -> (Container, Duration) {
    let c = Container::run(image, backend, netns, env);
    let ready = common::eventually(Duration::from_secs(15), || get_in(netns, ADMIN, "/readyz") == Ok(200));
    let took = c.created.elapsed();
    assert!(ready, "not ready within 15 s: {}", c.log_text());
    (c, took)
}

/// No collector in a test: without an endpoint the binary exports nothing. A short drain keeps
/// the tests quick where the declared 5 s is not the point.
const TEST_ENV: &[(&str, Option<&str>)] =
    &[("OTEL_EXPORTER_OTLP_ENDPOINT", None), ("GRACEFUL_SHUTDOWN__DRAIN_DELAY", Some("1s"))];
/// The same, with the drain delay the manifest declares.
const DECLARED_DRAIN: &[(&str, Option<&str>)] = &[("OTEL_EXPORTER_OTLP_ENDPOINT", None)];

/// Every path under `root`, relative, sorted.
fn tree(root: &Path) -> Vec<(String, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            }
            out.push((entry.path().strip_prefix(root).unwrap().display().to_string(), meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// True when the ELF file asks for no program interpreter (static, also static-pie).
fn elf_is_static(bytes: &[u8]) -> bool {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(bytes[4], 2, "not a 64-bit ELF");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) != PT_INTERP
    })
}

#[test]
fn image_is_one_layer_holding_only_the_static_binary() {
    let Some(image) = image() else { return };
    let layers = image.found.manifest.layers();
    assert_eq!(layers.len(), 1, "layers: {layers:?}");
    let layer = &layers[0];
    let media_type = layer.media_type().to_string();
    assert!(media_type.starts_with("application/vnd.oci.image.layer.v1.tar"), "{media_type}");

    let dir = tempfile::tempdir().unwrap();
    image.unpack(&dir.path().join("b"));
    let rootfs = dir.path().join("b/rootfs");
    let entries = tree(&rootfs);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["usr", "usr/local", "usr/local/bin", "usr/local/bin/graceful"],
        "the image holds more than the binary"
    );
    // No shell and no other program: the one file is the binary (and nothing is a link to a shell).
    assert!(entries.iter().all(|(_, m)| !m.file_type().is_symlink()));
    assert!(!rootfs.join("bin/sh").exists());

    let (_, bin) = entries.last().unwrap();
    assert_eq!(bin.permissions().mode() & 0o7777, 0o555, "binary mode");
    assert_eq!((bin.uid(), bin.gid()), (0, 0), "the binary is root's: the runtime user cannot change it");
    let bytes = std::fs::read(rootfs.join("usr/local/bin/graceful")).unwrap();
    assert!(elf_is_static(&bytes), "the binary needs a program interpreter, which the image does not have");

    println!(
        "image: archive {} bytes, layer {} bytes compressed, binary {} bytes",
        image.archive_bytes,
        layer.size(),
        bin.len()
    );
    assert!(layer.size() <= LAYER_BUDGET, "layer {} bytes > budget {LAYER_BUDGET}", layer.size());
    assert!(bin.len() <= BINARY_BUDGET, "binary {} bytes > budget {BINARY_BUDGET}", bin.len());
}

#[test]
fn image_config_runs_the_binary_as_65532_with_its_labels() {
    let Some(image) = image() else { return };
    let c = &image.found.config;
    assert_eq!((c.os().to_string().as_str(), c.architecture().to_string().as_str()), ("linux", "amd64"));
    assert_eq!(image.run.user.as_deref(), Some("65532:65532"));
    let (uid, gid) = pod::backend().uid_gid();
    assert_eq!(image.run.user, Some(format!("{uid}:{gid}")), "image user = the manifests' runAsUser:runAsGroup");
    assert_eq!(image.run.entrypoint, ["/usr/local/bin/graceful"]);
    assert_eq!(image.run.cmd, ["--help"]);
    let labels = c.config().as_ref().and_then(|c| c.labels().clone()).unwrap_or_default();
    let label = |k: &str| labels.get(&format!("org.opencontainers.image.{k}")).cloned().unwrap_or_default();
    assert_eq!(label("title"), "graceful");
    assert_eq!(label("licenses"), env!("CARGO_PKG_LICENSE"));
    assert_eq!(label("version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(label("base.name"), "scratch");
    assert!(!label("description").is_empty(), "labels: {labels:?}");
    assert!(!label("revision").is_empty(), "labels: {labels:?}");
}

/// Reads a field of /proc/PID/status.
fn status_field(pid: i32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("{name} in status"));
    line[name.len() + 1..].split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn runs_ready_under_the_declared_security_context() {
    let Some((image, backend)) = runnable() else { return };
    let netns = Netns::new();
    let (c, ready) = start_ready(&image, &backend, &netns, TEST_ENV);
    println!("container create -> /readyz 200: {} ms", ready.as_millis());
    let pid = c.wait_running(Duration::from_secs(2));

    // What the kernel applied, read from the host.
    let (uid, gid) = backend.uid_gid();
    assert_eq!(status_field(pid, "Uid"), format!("{0} {0} {0} {0}", uid));
    assert_eq!(status_field(pid, "Gid"), format!("{0} {0} {0} {0}", gid));
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}: drop ALL");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "allowPrivilegeEscalation: false");
    assert_eq!(status_field(pid, "Seccomp"), "2", "a seccomp filter is in force");
    assert!(status_field(pid, "NSpid").ends_with(" 1"), "PID 1 in the container: {}", status_field(pid, "NSpid"));

    // The root filesystem and the config mount refuse writes, even from the host's root through
    // the container's own mounts; the config is there to read.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    for path in [root.join("written-by-test"), root.join("usr/local/bin/written-by-test"), root.join("etc/graceful/x")]
    {
        let err = std::fs::File::create(&path).expect_err("a write to a read-only mount");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{}: {err}", path.display());
    }
    let toml = std::fs::read_to_string(root.join("etc/graceful/graceful.toml")).unwrap();
    assert_eq!(Some(&toml), backend.config_files.get("graceful.toml"));
    let out = c.exec(&["/bin/sh".into(), "-c".into(), "true".into()], Duration::from_secs(10));
    assert!(!out.status.success(), "the image has a shell");
}

#[test]
fn sigterm_drains_and_exits_zero_with_the_in_flight_request_answered() {
    let Some((image, backend)) = runnable() else { return };
    let netns = Netns::new();
    let (mut c, _) = start_ready(&image, &backend, &netns, TEST_ENV);
    let in_flight = netns.spawn(|| common::get(addr(BACKEND), "/api/data?work_ms=1500").map(|r| r.status));
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    c.kill("TERM");
    // `runc kill` returns once the signal is sent, not handled: readiness flips a moment later.
    let draining = common::eventually(Duration::from_secs(5), || get_in(&netns, ADMIN, "/readyz") == Ok(503));
    assert!(draining, "readiness never said 503 while draining");
    let status = c.wait_exit(Duration::from_secs(15)).expect("exits within 15 s of SIGTERM");
    println!("SIGTERM -> exit: {} ms (drain 1 s, in-flight 1.5 s)", t.elapsed().as_millis());
    assert_eq!(status.code(), Some(0), "{}", c.log_text());
    assert_eq!(in_flight.join().unwrap().expect("the in-flight request is answered"), 200);
    // Where the kernel refuses the SYN filter to a container with no capabilities (this one's
    // does), the fallback's check of handshakes under way must work under the declared
    // securityContext: sock_diag needs no privilege.
    let log = c.log_text();
    if log.contains("plugging a zero-length accept queue") {
        assert!(!log.contains("cannot count the listener's handshakes"), "{log}");
    }
}

// The listener's hand-over without capabilities (the kernel here refuses the SYN filter without
// CAP_NET_ADMIN, so the plugged zero-length queue is the close) is measured by
// tests/listener_close.rs::without_capabilities_at_most_the_last_connection_is_lost.

#[test]
fn a_second_signal_or_sigkill_ends_it_during_the_drain() {
    let Some((image, backend)) = runnable() else { return };
    // The declared 5 s drain: ending well inside it proves the second signal, not the drain, did it.
    for (second, code) in [("TERM", 143), ("INT", 130), ("KILL", 128 + 9)] {
        let netns = Netns::new();
        let (mut c, _) = start_ready(&image, &backend, &netns, DECLARED_DRAIN);
        c.kill("TERM");
        assert!(common::eventually(Duration::from_secs(3), || get_in(&netns, ADMIN, "/readyz") == Ok(503)));
        let t = Instant::now();
        c.kill(second);
        let status =
            c.wait_exit(Duration::from_secs(3)).unwrap_or_else(|| panic!("SIGTERM then {second}: still running"));
        println!("SIGTERM then {second} -> exit {:?} in {} ms", status.code(), t.elapsed().as_millis());
        assert_eq!(status.code(), Some(code), "SIGTERM then {second}: {}", c.log_text());
    }
}

#[test]
fn prestop_exec_runs_the_probe_inside_without_a_shell() {
    let Some((image, backend)) = runnable() else { return };
    let netns = Netns::new();
    let (mut c, _) = start_ready(&image, &backend, &netns, DECLARED_DRAIN);
    // Exec form: the first word is the binary's path in the image, nothing interprets the rest.
    assert!(backend.pre_stop[0].starts_with('/') && backend.pre_stop[1] == "shutdown-probe", "{:?}", backend.pre_stop);
    let t = Instant::now();
    let out = c.exec(&backend.pre_stop, Duration::from_secs(20));
    let took = t.elapsed();
    println!("preStop {:?}: {:?} in {} ms", backend.pre_stop, out.status.code(), took.as_millis());
    assert!(
        out.status.success(),
        "preStop failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(get_in(&netns, ADMIN, "/readyz"), Ok(503), "the hook put the pod in lame duck");
    assert_eq!(get_in(&netns, BACKEND, "/api/data"), Ok(200), "still serving while draining");
    // The hook already held the pod for the drain delay: SIGTERM now stops without a second wait.
    let t = Instant::now();
    c.kill("TERM");
    let status = c.wait_exit(Duration::from_secs(4)).expect("exits soon after SIGTERM once preStop drained");
    println!("SIGTERM after preStop -> exit: {} ms", t.elapsed().as_millis());
    assert_eq!(status.code(), Some(0), "{}", c.log_text());
}

/// True once `pid` has a handler for SIGTERM (SigCgt in /proc/PID/status).
fn catches_sigterm(pid: i32) -> bool {
    let mask = u64::from_str_radix(&status_field(pid, "SigCgt"), 16).unwrap_or(0);
    mask & (1 << (libc::SIGTERM - 1)) != 0
}

/// True when something in the container's network namespace listens on `port` (TCP, IPv4 or 6).
fn listening(pid: i32, port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    ["tcp", "tcp6"].iter().any(|f| {
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default();
        // Columns: sl local_address rem_address st ...; st 0A is LISTEN.
        table.lines().skip(1).any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && format!("{} ", cols[1]).ends_with(&hex) && cols[3] == "0A"
        })
    })
}

#[test]
fn pid_one_catches_an_early_sigterm() {
    let Some((image, backend)) = runnable() else { return };
    let netns = Netns::new();
    let mut c = Container::run(&image, &backend, &netns, TEST_ENV);
    let pid = c.exec_pid(&image.run.entrypoint[0], Duration::from_secs(10));
    // The kernel drops signals PID 1 has no handler for, so a SIGTERM before the handler would be
    // lost and the container would live on. The binary installs one first thing: signal the
    // moment it is there (busy polling), from the host as runc would.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !catches_sigterm(pid) {
        assert!(Instant::now() < deadline, "PID 1 never installed a SIGTERM handler: {}", c.log_text());
    }
    let at = c.created.elapsed();
    let admin_listening = listening(pid, 5001);
    // SAFETY: kill(2) on the container's init, which this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = c.wait_exit(Duration::from_secs(10)).expect("PID 1 ends on an early SIGTERM");
    // 143: the early handler (nothing served yet, exit at once); 0: the server's, after a drain.
    println!(
        "SIGTERM {} ms after create (admin port listening: {admin_listening}) -> exit {:?}",
        at.as_millis(),
        status.code()
    );
    assert!(matches!(status.code(), Some(143) | Some(0)), "{status:?}: {}", c.log_text());
}
