//! What kube-proxy is told: Services with ports and their endpoints' conditions, and which
//! endpoints it sends new connections to.

use std::net::Ipv4Addr;

/// A Service as kube-proxy sees it (TCP only: the lab speaks HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

/// One EndpointSlice endpoint with its conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    pub fn ready(ip: Ipv4Addr) -> Endpoint {
        Endpoint { ip, ready: true, serving: true, terminating: false }
    }

    /// Terminating but still passing readiness.
    pub fn serving_terminating(ip: Ipv4Addr) -> Endpoint {
        Endpoint { ip, ready: false, serving: true, terminating: true }
    }
}

impl Service {
    /// The endpoints that receive new connections: the ready ones; when none is ready, those
    /// that are terminating but still serving (kube-proxy's fallback); otherwise none.
    pub fn usable_endpoints(&self) -> Vec<Ipv4Addr> {
        let ready: Vec<_> = self.endpoints.iter().filter(|e| e.ready).map(|e| e.ip).collect();
        if !ready.is_empty() {
            return ready;
        }
        self.endpoints.iter().filter(|e| e.serving && e.terminating).map(|e| e.ip).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(endpoints: Vec<Endpoint>) -> Service {
        Service { name: "web".into(), cluster_ip: Ipv4Addr::new(10, 96, 0, 10), ports: vec![], endpoints }
    }
    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        assert_eq!(svc(vec![Endpoint::ready(A), Endpoint::serving_terminating(B)]).usable_endpoints(), vec![A]);
    }

    #[test]
    fn serving_terminating_endpoints_when_none_is_ready() {
        assert_eq!(svc(vec![Endpoint::serving_terminating(B)]).usable_endpoints(), vec![B]);
    }

    #[test]
    fn not_serving_endpoints_are_never_used() {
        let dead = Endpoint { ip: A, ready: false, serving: false, terminating: true };
        let not_ready = Endpoint { ip: B, ready: false, serving: false, terminating: false };
        assert!(svc(vec![dead, not_ready]).usable_endpoints().is_empty());
    }
}
