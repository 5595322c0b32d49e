//! The kernel node's datapath, black-box: real `graceful backend` processes in pod network
//! namespaces behind kube-proxy-style nftables rules, reached from a client namespace. Each
//! test re-runs itself inside a fresh private world (new network + mount namespaces), so all
//! traffic stays in namespaces the test created; the outer half checks that the host's links,
//! named namespaces and nftables ruleset are the same afterwards. Skipped, with the reason
//! printed, where namespaces or the tools are not available (not root, no `nft`/`ip`).

mod common;

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::host::HostSnapshot;
use common::{Process, BIN};
use graceful::lab::kernel_node::node::{DeadPod, Node, Sandbox, NODE_IP};
use graceful::lab::kernel_node::service_model::{Endpoint, Service, ServicePort};
use graceful::lab::kernel_node::{private_world, tool};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Set in the re-run child: the name of the test whose inner half it runs.
const INNER: &str = "KERNEL_NODE_TEST_INNER";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const POD_PORT: u16 = 5000;
const WORLD_BOUND: Duration = Duration::from_secs(90);

/// Runs `body` inside a fresh private world (re-running this test binary there), checking the
/// host is unchanged afterwards.
fn in_private_world(name: &str, body: impl FnOnce()) {
    in_private_world_as(name, None, body)
}

/// Same, the world started by user `uid` when given (then it adds a user namespace).
fn in_private_world_as(name: &str, uid: Option<u32>, body: impl FnOnce()) {
    if std::env::var(INNER).as_deref() == Ok(name) {
        body();
        return;
    }
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    let before = HostSnapshot::take();
    let child = world_command_as(name, uid)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the inner test");
    let (status, out, err) = common::wait_bounded(child, WORLD_BOUND);
    println!("{out}\n{err}");
    assert!(status.success(), "inner half of {name} failed ({status}):\n{out}\n{err}");
    assert!(out.contains("1 passed"), "the inner half of {name} did not run:\n{out}");
    assert_eq!(HostSnapshot::take(), before, "the host's network namespace changed");
}

fn world_command(name: &str) -> Command {
    world_command_as(name, None)
}

fn world_command_as(name: &str, uid: Option<u32>) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"]).env(INNER, name);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    private_world::command_in_new_world(cmd)
}

fn skip_reason() -> Option<String> {
    common::host::kernel_node_unavailable()
}

/// A pod: its sandbox and the real backend listening on 0.0.0.0 inside it.
struct Pod {
    sandbox: Sandbox,
    name: String,
    process: Process,
}

fn start_pod(node: &mut Node) -> Pod {
    let sandbox = node.create_sandbox().expect("create sandbox");
    let name = sandbox.netns.name.clone();
    let mut cmd = Command::new(BIN);
    cmd.args(["backend", "--listen", "0.0.0.0:5000", "--admin-listen", "0.0.0.0:5001"])
        .env("POD_NAME", &name)
        .env("POD_IP", sandbox.ip.to_string())
        .env("GRACEFUL_TELEMETRY__LOG_FORMAT", "json")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("RUST_LOG")
        .env_remove(INNER);
    let mut process = Process::spawn(sandbox.netns.command(cmd).expect("enter pod netns")).expect("spawn backend");
    if let Err(e) = process.wait_serving(Duration::from_secs(15)) {
        panic!("backend in {name}: {e}");
    }
    Pod { sandbox, name, process }
}

fn web(endpoints: Vec<Endpoint>) -> Service {
    Service {
        name: "web".into(),
        cluster_ip: CLUSTER_IP,
        ports: vec![ServicePort { name: "http".into(), port: 80, node_port: Some(NODE_PORT), endpoints }],
    }
}

