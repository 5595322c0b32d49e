//! Addresses. On the kernel node (`Mode::Kernel`) pods get real addresses from the node's pod
//! CIDR (10.244.0.0/24, each in its own network namespace) and Services ClusterIPs from
//! 10.96.0.0/12. On the process node each pod gets its own loopback IP (127.0.10.x, as if it had
//! its own network namespace) and each Service its own "ClusterIP" (127.0.9.x); where only
//! 127.0.0.1 works (macOS without aliases), everything shares it and ports are remapped instead.
//!
//! Addresses are never reused within one lab process: a socket left in TIME_WAIT by one run
//! must not collide with the next run's pod. Labs running side by side (parallel tests, CI next
//! to a developer) each claim their own block 127.<k>.x.x by holding a sentinel socket, and a
//! port something else already holds (a server on 0.0.0.0:5000 blocks 5000 on every loopback
//! address) is remapped for that pod alone.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::lab::kernel_node::node::Node;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every pod and Service on its own 127.x.y.z.
    PerIp,
    /// Only 127.0.0.1: distinct ports stand in for distinct addresses.
    SharedLoopback,
    /// The kernel node: pod CIDR and Service CIDR addresses, each pod in its own namespace.
    Kernel,
}

#[derive(Debug)]
pub struct Net {
    pub mode: Mode,
    /// Second octet of this lab's block: Services 127.<block>.9.x, pods 127.<block>.10+.x.
    block: u8,
    next_pod: AtomicU32,
    next_svc: AtomicU32,
    /// Held for the lab's life: other labs see the block as taken.
    _claim: Option<TcpListener>,
    /// `Mode::Kernel`: the node whose pod CIDR hands out pod addresses.
    node: Option<Arc<Mutex<Node>>>,
}

/// The sentinel that marks a block as taken.
const CLAIM_HOST: u8 = 254;
const CLAIM_PORT: u16 = 65001;

/// Where a pod's container ports really are on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNet {
    pub ip: IpAddr,
    /// container port -> host port; identity in `PerIp` and `Kernel` modes.
    ports: BTreeMap<u16, u16>,
    /// The pod has a network namespace of its own (kernel node): it listens on 0.0.0.0 as its
    /// manifest says and reaches itself on 127.0.0.1, so nothing is rewritten.
    pub own_netns: bool,
}

impl PodNet {
    pub fn addr(&self, container_port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports.get(&container_port).copied().unwrap_or(container_port))
    }

    /// Whether `addr` is one of this pod's sockets.
    pub fn owns(&self, addr: SocketAddr) -> bool {
        addr.ip() == self.ip && (!self.remapped() || self.ports.values().any(|p| *p == addr.port()))
    }

    fn remapped(&self) -> bool {
        self.ports.iter().any(|(c, h)| c != h)
    }
}

impl Net {
    pub fn detect() -> Net {
        let per_ip =
            ["127.0.9.1", "127.0.10.1"].iter().all(|ip| TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0)).is_ok());
        if !per_ip {
            return Net::new(Mode::SharedLoopback);
        }
        for block in 0..=250u8 {
            if let Ok(claim) = TcpListener::bind((Ipv4Addr::new(127, block, 9, CLAIM_HOST), CLAIM_PORT)) {
                return Net { _claim: Some(claim), ..Net::in_block(Mode::PerIp, block) };
            }
        }
        Net::new(Mode::SharedLoopback)
    }

    pub fn new(mode: Mode) -> Net {
        Net::in_block(mode, 0)
    }

    /// Unclaimed: for tests, which use blocks above those `detect` hands out.
    pub fn in_block(mode: Mode, block: u8) -> Net {
        Net { mode, block, next_pod: AtomicU32::new(0), next_svc: AtomicU32::new(0), _claim: None, node: None }
    }

    /// The kernel node's addresses: pods from its pod CIDR, ClusterIPs from the Service CIDR.
    pub fn kernel(node: Arc<Mutex<Node>>) -> Net {
        Net { node: Some(node), ..Net::in_block(Mode::Kernel, 0) }
    }

    /// A fresh pod address; `container_ports` are those the pod will listen on.
    pub fn pod(&self, container_ports: &[u16]) -> std::io::Result<PodNet> {
        match self.mode {
            Mode::PerIp => {
                let n = self.next_pod.fetch_add(1, Ordering::Relaxed);
                let ip = nth_ip(self.block, 10, n).ok_or_else(|| std::io::Error::other("pod addresses exhausted"))?;
                let mut ports = BTreeMap::new();
                for p in container_ports {
                    let host = if TcpListener::bind((ip, *p)).is_ok() { *p } else { free_port(ip)? };
                    ports.insert(*p, host);
                }
                Ok(PodNet { ip, ports, own_netns: false })
            }
            Mode::SharedLoopback => {
                let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
                let mut ports = BTreeMap::new();
                for p in container_ports {
                    ports.insert(*p, free_port(ip)?);
                }
                Ok(PodNet { ip, ports, own_netns: false })
            }
            Mode::Kernel => {
                let node = self.node.as_ref().ok_or_else(|| std::io::Error::other("kernel mode without a node"))?;
                let ip = node.lock().unwrap_or_else(|e| e.into_inner()).allocate_ip().map_err(std::io::Error::other)?;
                let ports = container_ports.iter().map(|p| (*p, *p)).collect();
                Ok(PodNet { ip: IpAddr::V4(ip), ports, own_netns: true })
            }
        }
    }

    /// A fresh ClusterIP (the port is chosen when the proxy binds).
    pub fn cluster_ip(&self) -> std::io::Result<IpAddr> {
        match self.mode {
            Mode::PerIp => {
                let n = self.next_svc.fetch_add(1, Ordering::Relaxed);
                nth_ip(self.block, 9, n)
                    .filter(|ip| *ip != IpAddr::V4(Ipv4Addr::new(127, self.block, 9, CLAIM_HOST)))
                    .ok_or_else(|| std::io::Error::other("ClusterIPs exhausted"))
            }
            Mode::SharedLoopback => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Mode::Kernel => {
                // 10.96.0.1 is the API server's in a cluster; Services here start at .10.
                let n = self.next_svc.fetch_add(1, Ordering::Relaxed);
                let host = 10 + n;
                (host < 254)
                    .then(|| IpAddr::V4(Ipv4Addr::new(10, 96, 0, host as u8)))
                    .ok_or_else(|| std::io::Error::other("ClusterIPs exhausted"))
            }
        }
    }
}

