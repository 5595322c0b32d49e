//! kube-proxy's nftables mode as a typed table: verdict maps from (ClusterIP, protocol, port)
//! and from NodePorts to per-service chains, which spread new connections with `numgen random`
//! over per-endpoint chains that `dnat`; masquerade for hairpin and NodePort traffic; services
//! without usable endpoints are rejected. The whole table renders to one `nft -f` transaction.

use std::fmt;
use std::net::Ipv4Addr;

use super::service_model::Service;

/// The table's name in family `ip`, as kube-proxy names its own.
pub const TABLE: &str = "kube-proxy";
/// The packet mark that asks postrouting to masquerade (kube-proxy's value).
pub const MASQUERADE_MARK: u32 = 0x4000;

/// A chain name, made only of characters nft accepts unquoted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChainName(String);

impl ChainName {
    fn fixed(name: &str) -> ChainName {
        ChainName(name.to_owned())
    }
    fn of(parts: &[&str]) -> ChainName {
        let joined = parts.join("-");
        ChainName(joined.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect())
    }
    pub fn service(svc: &str, port: &str) -> ChainName {
        ChainName::of(&["service", svc, port])
    }
    pub fn external(svc: &str, port: &str) -> ChainName {
        ChainName::of(&["external", svc, port])
    }
    pub fn endpoint(svc: &str, port: &str, ip: Ipv4Addr, target_port: u16) -> ChainName {
        ChainName::of(&["endpoint", svc, port, &ip.to_string(), &target_port.to_string()])
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

const SERVICES: &str = "services";
const FORWARD: &str = "forward";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
const MASQUERADING: &str = "masquerading";
const REJECT: &str = "reject-chain";

/// The four verdict maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapName {
    ServiceIps,
    ServiceNodePorts,
    NoEndpointServices,
    NoEndpointNodePorts,
}

impl MapName {
    fn as_str(self) -> &'static str {
        match self {
            MapName::ServiceIps => "service-ips",
            MapName::ServiceNodePorts => "service-nodeports",
            MapName::NoEndpointServices => "no-endpoint-services",
            MapName::NoEndpointNodePorts => "no-endpoint-nodeports",
        }
    }
    fn by_node_port(self) -> bool {
        matches!(self, MapName::ServiceNodePorts | MapName::NoEndpointNodePorts)
    }
}

/// A map key: TCP to a ClusterIP and port, or to a NodePort on any local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKey {
    ClusterIp(Ipv4Addr, u16),
    NodePort(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictMap {
    pub name: MapName,
    pub elements: Vec<(MapKey, ChainName)>,
}

/// Where a base chain hangs in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    NatPrerouting,
    NatOutput,
    NatPostrouting,
    FilterForward,
    FilterOutput,
    FilterInput,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Jump(ChainName),
    Goto(ChainName),
    /// `ip daddr . meta l4proto . th dport vmap @map`
    LookupClusterIp(MapName),
    /// Same by NodePort, for packets to one of the node's own addresses.
    LookupNodePort(MapName),
    MarkForMasquerade,
    ReturnUnlessMarked,
    ClearMarkAndMasquerade,
    /// A pod reaching itself through its Service: masquerade so the reply comes back via the node.
    HairpinFrom(Ipv4Addr),
    Dnat(Ipv4Addr, u16),
    /// `numgen random mod N vmap { 0 : goto …, … }`
    Spread(Vec<ChainName>),
    Reject,
    /// `ct state invalid counter drop`: a packet conntrack could not place (a SYN-ACK or RST
    /// with no connection, one out of its window) skips NAT, so a packet to a ClusterIP would
    /// be forwarded as it is, to an address nobody has. kube-proxy drops them unless
    /// `nf_conntrack_tcp_be_liberal` is set (it is not in the node's namespace); the counter is
    /// ours, to report what was dropped (kube-proxy counts them in iptables mode).
    DropInvalid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: ChainName,
    pub hook: Option<Hook>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub maps: Vec<VerdictMap>,
    pub chains: Vec<Chain>,
}

