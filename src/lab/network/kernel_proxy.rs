//! kube-proxy on the kernel node: each Service port's lagged EndpointSlice view programmed into
//! the node's nftables, every change as one atomic transaction, as kube-proxy's nftables mode
//! does; and conntrack's events read back as the record of which pod each connection reached
//! (what the process node's user-space proxy logs for itself).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::future::select_all;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use crate::lab::api::cluster::{Cluster, Pod};
use crate::lab::api::endpoint_slice::{ServicePort, Slice};
use crate::lab::kernel_node::conntrack::{self, Connection};
use crate::lab::kernel_node::from_lab;
use crate::lab::kernel_node::node::Node;
use crate::lab::kernel_node::service_model::Service;
use crate::lab::network::service_proxy::{ConnRecord, End, Outcome};

/// A reset within this time of the SYN, before any answer, is a refusal.
const REFUSED_WITHIN: Duration = Duration::from_secs(1);

/// One Service port as programmed: where clients reach it.
#[derive(Debug, Clone)]
pub struct KernelPort {
    pub port: ServicePort,
    pub cluster_ip: Ipv4Addr,
    pub node_port: Option<u16>,
}

impl KernelPort {
    pub fn cluster_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.cluster_ip, self.port.port)
    }

    /// Where clients outside the node reach it, when it has a NodePort.
    pub fn node_port_addr(&self) -> Option<SocketAddrV4> {
        self.node_port.map(|np| SocketAddrV4::new(crate::lab::kernel_node::node::NODE_IP, np))
    }
}

/// How the transactions went, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplyStats {
    pub transactions: usize,
    pub failures: usize,
    pub last_error: Option<String>,
    pub slowest_ms: f64,
    pub total_ms: f64,
}

pub struct KernelProxy {
    pub ports: Vec<KernelPort>,
    pub stats: Arc<Mutex<ApplyStats>>,
    conntrack: conntrack::Log,
    _sync: AbortOnDropHandle<()>,
}

impl KernelProxy {
    /// Programs the Services once (no endpoints yet), then follows the views.
    pub async fn start(
        node: Arc<Mutex<Node>>,
        ports: Vec<KernelPort>,
        views: Vec<watch::Receiver<Slice>>,
    ) -> Result<KernelProxy> {
        let netns = node.lock().unwrap_or_else(|e| e.into_inner()).netns.clone();
        let conntrack = conntrack::Log::start(&netns).await?;
        let stats = Arc::new(Mutex::new(ApplyStats::default()));
        let snapshot: Vec<Slice> = views.iter().map(|v| v.borrow().clone()).collect();
        apply(&node, &ports, &snapshot, &stats).await.context("programming the Services' nftables rules")?;
        let sync = tokio::spawn(follow(node, ports.clone(), views, stats.clone()));
        Ok(KernelProxy { ports, stats, conntrack, _sync: AbortOnDropHandle::new(sync) })
    }

    /// The NodePort address clients outside the node use for `service`, else its ClusterIP.
    pub fn entry_addr(&self, service: &str) -> Option<SocketAddr> {
        let p = self.ports.iter().find(|p| p.port.service == service)?;
        Some(SocketAddr::V4(p.node_port_addr().unwrap_or_else(|| p.cluster_addr())))
    }

    /// A new run: forget the connections seen so far.
    pub fn clear(&self) {
        self.conntrack.clear();
    }

    /// What conntrack saw of the connections to `service` (its ClusterIP ports and NodePorts),
    /// as the user-space proxy's records: which pod each client socket reached, and how.
    pub fn records(&self, service: &str, pods: &[Pod], cluster: &Cluster) -> Vec<ConnRecord> {
        let addrs: Vec<SocketAddrV4> = self
            .ports
            .iter()
            .filter(|p| p.port.service == service)
            .flat_map(|p| {
                let cluster_ip = SocketAddrV4::new(p.cluster_ip, p.port.port);
                let node_port = p.node_port.map(|np| SocketAddrV4::new(crate::lab::kernel_node::node::NODE_IP, np));
                std::iter::once(cluster_ip).chain(node_port)
            })
            .collect();
        self.conntrack
            .connections()
            .iter()
            .filter(|c| addrs.contains(&c.service))
            .map(|c| record(c, pods, cluster))
            .collect()
    }

    /// conntrack's own warnings (lost events), if any.
    pub fn warnings(&self) -> Vec<String> {
        self.conntrack.warnings()
    }
}

fn record(c: &Connection, pods: &[Pod], cluster: &Cluster) -> ConnRecord {
    let at = |nanos: u128| Duration::from_secs_f64(cluster.clock.unix_nanos_to_ms(nanos as u64).max(0.0) / 1000.0);
    let accepted = at(c.opened_unix_nanos);
    // Addresses are reused: the pod holding this one when the connection opened.
    let pod = pods
        .iter()
        .filter(|p| p.ip == IpAddr::V4(*c.pod.ip()) && p.created <= accepted + Duration::from_millis(5))
        .max_by_key(|p| p.created)
        .map(|p| p.name.clone());
    let outcome = if c.assured {
        Outcome::Spliced
    } else if c.refused(REFUSED_WITHIN) {
        Outcome::Refused
    } else {
        Outcome::Blackholed
    };
    // conntrack does not say which side closed first.
    let end = c.closing_unix_nanos.map(|n| (at(n), End::Closed));
    ConnRecord { client: SocketAddr::V4(c.client), accepted, pod, outcome, end }
}