fn ready(pods: &[&Pod]) -> Vec<Endpoint> {
    pods.iter().map(|p| Endpoint::ready(p.sandbox.ip, POD_PORT)).collect()
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// A connection opened from the client namespace.
fn connect_from_client(node: &Node, to: SocketAddr, bound: Duration) -> std::io::Result<TcpStream> {
    node.client
        .run(move || {
            let s = TcpStream::connect_timeout(&to, bound)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        })
        .expect("enter the client namespace")
}

/// Which pod answers `/ping` on `s`.
fn ping(s: &mut TcpStream) -> String {
    let r = common::request(s, "GET", "/ping", "").expect("ping");
    assert_eq!(r.status, 200);
    r.json()["pod"].as_str().expect("pod in /ping").to_owned()
}

fn count_by_pod(node: &Node, to: SocketAddr, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let mut s = connect_from_client(node, to, Duration::from_secs(2)).expect("connect");
        *seen.entry(ping(&mut s)).or_default() += 1;
    }
    seen
}

#[test]
fn connections_through_the_cluster_ip_spread_over_endpoints() {
    in_private_world("connections_through_the_cluster_ip_spread_over_endpoints", || {
        let mut node = Node::create().expect("node");
        let pods: Vec<Pod> = (0..3).map(|_| start_pod(&mut node)).collect();
        let took = node.apply_services(&[web(ready(&pods.iter().collect::<Vec<_>>()))]).expect("apply");
        println!("nft transaction: {took:?}");

        let seen = count_by_pod(&node, addr(CLUSTER_IP, 80), 300);
        println!("300 connections via the ClusterIP: {seen:?}");
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.values().all(|&n| n >= 50), "uneven spread: {seen:?}");

        let seen = count_by_pod(&node, addr(NODE_IP, NODE_PORT), 60);
        println!("60 connections via the NodePort: {seen:?}");
        assert!(seen.len() >= 2, "{seen:?}");

        // Pod → Service → any pod, itself included (hairpin), from inside a pod.
        let pod_ns = pods[0].sandbox.netns.clone();
        let answers = pod_ns
            .run(|| {
                (0..30)
                    .map(|_| {
                        let mut s = common::connect(addr(CLUSTER_IP, 80)).expect("connect from a pod");
                        ping(&mut s)
                    })
                    .collect::<std::collections::BTreeSet<_>>()
            })
            .unwrap();
        assert!(answers.contains(&pods[0].name), "no hairpin answer: {answers:?}");
        assert_eq!(answers.len(), 3, "{answers:?}");
    });
}

/// An unprivileged user gets a user namespace in which it is root: the same node works there.
#[test]
fn the_node_works_rootless_in_a_user_namespace() {
    const NAME: &str = "the_node_works_rootless_in_a_user_namespace";
    const NOBODY: u32 = 65534;
    if std::env::var(INNER).as_deref() != Ok(NAME) && skip_reason().is_none() {
        let mut probe = Command::new("ip");
        probe.arg("-V").uid(NOBODY).gid(NOBODY).stdout(Stdio::null());
        let status = private_world::command_in_new_world(probe).status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("skipped: no private world for an unprivileged user here ({status:?})");
            return;
        }
    }
    in_private_world_as(NAME, Some(NOBODY), || {
        let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap();
        let fields: Vec<&str> = uid_map.split_whitespace().collect();
        assert_eq!(fields, ["0", "65534", "1"], "not in a user namespace mapping nobody to root");
        let mut node = Node::create().expect("node");
        let pods: Vec<Pod> = (0..2).map(|_| start_pod(&mut node)).collect();
        node.apply_services(&[web(ready(&[&pods[0], &pods[1]]))]).expect("apply");
        let seen = count_by_pod(&node, addr(NODE_IP, NODE_PORT), 40);
        assert_eq!(seen.len(), 2, "{seen:?}");
    });
}

