//! What the rendered solution overlay declares for the backend container, read with the
//! Kubernetes types: its args, env, preStop command, ConfigMap mount and securityContext
//! (container fields over the pod's, as the kubelet merges them).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container};
use serde::Deserialize;

const RENDERED: &str = include_str!("../../deploy/rendered/solution.yaml");

/// The securityContext the runtime must apply, resolved to the values that matter to it.
#[derive(Debug)]
pub struct Security {
    pub uid: u32,
    pub gid: u32,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
    /// Capabilities left after `drop` and `add` (the manifests drop ALL and add none).
    pub capabilities: Vec<String>,
    /// `RuntimeDefault` in the manifests; the test runs its own profile of that kind.
    pub seccomp: String,
}

pub struct Backend {
    pub args: Vec<String>,
    /// Literal env values; Downward API fields are filled in by the caller.
    pub env: Vec<(String, Option<String>)>,
    pub pre_stop: Vec<String>,
    pub config_mount: String,
    pub config_files: BTreeMap<String, String>,
    pub security: Security,
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
    let container: &Container = pod.containers.iter().find(|c| c.name == "backend").expect("container backend");

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

    Backend {
        args: container.args.clone().unwrap_or_default(),
        env: container.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone())).collect(),
        pre_stop: container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone())
            .expect("an exec preStop hook"),
        config_mount: mount.mount_path.clone(),
        config_files: map.data.clone().unwrap_or_default(),
        security: security(container, pod.security_context.as_ref()),
    }
}

fn security(c: &Container, pod: Option<&k8s_openapi::api::core::v1::PodSecurityContext>) -> Security {
    let sc = c.security_context.clone().unwrap_or_default();
    let uid = sc.run_as_user.or(pod.and_then(|p| p.run_as_user)).expect("runAsUser");
    let gid = sc.run_as_group.or(pod.and_then(|p| p.run_as_group)).expect("runAsGroup");
    let non_root = sc.run_as_non_root.or(pod.and_then(|p| p.run_as_non_root)).unwrap_or(false);
    assert!(!non_root || uid != 0, "runAsNonRoot with runAsUser 0");
    let caps = sc.capabilities.unwrap_or_default();
    let dropped = caps.drop.unwrap_or_default();
    // With drop ALL only `add` remains; a partial drop would need the runtime's default set.
    assert!(dropped.iter().any(|d| d == "ALL"), "the manifests drop ALL capabilities, got {dropped:?}");
    let seccomp = sc
        .seccomp_profile
        .or(pod.and_then(|p| p.seccomp_profile.clone()))
        .map(|p| p.type_)
        .unwrap_or_else(|| "Unconfined".into());
    Security {
        uid: u32::try_from(uid).expect("a uid"),
        gid: u32::try_from(gid).expect("a gid"),
        read_only_root: sc.read_only_root_filesystem.unwrap_or(false),
        no_new_privileges: sc.allow_privilege_escalation == Some(false),
        capabilities: caps.add.unwrap_or_default().iter().map(|c| format!("CAP_{c}")).collect(),
        seccomp,
    }
}
