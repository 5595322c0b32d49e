//! Creating a pod from a template, as a ReplicaSet and the scheduler would: a name with the
//! template hash, an address, labels, and a kubelet worker that starts the container.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec};
use rand::Rng;

use crate::lab::api::cluster::{Cluster, Pod};
use crate::lab::network::ipam::Net;
use crate::lab::node::kubelet::{self, KubeletOptions, PodHandle};
use crate::lab::node::pod_spec::{self, PodContext, ServiceDns};

/// The lab's only node.
pub const NODE_NAME: &str = "lab-node";

pub struct PodFactory {
    pub cluster: Arc<Cluster>,
    pub net: Arc<Net>,
    pub exe: PathBuf,
    /// Per-pod directories (volumes) and log files go under here.
    pub run_dir: PathBuf,
    pub config_maps: Vec<ConfigMap>,
    pub services: Vec<ServiceDns>,
    pub otlp_endpoint: Option<String>,
    pub kubelet: KubeletOptions,
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
    pub fn log_path(&self, pod: &str) -> PathBuf {
        self.run_dir.join("pods").join(format!("{pod}.log"))
    }

    pub fn create(
        &self,
        deployment: &str,
        namespace: &str,
        template: &PodTemplateSpec,
        hash: &str,
    ) -> Result<PodHandle> {
        let name = format!("{deployment}-{hash}-{}", random_suffix(5));
        let mut labels = template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
        labels.insert("pod-template-hash".into(), hash.to_string());
        let c = template.spec.as_ref().and_then(|s| s.containers.first()).context("template has no container")?;
        let ports: Vec<u16> = c.ports.iter().flatten().filter_map(|p| u16::try_from(p.container_port).ok()).collect();
        let net = self.net.pod(&ports).context("allocating a pod address")?;
        let dir = self.run_dir.join("pods").join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let uid = format!("{:032x}", rand::random::<u128>());
        let ctx = PodContext {
            name: &name,
            namespace,
            uid: &uid,
            labels: &labels,
            net: &net,
            node: NODE_NAME,
            exe: &self.exe,
            dir: &dir,
            config_maps: &self.config_maps,
            services: &self.services,
            otlp_endpoint: self.otlp_endpoint.as_deref(),
        };
        let plan = pod_spec::plan(template, &ctx).with_context(|| format!("Deployment/{deployment}: pod {name}"))?;
        self.cluster.add_pod(Pod {
            name: name.clone(),
            namespace: namespace.to_string(),
            deployment: deployment.to_string(),
            template_hash: hash.to_string(),
            labels,
            ip: net.ip,
            net,
            named_ports: plan.named_ports.clone(),
            created: self.cluster.clock.now(),
            running: false,
            started: false,
            ready: false,
            ready_since: None,
            deleted: None,
            sigterm: None,
            exited: None,
            gone: None,
            restarts: 0,
        });
        let log = self.log_path(&name);
        Ok(kubelet::start(self.cluster.clone(), name, plan, log, self.kubelet.clone()))
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
