//! Pod identity from the Downward API environment, with host fallbacks off-cluster.

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Identity {
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_ip: String,
    pub node_name: String,
}

impl Identity {
    pub fn from_env() -> Self {
        let host = hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Identity {
            pod_name: var("POD_NAME").unwrap_or_else(|| host.clone()),
            pod_namespace: var("POD_NAMESPACE").unwrap_or_else(|| "default".into()),
            pod_ip: var("POD_IP").unwrap_or_default(),
            node_name: var("NODE_NAME").unwrap_or(host),
        }
    }
}
