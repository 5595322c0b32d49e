//! Reads a rendered overlay (multi-document YAML) into typed Kubernetes objects.
//!
//! Dispatches on `kind`; every object goes through k8s-openapi's own types, and a round trip
//! catches fields those types do not know (k8s-openapi skips unknown keys silently, so a typo
//! such as `readinesProbe` would otherwise vanish). Fields the lab cannot play are errors that
//! name the object and the field; fields that only matter to a scheduler or a node are accepted
//! and listed in docs/lab.md.

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Probe, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

/// Kinds accepted and set aside: they take no part in a rollout's termination race.
const IGNORED_KINDS: &[&str] = &[
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "NetworkPolicy",
    "Secret",
    "LimitRange",
    "ResourceQuota",
];

/// One rendered overlay, typed.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    /// Where it came from, for messages ("problem", a file name, "stdin").
    pub source: String,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub config_maps: Vec<ConfigMap>,
    pub pdbs: Vec<PodDisruptionBudget>,
    /// Objects accepted but not played, e.g. "Namespace/task-03".
    pub ignored: Vec<String>,
}

/// `Kind/name` for messages.
pub fn object_id(kind: &str, name: Option<&str>) -> String {
    format!("{kind}/{}", name.unwrap_or("<unnamed>"))
}

pub fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

/// Parses every document of `text`. `source` names the input in errors.
pub fn parse(source: &str, text: &str) -> Result<Manifest> {
    let mut m = Manifest { source: source.to_string(), ..Default::default() };
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            Value::deserialize(doc).with_context(|| format!("{source}: document {} is not valid YAML", i + 1))?;
        add_value(&mut m, value, &format!("{source}: document {}", i + 1))?;
    }
    validate(&m)?;
    Ok(m)
}

fn add_value(m: &mut Manifest, value: Value, at: &str) -> Result<()> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value.get("kind").and_then(Value::as_str).map(str::to_string);
    let name = value.get("metadata").and_then(|md| md.get("name")).and_then(Value::as_str).map(str::to_string);
    let Some(kind) = kind else { bail!("{at}: object has no `kind`") };
    let id = object_id(&kind, name.as_deref());
    match kind.as_str() {
        "List" => {
            let items = value.get("items").and_then(Value::as_sequence).cloned().unwrap_or_default();
            for item in items {
                add_value(m, item, at)?;
            }
        }
        "Deployment" => m.deployments.push(typed(value, &id)?),
        "Service" => m.services.push(typed(value, &id)?),
        "ConfigMap" => m.config_maps.push(typed(value, &id)?),
        "PodDisruptionBudget" => m.pdbs.push(typed(value, &id)?),
        k if IGNORED_KINDS.contains(&k) => m.ignored.push(id),
        other => bail!(
            "{id}: kind `{other}` is not something the lab can play (it plays Deployment, Service, ConfigMap, \
             PodDisruptionBudget; it sets aside {})",
            IGNORED_KINDS.join(", ")
        ),
    }
    Ok(())
}

/// Deserializes into a k8s-openapi type and rejects keys the type does not know.
fn typed<T: DeserializeOwned + Serialize>(value: Value, id: &str) -> Result<T> {
    let obj: T = serde_yaml::from_value(value.clone()).map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
    let back = serde_yaml::to_value(&obj).with_context(|| format!("{id}: cannot re-serialize"))?;
    let mut unknown = Vec::new();
    unknown_fields(&value, &back, "", &mut unknown);
    if let Some(field) = unknown.first() {
        bail!("{id}: unknown field `{field}` (not in the Kubernetes 1.33 API; a typo?)");
    }
    Ok(obj)
}