#[test]
fn a_removed_endpoint_keeps_its_connection_and_gets_no_new_ones() {
    in_private_world("a_removed_endpoint_keeps_its_connection_and_gets_no_new_ones", || {
        let mut node = Node::create().expect("node");
        let pods: Vec<Pod> = (0..2).map(|_| start_pod(&mut node)).collect();
        node.apply_services(&[web(ready(&[&pods[0], &pods[1]]))]).expect("apply");

        let mut kept = connect_from_client(&node, addr(CLUSTER_IP, 80), Duration::from_secs(2)).unwrap();
        let first = ping(&mut kept);
        let (gone, stays) = if first == pods[0].name { (&pods[0], &pods[1]) } else { (&pods[1], &pods[0]) };
        // The endpoint leaves as a terminating one: ready false, still serving.
        let endpoints =
            vec![Endpoint::ready(stays.sandbox.ip, POD_PORT), Endpoint::serving_terminating(gone.sandbox.ip, POD_PORT)];
        node.apply_services(&[web(endpoints)]).expect("apply");

        for _ in 0..5 {
            assert_eq!(ping(&mut kept), gone.name, "the established connection moved");
        }
        let seen = count_by_pod(&node, addr(CLUSTER_IP, 80), 60);
        assert_eq!(seen.get(&gone.name), None, "the removed endpoint got new connections: {seen:?}");
        assert_eq!(seen.get(&stays.name), Some(&60));

        // With no ready endpoint left, the terminating-but-serving one is used again.
        node.apply_services(&[web(vec![Endpoint::serving_terminating(gone.sandbox.ip, POD_PORT)])]).expect("apply");
        assert_eq!(count_by_pod(&node, addr(CLUSTER_IP, 80), 10).get(&gone.name), Some(&10));
    });
}

#[test]
fn a_pod_whose_process_exited_refuses_at_once() {
    in_private_world("a_pod_whose_process_exited_refuses_at_once", || {
        let mut node = Node::create().expect("node");
        let mut pod = start_pod(&mut node);
        node.apply_services(&[web(ready(&[&pod]))]).expect("apply");
        assert_eq!(count_by_pod(&node, addr(CLUSTER_IP, 80), 3).get(&pod.name), Some(&3));

        pod.process.kill();
        for to in [addr(CLUSTER_IP, 80), addr(pod.sandbox.ip, POD_PORT), addr(NODE_IP, NODE_PORT)] {
            let started = Instant::now();
            let err = connect_from_client(&node, to, Duration::from_secs(5)).expect_err("nothing listens");
            println!("{to}: {:?} after {:?}", err.kind(), started.elapsed());
            assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{to}: {err}");
            assert!(started.elapsed() < Duration::from_secs(1), "{to}: refused only after {:?}", started.elapsed());
        }

        // A Service with no usable endpoint is rejected by the rules themselves.
        node.apply_services(&[web(vec![])]).expect("apply");
        let err = connect_from_client(&node, addr(CLUSTER_IP, 80), Duration::from_secs(5)).expect_err("no endpoints");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    });
}

#[test]
fn a_torn_down_sandbox_is_unreachable() {
    in_private_world("a_torn_down_sandbox_is_unreachable", || {
        let mut node = Node::create().expect("node");
        let mut pod = start_pod(&mut node);
        node.apply_services(&[web(ready(&[&pod]))]).expect("apply");
        assert_eq!(count_by_pod(&node, addr(CLUSTER_IP, 80), 3).get(&pod.name), Some(&3));

        pod.process.kill();
        node.teardown_sandbox(pod.sandbox.id, DeadPod::Unreachable).expect("teardown");
        // The rules still point at the gone pod, as they do until the endpoint change arrives.
        let started = Instant::now();
        let err = connect_from_client(&node, addr(CLUSTER_IP, 80), Duration::from_secs(10)).expect_err("pod is gone");
        println!("torn-down pod: {:?} after {:?}", err.kind(), started.elapsed());
        assert_eq!(err.kind(), ErrorKind::HostUnreachable, "{err}");
    });
}

