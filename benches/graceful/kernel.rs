//! The kernel node's datapath against going straight to the pod: the backend in a pod network
//! namespace on the node's bridge, wrk in the client namespace, through the pod's address
//! (routed by the node, no Service), the ClusterIP (kube-proxy's nftables DNAT) and the NodePort
//! (DNAT and masquerade). All of it inside a private world the bench re-runs itself in, so the
//! host's network namespace is never touched.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use graceful::lab::kernel_node::node::{Node, NODE_IP};
use graceful::lab::kernel_node::private_world;
use graceful::lab::kernel_node::service_model::{Endpoint, Service, ServicePort};
use serde::{Deserialize, Serialize};

use crate::wrk::{Run, Wrk};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const POD_PORT: u16 = 5000;
const RESULT_PREFIX: &str = "GRACEFUL_KERNEL_DATAPATH ";

/// What the inner half measures: one wrk run per target per round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rounds {
    /// (target name, what, runs)
    pub targets: Vec<(String, String, Vec<Run>)>,
}

/// How the inner half is told what to do (a hidden flag of the bench binary).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub seconds: u32,
    pub warmup_seconds: u32,
    pub rounds: usize,
    pub connections: u32,
    pub threads: u32,
}

/// Runs the inner half in a new private world and returns its figures (bounded).
pub fn measure(plan: &Plan) -> Result<Rounds> {
    private_world::check_host().context("the kernel node cannot run here")?;
    let exe = std::env::current_exe().context("the bench's own path")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--kernel-datapath-inner").arg(serde_json::to_string(plan)?);
    let mut child = private_world::command_in_new_world(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("entering a private world")?;
    let per_run = u64::from(plan.seconds + plan.warmup_seconds) + 2;
    let bound = Duration::from_secs(60 + per_run * 3 * plan.rounds as u64);
    let deadline = Instant::now() + bound;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the kernel datapath measurement did not finish within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix(RESULT_PREFIX)).ok_or_else(|| {
        anyhow!("the inner half printed no result ({}): {}", out.status, String::from_utf8_lossy(&out.stderr))
    })?;
    serde_json::from_str(line).context("reading the inner half's result")
}

/// The inner half, inside the world: builds the node, runs the backend in a pod, measures.
pub fn inner(plan_json: &str) -> ExitCode {
    match inner_result(plan_json) {
        Ok(r) => {
            println!("{RESULT_PREFIX}{}", serde_json::to_string(&r).expect("the result serializes"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kernel datapath: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn inner_result(plan_json: &str) -> Result<Rounds> {
    let plan: Plan = serde_json::from_str(plan_json).context("the plan")?;
    let wrk = Wrk::ensure()?;
    let mut node = Node::create()?;
    let sandbox = node.create_sandbox()?;
    let mut backend = Command::new(crate::procs::bin());
    backend
        .args(["backend", "--listen", "0.0.0.0:5000", "--admin-listen", "0.0.0.0:5001"])
        .args(["--drain-delay", "0s", "--shutdown-timeout", "2s"])
        .env("OTEL_SDK_DISABLED", "true")
        // Zero work, as the bench's other load cases: the datapath, not the handler, is measured.
        .env("GRACEFUL_BACKEND__WORK_MIN", "0ms")
        .env("GRACEFUL_BACKEND__WORK_MAX", "0ms")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut backend = sandbox.netns.command(backend)?.spawn().context("starting the backend in its pod")?;
    let pod = SocketAddr::from((sandbox.ip, POD_PORT));
    let ready = node.netns.run(move || {
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until {
            if TcpStream::connect_timeout(&pod, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })?;
    if !ready {
        let _ = backend.kill();
        bail!("the backend in its pod did not listen within 15 s");
    }
    node.apply_services(&[Service {
        name: "web".into(),
        cluster_ip: CLUSTER_IP,
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            node_port: Some(NODE_PORT),
            endpoints: vec![Endpoint::ready(sandbox.ip, POD_PORT)],
        }],
    }])?;
    let targets = [
        ("direct", "client ns → pod address (routed, no Service)", format!("http://{pod}/api/data")),
        ("cluster_ip", "client ns → ClusterIP (nftables DNAT)", format!("http://{CLUSTER_IP}:80/api/data")),
        ("node_port", "client ns → NodePort (DNAT + masquerade)", format!("http://{NODE_IP}:{NODE_PORT}/api/data")),
    ];
    let client = node.client.clone();
    let run =
        |url: &str, seconds: u32| wrk.run_with(|c| client.command(c), url, plan.threads, plan.connections, seconds);
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
    for round in 0..plan.rounds {
        for k in 0..targets.len() {
            // Rotate the order each round so no target always runs first.
            let i = (k + round) % targets.len();
            run(&targets[i].2, plan.warmup_seconds)?;
            runs[i].push(run(&targets[i].2, plan.seconds)?);
        }
    }
    let _ = backend.kill();
    let _ = backend.wait();
    Ok(Rounds { targets: targets.iter().zip(runs).map(|((n, w, _), r)| (n.to_string(), w.to_string(), r)).collect() })
}
