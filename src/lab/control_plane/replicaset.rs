//! Creating a pod from a template, as a ReplicaSet and the scheduler would: a name with the
//! template hash, an address and labels, written to the store, where the kubelet finds it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use rand::Rng;

use crate::lab::api::cluster::{named_ports, Cluster, Pod};
use crate::lab::network::ipam::Net;

/// The ReplicaSet controller's part: pod objects from a template, in the store.
pub struct PodFactory {
    pub cluster: Arc<Cluster>,
    /// Pod addresses (the CNI's part, done here so the pod object carries its IP from the start).
    pub net: Arc<Net>,
    /// Where the node keeps pod files, for error messages that point there.
    pub pods_dir: PathBuf,
}

/// Kubernetes' alphabet for generated suffixes (no vowels, no look-alikes).
const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

pub fn random_suffix(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n).map(|_| ALPHANUMS[rng.random_range(0..ALPHANUMS.len())] as char).collect()
}

/// A stable `pod-template-hash`-like tag for a template (FNV-1a over its JSON).
pub fn template_hash(template: &PodTemplateSpec) -> String {
    let json = serde_json::to_vec(template).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in json {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (0..10).map(|i| ALPHANUMS[((h >> (i * 6)) % ALPHANUMS.len() as u64) as usize] as char).collect()
}

impl PodFactory {
    /// Adds a pod for `template` to the store and returns its name; the kubelet starts it.
    pub fn create(&self, deployment: &str, namespace: &str, template: &PodTemplateSpec, hash: &str) -> Result<String> {
        let name = format!("{deployment}-{hash}-{}", random_suffix(5));
        let mut labels = template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
        labels.insert("pod-template-hash".into(), hash.to_string());
        let c = template.spec.as_ref().and_then(|s| s.containers.first()).context("template has no container")?;
        let ports: Vec<u16> = c.ports.iter().flatten().filter_map(|p| u16::try_from(p.container_port).ok()).collect();
        let net = self.net.pod(&ports).context("allocating a pod address")?;
        self.cluster.add_pod(Pod {
            namespace: namespace.to_string(),
            labels,
            named_ports: named_ports(c),
            created: self.cluster.clock.now(),
            spec: Arc::new(template.clone()),
            uid: format!("{:032x}", rand::random::<u128>()),
            ..Pod::new(&name, deployment, hash, net)
        });
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_change_with_the_template() {
        let mut t = PodTemplateSpec::default();
        let a = template_hash(&t);
        t.metadata = Some(Default::default());
        t.metadata.as_mut().unwrap().annotations =
            Some([("kubectl.kubernetes.io/restartedAt".to_string(), "x".to_string())].into());
        let b = template_hash(&t);
        assert_ne!(a, b);
        assert_eq!(a.len(), 10);
        assert_eq!(a, template_hash(&PodTemplateSpec::default()));
    }
}
