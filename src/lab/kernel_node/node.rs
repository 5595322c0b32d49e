//! The node as a bridge CNI builds it: a "node" network namespace holding a bridge (fixed MAC,
//! the pods' gateway), pod sandboxes (each its own namespace, a veth on the bridge with hairpin
//! on, an address from the pod CIDR, a default route), and a client namespace routed to the
//! node, from where load enters through NodePorts as it would from outside the cluster.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::netns::Netns;
use super::nft_ruleset::Table;
use super::pod_ipam::{PodIpam, POD_CIDR};
use super::service_model::Service;
use super::tool;

pub const NODE_NETNS: &str = "node";
pub const CLIENT_NETNS: &str = "client";
pub const BRIDGE: &str = "cni0";
/// Fixed, locally administered: the bridge keeps its MAC whichever veth joins or leaves first.
pub const BRIDGE_MAC: &str = "02:00:0a:f4:00:01";
/// The node's address towards the client (NodePorts are reached there).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// A veth name can stay taken for a moment after its namespace is deleted (teardown is
/// asynchronous): creation retries "File exists" for this long.
const REUSE_BOUND: Duration = Duration::from_secs(2);

/// What a torn-down pod's address does to new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeadPod {
    /// The node forgets the pod's neighbour entry: a SYN fails with EHOSTUNREACH after ARP gives up (~3 s).
    Unreachable,
    /// The cached neighbour entry stays: SYNs vanish until it expires (tens of seconds).
    Blackhole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SandboxId(pub u32);

/// A pod's network: its namespace and address.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: SandboxId,
    pub netns: Netns,
    pub ip: Ipv4Addr,
    veth: String,
}

#[derive(Debug)]
pub struct Node {
    pub netns: Netns,
    pub client: Netns,
    ipam: PodIpam,
    next_sandbox: u32,
    sandboxes: BTreeMap<SandboxId, Sandbox>,
}

impl Node {
    /// Builds the node and the client namespaces. Must run inside a private world: the names
    /// are fixed because /run/netns is private there.
    pub fn create() -> Result<Node> {
        let ipam = PodIpam::new(POD_CIDR);
        let node = Netns::new(NODE_NETNS);
        let client = Netns::new(CLIENT_NETNS);
        let gateway = format!("{}/{}", ipam.gateway(), ipam.prefix());
        add_netns(&node)?;
        ip_in(&node, &["link", "add", BRIDGE, "type", "bridge"])?;
        ip_in(&node, &["link", "set", BRIDGE, "address", BRIDGE_MAC])?;
        ip_in(&node, &["addr", "add", &gateway, "dev", BRIDGE])?;
        ip_in(&node, &["link", "set", BRIDGE, "up"])?;
        // A node-local process (a prober, a hook) reaches ClusterIPs through the output hook;
        // the route makes the kernel pick a source address and a way out first.
        ip_in(&node, &["route", "add", SERVICE_CIDR, "dev", BRIDGE])?;
        node.set_sysctl("net/ipv4/ip_forward", "1")?;
        // Pod → Service → another pod on the same bridge: the reply is bridged, not routed, and
        // only br_netfilter lets conntrack undo the DNAT on it.
        node.set_sysctl("net/bridge/bridge-nf-call-iptables", "1")
            .context("the br_netfilter module must be loaded (modprobe br_netfilter)")?;

        add_netns(&client)?;
        ip_in(&node, &["link", "add", "client0", "type", "veth", "peer", "name", "eth0", "netns", CLIENT_NETNS])?;
        ip_in(&node, &["addr", "add", &format!("{NODE_IP}/24"), "dev", "client0"])?;
        ip_in(&node, &["link", "set", "client0", "up"])?;
        ip_in(&client, &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
        ip_in(&client, &["link", "set", "eth0", "up"])?;
        ip_in(&client, &["route", "add", "default", "via", &NODE_IP.to_string()])?;
        Ok(Node { netns: node, client, ipam, next_sandbox: 1, sandboxes: BTreeMap::new() })
    }

    /// A pod's sandbox with the next address of the pod CIDR.
    pub fn create_sandbox(&mut self) -> Result<Sandbox> {
        let ip = self.ipam.allocate()?;
        self.create_sandbox_at(ip)
    }

    /// The next free address of the pod CIDR (host-local IPAM), for a sandbox to come.
    pub fn allocate_ip(&mut self) -> Result<Ipv4Addr> {
        self.ipam.allocate()
    }

    /// Gives an address back to the pod CIDR.
    pub fn release_ip(&mut self, ip: Ipv4Addr) {
        self.ipam.release(ip);
    }

    /// The pods' gateway: the bridge's address, where node-local servers are reached from pods.
    pub fn gateway(&self) -> Ipv4Addr {
        self.ipam.gateway()
    }

    /// A pod's sandbox at an address already allocated to it, created before its containers
    /// start (CNI ADD). On failure the address is released.
    pub fn create_sandbox_at(&mut self, ip: Ipv4Addr) -> Result<Sandbox> {
        let id = SandboxId(self.next_sandbox);
        self.next_sandbox += 1;
        let netns = Netns::new(format!("pod-{}", id.0));
        let veth = format!("veth{}", id.0);
        let gateway = self.ipam.gateway().to_string();
        let address = format!("{ip}/{}", self.ipam.prefix());
        let made = (|| -> Result<()> {
            add_netns(&netns)?;
            retry_file_exists(|| {
                ip_in(
                    &self.netns,
                    &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns.name],
                )
            })?;
            ip_in(&self.netns, &["link", "set", &veth, "master", BRIDGE])?;
            // Hairpin: a pod that reaches itself through its Service gets the packet back out
            // of the port it came in by.
            ip_in(&self.netns, &["link", "set", &veth, "type", "bridge_slave", "hairpin", "on"])?;
            ip_in(&self.netns, &["link", "set", &veth, "up"])?;
            ip_in(&netns, &["addr", "add", &address, "dev", "eth0"])?;
            ip_in(&netns, &["link", "set", "eth0", "up"])?;
            ip_in(&netns, &["route", "add", "default", "via", &gateway])?;
            Ok(())
        })();
        if let Err(e) = made {
            self.ipam.release(ip);
            let _ = tool::run(ip_cmd(&["netns", "del", &netns.name]), None);
            return Err(e.context(format!("creating the sandbox of pod {}", id.0)));
        }
        let sandbox = Sandbox { id, netns, ip, veth };
        self.sandboxes.insert(id, sandbox.clone());
        Ok(sandbox)
    }

