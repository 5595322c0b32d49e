//! What the rendered solution overlay declares for the backend container, read with the
//! Kubernetes types: the pod and the container, their merged securityContext (by the lab
//! runtime's own rules), the preStop command and the ConfigMap behind the config mount.

use std::collections::BTreeMap;

use graceful::lab::node::oci::Security;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec};
use serde::Deserialize;

const RENDERED: &str = include_str!("../../deploy/rendered/solution.yaml");

pub struct Backend {
    pub pod: PodSpec,
    pub container: Container,
    pub pre_stop: Vec<String>,
    pub config_mount: String,
    pub config_files: BTreeMap<String, String>,
    pub security: Security,
}

impl Backend {
    /// The declared user and group (the manifests set both).
    pub fn uid_gid(&self) -> (u32, u32) {
        (self.security.run_as_user.expect("runAsUser"), self.security.run_as_group.expect("runAsGroup"))
    }
}

pub fn backend() -> Backend {
    let mut deployment = None;
    let mut config_maps = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(RENDERED) {
        let value = serde_yaml::Value::deserialize(doc).expect("a YAML document");
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
        let name = value["metadata"]["name"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "Deployment" if name == "backend" => {
                deployment = Some(serde_yaml::from_value::<Deployment>(value).unwrap())
            }
            "ConfigMap" => config_maps.push(serde_yaml::from_value::<ConfigMap>(value).unwrap()),
            _ => {}
        }
    }
    let deployment = deployment.expect("the solution overlay renders a backend Deployment");
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let container = pod.containers.iter().find(|c| c.name == "backend").expect("container backend").clone();

    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/etc/graceful")
        .expect("the config mount at /etc/graceful");
    assert_eq!(mount.read_only, Some(true), "the config mount is declared read-only");
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).expect("the mount's volume");
    let map_name = &volume.config_map.as_ref().expect("a ConfigMap volume").name;
    let map = config_maps
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(map_name))
        .unwrap_or_else(|| panic!("ConfigMap {map_name} in the render"));
    let security = Security::from_kubernetes(pod.security_context.as_ref(), container.security_context.as_ref())
        .unwrap_or_else(|e| panic!("{e:#}"));

    Backend {
        pre_stop: container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone())
            .expect("an exec preStop hook"),
        config_mount: mount.mount_path.clone(),
        config_files: map.data.clone().unwrap_or_default(),
        security,
        container,
        pod,
    }
}