/// The n-th usable address in a lab's block, skipping .0 and .255: Services use 127.<b>.9.x,
/// pods 127.<b>.10.x, 127.<b>.11.x, ... up to 127.<b>.255.x.
fn nth_ip(block: u8, base: u8, n: u32) -> Option<IpAddr> {
    let host = (n % 254) + 1;
    let third = u32::from(base) + n / 254;
    let limit = if base == 9 { 9 } else { 255 };
    if third > limit {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::new(127, block, third as u8, host as u8)))
}

/// An ephemeral port that was free a moment ago (bind to 0 and release).
fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_skip_network_and_broadcast() {
        assert_eq!(nth_ip(0, 10, 0).unwrap().to_string(), "127.0.10.1");
        assert_eq!(nth_ip(0, 10, 253).unwrap().to_string(), "127.0.10.254");
        assert_eq!(nth_ip(0, 10, 254).unwrap().to_string(), "127.0.11.1");
        assert!(nth_ip(0, 10, 254 * 246).is_none());
        assert_eq!(nth_ip(3, 9, 0).unwrap().to_string(), "127.3.9.1");
        assert!(nth_ip(3, 9, 254).is_none());
    }

    #[test]
    fn shared_mode_remaps_ports() {
        let net = Net::new(Mode::SharedLoopback);
        let pod = net.pod(&[5000, 5001]).unwrap();
        assert_eq!(pod.ip.to_string(), "127.0.0.1");
        assert_ne!(pod.addr(5000).port(), 5000);
        assert_ne!(pod.addr(5000), pod.addr(5001));
    }

    #[test]
    fn a_taken_port_is_remapped_for_that_pod_only() {
        let net = Net::in_block(Mode::PerIp, 253);
        let _held = TcpListener::bind("127.253.10.1:0").unwrap();
        let busy = _held.local_addr().unwrap().port();
        let pod = net.pod(&[busy, 5000]).unwrap();
        assert_eq!(pod.ip.to_string(), "127.253.10.1");
        assert_ne!(pod.addr(busy).port(), busy);
        assert!(pod.owns(pod.addr(busy)) && pod.owns(pod.addr(5000)));
    }

    #[test]
    fn labs_side_by_side_claim_different_blocks() {
        let a = Net::detect();
        let b = Net::detect();
        if a.mode == Mode::PerIp && b.mode == Mode::PerIp {
            assert_ne!(a.cluster_ip().unwrap(), b.cluster_ip().unwrap());
        }
    }

    #[test]
    fn per_ip_mode_keeps_ports() {
        let net = Net::in_block(Mode::PerIp, 252);
        let a = net.pod(&[5000]).unwrap();
        let b = net.pod(&[5000]).unwrap();
        assert_eq!(a.addr(5000).port(), 5000);
        assert_ne!(a.ip, b.ip);
    }
}
