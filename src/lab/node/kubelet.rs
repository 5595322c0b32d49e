//! The kubelet's part for one pod: start the container (a child process of this binary), run its
//! startup / readiness / liveness probes, restart it when it dies or fails liveness, and on
//! deletion: preStop, then the stop signal, then SIGKILL when the grace period (counted from the
//! deletion, preStop included) runs out — plus a one-off 2 s if preStop overran, as the kubelet
//! grants.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use crate::lab::api::cluster::{Cluster, EventKind, Pod};
use crate::lab::kernel_node::node::{DeadPod, Node, Sandbox, SandboxId};
use crate::lab::network::dns::ServiceDns;
use crate::lab::node::pod_spec::{self, ContainerPlan, PodContext, ProbePlan};
use crate::lab::node::prober::{self, Thresholds};
use crate::lab::node::runtime::{ContainerRuntime, ExecIn, Running};

/// The kubelet's extension when preStop used up the grace period.
const PRESTOP_OVERRUN_EXTENSION: Duration = Duration::from_secs(2);
/// CrashLoopBackOff: first restart at once, then 10 s doubling to 5 min.
const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The lab's only node.
pub const NODE_NAME: &str = "lab-node";

/// What this node gives every pod it runs.
pub struct NodeConfig {
    /// The image's binary: this very binary.
    pub exe: PathBuf,
    /// Per-pod directories (volumes) and log files go under `<run_dir>/pods`.
    pub run_dir: PathBuf,
    pub config_maps: Vec<ConfigMap>,
    pub services: Vec<ServiceDns>,
    pub otlp_endpoint: Option<String>,
    /// Container exit → pod sandbox (and its address) torn down.
    pub sandbox_teardown: Duration,
    /// Pod creation → container start: what sandbox creation, the runtime and the kubelet's
    /// status sync take on a real node, on top of what the real work here costs.
    pub pod_start: Duration,
    /// The kernel node whose sandboxes the pods run in; None: pods share the host's network.
    pub sandboxes: Option<Sandboxes>,
    /// When this kubelet started: probe workers of pods found within one period of it start
    /// after a random part of the period, as the kubelet's do after a restart.
    pub started: tokio::time::Instant,
    /// What runs the containers.
    pub runtime: ContainerRuntime,
}

/// The kernel node's pod network, as the kubelet drives it through CNI ADD and DEL.
#[derive(Clone)]
pub struct Sandboxes {
    pub node: Arc<std::sync::Mutex<Node>>,
    pub dead_pod: DeadPod,
}

impl Sandboxes {
    /// CNI ADD for `pod`, at the address its PodNet holds.
    async fn add(&self, pod: &str, ip: std::net::IpAddr) -> anyhow::Result<Sandbox> {
        let std::net::IpAddr::V4(ip) = ip else { anyhow::bail!("pod {pod}: {ip} is not IPv4") };
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || node.lock().unwrap_or_else(|e| e.into_inner()).create_sandbox_at(ip))
            .await
            .context("the sandbox task panicked")?
    }

    /// CNI DEL.
    async fn del(&self, id: SandboxId) -> anyhow::Result<()> {
        let (node, dead_pod) = (self.node.clone(), self.dead_pod);
        tokio::task::spawn_blocking(move || {
            node.lock().unwrap_or_else(|e| e.into_inner()).teardown_sandbox(id, dead_pod)
        })
        .await
        .context("the sandbox task panicked")?
    }
}

impl NodeConfig {
    pub fn log_path(&self, pod: &str) -> PathBuf {
        self.run_dir.join("pods").join(format!("{pod}.log"))
    }