#[test]
fn a_torn_down_sandbox_with_a_cached_neighbour_is_a_blackhole() {
    in_private_world("a_torn_down_sandbox_with_a_cached_neighbour_is_a_blackhole", || {
        let mut node = Node::create().expect("node");
        let mut pod = start_pod(&mut node);
        node.apply_services(&[web(ready(&[&pod]))]).expect("apply");
        // Fresh traffic leaves the node's neighbour entry for the pod REACHABLE.
        assert_eq!(count_by_pod(&node, addr(CLUSTER_IP, 80), 3).get(&pod.name), Some(&3));

        pod.process.kill();
        node.teardown_sandbox(pod.sandbox.id, DeadPod::Blackhole).expect("teardown");
        let err = connect_from_client(&node, addr(CLUSTER_IP, 80), Duration::from_secs(3)).expect_err("pod is gone");
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    });
}

/// A connect that took this long had its first SYN unanswered (the retry comes after 1 s).
const SYN_RETRY: Duration = Duration::from_millis(900);
/// The kernel gives up resolving a neighbour after 3 probes a second apart.
const NEIGHBOUR_GAVE_UP: Duration = Duration::from_millis(2900);

/// A segment conntrack cannot place (here a SYN-ACK no connection sent) skips NAT: sent on as it
/// is, a packet to a ClusterIP would go to the bridge, to an address no pod has. kube-proxy's
/// `ct state invalid drop` stops it in the forward hook, and the connections around it are
/// untouched.
#[test]
fn a_segment_conntrack_cannot_place_is_dropped_not_forwarded_to_the_cluster_ip() {
    in_private_world("a_segment_conntrack_cannot_place_is_dropped_not_forwarded_to_the_cluster_ip", || {
        let mut node = Node::create().expect("node");
        let pod = start_pod(&mut node);
        node.apply_services(&[web(ready(&[&pod]))]).expect("apply");
        // The test's own probe: what leaves the node still addressed to the ClusterIP (a DNATed
        // packet leaves addressed to the pod).
        let probe = "table ip leak-probe {\n  chain post {\n    type filter hook postrouting priority 0; policy accept;\n    ip daddr 10.96.0.0/12 counter\n  }\n}\n";
        let mut nft = Command::new("nft");
        nft.args(["-f", "-"]);
        tool::run(node.netns.command(nft).expect("node netns"), Some(probe)).expect("add the probe table");
        let leaked = || {
            let mut nft = Command::new("nft");
            nft.args(["list", "chain", "ip", "leak-probe", "post"]);
            let out = tool::run(node.netns.command(nft).expect("node netns"), None).expect("list the probe").stdout;
            let n = out.split("counter packets ").nth(1).and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok());
            n.expect("the probe's counter")
        };
        let before = node.invalid_dropped().expect("counter");
        let to = SocketAddrV4::new(CLUSTER_IP, 80);
        for _ in 0..3 {
            node.client.run(move || send_stray_syn_ack(to)).expect("enter the client namespace").expect("send");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut dropped = before;
        while dropped < before + 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            dropped = node.invalid_dropped().expect("counter");
        }
        let left = leaked();
        println!(
            "invalid packets dropped by kube-proxy's forward chain: {before} before, {dropped} after 3 stray SYN-ACKs; left the node addressed to the ClusterIP: {left}"
        );
        assert_eq!(dropped - before, 3, "each stray SYN-ACK is counted");
        assert_eq!(left, 0, "and none left the node still addressed to the ClusterIP");
        let seen = count_by_pod(&node, addr(CLUSTER_IP, 80), 5);
        assert_eq!(seen.get(&pod.name), Some(&5), "new connections still reach the pod: {seen:?}");
        assert_eq!(node.invalid_dropped().expect("counter"), dropped, "valid traffic is never counted");
    });
}

