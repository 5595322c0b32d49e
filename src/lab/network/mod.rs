//! The cluster network: pod and Service addresses, kube-proxy, the HTTP client on loopback.

pub mod dns;
pub mod http_client;
pub mod ipam;
pub mod service_proxy;