    /// The pod's spec resolved on this node: files written, addresses and names substituted.
    fn plan(&self, pod: &Pod) -> anyhow::Result<ContainerPlan> {
        let dir = self.run_dir.join("pods").join(&pod.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ctx = PodContext {
            name: &pod.name,
            namespace: &pod.namespace,
            uid: &pod.uid,
            labels: &pod.labels,
            net: &pod.net,
            node: NODE_NAME,
            exe: &self.exe,
            dir: &dir,
            config_maps: &self.config_maps,
            services: &self.services,
            otlp_endpoint: self.otlp_endpoint.as_deref(),
            in_container: self.runtime.is_oci(),
        };
        pod_spec::plan(&pod.spec, &ctx)
    }
}

/// The node agent: watches the store and runs a worker for every pod it finds; a pod's deletion
/// reaches its worker through the store too. Dropping it kills every container of the node.
pub struct Kubelet {
    _sync: AbortOnDropHandle<()>,
}

impl Kubelet {
    pub fn start(cluster: Arc<Cluster>, node: NodeConfig) -> Kubelet {
        Kubelet { _sync: AbortOnDropHandle::new(tokio::spawn(sync_pods(cluster, node))) }
    }
}

/// The kubelet's sync loop: a worker per new pod; the workers die with this task (JoinSet).
async fn sync_pods(cluster: Arc<Cluster>, node: NodeConfig) {
    let mut workers = JoinSet::new();
    let mut seen = HashSet::new();
    let mut changes = cluster.subscribe();
    loop {
        changes.borrow_and_update();
        for pod in cluster.pods() {
            if !seen.insert(pod.name.clone()) {
                continue;
            }
            match node.plan(&pod) {
                Ok(plan) => {
                    let log = node.log_path(&pod.name);
                    let pod_node = PodNode {
                        sandbox_teardown: node.sandbox_teardown,
                        pod_start: node.pod_start,
                        sandboxes: node.sandboxes.clone(),
                        kubelet_started: node.started,
                        runtime: node.runtime.clone(),
                    };
                    workers.spawn(worker(cluster.clone(), pod.name, plan, log, pod_node));
                }
                Err(e) => {
                    cluster.update_pod(&pod.name, |p| p.config_error = Some(format!("{e:#}")));
                }
            }
        }
        while workers.try_join_next().is_some() {}
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// One pod's deletionTimestamp, as its worker watches it in the store.
struct Deletion {
    cluster: Arc<Cluster>,
    name: String,
    changes: watch::Receiver<u64>,
}

impl Deletion {
    fn new(cluster: Arc<Cluster>, name: String) -> Deletion {
        let changes = cluster.subscribe();
        Deletion { cluster, name, changes }
    }

    fn requested(&self) -> bool {
        self.cluster.is_deleted(&self.name)
    }

    async fn wait(&mut self) {
        loop {
            self.changes.borrow_and_update();
            if self.requested() {
                return;
            }
            if self.changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// A running container's probe workers. Readiness (and startup) go on while the pod terminates,
/// liveness stops at once; all of them stop with the container (or an aborted worker).
struct Probes {
    /// Held, not read: dropping the set aborts its tasks.
    _readiness: JoinSet<()>,
    liveness: Option<AbortOnDropHandle<()>>,
    /// Kill requests from a failed startup or liveness probe: (grace, why).
    kills: mpsc::UnboundedReceiver<(Duration, String)>,
}

fn start_probes(
    cluster: &Arc<Cluster>,
    name: &str,
    plan: &Arc<ContainerPlan>,
    log: &std::path::Path,
    exec_in: ExecIn,
    kubelet_started: tokio::time::Instant,
) -> Probes {
    let container_started = tokio::time::Instant::now();
    let clock = move |p: &ProbePlan| ProbeClock::new(p, container_started, kubelet_started);
    let (kill_tx, kills) = mpsc::unbounded_channel::<(Duration, String)>();
    let (started_tx, started_rx) = watch::channel(plan.startup.is_none());
    let mut readiness = JoinSet::new();
    let (name, log) = (name.to_string(), log.to_path_buf());
    if let Some(p) = plan.startup.clone() {
        let (c, n, pl, l) = (cluster.clone(), name.clone(), plan.clone(), (log.clone(), exec_in.clone()));
        readiness.spawn(startup_probe(c, n, clock(&p), p, pl, l, started_tx, kill_tx.clone()));
    }
    if let Some(p) = plan.readiness.clone() {
        readiness.spawn(readiness_probe(
            cluster.clone(),
            name.clone(),
            clock(&p),
            p,
            plan.clone(),
            (log.clone(), exec_in.clone()),
            started_rx.clone(),
        ));
    } else {
        // No readiness probe: Ready as soon as the container has started.
        readiness.spawn(ready_when_started(cluster.clone(), name.clone(), started_rx.clone()));
    }
    let liveness = plan.liveness.clone().map(|p| {
        let c = clock(&p);
        let at = (log, exec_in);
        AbortOnDropHandle::new(tokio::spawn(liveness_probe(c, p, plan.clone(), at, started_rx, kill_tx)))
    });
    Probes { _readiness: readiness, liveness, kills }
}

/// Why a container's run ended.
enum Ended {
    Deleted,
    /// Liveness or startup probe failed out: kill with this grace and restart.
    ProbeKill(Duration, String),
    Exited(String),
}

/// What the node gives one pod's worker.
#[derive(Clone)]
struct PodNode {
    sandbox_teardown: Duration,
    pod_start: Duration,
    sandboxes: Option<Sandboxes>,
    kubelet_started: tokio::time::Instant,
    runtime: ContainerRuntime,
}

async fn worker(cluster: Arc<Cluster>, name: String, mut plan: ContainerPlan, log: PathBuf, node: PodNode) {
    let mut deleted = Deletion::new(cluster.clone(), name.clone());
    // The sandbox comes first (CNI ADD): the container joins its network namespace.
    let template = cluster.pod(&name).map(|p| p.spec.clone()).unwrap_or_default();
    let sandbox = match (&node.sandboxes, cluster.pod(&name)) {
        (Some(sandboxes), Some(pod)) => match sandboxes.add(&name, pod.ip).await {
            Ok(sb) => {
                plan.netns = Some(sb.netns.clone());
                Some(sb)
            }
            Err(e) => {
                cluster.event(&name, EventKind::Exited, format!("failed to create the pod sandbox: {e:#}"));
                cluster.update_pod(&name, |p| p.config_error = Some(format!("{e:#}")));
                return;
            }
        },
        _ => None,
    };
    let plan = Arc::new(plan);
    // The rest of a real pod start (runtime, image already present, status sync).
    let deleted_while_starting = tokio::select! {
        _ = tokio::time::sleep(node.pod_start) => false,
        _ = deleted.wait() => true,
    };
    if !deleted_while_starting {
        let pod = PodRun { cluster: &cluster, name: &name, template: &template, plan: &plan, log: &log };
        run_containers(pod, &node.runtime, &mut deleted, node.kubelet_started).await;
    }
    // The sandbox (and the pod's address) goes away a moment after the last container.
    let gone_at = cluster.clock.now() + node.sandbox_teardown;
    cluster.update_pod(&name, |p| {
        p.running = false;
        p.ready = false;
        p.gone = Some(gone_at);
        if p.deleted.is_none() {
            p.deleted = Some(cluster.clock.now());
        }
    });
    if let (Some(sandboxes), Some(sb)) = (node.sandboxes, sandbox) {
        tokio::time::sleep(node.sandbox_teardown).await;
        let detail = match sandboxes.del(sb.id).await {
            Ok(()) => format!("sandbox torn down; its address {} now {:?}", sb.ip, sandboxes.dead_pod),
            Err(e) => format!("sandbox teardown failed: {e:#}"),
        };
        cluster.event(&name, EventKind::Gone, detail);
    }
}

/// One pod as its worker runs it.
struct PodRun<'a> {
    cluster: &'a Arc<Cluster>,
    name: &'a str,
    template: &'a PodTemplateSpec,
    plan: &'a Arc<ContainerPlan>,
    log: &'a std::path::Path,
}

/// The container's runs, restarts included, until the pod is deleted (or the worker aborted).
async fn run_containers(
    pod: PodRun<'_>,
    runtime: &ContainerRuntime,
    deleted: &mut Deletion,
    kubelet_started: tokio::time::Instant,
) {
    let (cluster, name, plan, log) =
        (pod.cluster.clone(), pod.name.to_string(), pod.plan.clone(), pod.log.to_path_buf());
    let mut restarts: u32 = 0;
    loop {
        if deleted.requested() {
            break;
        }
        let mut child = match runtime.start(&name, pod.template, &plan, &log).await {
            Ok(c) => c,
            Err(e) => {
                cluster.event(&name, EventKind::Exited, format!("failed to start: {e:#}"));
                if backoff(deleted, restarts).await {
                    break;
                }
                restarts += 1;
                continue;
            }
        };
        cluster.update_pod(&name, |p| {
            p.running = true;
            p.started = plan.startup.is_none();
            p.ready = false;
            p.ready_since = None;
            p.restarts = restarts;
        });
        cluster.event(&name, EventKind::ContainerStarted, child.describe());

        let mut probes = start_probes(&cluster, &name, &plan, &log, child.exec_in(&plan), kubelet_started);

        let ended = tokio::select! {
            how = child.wait() => Ended::Exited(how),
            _ = deleted.wait() => Ended::Deleted,
            Some((grace, why)) = probes.kills.recv() => Ended::ProbeKill(grace, why),
        };
        // Liveness probes stop once the pod is terminating; readiness goes on.
        drop(probes.liveness.take());
        match ended {
            Ended::Deleted => {
                let at = cluster.pod(&name).and_then(|p| p.deleted).unwrap_or_else(|| cluster.clock.now());
                terminate(&cluster, &name, &plan, &log, &mut child, at, plan.grace).await;
                stop_probes(&cluster, &name, probes);
                child.remove().await;
                break;
            }
            Ended::ProbeKill(grace, why) => {
                cluster.event(&name, EventKind::ProbeFailed, format!("{why}; container will be restarted"));
                terminate(&cluster, &name, &plan, &log, &mut child, cluster.clock.now(), grace).await;
                stop_probes(&cluster, &name, probes);
                child.remove().await;
            }
            Ended::Exited(how) => {
                cluster.update_pod(&name, |p| p.exited = Some(cluster.clock.now()));
                cluster.event(&name, EventKind::Exited, how);
                stop_probes(&cluster, &name, probes);
                child.remove().await;
                if deleted.requested() {
                    break;
                }
            }
        }
        if deleted.requested() {
            break;
        }
        if backoff(deleted, restarts).await {
            break;
        }
        restarts += 1;
        cluster.event(&name, EventKind::Restarting, format!("restart {restarts}"));
    }
}

/// Sleeps the CrashLoopBackOff for restart number `restarts` (0 = none); true if the pod was
/// deleted meanwhile.
async fn backoff(deleted: &mut Deletion, restarts: u32) -> bool {
    if restarts == 0 {
        return deleted.requested();
    }
    let d = BACKOFF_START.saturating_mul(1 << (restarts - 1).min(16)).min(BACKOFF_MAX);
    let woke = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = deleted.wait() => true,
    };
    woke || deleted.requested()
}

fn stop_probes(cluster: &Cluster, name: &str, probes: Probes) {
    drop(probes);
    cluster.update_pod(name, |p| {
        p.running = false;
        p.started = false;
        if p.ready {
            p.ready = false;
        }
        p.ready_since = None;
    });
}

/// preStop, stop signal, SIGKILL at the deadline. `since` is when the kill was decided.
async fn terminate(
    cluster: &Cluster,
    name: &str,
    plan: &ContainerPlan,
    log: &std::path::Path,
    child: &mut Running,
    since: Duration,
    grace: Duration,
) {
    let exec_in = child.exec_in(plan);
    let mut deadline = cluster.clock.instant(since + grace);
    if let Some(hook) = &plan.pre_stop {
        cluster.event(name, EventKind::PreStopStarted, "");
        let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::select! {
            r = prober::run(hook, budget, &plan.env, log, &exec_in) => match r {
                Ok(()) => cluster.event(name, EventKind::PreStopFinished, ""),
                Err(e) => {
                    let overran = tokio::time::Instant::now() >= deadline;
                    cluster.event(name, EventKind::PreStopFailed, e);
                    if overran {
                        deadline = tokio::time::Instant::now() + PRESTOP_OVERRUN_EXTENSION;
                    }
                }
            },
            how = child.wait() => {
                // The container stopped by itself during preStop: nothing left to signal.
                cluster.update_pod(name, |p| p.exited = Some(cluster.clock.now()));
                cluster.event(name, EventKind::Exited, format!("{how} (during preStop)"));
                return;
            }
        }
    }
    let stop_signal = child.stop_signal(plan);
    child.signal(stop_signal).await;
    cluster.update_pod(name, |p| p.sigterm = Some(cluster.clock.now()));
    cluster.event(name, EventKind::Sigterm, stop_signal.as_str());
    let how = tokio::select! {
        how = child.wait() => how,
        _ = tokio::time::sleep_until(deadline) => {
            cluster.event(name, EventKind::Sigkill, "grace period over");
            child.kill().await;
            child.wait().await
        }
    };
    cluster.update_pod(name, |p| {
        p.exited = Some(cluster.clock.now());
        p.running = false;
    });
    cluster.event(name, EventKind::Exited, how);
}

/// A probe worker's clock, as the kubelet's: one tick per period from the worker's start, the
/// ticks before the initial delay (counted from the container's start) probing nothing. A
/// kubelet that started less than a period ago first waits a random part of the period, so
/// the probes of the pods it finds do not all fire together.
struct ProbeClock {
    period: Duration,
    initial_delay: Duration,
    container_started: tokio::time::Instant,
    jitter: Duration,
    tick: Option<tokio::time::Interval>,
}

impl ProbeClock {
    fn new(p: &ProbePlan, container_started: tokio::time::Instant, kubelet_started: tokio::time::Instant) -> Self {
        let jitter =
            if kubelet_started.elapsed() < p.period { p.period.mul_f64(rand::random::<f64>()) } else { Duration::ZERO };
        ProbeClock { period: p.period, initial_delay: p.initial_delay, container_started, jitter, tick: None }
    }

    /// Waits for the next tick at which the probe runs.
    async fn next(&mut self) {
        let tick = match &mut self.tick {
            Some(t) => t,
            None => {
                tokio::time::sleep(self.jitter).await;
                let mut t = tokio::time::interval(self.period);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                self.tick.insert(t)
            }
        };
        loop {
            tick.tick().await;
            if self.container_started.elapsed() >= self.initial_delay {
                return;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn startup_probe(
    cluster: Arc<Cluster>,
    name: String,
    mut clock: ProbeClock,
    p: ProbePlan,
    plan: Arc<ContainerPlan>,
    (log, exec_in): (PathBuf, ExecIn),
    started: watch::Sender<bool>,
    kill: mpsc::UnboundedSender<(Duration, String)>,
) {
    let mut t = Thresholds::new(1, p.failure_threshold, false);
    loop {
        clock.next().await;
        let r = prober::run(&p.handler, p.timeout, &plan.env, &log, &exec_in).await;
        t.record(r.is_ok());
        if t.result() {
            cluster.update_pod(&name, |pod| pod.started = true);
            started.send_replace(true);
            return;
        }
        if t.failed_out() {
            let why = format!("startup probe failed: {}", r.err().unwrap_or_default());
            let _ = kill.send((p.grace.unwrap_or(plan.grace), why));
            return;
        }
    }
}

async fn readiness_probe(
    cluster: Arc<Cluster>,
    name: String,
    mut clock: ProbeClock,
    p: ProbePlan,
    plan: Arc<ContainerPlan>,
    (log, exec_in): (PathBuf, ExecIn),
    mut started: watch::Receiver<bool>,
) {
    if started.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut t = Thresholds::new(p.success_threshold, p.failure_threshold, false);
    loop {
        clock.next().await;
        let r = prober::run(&p.handler, p.timeout, &plan.env, &log, &exec_in).await;
        if let Some(ready) = t.record(r.is_ok()) {
            let now = cluster.clock.now();
            cluster.update_pod(&name, |pod| {
                pod.ready = ready;
                pod.ready_since = ready.then_some(now);
            });
            let detail = r.err().unwrap_or_default();
            cluster.event(&name, if ready { EventKind::Ready } else { EventKind::NotReady }, detail);
        }
    }
}

async fn ready_when_started(cluster: Arc<Cluster>, name: String, mut started: watch::Receiver<bool>) {
    if started.wait_for(|s| *s).await.is_ok() {
        let now = cluster.clock.now();
        cluster.update_pod(&name, |pod| {
            pod.ready = true;
            pod.ready_since = Some(now);
        });
        cluster.event(&name, EventKind::Ready, "no readiness probe");
    }
}

async fn liveness_probe(
    mut clock: ProbeClock,
    p: ProbePlan,
    plan: Arc<ContainerPlan>,
    (log, exec_in): (PathBuf, ExecIn),
    mut started: watch::Receiver<bool>,
    kill: mpsc::UnboundedSender<(Duration, String)>,
) {
    if started.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut t = Thresholds::new(p.success_threshold, p.failure_threshold, true);
    loop {
        clock.next().await;
        let r = prober::run(&p.handler, p.timeout, &plan.env, &log, &exec_in).await;
        if t.record(r.is_ok()) == Some(false) {
            let why = format!("liveness probe failed: {}", r.err().unwrap_or_default());
            let _ = kill.send((p.grace.unwrap_or(plan.grace), why));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::api::cluster::{Clock, Pod};
    use crate::lab::network::ipam::{Mode, Net};
    use crate::lab::node::pod_spec::Handler;
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use nix::sys::signal::Signal;

    fn plan(script: &str, grace_ms: u64) -> ContainerPlan {
        ContainerPlan {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), std::env::var("PATH").unwrap_or_default())],
            cwd: None,
            startup: None,
            readiness: None,
            liveness: None,
            pre_stop: None,
            stop_signal: Signal::SIGTERM,
            grace: Duration::from_millis(grace_ms),
            named_ports: Default::default(),
            container_ports: vec![],
            netns: None,
            image: None,
            mounts: vec![],
        }
    }

    fn add_pod(cluster: &Cluster, name: &str) {
        add_pod_with(cluster, name, Default::default());
    }

    fn add_pod_with(cluster: &Cluster, name: &str, spec: PodTemplateSpec) {
        let net = Net::in_block(Mode::PerIp, 251).pod(&[]).unwrap();
        cluster.add_pod(Pod { spec: Arc::new(spec), ..Pod::new(name, "d", "h", net) });
    }

    /// A pod template whose container runs `script` under /bin/sh (the node's "image").
    fn template(script: &str, stop_signal: Option<&str>) -> PodTemplateSpec {
        serde_json::from_value(serde_json::json!({
            "spec": {
                "terminationGracePeriodSeconds": 5,
                "containers": [{
                    "name": "c",
                    "args": ["-c", script],
                    "lifecycle": stop_signal.map(|s| serde_json::json!({"stopSignal": s})),
                }],
            }
        }))
        .unwrap()
    }

    fn node(dir: &std::path::Path) -> NodeConfig {
        NodeConfig {
            exe: "/bin/sh".into(),
            run_dir: dir.to_path_buf(),
            config_maps: vec![],
            services: vec![],
            otlp_endpoint: None,
            sandbox_teardown: Duration::from_millis(100),
            pod_start: Duration::ZERO,
            sandboxes: None,
            started: tokio::time::Instant::now(),
            runtime: ContainerRuntime::Process,
        }
    }

    fn container_pid(cluster: &Cluster) -> i32 {
        let started = cluster.events().into_iter().find(|e| e.kind == EventKind::ContainerStarted).unwrap();
        started.detail.trim_start_matches("pid ").parse().unwrap()
    }

    async fn wait_gone(pid: i32) -> bool {
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < until {
            // A zombie still has /proc/PID; its state line says Z.
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(stat) if !stat.contains(") Z ") => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => return true,
            }
        }
        false
    }

    #[tokio::test]
    async fn the_kubelet_runs_pods_from_the_store_and_stops_them_on_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Cluster::new(Clock::new()));
        let kubelet = Kubelet::start(cluster.clone(), node(dir.path()));
        add_pod_with(&cluster, "p", template("exec sleep 30", Some("SIGTERM")));
        wait_for(&cluster, |p| p.ready).await;
        let pid = container_pid(&cluster);
        cluster.delete_pod("p");
        wait_for(&cluster, |p| p.gone.is_some()).await;
        let k = kinds(&cluster);
        assert!(k.contains(&EventKind::Sigterm) && !k.contains(&EventKind::Sigkill), "{k:?}");
        assert!(wait_gone(pid).await, "container {pid} still running after deletion");
        drop(kubelet);
    }

    #[tokio::test]
    async fn dropping_the_kubelet_kills_its_containers() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Cluster::new(Clock::new()));
        let kubelet = Kubelet::start(cluster.clone(), node(dir.path()));
        add_pod_with(&cluster, "p", template("exec sleep 30", None));
        wait_for(&cluster, |p| p.running).await;
        let pid = container_pid(&cluster);
        drop(kubelet);
        assert!(wait_gone(pid).await, "container {pid} outlived its kubelet");
    }

    #[tokio::test]
    async fn a_spec_the_node_cannot_run_is_reported_on_the_pod() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Cluster::new(Clock::new()));
        let _kubelet = Kubelet::start(cluster.clone(), node(dir.path()));
        add_pod_with(&cluster, "p", template("exec sleep 30", Some("SIGBOGUS")));
        wait_for(&cluster, |p| p.config_error.is_some()).await;
        let pod = cluster.pod("p").unwrap();
        assert!(pod.config_error.unwrap().contains("SIGBOGUS"));
        assert!(!pod.running);
    }

