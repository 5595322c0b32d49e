//! The EndpointSlice controller and the propagation lag to the proxies.
//!
//! The controller sees pod changes at once (as the real one does through its watch); every
//! change reaches the Service proxy only `lag` later, in order, which is the window where a
//! deleted pod still receives new connections.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::lab::api::cluster::{Cluster, EventKind, Pod};
use crate::lab::api::endpoint_slice::{Endpoint, ServicePort, Slice};
use crate::lab::network::service_proxy::routable;

/// What the EndpointSlice controller publishes for `svc` given the pods now.
pub fn slice_for(svc: &ServicePort, pods: &[Pod], now: Duration) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = pods
        .iter()
        .filter(|p| svc.selects(p) && p.gone.is_none_or(|g| g > now))
        .filter_map(|p| {
            let port = svc.target_port(p)?;
            let terminating = p.deleted.is_some();
            Some(Endpoint {
                pod: p.name.clone(),
                addr: p.net.addr(port),
                ready: (p.ready || svc.publish_not_ready) && !terminating,
                serving: p.ready || svc.publish_not_ready,
                terminating,
            })
        })
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

/// The controller's tasks; dropping it stops them (a JoinSet aborts its tasks on drop).
pub struct Controller {
    _tasks: JoinSet<()>,
    /// Slices published and not yet applied by a proxy.
    pending: Arc<AtomicUsize>,
}

impl Controller {
    /// Waits until every proxy has applied every change and no pod is about to leave (a gone
    /// time still ahead): what clients see has caught up with the cluster. Bounded by `limit`.
    pub async fn converged(&self, cluster: &Cluster, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        let mut quiet = 0;
        while tokio::time::Instant::now() < until {
            let now = cluster.clock.now();
            let leaving = cluster.pods().iter().any(|p| p.gone.is_some_and(|g| g + TICK > now));
            if self.pending.load(Ordering::SeqCst) == 0 && !leaving {
                quiet += 1;
                // Two quiet looks a controller tick apart: nothing published in between.
                if quiet >= 2 {
                    return true;
                }
            } else {
                quiet = 0;
            }
            tokio::time::sleep(TICK).await;
        }
        false
    }
}

/// The controller's resync period (pod `gone` times are noticed on it).
const TICK: Duration = Duration::from_millis(100);

/// Starts the controller and, per Service port, the lagged propagation; returns the proxies' views.
pub fn start(
    cluster: Arc<Cluster>,
    services: Vec<ServicePort>,
    lag: Duration,
) -> (Controller, Vec<watch::Receiver<Slice>>) {
    let mut queues = Vec::new();
    let mut views = Vec::new();
    let mut tasks = JoinSet::new();
    let pending = Arc::new(AtomicUsize::new(0));
    for svc in &services {
        let (view_tx, view_rx) = watch::channel::<Slice>(Arc::new(Vec::new()));
        let (q_tx, q_rx) = mpsc::unbounded_channel::<(Duration, Slice)>();
        tasks.spawn(propagate(cluster.clone(), svc.label(), q_rx, view_tx, lag, pending.clone()));
        queues.push(q_tx);
        views.push(view_rx);
    }
    tasks.spawn(controller(cluster, services, queues, pending.clone()));
    (Controller { _tasks: tasks, pending }, views)
}

