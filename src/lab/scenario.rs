//! One run: bring up the overlay (Services with their proxies, Deployments with their pods),
//! put load on it, roll the Deployments, and collect what happened.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::future::join_all;

use crate::lab::api::cluster::{ms, Clock, Cluster};
use crate::lab::api::endpoint_slice::ServicePort;
use crate::lab::api::manifest::Manifest;
use crate::lab::control_plane::deployment::DeploymentCtl;
use crate::lab::control_plane::endpointslice;
use crate::lab::control_plane::replicaset::PodFactory;
use crate::lab::load::generator::{self, LoadConfig};
use crate::lab::load::k6::{K6Config, K6Figures, K6Run};
use crate::lab::network::dns::ServiceDns;
use crate::lab::network::ipam::Net;
use crate::lab::network::service_proxy::ServiceProxy;
use crate::lab::node::kubelet::{Kubelet, NodeConfig};
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

/// The Services as played: their proxies and the endpoints controller feeding them.
struct Proxies {
    list: Vec<(ServicePort, ServiceProxy)>,
    endpoints: endpointslice::Controller,
}

pub async fn run(
    cfg: &RunConfig,
    manifest: &Manifest,
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
    let (proxies, dns) = start_services(cfg, manifest, &cluster, &net).await?;
    let node = NodeConfig {
        exe: cfg.exe.clone(),
        run_dir: cfg.run_dir.clone(),
        config_maps: manifest.config_maps.clone(),
        services: dns,
        otlp_endpoint: receiver.map(|r| r.endpoint()),
        sandbox_teardown: cfg.sandbox_teardown,
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
    let result = drive(cfg, &cluster, &factory, &mut ctls, &proxies, &entry, progress).await;
    let spans = match (&result, receiver) {
        // Export is batched: before the pods go, wait until their spans stop arriving.
        (Ok(Driven { requests, .. }), Some(r)) if requests.iter().any(|r| !r.outcome.is_ok()) => {
            progress.phase("collecting spans");
            settle(r).await
        }
        (_, Some(r)) => r.spans(),
        _ => Vec::new(),
    };
    // Whatever happened, no pod outlives its run.
    drop(kubelet);
    report(cfg, &cluster, &proxies, &entry, result?, spans)
}

/// Every Service port gets a lagged endpoint view and a proxy on its ClusterIP; the pods reach
/// them by the names in the returned DNS records.
async fn start_services(
    cfg: &RunConfig,
    manifest: &Manifest,
    cluster: &Arc<Cluster>,
    net: &Net,
) -> Result<(Proxies, Vec<ServiceDns>)> {
    let mut ports = Vec::new();
    for s in &manifest.services {
        ports.extend(ServicePort::of_service(s)?);
    }
    let (controller, views) = endpointslice::start(cluster.clone(), ports.clone(), cfg.lag);
    let mut proxies = Proxies { list: Vec::new(), endpoints: controller };
    let mut dns = Vec::new();
    let mut cluster_ips = std::collections::BTreeMap::new();
    for (sp, view) in ports.into_iter().zip(views) {
        let base = sp.service.clone();
        let ip = match cluster_ips.get(&base) {
            Some(ip) => *ip,
            None => {
                let ip = net.cluster_ip()?;
                cluster_ips.insert(base.clone(), ip);
                ip
            }
        };
        let proxy = ServiceProxy::start(&sp.label(), std::net::SocketAddr::new(ip, sp.port), view, cluster.clone())
            .await
            .with_context(|| format!("Service/{base}: binding its proxy on {ip}:{}", sp.port))?;
        let svc = manifest.services.iter().find(|s| s.metadata.name.as_deref() == Some(base.as_str()));
        let port_name = svc
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.ports.as_ref())
            .and_then(|ps| ps.iter().find(|p| p.port == i32::from(sp.port)))
            .and_then(|p| p.name.clone());
        dns.push(ServiceDns {
            name: base,
            namespace: sp.namespace.clone(),
            port: sp.port,
            port_name,
            proxy: proxy.addr,
        });
        proxies.list.push((sp, proxy));
    }
    Ok((proxies, dns))
}