    fn kinds(cluster: &Cluster) -> Vec<EventKind> {
        cluster.events().iter().map(|e| e.kind).collect()
    }

    /// A worker for pod `p`, as the kubelet's sync loop starts it.
    fn run(cluster: &Arc<Cluster>, plan: ContainerPlan, log: PathBuf) -> AbortOnDropHandle<()> {
        let node = PodNode {
            sandbox_teardown: Duration::from_millis(100),
            pod_start: Duration::ZERO,
            sandboxes: None,
            kubelet_started: tokio::time::Instant::now(),
            runtime: ContainerRuntime::Process,
        };
        AbortOnDropHandle::new(tokio::spawn(worker(cluster.clone(), "p".into(), plan, log, node)))
    }

    async fn wait_for(cluster: &Cluster, what: impl Fn(&Pod) -> bool) {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cluster.pods().first().is_some_and(&what) {
            assert!(tokio::time::Instant::now() < until, "timed out: {:?}", kinds(cluster));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn probe_every(period_ms: u64, initial_delay_ms: u64) -> ProbePlan {
        ProbePlan {
            handler: Handler::Sleep(Duration::ZERO),
            initial_delay: Duration::from_millis(initial_delay_ms),
            period: Duration::from_millis(period_ms),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
            grace: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn probes_run_on_the_period_grid_once_the_initial_delay_has_passed() {
        let p = probe_every(100, 250);
        let started = tokio::time::Instant::now();
        let kubelet_started = started.checked_sub(Duration::from_secs(60)).unwrap();
        let mut clock = ProbeClock::new(&p, started, kubelet_started);
        let mut at = Vec::new();
        for _ in 0..3 {
            clock.next().await;
            at.push(started.elapsed().as_millis());
        }
        // Ticks at 0, 100, 200 fall inside the 250 ms delay; the kubelet probes at 300, 400, 500.
        assert_eq!(at, [300, 400, 500]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kubelet_that_just_started_spreads_first_probes_over_one_period() {
        let p = probe_every(1000, 0);
        let now = tokio::time::Instant::now();
        let mut firsts = Vec::new();
        for _ in 0..20 {
            let mut clock = ProbeClock::new(&p, now, now);
            let t = tokio::time::Instant::now();
            clock.next().await;
            firsts.push(t.elapsed());
        }
        assert!(firsts.iter().all(|d| *d < Duration::from_secs(1)), "{firsts:?}");
        assert!(firsts.iter().any(|d| *d != firsts[0]), "no jitter: {firsts:?}");
        // Long after the kubelet's start, no jitter: the first probe runs at once.
        let mut clock = ProbeClock::new(&p, now, now.checked_sub(Duration::from_secs(60)).unwrap());
        let t = tokio::time::Instant::now();
        clock.next().await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn deletion_runs_prestop_then_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Cluster::new(Clock::new()));
        add_pod(&cluster, "p");
        let mut p = plan("exec sleep 30", 5000);
        p.pre_stop = Some(Handler::Sleep(Duration::from_millis(300)));
        let h = run(&cluster, p, dir.path().join("log"));
        wait_for(&cluster, |p| p.ready).await;
        cluster.delete_pod("p");
        tokio::time::timeout(Duration::from_secs(10), h).await.unwrap().unwrap();
        let pod = cluster.pod("p").unwrap();
        let held = pod.sigterm.unwrap() - pod.deleted.unwrap();
        assert!(held >= Duration::from_millis(290), "SIGTERM only after preStop: {held:?}");
        let k = kinds(&cluster);
        let pos = |x: EventKind| k.iter().position(|e| *e == x).unwrap();
        assert!(pos(EventKind::PreStopStarted) < pos(EventKind::PreStopFinished));
        assert!(pos(EventKind::PreStopFinished) < pos(EventKind::Sigterm));
        assert!(pos(EventKind::Sigterm) < pos(EventKind::Exited));
        assert!(!k.contains(&EventKind::Sigkill));
        assert!(pod.gone.is_some());
    }

    #[tokio::test]
    async fn sigkill_when_the_grace_period_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Cluster::new(Clock::new()));
        add_pod(&cluster, "p");
        // Ignores SIGTERM; the grace period (counted from deletion) ends it.
        let h = run(&cluster, plan("trap '' TERM; while :; do sleep 0.1; done", 700), dir.path().join("log"));
        wait_for(&cluster, |p| p.running).await;
        cluster.delete_pod("p");
        tokio::time::timeout(Duration::from_secs(10), h).await.unwrap().unwrap();
        let pod = cluster.pod("p").unwrap();
        let lived = pod.exited.unwrap() - pod.deleted.unwrap();
        assert!(kinds(&cluster).contains(&EventKind::Sigkill));
        assert!(lived >= Duration::from_millis(650) && lived < Duration::from_secs(3), "{lived:?}");
    }

    #[tokio::test]
    async fn liveness_failure_restarts_the_container_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Arc::new(Cluster::new(Clock::new()));
        add_pod(&cluster, "p");
        let mut p = plan("exec sleep 30", 1000);
        p.liveness = Some(ProbePlan {
            handler: Handler::Exec { program: "false".into(), args: vec![] },
            initial_delay: Duration::ZERO,
            period: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 2,
            grace: Some(Duration::from_millis(500)),
        });
        let h = run(&cluster, p, dir.path().join("log"));
        wait_for(&cluster, |p| p.restarts >= 1).await;
        let k = kinds(&cluster);
        assert!(k.contains(&EventKind::ProbeFailed) && k.contains(&EventKind::Restarting), "{k:?}");
        assert!(cluster.pod("p").unwrap().deleted.is_none(), "a restart is not a deletion");
        drop(h);
    }
}