/// A lone SYN-ACK from this thread's namespace to `to` through a raw socket, with a correct
/// checksum (a wrong one would be invalid for another reason).
fn send_stray_syn_ack(to: SocketAddrV4) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    // The source address the kernel will put in the IP header, for the pseudo-header.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    probe.connect(to)?;
    let SocketAddr::V4(from) = probe.local_addr()? else {
        return Err(std::io::Error::other("an IPv4 socket has an IPv4 address"));
    };
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&0x0abc_def0u32.to_be_bytes());
    tcp[12] = 5 << 4; // 20-byte header
    tcp[13] = 0x12; // SYN | ACK
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&from.ip().octets());
    add(&to.ip().octets());
    add(&[0, 6, 0, tcp.len() as u8]);
    add(&tcp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
    raw.send_to(&tcp, &SocketAddr::V4(SocketAddrV4::new(*to.ip(), 0)).into())?;
    Ok(())
}

/// kube-proxy replaces the whole table at every change; the replace is atomic, so new
/// connections racing it never fall through a gap.
#[test]
fn whole_table_replaces_under_load_lose_no_connection() {
    in_private_world("whole_table_replaces_under_load_lose_no_connection", || {
        let mut node = Node::create().expect("node");
        let pods: Vec<Pod> = (0..2).map(|_| start_pod(&mut node)).collect();
        let both = web(ready(&[&pods[0], &pods[1]]));
        let one = web(ready(&[&pods[0]]));
        node.apply_services(std::slice::from_ref(&both)).expect("apply");
        const CONNECTIONS: usize = 1500;
        let client = node.client.clone();
        let load = std::thread::spawn(move || {
            client
                .run(|| {
                    let (mut failures, mut retransmitted, mut neighbour_failures) = (Vec::new(), 0, Vec::new());
                    let started = Instant::now();
                    for i in 0..CONNECTIONS {
                        // SYNs at 0, 1 and 3 s: a SYN the loaded machine dropped once is TCP's
                        // business; a gap between tables would make every racing SYN wait.
                        let connect_started = Instant::now();
                        let result = TcpStream::connect_timeout(&addr(CLUSTER_IP, 80), Duration::from_secs(7))
                            .inspect(|_| retransmitted += usize::from(connect_started.elapsed() >= SYN_RETRY))
                            .and_then(|mut s| common::request(&mut s, "GET", "/ping", ""));
                        let took = connect_started.elapsed();
                        match result {
                            Ok(r) if r.status == 200 => {}
                            Ok(r) => failures.push(format!("#{i} at {:?}: HTTP {}", started.elapsed(), r.status)),
                            // Seen once in CI under load, before the forward chain dropped what
                            // conntrack marks invalid: one SYN whose neighbour the node gave up
                            // resolving after its 3 s of probes. A ClusterIP packet left un-DNATed
                            // goes to the bridge exactly so (see the stray SYN-ACK test); a pod's
                            // lost ARP would look alike. One in 1500 is allowed and printed; a
                            // gap at each replace would catch dozens.
                            Err(e) if e.kind() == ErrorKind::HostUnreachable && took >= NEIGHBOUR_GAVE_UP => {
                                neighbour_failures.push(format!("#{i} at {:?} after {took:?}: {e}", started.elapsed()))
                            }
                            Err(e) => failures.push(format!("#{i} at {:?} after {took:?}: {e}", started.elapsed())),
                        }
                    }
                    (failures, retransmitted, neighbour_failures)
                })
                .expect("enter the client namespace")
        });
        let mut took = Vec::new();
        while !load.is_finished() && took.len() < 200 {
            let services = if took.len() % 2 == 0 { &one } else { &both };
            took.push(node.apply_services(std::slice::from_ref(services)).expect("apply"));
        }
        let (failures, retransmitted, neighbour_failures) = load.join().expect("load thread");
        let max = took.iter().max().copied().unwrap_or_default();
        let mean = took.iter().sum::<Duration>() / took.len().max(1) as u32;
        println!(
            "{} whole-table replaces under {CONNECTIONS} new connections: {} failed, {retransmitted} needed a second SYN, {} met a failed neighbour entry {neighbour_failures:?}; nft mean {mean:?}, max {max:?}",
            took.len(),
            failures.len(),
            neighbour_failures.len()
        );
        assert!(took.len() >= 5, "too few replaces ({}) to mean anything", took.len());
        assert!(failures.is_empty(), "{failures:?}");
        // A table missing for a moment at each of the replaces would catch a share of the
        // connections racing them; a dropped SYN on the loaded machine is one in a thousand.
        assert!(retransmitted <= 2, "{retransmitted} of {CONNECTIONS} connections needed a second SYN");
        assert!(neighbour_failures.len() <= 1, "{neighbour_failures:?}");
    });
}

