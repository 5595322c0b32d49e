//! Reads a rendered overlay (multi-document YAML) into typed Kubernetes objects.
//!
//! Dispatches on `kind`; every object goes through k8s-openapi's own types, and a round trip
//! catches fields those types do not know (k8s-openapi skips unknown keys silently, so a typo
//! such as `readinesProbe` would otherwise vanish). Fields the lab cannot play are errors that
//! name the object and the field; fields that only matter to a scheduler or a node are accepted
//! and listed in docs/lab.md.

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ExecAction, HTTPGetAction, LifecycleHandler, PodSpec, Probe, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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

/// Largest manifest the lab reads (rendered overlays are tens of KB).
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// Deepest `[`/`{` nesting accepted. The YAML parser stops at 128 itself, but only after work
/// that grows with the square of the input (a 200 KB nest took 47 s): refuse it before parsing.
const MAX_FLOW_DEPTH: usize = 64;

/// What admission allows beyond the lab's fixed subset.
#[derive(Debug, Clone, Copy, Default)]
pub struct Admission {
    /// Programs of this machine other than this binary in exec hooks, exec probes and
    /// `containers[].command` (`--allow-host-exec`).
    pub allow_host_exec: bool,
    /// Containers run their images (`--runtime oci`): commands and exec handlers run inside
    /// them, never on this machine, so any program may be named.
    pub in_containers: bool,
}

/// Parses every document of `text`. `source` names the input in errors.
pub fn parse(source: &str, text: &str) -> Result<Manifest> {
    admit(source, text, Admission::default())
}

/// Parses and validates `text` with `admission`'s allowances.
pub fn admit(source: &str, text: &str, admission: Admission) -> Result<Manifest> {
    check_size_and_depth(source, text)?;
    let mut m = Manifest { source: source.to_string(), ..Default::default() };
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            Value::deserialize(doc).with_context(|| format!("{source}: document {} is not valid YAML", i + 1))?;
        add_value(&mut m, value, &format!("{source}: document {}", i + 1))?;
    }
    validate(&m)?;
    if !admission.allow_host_exec && !admission.in_containers {
        refuse_host_exec(&m)?;
    }
    Ok(m)
}

/// Bounds the input before the YAML parser sees it: its size, and its flow nesting depth
/// (counted over brackets anywhere; a real manifest never comes near the bound).
fn check_size_and_depth(source: &str, text: &str) -> Result<()> {
    if text.len() > MAX_MANIFEST_BYTES {
        bail!("{source}: larger than {MAX_MANIFEST_BYTES} bytes, the most the lab reads");
    }
    let mut depth = 0usize;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") {
            depth = 0;
        }
        for b in line.bytes() {
            match b {
                b'[' | b'{' => depth += 1,
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if depth > MAX_FLOW_DEPTH {
                bail!("{source}: line {}: nested deeper than {MAX_FLOW_DEPTH} levels of [ ] / {{ }}", i + 1);
            }
        }
    }
    Ok(())
}

/// A program a manifest would have this machine run, and where it is named.
struct NamedProgram {
    object: String,
    field: String,
    program: String,
}

/// Every program a manifest would have this machine run.
fn programs(m: &Manifest) -> Vec<NamedProgram> {
    let mut out = Vec::new();
    for d in &m.deployments {
        let id = object_id("Deployment", d.metadata.name.as_deref());
        let pod = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
        for (i, c) in pod.map(|p| p.containers.as_slice()).unwrap_or_default().iter().enumerate() {
            let at = format!("spec.template.spec.containers[{i}]");
            let mut add = |field: &str, cmd: Option<&Vec<String>>| {
                if let Some(first) = cmd.and_then(|c| c.first()) {
                    out.push(NamedProgram {
                        object: id.clone(),
                        field: format!("{at}.{field}"),
                        program: first.clone(),
                    });
                }
            };
            add("command", c.command.as_ref());
            let lc = c.lifecycle.as_ref();
            for (name, h) in [
                ("preStop", lc.and_then(|l| l.pre_stop.as_ref())),
                ("postStart", lc.and_then(|l| l.post_start.as_ref())),
            ] {
                add(
                    &format!("lifecycle.{name}.exec.command"),
                    h.and_then(|h| h.exec.as_ref()).and_then(|e| e.command.as_ref()),
                );
            }
            for (name, p) in [
                ("startupProbe", &c.startup_probe),
                ("readinessProbe", &c.readiness_probe),
                ("livenessProbe", &c.liveness_probe),
            ] {
                add(
                    &format!("{name}.exec.command"),
                    p.as_ref().and_then(|p| p.exec.as_ref()).and_then(|e| e.command.as_ref()),
                );
            }
        }
    }
    out
}

