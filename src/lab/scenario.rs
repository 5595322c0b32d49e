//! One run: bring up the overlay (Services with their proxies, Deployments with their pods),
//! put load on it, roll the Deployments, and collect what happened.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::future::join_all;

use crate::lab::api::cluster::{ms, Clock, Cluster};
use crate::lab::api::endpoint_slice::ServicePort;
use crate::lab::api::manifest::Manifest;
use crate::lab::cli::RuntimeKind;
use crate::lab::control_plane::deployment::DeploymentCtl;
use crate::lab::control_plane::endpointslice;
use crate::lab::control_plane::replicaset::PodFactory;
use crate::lab::kernel_node::netns::Netns;
use crate::lab::kernel_node::node::{DeadPod, Node};
use crate::lab::load::generator::{self, LoadConfig};
use crate::lab::load::k6::{K6Config, K6Figures, K6Run};
use crate::lab::network::dns::ServiceDns;
use crate::lab::network::ipam::Net;
use crate::lab::network::kernel_proxy::{KernelPort, KernelProxy};
use crate::lab::network::service_proxy::{ConnRecord, ProxyLog, ServiceProxy};
use crate::lab::node::kubelet::{Kubelet, NodeConfig, Sandboxes};
use crate::lab::node::runtime::{ContainerRuntime, OciNode};
use crate::lab::report::attribution::{self, Inputs, ProxyRecords};
use crate::lab::report::progress::Progress;
use crate::lab::report::result::{self, RolloutWindow, RunResult};
use crate::lab::report::timeline;
use crate::otlp_receiver::OtlpReceiver;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub name: String,
    pub lag: Duration,
    pub rate: f64,
    pub warmup: Duration,
    pub cooldown: Duration,
    pub timeout: Duration,
    pub rollouts: usize,
    /// Deployments to restart; empty = all.
    pub restart: Vec<String>,
    pub sequential: bool,
    pub entry: Option<String>,
    pub path: String,
    pub max_in_flight: usize,
    pub exe: PathBuf,
    pub run_dir: PathBuf,
    pub sandbox_teardown: Duration,
    /// Pod creation → container start, on top of the real work (`--pod-start`).
    pub pod_start: Duration,
    /// Bound on bringing the Deployments up and on each rollout.
    pub limit: Duration,
    /// k6 instead of the built-in load generator.
    pub k6: Option<K6Source>,
}

/// `--k6`: the binary, the script, and how long k6's rollout phase lasts.
#[derive(Debug, Clone)]
pub struct K6Source {
    pub bin: PathBuf,
    pub script: PathBuf,
    pub rollout_phase: Duration,
}

/// The Service the load goes through: `--entry`, else the one NodePort/LoadBalancer Service,
/// else `svc-frontend` / `frontend`.
fn entry_service(m: &Manifest, wanted: Option<&str>) -> Result<String> {
    let names: Vec<String> = m.services.iter().filter_map(|s| s.metadata.name.clone()).collect();
    if let Some(w) = wanted {
        if names.iter().any(|n| n == w) {
            return Ok(w.to_string());
        }
        bail!("--entry {w}: no such Service in {} (it has {})", m.source, names.join(", "));
    }
    let exposed: Vec<&String> = m
        .services
        .iter()
        .filter(|s| matches!(s.spec.as_ref().and_then(|s| s.type_.as_deref()), Some("NodePort") | Some("LoadBalancer")))
        .filter_map(|s| s.metadata.name.as_ref())
        .collect();
    if exposed.len() == 1 {
        return Ok(exposed[0].clone());
    }
    for n in ["svc-frontend", "frontend"] {
        if names.iter().any(|x| x == n) {
            return Ok(n.to_string());
        }
    }
    bail!("{}: which Service takes the load? Name it with --entry (Services: {})", m.source, names.join(", "))
}

/// The node a run's pods live on.
#[derive(Clone)]
pub enum NodeEnv {
    /// Pods are processes sharing this machine's network; Services are user-space proxies.
    Process,
    /// Pods in their own network namespaces behind kube-proxy's nftables rules.
    Kernel(KernelEnv),
}