/// The run's result: every failed request attributed (spans, proxy records, pods), the summary,
/// the timeline picture written beside the pod logs.
fn report(
    cfg: &RunConfig,
    cluster: &Cluster,
    proxies: &Proxies,
    entry: &str,
    driven: Driven,
    spans: Vec<crate::otlp_receiver::SpanRecord>,
) -> Result<RunResult> {
    let Driven { requests, windows, end: run_end, k6 } = driven;
    let pods = cluster.pods();
    let entry_records =
        proxies.list.iter().filter(|(sp, _)| sp.service == entry).flat_map(|(_, p)| p.log.records()).collect();
    let inner = proxies
        .list
        .iter()
        .filter(|(sp, _)| sp.service != entry)
        .map(|(_, p)| ProxyRecords { service: &p.service, records: p.log.records() })
        .collect();
    let attribution = attribution::attribute(&Inputs {
        clock: &cluster.clock,
        requests: &requests,
        spans: &spans,
        pods: &pods,
        entry: ProxyRecords { service: entry, records: entry_records },
        inner,
    });
    let groups = attribution::groups(&attribution.items);
    let summary = match &k6 {
        Some(f) => result::summary_from_k6(f, &windows),
        None => result::summarize(&requests, &windows),
    };
    let timeline_path = cfg.run_dir.join("timeline.svg");
    let mut result = RunResult {
        name: cfg.name.clone(),
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

async fn drive(
    cfg: &RunConfig,
    cluster: &Arc<Cluster>,
    factory: &PodFactory,
    ctls: &mut [DeploymentCtl],
    proxies: &Proxies,
    entry: &str,
    progress: &Progress,
) -> Result<Driven> {
    // Bring every Deployment up and let the proxies learn the endpoints.
    let ups = join_all(ctls.iter_mut().map(|c| c.start(factory, cfg.limit))).await;
    for r in ups {
        r?;
    }
    progress.phase("waiting for endpoints");
    proxies.endpoints.converged(cluster, cfg.lag + Duration::from_secs(5)).await;

    let (_, entry_proxy) =
        proxies.list.iter().find(|(sp, _)| sp.service == entry).context("the entry Service has no port")?;
    let run_started = tokio::time::Instant::now();
    let source = start_load(cfg, cluster, entry_proxy, entry, progress).await?;
    let rollout_phase_start = tokio::time::Instant::now();
    let (mut windows, failure) = roll(cfg, cluster, factory, ctls, proxies, progress).await;
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
    cluster: &Cluster,
    entry_proxy: &ServiceProxy,
    entry: &str,
    progress: &Progress,
) -> Result<LoadSource> {
    Ok(match &cfg.k6 {
        None => {
            let load = generator::start(
                LoadConfig {
                    target: entry_proxy.addr,
                    host: entry.to_string(),
                    path: cfg.path.clone(),
                    rate: cfg.rate,
                    timeout: cfg.timeout,
                    max_in_flight: cfg.max_in_flight,
                    pool_idle: Duration::from_secs(3),
                },
                cluster.clock,
                Some(entry_proxy.log.clone()),
            );
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
                    frontend_url: format!("http://{}", entry_proxy.addr),
                    path: cfg.path.clone(),
                    rate: cfg.rate,
                    warmup: cfg.warmup,
                    rollout: k.rollout_phase,
                    cooldown: cfg.cooldown,
                    timeout: cfg.timeout,
                    run_dir: cfg.run_dir.clone(),
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
    proxies: &Proxies,
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
            proxies.endpoints.converged(cluster, cfg.lag + cfg.sandbox_teardown + Duration::from_secs(5)).await;
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