/// The same rule for a container's command and for every exec hook and probe: only this binary,
/// unless `--allow-host-exec`.
fn refuse_host_exec(m: &Manifest) -> Result<()> {
    if let Some(NamedProgram { object, field, program }) =
        programs(m).into_iter().find(|p| !is_graceful_binary(&p.program))
    {
        bail!(
            "{object}: {field}: `{program}` is not this binary; the lab runs only this project's binary (basename \
             `graceful`) unless --allow-host-exec is given"
        );
    }
    Ok(())
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
    if let Some(s) = pod.termination_grace_period_seconds.filter(|s| *s < 0) {
        bail!("{id}: {at}.terminationGracePeriodSeconds {s}: must be 0 or more");
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
    if c.command.as_ref().and_then(|cmd| cmd.first()).is_some_and(|p| p.is_empty()) {
        bail!("{id}: {at}.command[0] is empty");
    }
    if let Some(lc) = &c.lifecycle {
        if let Some(h) = &lc.pre_stop {
            validate_hook(id, &format!("{at}.lifecycle.preStop"), h, c)?;
        }
        if let Some(h) = &lc.post_start {
            validate_hook(id, &format!("{at}.lifecycle.postStart"), h, c)?;
            return Err(refuse("lifecycle.postStart", "not played"));
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
            validate_probe(id, &format!("{at}.{name}"), p, c)?;
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

fn validate_probe(id: &str, at: &str, p: &Probe, c: &Container) -> Result<()> {
    let handlers = [p.http_get.is_some(), p.tcp_socket.is_some(), p.exec.is_some(), p.grpc.is_some()];
    if handlers.iter().filter(|h| **h).count() != 1 {
        bail!("{id}: {at} needs exactly one of httpGet, tcpSocket, exec, grpc");
    }
    if p.grpc.is_some() {
        bail!("{id}: {at}.grpc is not supported: the lab probes with httpGet, tcpSocket and exec");
    }
    if let Some(g) = &p.http_get {
        validate_http_get(id, &format!("{at}.httpGet"), g, c)?;
    }
    if let Some(t) = &p.tcp_socket {
        validate_port(id, &format!("{at}.tcpSocket.port"), &t.port, c)?;
    }
    if let Some(e) = &p.exec {
        validate_exec(id, &format!("{at}.exec"), e)?;
    }
    for (field, value, least) in [
        ("initialDelaySeconds", p.initial_delay_seconds, 0),
        ("periodSeconds", p.period_seconds, 1),
        ("timeoutSeconds", p.timeout_seconds, 1),
        ("successThreshold", p.success_threshold, 1),
        ("failureThreshold", p.failure_threshold, 1),
    ] {
        if value.is_some_and(|v| v < least) {
            bail!("{id}: {at}.{field} {}: must be at least {least}", value.unwrap_or_default());
        }
    }
    if let Some(s) = p.termination_grace_period_seconds.filter(|s| *s < 1) {
        bail!("{id}: {at}.terminationGracePeriodSeconds {s}: must be at least 1");
    }
    Ok(())
}

/// A lifecycle hook: exactly one handler, and that one complete.
fn validate_hook(id: &str, at: &str, h: &LifecycleHandler, c: &Container) -> Result<()> {
    let set = [h.exec.is_some(), h.http_get.is_some(), h.tcp_socket.is_some(), h.sleep.is_some()];
    if set.iter().filter(|s| **s).count() != 1 {
        bail!("{id}: {at} needs exactly one of exec, httpGet, tcpSocket, sleep");
    }
    if h.tcp_socket.is_some() {
        bail!("{id}: {at}.tcpSocket is not supported: deprecated and never run by the kubelet either");
    }
    if let Some(e) = &h.exec {
        validate_exec(id, &format!("{at}.exec"), e)?;
    }
    if let Some(g) = &h.http_get {
        validate_http_get(id, &format!("{at}.httpGet"), g, c)?;
    }
    if let Some(s) = h.sleep.as_ref().filter(|s| s.seconds < 0) {
        bail!("{id}: {at}.sleep.seconds {}: must be 0 or more", s.seconds);
    }
    Ok(())
}

fn validate_exec(id: &str, at: &str, e: &ExecAction) -> Result<()> {
    if e.command.as_ref().and_then(|c| c.first()).is_none_or(|p| p.is_empty()) {
        bail!("{id}: {at}.command is empty (it needs a program to run)");
    }
    Ok(())
}

fn validate_http_get(id: &str, at: &str, g: &HTTPGetAction, c: &Container) -> Result<()> {
    if g.scheme.as_deref().is_some_and(|s| s != "HTTP") {
        bail!("{id}: {at}.scheme is not supported: only HTTP");
    }
    if let Some(host) = g.host.as_deref().filter(|h| !matches!(*h, "" | "localhost" | "127.0.0.1")) {
        bail!("{id}: {at}.host `{host}` is not supported: the lab reaches the pod itself only");
    }
    validate_port(id, &format!("{at}.port"), &g.port, c)
}

/// A port number in 1–65535, or the name of one of the container's ports.
fn validate_port(id: &str, at: &str, port: &IntOrString, c: &Container) -> Result<()> {
    let ok = match port {
        IntOrString::Int(p) => (1..=65535).contains(p),
        IntOrString::String(s) => match s.parse::<i32>() {
            Ok(p) => (1..=65535).contains(&p),
            Err(_) => c.ports.iter().flatten().any(|cp| cp.name.as_deref() == Some(s.as_str())),
        },
    };
    if !ok {
        let shown = match port {
            IntOrString::Int(p) => p.to_string(),
            IntOrString::String(s) => s.clone(),
        };
        bail!("{id}: {at} `{shown}` is neither a port number (1-65535) nor the name of a container port");
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
    fn handlers_and_grace_are_validated_with_the_field_named() {
        let with_hook = |hook: &str| {
            SMALL.replace("args: [backend]", &format!("args: [backend]\n        lifecycle: {{preStop: {hook}}}"))
        };
        for (text, want) in [
            (with_hook("{exec: {command: []}}"), "lifecycle.preStop.exec.command is empty"),
            (with_hook("{}"), "lifecycle.preStop needs exactly one of"),
            (with_hook("{httpGet: {port: admin}}"), "lifecycle.preStop.httpGet.port `admin`"),
            (with_hook("{httpGet: {port: 0}}"), "lifecycle.preStop.httpGet.port `0`"),
            (with_hook("{httpGet: {port: http, host: example.com}}"), "lifecycle.preStop.httpGet.host `example.com`"),
            (with_hook("{sleep: {seconds: -2}}"), "lifecycle.preStop.sleep.seconds -2"),
            (
                SMALL.replace("      containers:", "      terminationGracePeriodSeconds: -1\n      containers:"),
                "terminationGracePeriodSeconds -1",
            ),
        ] {
            let err = parse("t", &text).unwrap_err().to_string();
            assert!(err.contains("Deployment/backend") && err.contains(want), "want `{want}` in: {err}");
        }
        // A named port of the container is a valid hook port.
        parse("t", &with_hook("{httpGet: {port: http, path: /prestop}}")).unwrap();
    }

    #[test]
    fn host_programs_pass_only_with_the_allowance() {
        let text =
            SMALL.replace("args: [backend]", "args: [backend]\n        livenessProbe: {exec: {command: [/bin/true]}}");
        let err = parse("t", &text).unwrap_err().to_string();
        assert!(err.contains("livenessProbe.exec.command: `/bin/true`") && err.contains("--allow-host-exec"), "{err}");
        admit("t", &text, Admission { allow_host_exec: true, in_containers: false }).unwrap();
        // In a container the program is the image's, not this machine's.
        admit("t", &text, Admission { allow_host_exec: false, in_containers: true }).unwrap();
    }

    #[test]
    fn nesting_is_bounded_per_document_before_parsing() {
        let deep = format!("{}{}", "[".repeat(MAX_FLOW_DEPTH + 1), "]".repeat(MAX_FLOW_DEPTH + 1));
        let err = parse("t", &format!("a: 1\nb: {deep}\n")).unwrap_err().to_string();
        assert!(err.contains("t: line 2: nested deeper than 64"), "{err}");
        // Unclosed brackets in one document do not count against the next.
        let open = "[".repeat(MAX_FLOW_DEPTH);
        assert!(check_size_and_depth("t", &format!("a: '{open}'\n---\nb: [[1]]\n")).is_ok());
        assert!(check_size_and_depth("t", &"#".repeat(MAX_MANIFEST_BYTES + 1)).is_err());
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