/// Keys present in `input` and absent from the typed round trip `back`.
fn unknown_fields(input: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (input, back) {
        (Value::Mapping(a), Value::Mapping(b)) => {
            for (k, v) in a {
                let key = k.as_str().map(str::to_string).unwrap_or_else(|| format!("{k:?}"));
                let p = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match b.get(k) {
                    Some(bv) => unknown_fields(v, bv, &p, out),
                    // A null value is the same as an absent one.
                    None if v.is_null() => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Sequence(a), Value::Sequence(b)) => {
            for (i, (av, bv)) in a.iter().zip(b.iter()).enumerate() {
                unknown_fields(av, bv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The lab's subset: anything else is refused here with the object and field named.
fn validate(m: &Manifest) -> Result<()> {
    for d in &m.deployments {
        let id = object_id("Deployment", d.metadata.name.as_deref());
        let spec = d.spec.as_ref().with_context(|| format!("{id}: no spec"))?;
        if spec.paused == Some(true) {
            bail!("{id}: spec.paused is true; a paused Deployment does not roll");
        }
        if spec.selector.match_expressions.as_ref().is_some_and(|e| !e.is_empty()) {
            bail!("{id}: spec.selector.matchExpressions is not supported (use matchLabels)");
        }
        let sel = spec.selector.match_labels.clone().unwrap_or_default();
        if sel.is_empty() {
            bail!("{id}: spec.selector.matchLabels is empty");
        }
        let labels = spec.template.metadata.as_ref().and_then(|md| md.labels.clone()).unwrap_or_default();
        if !sel.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            bail!("{id}: spec.selector does not match spec.template.metadata.labels (the API server would refuse it)");
        }
        if let Some(strategy) = &spec.strategy {
            match strategy.type_.as_deref() {
                None | Some("RollingUpdate") | Some("Recreate") => {}
                Some(other) => bail!("{id}: spec.strategy.type `{other}` is not RollingUpdate or Recreate"),
            }
        }
        let pod = spec.template.spec.as_ref().with_context(|| format!("{id}: no spec.template.spec"))?;
        validate_pod(&id, pod, m)?;
    }
    for s in &m.services {
        let id = object_id("Service", s.metadata.name.as_deref());
        let spec = s.spec.as_ref().with_context(|| format!("{id}: no spec"))?;
        if spec.type_.as_deref() == Some("ExternalName") {
            bail!("{id}: spec.type ExternalName has no endpoints to play");
        }
        if spec.session_affinity.as_deref().is_some_and(|a| a != "None") {
            bail!("{id}: spec.sessionAffinity `{}` is not supported (the lab's proxy picks endpoints at random, as kube-proxy does without affinity)", spec.session_affinity.as_deref().unwrap_or_default());
        }
        if spec.selector.as_ref().is_none_or(|s| s.is_empty()) {
            bail!("{id}: spec.selector is empty; Services with hand-made Endpoints are not supported");
        }
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            if p.protocol.as_deref().is_some_and(|p| p != "TCP") {
                bail!("{id}: spec.ports[{i}].protocol must be TCP");
            }
        }
    }
    for p in &m.pdbs {
        let id = object_id("PodDisruptionBudget", p.metadata.name.as_deref());
        let spec = p.spec.as_ref().with_context(|| format!("{id}: no spec"))?;
        if spec.selector.as_ref().and_then(|s| s.match_expressions.as_ref()).is_some_and(|e| !e.is_empty()) {
            bail!("{id}: spec.selector.matchExpressions is not supported");
        }
    }
    Ok(())
}

fn validate_pod(id: &str, pod: &PodSpec, m: &Manifest) -> Result<()> {
    let at = "spec.template.spec";
    let refuse = |field: &str, why: &str| anyhow::anyhow!("{id}: {at}.{field} is not supported: {why}");
    if pod.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(refuse("initContainers", "the lab runs one container per pod"));
    }
    if pod.ephemeral_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(refuse("ephemeralContainers", "the lab runs one container per pod"));
    }
    if pod.containers.len() != 1 {
        return Err(refuse("containers", "the lab runs exactly one container per pod"));
    }
    if pod.host_network == Some(true) {
        return Err(refuse("hostNetwork", "each lab pod has its own loopback address"));
    }
    if pod.readiness_gates.as_ref().is_some_and(|g| !g.is_empty()) {
        return Err(refuse("readinessGates", "nothing in the lab would ever set those conditions"));
    }
    if pod.host_aliases.as_ref().is_some_and(|g| !g.is_empty()) {
        return Err(refuse("hostAliases", "the lab resolves only Service names"));
    }
    if pod.restart_policy.as_deref().is_some_and(|p| p != "Always") {
        return Err(refuse("restartPolicy", "a Deployment's pods always use Always"));
    }
    for (i, v) in pod.volumes.iter().flatten().enumerate() {
        if let Some(cm) = &v.config_map {
            let found = m.config_maps.iter().any(|c| c.metadata.name.as_deref() == Some(cm.name.as_str()));
            if !found && cm.optional != Some(true) {
                bail!("{id}: {at}.volumes[{i}].configMap.name `{}` names no ConfigMap in this manifest", cm.name);
            }
        } else if v.empty_dir.is_none() {
            return Err(refuse(
                &format!("volumes[{i}] ({})", v.name),
                "only configMap and emptyDir volumes are played",
            ));
        }
    }
    let c = &pod.containers[0];
    validate_container(id, &format!("{at}.containers[0]"), c, pod)
}

fn validate_container(id: &str, at: &str, c: &Container, pod: &PodSpec) -> Result<()> {
    let refuse = |field: &str, why: &str| anyhow::anyhow!("{id}: {at}.{field} is not supported: {why}");
    if c.restart_policy.is_some() {
        return Err(refuse("restartPolicy", "sidecar containers are not played"));
    }
    if c.volume_devices.as_ref().is_some_and(|d| !d.is_empty()) {
        return Err(refuse("volumeDevices", "no block devices in the lab"));
    }
    if let Some(cmd) = &c.command {
        let first = cmd.first().map(String::as_str).unwrap_or("");
        if !is_graceful_binary(first) {
            return Err(refuse(
                "command",
                &format!("`{first}`: the lab runs only this project's binary (basename `graceful`)"),
            ));
        }
    }
    if let Some(lc) = &c.lifecycle {
        if lc.post_start.is_some() {
            return Err(refuse("lifecycle.postStart", "not played"));
        }
        if let Some(h) = &lc.pre_stop {
            if h.tcp_socket.is_some() {
                return Err(refuse("lifecycle.preStop.tcpSocket", "deprecated and never run by the kubelet either"));
            }
            if let Some(g) = &h.http_get {
                if g.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                    return Err(refuse("lifecycle.preStop.httpGet.scheme", "only HTTP"));
                }
            }
        }
        if let Some(sig) = &lc.stop_signal {
            if crate::lab::api::signal::stop_signal(sig).is_none() {
                return Err(refuse("lifecycle.stopSignal", &format!("unknown signal `{sig}`")));
            }
        }
    }
    for (name, probe) in [
        ("startupProbe", &c.startup_probe),
        ("readinessProbe", &c.readiness_probe),
        ("livenessProbe", &c.liveness_probe),
    ] {
        if let Some(p) = probe {
            validate_probe(id, &format!("{at}.{name}"), p)?;
        }
    }
    for (i, e) in c.env.iter().flatten().enumerate() {
        if let Some(src) = &e.value_from {
            if src.secret_key_ref.is_some() {
                return Err(refuse(&format!("env[{i}] ({}).valueFrom.secretKeyRef", e.name), "no Secrets in the lab"));
            }
            if let Some(r) = &src.resource_field_ref {
                if !matches!(r.resource.as_str(), "limits.cpu" | "requests.cpu") {
                    return Err(refuse(
                        &format!("env[{i}] ({}).valueFrom.resourceFieldRef", e.name),
                        "only limits.cpu / requests.cpu",
                    ));
                }
            }
        }
    }
    for (i, e) in c.env_from.iter().flatten().enumerate() {
        if e.secret_ref.is_some() {
            return Err(refuse(&format!("envFrom[{i}].secretRef"), "no Secrets in the lab"));
        }
    }
    for (i, vm) in c.volume_mounts.iter().flatten().enumerate() {
        if !pod.volumes.iter().flatten().any(|v| v.name == vm.name) {
            bail!("{id}: {at}.volumeMounts[{i}].name `{}` names no volume", vm.name);
        }
        if vm.sub_path_expr.is_some() {
            return Err(refuse(&format!("volumeMounts[{i}].subPathExpr"), "not played"));
        }
    }
    Ok(())
}

fn validate_probe(id: &str, at: &str, p: &Probe) -> Result<()> {
    let handlers = [p.http_get.is_some(), p.tcp_socket.is_some(), p.exec.is_some(), p.grpc.is_some()];
    if handlers.iter().filter(|h| **h).count() != 1 {
        bail!("{id}: {at} needs exactly one of httpGet, tcpSocket, exec, grpc");
    }
    if p.grpc.is_some() {
        bail!("{id}: {at}.grpc is not supported: the lab probes with httpGet, tcpSocket and exec");
    }
    if let Some(g) = &p.http_get {
        if g.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            bail!("{id}: {at}.httpGet.scheme is not supported: only HTTP");
        }
    }
    if let Some(e) = &p.exec {
        let first = e.command.as_ref().and_then(|c| c.first()).map(String::as_str).unwrap_or("");
        if first.is_empty() {
            bail!("{id}: {at}.exec.command is empty");
        }
    }
    Ok(())
}

/// The image's binary as manifests name it: `/usr/local/bin/graceful`, `graceful`, ...
pub fn is_graceful_binary(path: &str) -> bool {
    std::path::Path::new(path).file_name().is_some_and(|n| n == "graceful")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: svc-backend}
spec:
  selector: {app: backend}
  ports: [{port: 5000, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: backend}
spec:
  replicas: 2
  selector: {matchLabels: {app: backend}}
  template:
    metadata: {labels: {app: backend}}
    spec:
      containers:
      - name: backend
        image: graceful:latest
        args: [backend]
        ports: [{containerPort: 5000, name: http}]
---
apiVersion: v1
kind: Namespace
metadata: {name: x}
"#;

    #[test]
    fn parses_kinds_and_sets_aside_namespaces() {
        let m = parse("t", SMALL).unwrap();
        assert_eq!(m.deployments.len(), 1);
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.ignored, vec!["Namespace/x".to_string()]);
    }

    #[test]
    fn typo_is_named() {
        let text = SMALL.replace("ports: [{containerPort", "portz: [{containerPort");
        let err = parse("t", &text).unwrap_err().to_string();
        assert!(err.contains("Deployment/backend") && err.contains("portz"), "{err}");
    }

    #[test]
    fn unknown_kind_is_refused() {
        let err = parse("t", "apiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n").unwrap_err().to_string();
        assert!(err.contains("Gadget/g"), "{err}");
    }

    #[test]
    fn unsupported_fields_are_named() {
        let text = SMALL.replace("      containers:", "      hostNetwork: true\n      containers:");
        let err = parse("t", &text).unwrap_err().to_string();
        assert!(err.contains("Deployment/backend") && err.contains("hostNetwork"), "{err}");
        let text = SMALL.replace("args: [backend]", "args: [backend]\n        command: [/bin/sh]");
        let err = parse("t", &text).unwrap_err().to_string();
        assert!(err.contains("containers[0].command"), "{err}");
    }

    #[test]
    fn rendered_overlays_parse() {
        for (name, text) in crate::lab::embedded_overlays() {
            let m = parse(name, text).unwrap();
            assert_eq!(m.deployments.len(), 2, "{name}");
            assert_eq!(m.services.len(), 2, "{name}");
        }
    }
}