async fn controller(
    cluster: Arc<Cluster>,
    services: Vec<ServicePort>,
    queues: Vec<mpsc::UnboundedSender<(Duration, Slice)>>,
    pending: Arc<AtomicUsize>,
) {
    let mut changes = cluster.subscribe();
    let mut last: Vec<Option<Slice>> = vec![None; services.len()];
    // `gone` times lie in the future when set; a tick makes sure they are noticed.
    let mut tick = tokio::time::interval(TICK);
    loop {
        let now = cluster.clock.now();
        let pods = cluster.pods();
        for (i, svc) in services.iter().enumerate() {
            let slice = Arc::new(slice_for(svc, &pods, now));
            if last[i].as_ref() != Some(&slice) {
                last[i] = Some(slice.clone());
                pending.fetch_add(1, Ordering::SeqCst);
                if queues[i].send((now, slice)).is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// Applies each published slice `lag` after it was published, logging who the proxy starts and
/// stops sending new connections to.
async fn propagate(
    cluster: Arc<Cluster>,
    service: String,
    mut queue: mpsc::UnboundedReceiver<(Duration, Slice)>,
    view: watch::Sender<Slice>,
    lag: Duration,
    pending: Arc<AtomicUsize>,
) {
    let mut routed: BTreeSet<String> = BTreeSet::new();
    while let Some((published, slice)) = queue.recv().await {
        tokio::time::sleep_until(cluster.clock.instant(published + lag)).await;
        let now_routed: BTreeSet<String> = routable(&slice).iter().map(|e| e.pod.clone()).collect();
        for added in now_routed.difference(&routed) {
            cluster.event(added, EventKind::EndpointAdded, &service);
        }
        for removed in routed.difference(&now_routed) {
            cluster.event(removed, EventKind::EndpointRemoved, &service);
        }
        routed = now_routed;
        let sent = view.send(slice);
        pending.fetch_sub(1, Ordering::SeqCst);
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::network::ipam::{Mode, Net};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn pod(name: &str, ready: bool, deleted: bool) -> Pod {
        let net = Net::new(Mode::PerIp).pod(&[5000]).unwrap();
        Pod {
            labels: [("app".to_string(), "backend".to_string())].into(),
            named_ports: [("http".to_string(), 5000)].into(),
            running: true,
            started: true,
            ready,
            ready_since: ready.then_some(Duration::ZERO),
            deleted: deleted.then_some(Duration::ZERO),
            ..Pod::new(name, "backend", "h", net)
        }
    }

    fn svc() -> ServicePort {
        ServicePort {
            service: "svc-backend".into(),
            port_label: None,
            namespace: "default".into(),
            selector: [("app".to_string(), "backend".to_string())].into(),
            port: 5000,
            target: IntOrString::String("http".into()),
            publish_not_ready: false,
        }
    }

    #[test]
    fn terminating_pods_are_not_ready_but_may_serve() {
        let pods = vec![pod("a", true, false), pod("b", true, true), pod("c", false, false)];
        let s = slice_for(&svc(), &pods, Duration::ZERO);
        assert_eq!(s.len(), 3);
        assert!(s[0].ready && !s[1].ready && s[1].serving && s[1].terminating && !s[2].ready);
        assert_eq!(routable(&s).iter().map(|e| e.pod.as_str()).collect::<Vec<_>>(), vec!["a"]);
    }

    #[test]
    fn falls_back_to_serving_terminating_endpoints() {
        let pods = vec![pod("b", true, true), pod("c", false, false)];
        let s = slice_for(&svc(), &pods, Duration::ZERO);
        assert_eq!(routable(&s).iter().map(|e| e.pod.as_str()).collect::<Vec<_>>(), vec!["b"]);
        let pods = vec![pod("b", false, true)];
        assert!(routable(&slice_for(&svc(), &pods, Duration::ZERO)).is_empty());
    }

    #[tokio::test]
    async fn changes_reach_the_proxy_only_after_the_lag() {
        let cluster = Arc::new(Cluster::new(crate::lab::api::cluster::Clock::new()));
        cluster.add_pod(pod("a", true, false));
        cluster.add_pod(pod("b", true, false));
        let lag = Duration::from_millis(400);
        let (_ctl, mut views) = start(cluster.clone(), vec![svc()], lag);
        let view = views.remove(0);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(view.borrow().is_empty(), "visible before the lag");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(view.borrow().len(), 2);
        cluster.update_pod("a", |p| p.deleted = Some(cluster.clock.now()));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(view.borrow()[0].ready, "removal visible before the lag");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!view.borrow()[0].ready);
        assert!(_ctl.converged(&cluster, Duration::from_secs(2)).await);
        let kinds: Vec<_> = cluster.events().iter().map(|e| e.kind).collect();
        assert!(kinds.contains(&EventKind::EndpointAdded) && kinds.contains(&EventKind::EndpointRemoved), "{kinds:?}");
    }
}
