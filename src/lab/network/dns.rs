//! Cluster DNS as pods see it: Service names (short only from the same namespace) to the lab's
//! proxy for that port. There is no resolver: the names reach the binary through its curl-style
//! connect override (`upstream.resolve`) and through rewritten hook URLs.

use std::net::SocketAddr;

/// One Service port as DNS + kube-proxy present it to pods.
#[derive(Debug, Clone)]
pub struct ServiceDns {
    pub name: String,
    pub namespace: String,
    pub port: u16,
    pub port_name: Option<String>,
    /// Where the lab's proxy for that port listens.
    pub proxy: SocketAddr,
}

impl ServiceDns {
    /// The names a pod in `ns` can use: the short one only from the same namespace.
    pub fn names_from(&self, ns: &str) -> Vec<String> {
        let mut v = vec![
            format!("{}.{}", self.name, self.namespace),
            format!("{}.{}.svc", self.name, self.namespace),
            format!("{}.{}.svc.cluster.local", self.name, self.namespace),
        ];
        if ns == self.namespace {
            v.insert(0, self.name.clone());
        }
        v
    }
}