    /// Removes a sandbox (CNI DEL). Its processes must have ended: a namespace lives on as
    /// long as a process is inside. The kernel finishes the teardown asynchronously.
    pub fn teardown_sandbox(&mut self, id: SandboxId, dead_pod: DeadPod) -> Result<()> {
        let Some(sandbox) = self.sandboxes.remove(&id) else {
            anyhow::bail!("no sandbox {} on this node", id.0);
        };
        tool::run(ip_cmd(&["netns", "del", &sandbox.netns.name]), None)?;
        // Deleting the namespace deletes the veth with it; say so explicitly in case a
        // process still holds it, so the bridge port goes away in any case.
        let _ = ip_in(&self.netns, &["link", "del", &sandbox.veth]);
        if dead_pod == DeadPod::Unreachable {
            // The entry may already be gone; nothing else can fail here.
            let _ = ip_in(&self.netns, &["neigh", "flush", "to", &sandbox.ip.to_string(), "dev", BRIDGE]);
        }
        self.ipam.release(sandbox.ip);
        Ok(())
    }

    /// Forgets every tracked connection (a new run starts on a fresh node: an entry left from
    /// the last one would steer a new connection from a reused client port to its old pod).
    pub fn flush_conntrack(&self) -> Result<()> {
        let mut cmd = Command::new("conntrack");
        cmd.arg("-F");
        tool::run(self.netns.command(cmd)?, None).map(drop).context("flushing the node's conntrack table")
    }

    /// Tears down every sandbox left (the end of a run).
    pub fn teardown_all(&mut self, dead_pod: DeadPod) -> Result<()> {
        let ids: Vec<SandboxId> = self.sandboxes.keys().copied().collect();
        for id in ids {
            self.teardown_sandbox(id, dead_pod)?;
        }
        Ok(())
    }

    /// Programs kube-proxy's rules for `services` as one atomic transaction; returns how long
    /// `nft` took.
    pub fn apply_services(&self, services: &[Service]) -> Result<Duration> {
        let text = Table::for_services(services).transaction();
        let started = Instant::now();
        let mut nft = Command::new("nft");
        nft.args(["-f", "-"]);
        tool::run(self.netns.command(nft)?, Some(&text))
            .context("applying kube-proxy's ruleset in the node namespace")?;
        Ok(started.elapsed())
    }

    /// Packets kube-proxy's `ct state invalid drop` has dropped since the table was last
    /// written (the rule's counter; each `apply_services` replaces the table).
    pub fn invalid_dropped(&self) -> Result<u64> {
        let mut nft = Command::new("nft");
        nft.args(["list", "chain", "ip", super::nft_ruleset::TABLE, "forward"]);
        let listing = tool::run(self.netns.command(nft)?, None).context("reading kube-proxy's forward chain")?.stdout;
        parse_counter_packets(&listing)
            .with_context(|| format!("no `counter packets N` in kube-proxy's forward chain:\n{listing}"))
    }
}

/// N in the first `counter packets N bytes M` of an `nft list` output.
fn parse_counter_packets(listing: &str) -> Option<u64> {
    let rest = &listing[listing.find("counter packets ")? + "counter packets ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn ip_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    cmd
}

fn add_netns(ns: &Netns) -> Result<()> {
    tool::run(ip_cmd(&["netns", "add", &ns.name]), None)?;
    ip_in(ns, &["link", "set", "lo", "up"])
}

/// `ip -n NS ARGS…`
fn ip_in(ns: &Netns, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", &ns.name]).args(args);
    tool::run(cmd, None).map(drop)
}

fn retry_file_exists(mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + REUSE_BOUND;
    loop {
        match f() {
            Err(e) if format!("{e:#}").contains("File exists") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_is_read_from_nfts_listing() {
        let listing = "table ip kube-proxy {\n\tchain forward {\n\t\tct state invalid counter packets 17 bytes 680 drop\n\t}\n}\n";
        assert_eq!(parse_counter_packets(listing), Some(17));
        assert_eq!(parse_counter_packets("chain forward {\n}"), None);
    }
}