/// The kernel node and where its clients live.
#[derive(Clone)]
pub struct KernelEnv {
    pub node: Arc<std::sync::Mutex<Node>>,
    /// Runs the load generator's tasks in the client namespace.
    pub client: tokio::runtime::Handle,
    pub client_netns: Netns,
    pub dead_pod: DeadPod,
    /// `--runtime oci`: the pods are containers of their images.
    pub oci: Option<Arc<OciNode>>,
}

impl NodeEnv {
    pub fn describe(&self) -> &'static str {
        match self {
            NodeEnv::Process => "process",
            NodeEnv::Kernel(_) => "kernel",
        }
    }

    /// What runs the pods' containers on this node.
    pub fn runtime(&self) -> ContainerRuntime {
        match self {
            NodeEnv::Kernel(KernelEnv { oci: Some(oci), .. }) => ContainerRuntime::Oci(oci.clone()),
            _ => ContainerRuntime::Process,
        }
    }
}

/// See [`Services::late_ms`].
const CONNTRACK_LATE_MS: f64 = 1000.0;

/// How the Services reach their pods on this node.
enum ServiceNet {
    /// One user-space proxy per Service port.
    Proxies(Vec<(ServicePort, ServiceProxy)>),
    /// kube-proxy's nftables rules; conntrack keeps the records.
    Kernel(KernelProxy),
}

/// The Services as played: their datapath and the endpoints controller feeding it.
struct Services {
    net: ServiceNet,
    endpoints: endpointslice::Controller,
}

impl Services {
    /// Where the load enters `service`: its proxy, or its NodePort on the kernel node.
    fn entry_addr(&self, service: &str) -> Option<SocketAddr> {
        match &self.net {
            ServiceNet::Proxies(list) => list.iter().find(|(sp, _)| sp.service == service).map(|(_, p)| p.addr),
            ServiceNet::Kernel(k) => k.entry_addr(service),
        }
    }

    /// The user-space proxy's log of `service`, which the generator reads to tell a refusal.
    fn proxy_log(&self, service: &str) -> Option<Arc<ProxyLog>> {
        match &self.net {
            ServiceNet::Proxies(list) => list.iter().find(|(sp, _)| sp.service == service).map(|(_, p)| p.log.clone()),
            ServiceNet::Kernel(_) => None,
        }
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.net {
            ServiceNet::Proxies(list) => list.iter().map(|(sp, _)| sp.service.clone()).collect(),
            ServiceNet::Kernel(k) => k.ports.iter().map(|p| p.port.service.clone()).collect(),
        };
        names.dedup();
        names
    }

    /// How late the records' times may read: conntrack's events are stamped when conntrack
    /// reads them, which on a busy machine trails the packet.
    fn late_ms(&self) -> f64 {
        match &self.net {
            ServiceNet::Proxies(_) => 0.0,
            ServiceNet::Kernel(_) => CONNTRACK_LATE_MS,
        }
    }

    /// Which pod each connection to `service` reached, and how.
    fn records(&self, service: &str, pods: &[crate::lab::api::cluster::Pod], cluster: &Cluster) -> Vec<ConnRecord> {
        match &self.net {
            ServiceNet::Proxies(list) => {
                list.iter().filter(|(sp, _)| sp.service == service).flat_map(|(_, p)| p.log.records()).collect()
            }
            ServiceNet::Kernel(k) => k.records(service, pods, cluster),
        }
    }
}