/// Re-applies the whole table whenever a view changes.
async fn follow(
    node: Arc<Mutex<Node>>,
    ports: Vec<KernelPort>,
    mut views: Vec<watch::Receiver<Slice>>,
    stats: Arc<Mutex<ApplyStats>>,
) {
    loop {
        if views.is_empty() {
            return std::future::pending().await;
        }
        let changed = views.iter_mut().map(|v| Box::pin(v.changed()));
        let (r, _, _) = select_all(changed).await;
        if r.is_err() {
            return;
        }
        let snapshot: Vec<Slice> = views.iter_mut().map(|v| v.borrow_and_update().clone()).collect();
        // A failed transaction leaves the previous rules in place (nft applies all or nothing):
        // counted and reported; the next change tries again.
        let _ = apply(&node, &ports, &snapshot, &stats).await;
    }
}

/// One transaction for every Service from the current views.
async fn apply(
    node: &Arc<Mutex<Node>>,
    ports: &[KernelPort],
    views: &[Slice],
    stats: &Mutex<ApplyStats>,
) -> Result<()> {
    let services = services(ports, views)?;
    let node = node.clone();
    let applied =
        tokio::task::spawn_blocking(move || node.lock().unwrap_or_else(|e| e.into_inner()).apply_services(&services))
            .await
            .context("the nft task panicked")?;
    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
    s.transactions += 1;
    match applied {
        Ok(took) => {
            let took = took.as_secs_f64() * 1000.0;
            s.total_ms += took;
            s.slowest_ms = s.slowest_ms.max(took);
            Ok(())
        }
        Err(e) => {
            s.failures += 1;
            s.last_error = Some(format!("{e:#}"));
            Err(e)
        }
    }
}

/// kube-proxy's model of the Services: ports grouped by Service, each with its endpoints.
fn services(ports: &[KernelPort], views: &[Slice]) -> Result<Vec<Service>> {
    let mut out: Vec<Service> = Vec::new();
    for (p, view) in ports.iter().zip(views) {
        let port = from_lab::service_port(&p.port, p.node_port, view)?;
        match out.iter_mut().find(|s| s.name == p.port.service) {
            Some(s) => s.ports.push(port),
            None => out.push(Service { name: p.port.service.clone(), cluster_ip: p.cluster_ip, ports: vec![port] }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::api::cluster::Clock;
    use crate::lab::network::ipam::{Mode, Net};

    fn pod_at(name: &str, ip: &str, created_ms: u64) -> Pod {
        let net = Net::new(Mode::PerIp).pod(&[]).unwrap();
        Pod { ip: ip.parse().unwrap(), created: Duration::from_millis(created_ms), ..Pod::new(name, "web", "h", net) }
    }

    fn connection(cluster: &Cluster, opened_ms: u64, assured: bool, destroyed_after_ms: Option<u64>) -> Connection {
        let unix = |ms: u64| {
            // The clock's epoch in ns plus the offset: what conntrack would have stamped.
            let start = (cluster.clock.unix_nanos_to_ms(0) * -1e6) as u128;
            start + u128::from(ms) * 1_000_000
        };
        Connection {
            client: "10.250.0.2:40000".parse().unwrap(),
            service: "10.250.0.1:30080".parse().unwrap(),
            pod: "10.244.0.7:8080".parse().unwrap(),
            opened_unix_nanos: unix(opened_ms),
            assured,
            destroyed_unix_nanos: destroyed_after_ms.map(|d| unix(opened_ms + d)),
            closing_unix_nanos: destroyed_after_ms.filter(|_| assured).map(|d| unix(opened_ms + d)),
        }
    }

    #[test]
    fn conntrack_connections_become_records_naming_the_pod_that_held_the_address() {
        let cluster = Cluster::new(Clock::new());
        // 10.244.0.7 was an old pod's, then (after its teardown) a new pod's.
        let pods = [pod_at("web-old", "10.244.0.7", 0), pod_at("web-new", "10.244.0.7", 20_000)];
        let served = record(&connection(&cluster, 5_000, true, Some(900)), &pods, &cluster);
        assert_eq!((served.pod.as_deref(), served.outcome), (Some("web-old"), Outcome::Spliced));
        assert!(matches!(served.end, Some((t, End::Closed)) if t.as_millis().abs_diff(5_900) <= 1), "{served:?}");
        assert!(served.accepted.as_millis().abs_diff(5_000) <= 1, "{served:?}");
        let refused = record(&connection(&cluster, 21_000, false, Some(0)), &pods, &cluster);
        assert_eq!((refused.pod.as_deref(), refused.outcome), (Some("web-new"), Outcome::Refused));
        let unanswered = record(&connection(&cluster, 21_000, false, None), &pods, &cluster);
        assert_eq!(unanswered.outcome, Outcome::Blackholed);
    }

    #[test]
    fn ports_of_one_service_share_its_cluster_ip_in_kube_proxys_model() {
        let port = |service: &str, port: u16| KernelPort {
            port: ServicePort {
                service: service.into(),
                port_label: Some(port.to_string()),
                namespace: "default".into(),
                selector: Default::default(),
                port,
                target: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(port)),
                publish_not_ready: false,
            },
            cluster_ip: if service == "a" { Ipv4Addr::new(10, 96, 0, 10) } else { Ipv4Addr::new(10, 96, 0, 11) },
            node_port: None,
        };
        let ports = [port("a", 80), port("a", 81), port("b", 80)];
        let views: Vec<Slice> = vec![Default::default(); 3];
        let services = services(&ports, &views).unwrap();
        assert_eq!(services.len(), 2);
        assert_eq!((services[0].name.as_str(), services[0].ports.len()), ("a", 2));
        assert_eq!(services[1].cluster_ip, Ipv4Addr::new(10, 96, 0, 11));
    }
}