impl Table {
    /// kube-proxy's rules for `services`.
    pub fn for_services(services: &[Service]) -> Table {
        let mut maps =
            [MapName::ServiceIps, MapName::ServiceNodePorts, MapName::NoEndpointServices, MapName::NoEndpointNodePorts]
                .map(|name| VerdictMap { name, elements: vec![] });
        let fixed = ChainName::fixed;
        let mut chains = vec![
            base(Hook::NatPrerouting, vec![Rule::Jump(fixed(SERVICES))]),
            base(Hook::NatOutput, vec![Rule::Jump(fixed(SERVICES))]),
            base(Hook::NatPostrouting, vec![Rule::Jump(fixed(MASQUERADING))]),
            base(
                Hook::FilterForward,
                vec![Rule::LookupClusterIp(MapName::NoEndpointServices), Rule::Jump(fixed(FORWARD))],
            ),
            base(Hook::FilterOutput, vec![Rule::LookupClusterIp(MapName::NoEndpointServices)]),
            base(Hook::FilterInput, vec![Rule::LookupNodePort(MapName::NoEndpointNodePorts)]),
            Chain {
                name: fixed(SERVICES),
                hook: None,
                rules: vec![
                    Rule::LookupClusterIp(MapName::ServiceIps),
                    Rule::LookupNodePort(MapName::ServiceNodePorts),
                ],
            },
            Chain { name: fixed(MARK_FOR_MASQUERADE), hook: None, rules: vec![Rule::MarkForMasquerade] },
            Chain {
                name: fixed(MASQUERADING),
                hook: None,
                rules: vec![Rule::ReturnUnlessMarked, Rule::ClearMarkAndMasquerade],
            },
            Chain { name: fixed(REJECT), hook: None, rules: vec![Rule::Reject] },
            Chain { name: fixed(FORWARD), hook: None, rules: vec![Rule::DropInvalid] },
        ];
        let [service_ips, node_ports, no_ep_services, no_ep_node_ports] = &mut maps;
        for svc in services {
            for port in &svc.ports {
                let usable = port.usable_endpoints();
                let cluster_key = MapKey::ClusterIp(svc.cluster_ip, port.port);
                if usable.is_empty() {
                    no_ep_services.elements.push((cluster_key, fixed(REJECT)));
                    if let Some(np) = port.node_port {
                        no_ep_node_ports.elements.push((MapKey::NodePort(np), fixed(REJECT)));
                    }
                    continue;
                }
                let service_chain = ChainName::service(&svc.name, &port.name);
                let mut targets = Vec::new();
                for ep in &usable {
                    let name = ChainName::endpoint(&svc.name, &port.name, ep.ip, ep.port);
                    chains.push(Chain {
                        name: name.clone(),
                        hook: None,
                        rules: vec![Rule::HairpinFrom(ep.ip), Rule::Dnat(ep.ip, ep.port)],
                    });
                    targets.push(name);
                }
                chains.push(Chain { name: service_chain.clone(), hook: None, rules: vec![Rule::Spread(targets)] });
                service_ips.elements.push((cluster_key, service_chain.clone()));
                if let Some(np) = port.node_port {
                    let external = ChainName::external(&svc.name, &port.name);
                    chains.push(Chain {
                        name: external.clone(),
                        hook: None,
                        rules: vec![Rule::Jump(fixed(MARK_FOR_MASQUERADE)), Rule::Goto(service_chain)],
                    });
                    node_ports.elements.push((MapKey::NodePort(np), external));
                }
            }
        }
        Table { maps: maps.into(), chains }
    }

    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name.as_str() == name)
    }

    pub fn map(&self, name: MapName) -> &VerdictMap {
        self.maps.iter().find(|m| m.name == name).expect("every table has all four maps")
    }

    /// One atomic `nft -f` transaction that replaces the whole table (adding it first makes
    /// the delete valid on the first run).
    pub fn transaction(&self) -> String {
        format!("add table ip {TABLE}\ndelete table ip {TABLE}\n{self}")
    }
}

fn base(hook: Hook, rules: Vec<Rule>) -> Chain {
    let name = match hook {
        Hook::NatPrerouting => "nat-prerouting",
        Hook::NatOutput => "nat-output",
        Hook::NatPostrouting => "nat-postrouting",
        Hook::FilterForward => "filter-forward",
        Hook::FilterOutput => "filter-output",
        Hook::FilterInput => "filter-input",
    };
    Chain { name: ChainName::fixed(name), hook: Some(hook), rules }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, hook, priority) = match self {
            Hook::NatPrerouting => ("nat", "prerouting", "dstnat"),
            Hook::NatOutput => ("nat", "output", "-100"),
            Hook::NatPostrouting => ("nat", "postrouting", "srcnat"),
            Hook::FilterForward => ("filter", "forward", "-110"),
            Hook::FilterOutput => ("filter", "output", "-110"),
            Hook::FilterInput => ("filter", "input", "-110"),
        };
        write!(f, "type {kind} hook {hook} priority {priority}; policy accept;")
    }
}

