//! The kernel node: the lab's cluster network made of real namespaces, veths, a bridge and
//! kube-proxy's nftables rules, all inside a private world that vanishes with the lab.
//!
//! Links, addresses and routes are set with iproute2's `ip -n NS`: each call names its
//! namespace, so no thread has to be moved between namespaces, and a failure reads as the
//! command a person would type; rtnetlink would add an async netlink stack for a few dozen calls
//! per lab. nftables rules are generated from a typed table and applied with one `nft -f -`.

pub mod conntrack;
pub mod from_lab;
pub mod netns;
pub mod nft_ruleset;
pub mod node;
pub mod pod_ipam;
pub mod private_world;
pub mod service_model;
pub mod tool;