#[test]
fn sandboxes_can_be_recreated_at_once_after_teardown() {
    in_private_world("sandboxes_can_be_recreated_at_once_after_teardown", || {
        let mut node = Node::create().expect("node");
        let started = Instant::now();
        for _ in 0..20 {
            let sandbox = node.create_sandbox().expect("create");
            node.teardown_sandbox(sandbox.id, DeadPod::Unreachable).expect("teardown");
        }
        println!("20 sandbox create+teardown cycles: {:?}", started.elapsed());
        let _pod = start_pod(&mut node);
    });
}

#[test]
fn kernel_datapath_versus_direct_figure() {
    in_private_world("kernel_datapath_versus_direct_figure", || {
        let mut node = Node::create().expect("node");
        let pod = start_pod(&mut node);
        node.apply_services(&[web(ready(&[&pod]))]).expect("apply");
        const N: usize = 400;
        let time = |to: SocketAddr| {
            let started = Instant::now();
            assert_eq!(count_by_pod(&node, to, N).get(&pod.name), Some(&N));
            started.elapsed()
        };
        // Alternating rounds, best of each: the machine is shared, the order should not matter.
        let (mut direct, mut cluster_ip) = (Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            direct = direct.min(time(addr(pod.sandbox.ip, POD_PORT)));
            cluster_ip = cluster_ip.min(time(addr(CLUSTER_IP, 80)));
        }
        println!(
            "kernel datapath vs direct, {N} new connections each (best of 3): direct {direct:?}, via ClusterIP {cluster_ip:?}, ratio {:.2}",
            cluster_ip.as_secs_f64() / direct.as_secs_f64()
        );
    });
}

/// The inner half builds a node with a running pod and waits to be killed; the outer half
/// SIGKILLs it and checks that the pod's process and every namespace went with it.
#[test]
fn nothing_survives_a_sigkilled_world() {
    const NAME: &str = "nothing_survives_a_sigkilled_world";
    if std::env::var(INNER).as_deref() == Ok(NAME) {
        let mut node = Node::create().expect("node");
        let pod = start_pod(&mut node);
        node.apply_services(&[web(ready(&[&pod]))]).expect("apply");
        println!("WORLD-READY {}", pod.process.pid);
        std::thread::sleep(WORLD_BOUND);
        panic!("not killed within {WORLD_BOUND:?}");
    }
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    let before = HostSnapshot::take();
    let mut world = world_command(NAME).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = world.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            // The harness's "test NAME ... " may precede it on the same line.
            if let Some((_, pid)) = line.split_once("WORLD-READY ") {
                let _ = tx.send(pid.trim().parse::<i32>().expect("pid"));
            }
        }
    });
    let pod_pid = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(pid) => pid,
        Err(e) => {
            let _ = world.kill();
            let _ = world.wait();
            panic!("the world did not get ready: {e}");
        }
    };
    world.kill().expect("SIGKILL the world");
    world.wait().expect("reap");
    let pod_gone = common::eventually(Duration::from_secs(5), || kill(Pid::from_raw(pod_pid), None::<Signal>).is_err());
    assert!(pod_gone, "the pod's process {pod_pid} outlived its world");
    assert_eq!(HostSnapshot::take(), before, "the host's network namespace changed");
}
