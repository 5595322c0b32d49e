//! Pod addresses from the node's pod CIDR, as the host-local IPAM plugin hands them out: the
//! first address is the bridge's (the pods' gateway), then addresses in turn after the last one
//! given, skipping those in use, so a freed address is not handed out again at once.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

/// The pod CIDR of the lab's single node.
pub const POD_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 24);

#[derive(Debug)]
pub struct PodIpam {
    base: u32,
    size: u32,
    /// Index (among the pod addresses) of the last one handed out.
    last: u32,
    in_use: BTreeSet<u32>,
}

impl PodIpam {
    pub fn new((network, prefix): (Ipv4Addr, u8)) -> PodIpam {
        let size = 1u32 << (32 - prefix);
        PodIpam { base: u32::from(network), size, last: size - 4, in_use: BTreeSet::new() }
    }

    /// The bridge's address: the pods' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    pub fn prefix(&self) -> u8 {
        32 - self.size.trailing_zeros() as u8
    }

    /// The next free pod address, after the last one handed out.
    pub fn allocate(&mut self) -> Result<Ipv4Addr> {
        // Offsets 0 (network), 1 (gateway) and size-1 (broadcast) are never pods.
        let pods = self.size - 3;
        for step in 1..=pods {
            let index = (self.last + step) % pods;
            let offset = index + 2;
            if self.in_use.insert(offset) {
                self.last = index;
                return Ok(Ipv4Addr::from(self.base + offset));
            }
        }
        bail!("pod CIDR {}/{} is exhausted ({} pods)", Ipv4Addr::from(self.base), self.prefix(), self.in_use.len())
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.in_use.remove(&(u32::from(ip).wrapping_sub(self.base)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_first_then_pods_in_turn() {
        let mut ipam = PodIpam::new(POD_CIDR);
        assert_eq!(ipam.gateway(), Ipv4Addr::new(10, 244, 0, 1));
        assert_eq!(ipam.allocate().unwrap(), Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(ipam.allocate().unwrap(), Ipv4Addr::new(10, 244, 0, 3));
    }

    #[test]
    fn a_freed_address_is_not_reused_at_once() {
        let mut ipam = PodIpam::new(POD_CIDR);
        let a = ipam.allocate().unwrap();
        ipam.release(a);
        assert_eq!(ipam.allocate().unwrap(), Ipv4Addr::new(10, 244, 0, 3));
    }

    #[test]
    fn wraps_around_and_reports_exhaustion() {
        let mut ipam = PodIpam::new((Ipv4Addr::new(10, 244, 0, 0), 29)); // pods .2 .. .6
        let got: Vec<_> = (0..5).map(|_| ipam.allocate().unwrap()).collect();
        assert_eq!(got.last(), Some(&Ipv4Addr::new(10, 244, 0, 6)));
        let e = ipam.allocate().unwrap_err().to_string();
        assert!(e.contains("10.244.0.0/29 is exhausted"), "{e}");
        ipam.release(Ipv4Addr::new(10, 244, 0, 3));
        assert_eq!(ipam.allocate().unwrap(), Ipv4Addr::new(10, 244, 0, 3));
    }
}