pub async fn run(
    cfg: &RunConfig,
    manifest: &Manifest,
    env: &NodeEnv,
    net: Arc<Net>,
    receiver: Option<&OtlpReceiver>,
    progress: &Progress,
) -> Result<RunResult> {
    let clock = Clock::new();
    let cluster = Arc::new(Cluster::new(clock));
    progress.run(&cfg.name, cluster.clone());
    progress.phase("starting");
    std::fs::create_dir_all(cfg.run_dir.join("pods")).with_context(|| format!("creating {}", cfg.run_dir.display()))?;
    if let Some(r) = receiver {
        r.clear();
    }
    let entry = entry_service(manifest, cfg.entry.as_deref())?;
    let (proxies, dns) = start_services(cfg, manifest, &cluster, env, &net).await?;
    let node = NodeConfig {
        exe: cfg.exe.clone(),
        run_dir: cfg.run_dir.clone(),
        config_maps: manifest.config_maps.clone(),
        services: dns,
        otlp_endpoint: receiver.map(|r| otlp_endpoint_for_pods(r, env)),
        sandbox_teardown: cfg.sandbox_teardown,
        pod_start: cfg.pod_start,
        sandboxes: match env {
            NodeEnv::Process => None,
            NodeEnv::Kernel(k) => Some(Sandboxes { node: k.node.clone(), dead_pod: k.dead_pod }),
        },
        started: tokio::time::Instant::now(),
        runtime: env.runtime(),
    };
    let factory = PodFactory { cluster: cluster.clone(), net, pods_dir: cfg.run_dir.join("pods") };
    let kubelet = Kubelet::start(cluster.clone(), node);
    let mut ctls: Vec<DeploymentCtl> =
        manifest.deployments.iter().map(DeploymentCtl::from_manifest).collect::<Result<_>>()?;
    for r in &cfg.restart {
        if !ctls.iter().any(|c| &c.name == r) {
            bail!("--restart {r}: no such Deployment in {}", manifest.source);
        }
    }
    let result = drive(cfg, env, &cluster, &factory, &mut ctls, &proxies, &entry, progress).await;
    let spans = match (&result, receiver) {
        // Export is batched: before the pods go, wait until their spans stop arriving.
        (Ok(Driven { requests, .. }), Some(r)) if requests.iter().any(|r| !r.outcome.is_ok()) => {
            progress.phase("collecting spans");
            settle(r).await
        }
        (_, Some(r)) => r.spans(),
        _ => Vec::new(),
    };
    // Whatever happened, no pod outlives its run, nor its sandbox.
    drop(kubelet);
    if let NodeEnv::Kernel(k) = env {
        clear_node(k, &cluster).await?;
    }
    report(cfg, env, &cluster, &proxies, &entry, result?, spans)
}

/// The receiver's address as the pods reach it: on the kernel node, the bridge's address.
fn otlp_endpoint_for_pods(r: &OtlpReceiver, env: &NodeEnv) -> String {
    match env {
        NodeEnv::Process => r.endpoint(),
        NodeEnv::Kernel(k) => {
            let gateway = k.node.lock().unwrap_or_else(|e| e.into_inner()).gateway();
            format!("http://{gateway}:{}", r.addr().port())
        }
    }
}

/// Tears down the sandboxes still there and gives every address of the run back.
async fn clear_node(k: &KernelEnv, cluster: &Cluster) -> Result<()> {
    let (node, dead_pod) = (k.node.clone(), k.dead_pod);
    let ips: Vec<std::net::IpAddr> = cluster.pods().iter().map(|p| p.ip).collect();
    tokio::task::spawn_blocking(move || {
        let mut node = node.lock().unwrap_or_else(|e| e.into_inner());
        let torn = node.teardown_all(dead_pod).and_then(|()| node.flush_conntrack());
        for ip in ips {
            if let std::net::IpAddr::V4(v4) = ip {
                node.release_ip(v4);
            }
        }
        torn
    })
    .await
    .context("the sandbox task panicked")?
    .context("tearing down the run's pod sandboxes")
}

