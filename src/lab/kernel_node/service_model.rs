//! What kube-proxy is told: Services with ports, each port with its EndpointSlice endpoints
//! and their conditions, and which endpoints it sends new connections to.

use std::net::Ipv4Addr;

/// A Service as kube-proxy sees it (TCP only: the lab speaks HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
}

/// One Service port and the endpoints its EndpointSlice lists for it (a named target port can
/// be a different number on each pod, so each endpoint carries its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<Endpoint>,
}

/// One EndpointSlice endpoint with its conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    pub fn ready(ip: Ipv4Addr, port: u16) -> Endpoint {
        Endpoint { ip, port, ready: true, serving: true, terminating: false }
    }

    /// Terminating but still passing readiness.
    pub fn serving_terminating(ip: Ipv4Addr, port: u16) -> Endpoint {
        Endpoint { ip, port, ready: false, serving: true, terminating: true }
    }
}

impl ServicePort {
    /// The endpoints that receive new connections: the ready ones; when none is ready, those
    /// that are terminating but still serving (kube-proxy's fallback); otherwise none.
    pub fn usable_endpoints(&self) -> Vec<Endpoint> {
        let ready: Vec<_> = self.endpoints.iter().filter(|e| e.ready).copied().collect();
        if !ready.is_empty() {
            return ready;
        }
        self.endpoints.iter().filter(|e| e.serving && e.terminating).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(endpoints: Vec<Endpoint>) -> ServicePort {
        ServicePort { name: "http".into(), port: 80, node_port: None, endpoints }
    }
    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        let p = port(vec![Endpoint::ready(A, 5000), Endpoint::serving_terminating(B, 5000)]);
        assert_eq!(p.usable_endpoints(), vec![Endpoint::ready(A, 5000)]);
    }

    #[test]
    fn serving_terminating_endpoints_when_none_is_ready() {
        let p = port(vec![Endpoint::serving_terminating(B, 5000)]);
        assert_eq!(p.usable_endpoints(), vec![Endpoint::serving_terminating(B, 5000)]);
    }

    #[test]
    fn not_serving_endpoints_are_never_used() {
        let dead = Endpoint { ip: A, port: 5000, ready: false, serving: false, terminating: true };
        let not_ready = Endpoint { ip: B, port: 5000, ready: false, serving: false, terminating: false };
        assert!(port(vec![dead, not_ready]).usable_endpoints().is_empty());
    }
}