impl fmt::Display for MapKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapKey::ClusterIp(ip, port) => write!(f, "{ip} . tcp . {port}"),
            MapKey::NodePort(port) => write!(f, "tcp . {port}"),
        }
    }
}

impl fmt::Display for VerdictMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.name.by_node_port() {
            "inet_proto . inet_service"
        } else {
            "ipv4_addr . inet_proto . inet_service"
        };
        writeln!(f, "  map {} {{", self.name.as_str())?;
        writeln!(f, "    type {key} : verdict")?;
        if !self.elements.is_empty() {
            let elements: Vec<String> =
                self.elements.iter().map(|(k, chain)| format!("{k} : goto {}", chain.as_str())).collect();
            writeln!(f, "    elements = {{ {} }}", elements.join(", "))?;
        }
        writeln!(f, "  }}")
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Jump(c) => write!(f, "jump {}", c.as_str()),
            Rule::Goto(c) => write!(f, "goto {}", c.as_str()),
            Rule::LookupClusterIp(m) => write!(f, "ip daddr . meta l4proto . th dport vmap @{}", m.as_str()),
            Rule::LookupNodePort(m) => {
                write!(f, "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @{}", m.as_str())
            }
            Rule::MarkForMasquerade => write!(f, "meta mark set meta mark or {MASQUERADE_MARK:#x}"),
            Rule::ReturnUnlessMarked => write!(f, "meta mark & {MASQUERADE_MARK:#x} == 0 return"),
            Rule::ClearMarkAndMasquerade => {
                write!(f, "meta mark set meta mark xor {MASQUERADE_MARK:#x} masquerade fully-random")
            }
            Rule::HairpinFrom(ip) => write!(f, "ip saddr {ip} jump {MARK_FOR_MASQUERADE}"),
            Rule::Dnat(ip, port) => write!(f, "meta l4proto tcp dnat to {ip}:{port}"),
            Rule::Spread(targets) => {
                let arms: Vec<String> =
                    targets.iter().enumerate().map(|(i, c)| format!("{i} : goto {}", c.as_str())).collect();
                write!(f, "numgen random mod {} vmap {{ {} }}", targets.len(), arms.join(", "))
            }
            Rule::Reject => write!(f, "reject"),
            Rule::DropInvalid => write!(f, "ct state invalid counter drop"),
        }
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  chain {} {{", self.name.as_str())?;
        if let Some(hook) = self.hook {
            writeln!(f, "    {hook}")?;
        }
        for rule in &self.rules {
            writeln!(f, "    {rule}")?;
        }
        writeln!(f, "  }}")
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table ip {TABLE} {{")?;
        for map in &self.maps {
            write!(f, "{map}")?;
        }
        for chain in &self.chains {
            write!(f, "{chain}")?;
        }
        writeln!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::service_model::{Endpoint, ServicePort};
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    fn web(endpoints: Vec<Endpoint>, node_port: Option<u16>) -> Service {
        Service {
            name: "web".into(),
            cluster_ip: VIP,
            ports: vec![ServicePort { name: "http".into(), port: 80, node_port, endpoints }],
        }
    }

    #[test]
    fn a_service_spreads_over_its_ready_endpoints_which_dnat() {
        let t = Table::for_services(&[web(vec![Endpoint::ready(A, 5000), Endpoint::ready(B, 5000)], None)]);
        let svc = ChainName::service("web", "http");
        assert_eq!(t.map(MapName::ServiceIps).elements, vec![(MapKey::ClusterIp(VIP, 80), svc.clone())]);
        let ea = ChainName::endpoint("web", "http", A, 5000);
        let eb = ChainName::endpoint("web", "http", B, 5000);
        assert_eq!(t.chain(svc.as_str()).unwrap().rules, vec![Rule::Spread(vec![ea.clone(), eb])]);
        assert_eq!(t.chain(ea.as_str()).unwrap().rules, vec![Rule::HairpinFrom(A), Rule::Dnat(A, 5000)]);
        assert_eq!(ea.as_str(), "endpoint-web-http-10_244_0_2-5000");
    }

    #[test]
    fn terminating_endpoints_only_when_no_ready_one() {
        let t =
            Table::for_services(&[web(vec![Endpoint::ready(A, 5000), Endpoint::serving_terminating(B, 5000)], None)]);
        assert!(t.chain(ChainName::endpoint("web", "http", B, 5000).as_str()).is_none());
        let t = Table::for_services(&[web(vec![Endpoint::serving_terminating(B, 5000)], None)]);
        let svc = t.chain("service-web-http").unwrap();
        assert_eq!(svc.rules, vec![Rule::Spread(vec![ChainName::endpoint("web", "http", B, 5000)])]);
    }

    #[test]
    fn no_usable_endpoint_rejects_both_cluster_ip_and_node_port() {
        let t = Table::for_services(&[web(vec![], Some(30080))]);
        assert!(t.map(MapName::ServiceIps).elements.is_empty());
        assert_eq!(
            t.map(MapName::NoEndpointServices).elements,
            vec![(MapKey::ClusterIp(VIP, 80), ChainName::fixed(REJECT))]
        );
        assert_eq!(
            t.map(MapName::NoEndpointNodePorts).elements,
            vec![(MapKey::NodePort(30080), ChainName::fixed(REJECT))]
        );
    }

    #[test]
    fn node_port_is_masqueraded_then_joins_the_service_chain() {
        let t = Table::for_services(&[web(vec![Endpoint::ready(A, 5000)], Some(30080))]);
        let ext = ChainName::external("web", "http");
        assert_eq!(t.map(MapName::ServiceNodePorts).elements, vec![(MapKey::NodePort(30080), ext.clone())]);
        assert_eq!(
            t.chain(ext.as_str()).unwrap().rules,
            vec![Rule::Jump(ChainName::fixed(MARK_FOR_MASQUERADE)), Rule::Goto(ChainName::service("web", "http"))]
        );
    }

    #[test]
    fn forwarded_packets_conntrack_could_not_place_are_dropped() {
        let t = Table::for_services(&[web(vec![Endpoint::ready(A, 5000)], None)]);
        let forward = t.chain("filter-forward").unwrap();
        assert_eq!(forward.hook, Some(Hook::FilterForward));
        assert_eq!(forward.rules.last(), Some(&Rule::Jump(ChainName::fixed(FORWARD))));
        assert_eq!(t.chain(FORWARD).unwrap().rules, vec![Rule::DropInvalid]);
    }

    #[test]
    fn each_endpoint_dnats_to_its_own_port() {
        let t = Table::for_services(&[web(vec![Endpoint::ready(A, 5000), Endpoint::ready(B, 8080)], None)]);
        let eb = t.chain(ChainName::endpoint("web", "http", B, 8080).as_str()).unwrap();
        assert_eq!(eb.rules[1], Rule::Dnat(B, 8080));
    }

    #[test]
    fn renders_one_transaction_that_replaces_the_table() {
        let text = Table::for_services(&[web(vec![Endpoint::ready(A, 5000), Endpoint::ready(B, 5000)], Some(30080))])
            .transaction();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(lines[..3], ["add table ip kube-proxy", "delete table ip kube-proxy", "table ip kube-proxy {"]);
        for expected in [
            "elements = { 10.96.0.10 . tcp . 80 : goto service-web-http }",
            "elements = { tcp . 30080 : goto external-web-http }",
            "numgen random mod 2 vmap { 0 : goto endpoint-web-http-10_244_0_2-5000, 1 : goto endpoint-web-http-10_244_0_3-5000 }",
            "meta l4proto tcp dnat to 10.244.0.3:5000",
            "ip saddr 10.244.0.2 jump mark-for-masquerade",
            "type nat hook prerouting priority dstnat; policy accept;",
            "type nat hook output priority -100; policy accept;",
            "meta mark set meta mark xor 0x4000 masquerade fully-random",
            "jump forward",
            "ct state invalid counter drop",
        ] {
            assert!(lines.contains(&expected), "missing `{expected}` in\n{text}");
        }
        // An empty map has no `elements` line (nft rejects an empty set literal).
        assert!(!text.contains("elements = {  }"));
    }
}