/// Every Service port gets a lagged endpoint view and a datapath (a proxy on its ClusterIP, or
/// kube-proxy's rules); the pods reach them by the names in the returned DNS records.
async fn start_services(
    cfg: &RunConfig,
    manifest: &Manifest,
    cluster: &Arc<Cluster>,
    env: &NodeEnv,
    net: &Net,
) -> Result<(Services, Vec<ServiceDns>)> {
    let mut ports = Vec::new();
    for s in &manifest.services {
        ports.extend(ServicePort::of_service(s)?);
    }
    let (controller, views) = endpointslice::start(cluster.clone(), ports.clone(), cfg.lag);
    let mut dns = Vec::new();
    let mut cluster_ips = std::collections::BTreeMap::new();
    let mut proxies = Vec::new();
    let mut kernel_ports = Vec::new();
    let mut next_node_port = 30000u16;
    for (sp, view) in ports.into_iter().zip(views.iter().cloned()) {
        let base = sp.service.clone();
        let ip = match cluster_ips.get(&base) {
            Some(ip) => *ip,
            None => {
                let ip = net.cluster_ip()?;
                cluster_ips.insert(base.clone(), ip);
                ip
            }
        };
        let svc = manifest.services.iter().find(|s| s.metadata.name.as_deref() == Some(base.as_str()));
        let svc_port = svc
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.ports.as_ref())
            .and_then(|ps| ps.iter().find(|p| p.port == i32::from(sp.port)));
        let port_name = svc_port.and_then(|p| p.name.clone());
        let addr = match env {
            NodeEnv::Process => {
                let proxy = ServiceProxy::start(&sp.label(), SocketAddr::new(ip, sp.port), view, cluster.clone())
                    .await
                    .with_context(|| format!("Service/{base}: binding its proxy on {ip}:{}", sp.port))?;
                let addr = proxy.addr;
                proxies.push((sp.clone(), proxy));
                addr
            }
            NodeEnv::Kernel(_) => {
                let std::net::IpAddr::V4(v4) = ip else { bail!("Service/{base}: ClusterIP {ip} is not IPv4") };
                let exposed = matches!(
                    svc.and_then(|s| s.spec.as_ref()).and_then(|s| s.type_.as_deref()),
                    Some("NodePort") | Some("LoadBalancer")
                );
                let node_port = exposed.then(|| {
                    svc_port.and_then(|p| p.node_port).and_then(|n| u16::try_from(n).ok()).unwrap_or_else(|| {
                        next_node_port += 1;
                        next_node_port - 1
                    })
                });
                kernel_ports.push(KernelPort { port: sp.clone(), cluster_ip: v4, node_port });
                SocketAddr::new(ip, sp.port)
            }
        };
        dns.push(ServiceDns { name: base, namespace: sp.namespace.clone(), port: sp.port, port_name, proxy: addr });
    }
    let net = match env {
        NodeEnv::Process => ServiceNet::Proxies(proxies),
        NodeEnv::Kernel(k) => ServiceNet::Kernel(KernelProxy::start(k.node.clone(), kernel_ports, views).await?),
    };
    Ok((Services { net, endpoints: controller }, dns))
}

/// The run's result: every failed request attributed (spans, proxy records, pods), the summary,
/// the timeline picture written beside the pod logs.
fn report(
    cfg: &RunConfig,
    env: &NodeEnv,
    cluster: &Cluster,
    services: &Services,
    entry: &str,
    driven: Driven,
    spans: Vec<crate::otlp_receiver::SpanRecord>,
) -> Result<RunResult> {
    let Driven { requests, windows, end: run_end, k6 } = driven;
    let pods = cluster.pods();
    let entry_records = services.records(entry, &pods, cluster);
    let names: Vec<String> = services.names().into_iter().filter(|n| n != entry).collect();
    let inner = names
        .iter()
        .map(|n| ProxyRecords {
            service: n.as_str(),
            records: services.records(n, &pods, cluster),
            late_ms: services.late_ms(),
        })
        .collect();
    let attribution = attribution::attribute(&Inputs {
        clock: &cluster.clock,
        requests: &requests,
        spans: &spans,
        pods: &pods,
        entry: ProxyRecords { service: entry, records: entry_records, late_ms: services.late_ms() },
        inner,
    });
    let groups = attribution::groups(&attribution.items);
    let summary = match &k6 {
        Some(f) => result::summary_from_k6(f, &windows),
        None => result::summarize(&requests, &windows),
    };
    let timeline_path = cfg.run_dir.join("timeline.svg");
    let datapath = match &services.net {
        ServiceNet::Proxies(_) => None,
        ServiceNet::Kernel(k) => Some(result::Datapath {
            nft: k.stats.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            conntrack_warnings: k.warnings(),
        }),
    };
    let mut result = RunResult {
        name: cfg.name.clone(),
        node: env.describe().to_string(),
        runtime: if env.runtime().is_oci() { RuntimeKind::Oci } else { RuntimeKind::Process },
        datapath,
        endpoint_lag_ms: ms(cfg.lag),
        rate: cfg.rate,
        summary,
        rollouts: windows,
        attribution,
        groups,
        spans_received: spans.len(),
        run_ms: ms(run_end),
        run_dir: cfg.run_dir.clone(),
        timeline: timeline_path.clone(),
        pods,
        events: cluster.events(),
        requests,
        k6,
        traces: None,
    };
    result.run_ms = ms(cluster.clock.now());
    std::fs::write(&timeline_path, timeline::render(&result))
        .with_context(|| format!("writing {}", timeline_path.display()))?;
    Ok(result)
}

/// What the load did while the Deployments rolled.
struct Driven {
    requests: Vec<generator::RequestRecord>,
    windows: Vec<RolloutWindow>,
    end: Duration,
    k6: Option<K6Figures>,
}

/// The load on the entry Service: the built-in generator or k6.
enum LoadSource {
    Lab(generator::LoadRun),
    K6(Box<K6Run>),
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    cfg: &RunConfig,
    env: &NodeEnv,
    cluster: &Arc<Cluster>,
    factory: &PodFactory,
    ctls: &mut [DeploymentCtl],
    services: &Services,
    entry: &str,
    progress: &Progress,
) -> Result<Driven> {
    // Bring every Deployment up and let the proxies learn the endpoints.
    let ups = join_all(ctls.iter_mut().map(|c| c.start(factory, cfg.limit))).await;
    for r in ups {
        r?;
    }
    progress.phase("waiting for endpoints");
    services.endpoints.converged(cluster, cfg.lag + Duration::from_secs(5)).await;

    let target = services.entry_addr(entry).context("the entry Service has no port")?;
    let run_started = tokio::time::Instant::now();
    let source = start_load(cfg, env, cluster, target, services.proxy_log(entry), entry, progress).await?;
    let rollout_phase_start = tokio::time::Instant::now();
    let (mut windows, failure) = roll(cfg, cluster, factory, ctls, services, progress).await;
    let (requests, k6) =
        match finish_load(cfg, source, failure.is_none(), run_started, rollout_phase_start, progress).await {
            Ok(done) => done,
            Err(e) => return Err(failure.unwrap_or(e)),
        };
    if let Some(e) = failure {
        return Err(e);
    }
    count_requests_per_window(&mut windows, &requests);
    Ok(Driven { requests, windows, end: cluster.clock.now(), k6 })
}

/// Starts the load and waits out its warmup.
async fn start_load(
    cfg: &RunConfig,
    env: &NodeEnv,
    cluster: &Cluster,
    target: SocketAddr,
    proxy_log: Option<Arc<ProxyLog>>,
    entry: &str,
    progress: &Progress,
) -> Result<LoadSource> {
    Ok(match &cfg.k6 {
        None => {
            let load_cfg = LoadConfig {
                target,
                host: entry.to_string(),
                path: cfg.path.clone(),
                rate: cfg.rate,
                timeout: cfg.timeout,
                max_in_flight: cfg.max_in_flight,
                pool_idle: Duration::from_secs(3),
            };
            let clock = cluster.clock;
            let load = match env {
                NodeEnv::Process => generator::start(load_cfg, clock, proxy_log),
                // Started on the client namespace's runtime: its sockets are the client's.
                NodeEnv::Kernel(k) => k
                    .client
                    .spawn(async move { generator::start(load_cfg, clock, proxy_log) })
                    .await
                    .context("starting the load generator in the client namespace")?,
            };
            progress.load(load.stats.clone());
            progress.phase("warmup");
            tokio::time::sleep(cfg.warmup).await;
            LoadSource::Lab(load)
        }
        Some(k) => {
            let mut run = K6Run::start(
                K6Config {
                    bin: k.bin.clone(),
                    script: k.script.clone(),
                    frontend_url: format!("http://{target}"),
                    path: cfg.path.clone(),
                    rate: cfg.rate,
                    warmup: cfg.warmup,
                    rollout: k.rollout_phase,
                    cooldown: cfg.cooldown,
                    timeout: cfg.timeout,
                    run_dir: cfg.run_dir.clone(),
                    netns: match env {
                        NodeEnv::Process => None,
                        NodeEnv::Kernel(k) => Some(k.client_netns.clone()),
                    },
                },
                cluster.clock,
            )
            .await?;
            progress.load(run.stats.clone());
            progress.phase("k6 warmup");
            run.wait_banner(cfg.warmup + Duration::from_secs(30)).await?;
            LoadSource::K6(Box::new(run))
        }
    })
}

/// The rollouts, one after the other: each window ends once the proxies have caught up.
/// Returns the windows and the first rollout failure, if any.
async fn roll(
    cfg: &RunConfig,
    cluster: &Cluster,
    factory: &PodFactory,
    ctls: &mut [DeploymentCtl],
    services: &Services,
    progress: &Progress,
) -> (Vec<RolloutWindow>, Option<anyhow::Error>) {
    let mut windows = Vec::new();
    let rolled: Vec<usize> =
        (0..ctls.len()).filter(|i| cfg.restart.is_empty() || cfg.restart.contains(&ctls[*i].name)).collect();
    let mut failure = None;
    for index in 0..cfg.rollouts {
        progress.phase(&format!("rollout {}/{}", index + 1, cfg.rollouts));
        let start = cluster.clock.now();
        let mut stats = Vec::new();
        if cfg.sequential {
            for &i in &rolled {
                match ctls[i].rollout_restart(factory, cfg.limit).await {
                    Ok(s) => stats.push(s),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
        } else {
            let selected: Vec<&mut DeploymentCtl> =
                ctls.iter_mut().enumerate().filter(|(i, _)| rolled.contains(i)).map(|(_, c)| c).collect();
            for r in join_all(selected.into_iter().map(|c| c.rollout_restart(factory, cfg.limit))).await {
                match r {
                    Ok(s) => stats.push(s),
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
        }
        if failure.is_none() {
            // The rollout is over for clients once the proxies have caught up with it.
            progress.phase(&format!("rollout {}/{}: proxies catching up", index + 1, cfg.rollouts));
            services.endpoints.converged(cluster, cfg.lag + cfg.sandbox_teardown + Duration::from_secs(5)).await;
        }
        windows.push(RolloutWindow {
            index,
            start,
            end: cluster.clock.now(),
            deployments: stats,
            failed: 0,
            requests: 0,
        });
        if failure.is_some() {
            break;
        }
    }
    (windows, failure)
}

/// Ends the load (cooldown first unless a rollout failed) and collects its records.
async fn finish_load(
    cfg: &RunConfig,
    source: LoadSource,
    cool_down: bool,
    run_started: tokio::time::Instant,
    rollout_phase_start: tokio::time::Instant,
    progress: &Progress,
) -> Result<(Vec<generator::RequestRecord>, Option<K6Figures>)> {
    Ok(match source {
        LoadSource::Lab(load) => {
            if cool_down {
                progress.phase("cooldown");
                tokio::time::sleep(cfg.cooldown).await;
            }
            progress.phase("draining the load");
            (load.finish().await, None)
        }
        LoadSource::K6(run) => {
            progress.phase("k6 running to its end");
            let k = cfg.k6.as_ref().expect("k6 source");
            let overran = rollout_phase_start.elapsed() > k.rollout_phase;
            // k6's whole plan, its graceful stops, and a margin; bounded whatever happens.
            let planned = cfg.warmup + k.rollout_phase + cfg.cooldown + 3 * (cfg.timeout + Duration::from_secs(2));
            let limit = (run_started + planned + Duration::from_secs(30))
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_secs(10));
            let (mut fig, records) = run.finish(limit).await?;
            fig.rollout_overran_phase = overran;
            (records, Some(fig))
        }
    })
}

/// Each window owns the requests that started in it, up to the next window.
fn count_requests_per_window(windows: &mut [RolloutWindow], requests: &[generator::RequestRecord]) {
    for i in 0..windows.len() {
        let from = windows[i].start;
        let to = windows.get(i + 1).map(|w| w.start).unwrap_or(Duration::MAX);
        let mine = requests.iter().filter(|r| r.start >= from && r.start < to);
        let (n, f) = mine.fold((0, 0), |(n, f), r| (n + 1, f + usize::from(!r.outcome.is_ok())));
        windows[i].requests = n;
        windows[i].failed = f;
    }
}

/// Waits until no new span has arrived for a while (bounded).
async fn settle(r: &OtlpReceiver) -> Vec<crate::otlp_receiver::SpanRecord> {
    let quiet = Duration::from_millis(1500);
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut last = r.spans().len();
    let mut since = tokio::time::Instant::now();
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = r.spans().len();
        if n != last {
            last = n;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    r.spans()
}
