//! From a pod template to a process this machine can start: what a container runtime and the
//! kubelet would set up (command line, environment with the Downward API, ConfigMap volumes),
//! with the substitutions a single machine needs:
//! - the image's binary is this very binary, and mount paths point into the run directory;
//! - Service names resolve to the Services' addresses (there is no cluster DNS);
//! - with `--runtime oci` none of the first two: the container runs the image the manifest
//!   names, with the volumes bind-mounted at their mountPaths, so paths stay as written;
//! - on the process node only, where pods share the host's network: "0.0.0.0 inside the pod" is
//!   the pod's own loopback address, and "127.0.0.1 inside the pod" (as hooks use it) is that
//!   address too. On the kernel node each pod has its own network namespace: nothing to rewrite.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ExecAction, HTTPGetAction, LifecycleHandler, PodTemplateSpec, Probe, SleepAction,
    TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use nix::sys::signal::Signal;

use crate::lab::api::cluster::named_ports;
use crate::lab::api::manifest::is_graceful_binary;
use crate::lab::kernel_node::netns::Netns;
use crate::lab::network::dns::ServiceDns;
use crate::lab::network::ipam::PodNet;
use crate::lab::node::oci::BindMount;

/// What a probe or hook does, resolved to this machine's addresses.
#[derive(Debug, Clone, PartialEq)]
pub enum Handler {
    HttpGet { addr: SocketAddr, host: String, path: String, headers: Vec<(String, String)> },
    Tcp { addr: SocketAddr },
    Exec { program: PathBuf, args: Vec<String> },
    Sleep(Duration),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbePlan {
    pub handler: Handler,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
    /// probe-level terminationGracePeriodSeconds (liveness/startup kills).
    pub grace: Option<Duration>,
}

/// Everything the kubelet needs to run one pod's container.
#[derive(Debug, Clone)]
pub struct ContainerPlan {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub startup: Option<ProbePlan>,
    pub readiness: Option<ProbePlan>,
    pub liveness: Option<ProbePlan>,
    pub pre_stop: Option<Handler>,
    pub stop_signal: Signal,
    pub grace: Duration,
    /// Named container ports, for named targetPorts and probe ports.
    pub named_ports: BTreeMap<String, u16>,
    pub container_ports: Vec<u16>,
    /// The pod sandbox's network namespace (kernel node), set by the kubelet once it exists:
    /// the container and its exec hooks and probes run inside it.
    pub netns: Option<Netns>,
    /// The image the manifest names (what `--runtime oci` runs).
    pub image: Option<String>,
    /// The pod's volumes and /etc/hosts as the container sees them (`--runtime oci`).
    pub mounts: Vec<BindMount>,
}

/// The identity and surroundings of one pod.
pub struct PodContext<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub net: &'a PodNet,
    pub node: &'a str,
    pub exe: &'a Path,
    /// Files of ConfigMap volumes go here.
    pub dir: &'a Path,
    pub config_maps: &'a [ConfigMap],
    /// Service DNS names → the proxy's address, for `upstream.resolve` and hook URLs.
    pub services: &'a [ServiceDns],
    /// OTLP/HTTP base URL of the lab's receiver.
    pub otlp_endpoint: Option<&'a str>,
    /// The container runs its image (`--runtime oci`): commands and paths are the manifest's own.
    pub in_container: bool,
}

/// Each role's listener config keys and the container ports they default to.
fn role_listeners(role: &str) -> Option<[(&'static str, &'static str, u16); 2]> {
    match role {
        "backend" => Some([("BACKEND__LISTEN", "http", 5000), ("BACKEND__ADMIN_LISTEN", "admin", 5001)]),
        "frontend" => Some([("FRONTEND__LISTEN", "http", 8080), ("FRONTEND__ADMIN_LISTEN", "admin", 8081)]),
        _ => None,
    }
}

pub fn plan(template: &PodTemplateSpec, ctx: &PodContext) -> Result<ContainerPlan> {
    let spec = template.spec.as_ref().context("pod template has no spec")?;
    let c = spec.containers.first().context("pod template has no container")?;
    let named_ports = named_ports(c);
    let container_ports: Vec<u16> =
        c.ports.iter().flatten().filter_map(|p| u16::try_from(p.container_port).ok()).collect();

    let (host_mounts, mut binds) = write_volumes(spec, c, ctx)?;
    // Inside a container the manifest's paths are real: nothing to remap.
    let mounts = if ctx.in_container { Mounts::new() } else { host_mounts };
    if ctx.in_container {
        binds.push(hosts_file(ctx)?);
    }
    let env = environment(spec, c, ctx, &mounts)?;
    let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    // The image's ENTRYPOINT is the graceful binary; `command` replaces it, `args` follow.
    let mut argv: Vec<String> = c.command.iter().flatten().skip(1).cloned().collect();
    argv.extend(c.args.iter().flatten().cloned());
    let mut args: Vec<String> = argv.iter().map(|a| remap_paths(&expand(a, &vars), &mounts)).collect();
    if !ctx.net.own_netns {
        bind_listen_flags(&mut args, ctx.net);
    }

    let resolve = |p: &Probe| -> Result<ProbePlan> { probe_plan(p, ctx, &named_ports, &env, &mounts) };
    let startup = c.startup_probe.as_ref().map(resolve).transpose()?;
    let readiness = c.readiness_probe.as_ref().map(resolve).transpose()?;
    let liveness = c.liveness_probe.as_ref().map(resolve).transpose()?;
    let lifecycle = c.lifecycle.as_ref();
    let pre_stop = match lifecycle.and_then(|l| l.pre_stop.as_ref()) {
        Some(h) => Some(handler(h, ctx, &named_ports, &env, &mounts)?),
        None => None,
    };
    let stop_signal = match lifecycle.and_then(|l| l.stop_signal.as_deref()) {
        Some(s) => crate::lab::api::signal::stop_signal(s).with_context(|| format!("unknown stopSignal {s}"))?,
        None => Signal::SIGTERM,
    };
    let grace = Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
    let cwd = c.working_dir.as_deref().map(|d| PathBuf::from(remap_paths(d, &mounts))).filter(|p| p.is_dir());
    Ok(ContainerPlan {
        program: program_for(c.command.as_ref().and_then(|cmd| cmd.first()), ctx.exe),
        args,
        env,
        cwd,
        startup,
        readiness,
        liveness,
        pre_stop,
        stop_signal,
        grace,
        named_ports,
        container_ports,
        netns: None,
        image: c.image.clone(),
        mounts: binds,
    })
}

/// The program a command names: this binary for the image's own (`graceful`), else the host's
/// (admission let it through only with --allow-host-exec).
fn program_for(first: Option<&String>, exe: &Path) -> PathBuf {
    match first {
        Some(p) if !is_graceful_binary(p) => PathBuf::from(p),
        _ => exe.to_path_buf(),
    }
}

/// The kubelet-managed /etc/hosts: localhost and the pod's own name at its address.
fn hosts_file(ctx: &PodContext) -> Result<BindMount> {
    let path = ctx.dir.join("etc-hosts");
    let text = format!(
        "# Kubernetes-managed hosts file (graceful lab).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
        ctx.net.ip, ctx.name
    );
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(BindMount { source: path, destination: "/etc/hosts".into(), read_only: true })
}

/// mountPath → directory (or file, with subPath) under the pod's run directory, longest first.
type Mounts = Vec<(String, PathBuf)>;

/// Writes the pod's volumes under its run directory; returns them by mountPath (for remapping
/// on the process runtime) and as the container's bind mounts (ConfigMaps read-only, as the
/// kubelet mounts them).
fn write_volumes(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    c: &Container,
    ctx: &PodContext,
) -> Result<(Mounts, Vec<BindMount>)> {
    let mut dirs: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let dir = ctx.dir.join("volumes").join(&v.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(src) = &v.config_map {
            let cm = ctx.config_maps.iter().find(|m| m.metadata.name.as_deref() == Some(src.name.as_str()));
            let data: BTreeMap<String, Vec<u8>> = match cm {
                Some(cm) => {
                    let mut d: BTreeMap<String, Vec<u8>> =
                        cm.data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect();
                    d.extend(cm.binary_data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())));
                    d
                }
                None => BTreeMap::new(),
            };
            let files: Vec<(String, String)> = match &src.items {
                Some(items) => items.iter().map(|i| (i.key.clone(), i.path.clone())).collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, rel) in files {
                let bytes = data
                    .get(&key)
                    .with_context(|| format!("volume {}: ConfigMap {} has no key `{key}`", v.name, src.name))?;
                let path = dir.join(&rel);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        dirs.insert(v.name.clone(), (dir, v.config_map.is_some()));
    }
    let mut mounts: Mounts = Vec::new();
    let mut binds = Vec::new();
    for vm in c.volume_mounts.iter().flatten() {
        let (dir, config_map) =
            dirs.get(&vm.name).with_context(|| format!("volumeMount {} names no volume", vm.name))?;
        let host = match vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => dir.join(sub),
            None => dir.clone(),
        };
        let read_only = *config_map || vm.read_only == Some(true);
        binds.push(BindMount { source: host.clone(), destination: vm.mount_path.clone().into(), read_only });
        mounts.push((vm.mount_path.trim_end_matches('/').to_string(), host));
    }
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    Ok((mounts, binds))
}

/// Replaces a mount path prefix (whole path components) with its directory in the run dir.
pub fn remap_paths(value: &str, mounts: &Mounts) -> String {
    for (mount, host) in mounts {
        if mount.is_empty() {
            continue;
        }
        if let Some(rest) = value.strip_prefix(mount.as_str()) {
            if rest.is_empty() || rest.starts_with('/') {
                return format!("{}{rest}", host.display());
            }
        }
        // `--config=/etc/graceful/x.toml`
        if let Some((flag, path)) = value.split_once('=') {
            if flag.starts_with("--") {
                let mapped = remap_paths(path, mounts);
                if mapped != path {
                    return format!("{flag}={mapped}");
                }
            }
        }
    }
    value.to_string()
}

/// Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` escapes, others stay.
pub fn expand(s: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: String) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(e) => e.1 = value,
        None => env.push((key.to_string(), value)),
    }
}

fn environment(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    c: &Container,
    ctx: &PodContext,
    mounts: &Mounts,
) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    // Service links (on unless disabled): lowest precedence.
    if spec.enable_service_links.unwrap_or(true) {
        for s in ctx.services.iter().filter(|s| s.namespace == ctx.namespace) {
            let base = s.name.to_ascii_uppercase().replace('-', "_");
            let ip = s.proxy.ip().to_string();
            set(&mut env, &format!("{base}_SERVICE_HOST"), ip);
            set(&mut env, &format!("{base}_SERVICE_PORT"), s.proxy.port().to_string());
            if let Some(pn) = &s.port_name {
                let pn = pn.to_ascii_uppercase().replace('-', "_");
                set(&mut env, &format!("{base}_SERVICE_PORT_{pn}"), s.proxy.port().to_string());
            }
        }
    }
    for src in c.env_from.iter().flatten() {
        if let Some(r) = &src.config_map_ref {
            let cm = ctx.config_maps.iter().find(|m| m.metadata.name.as_deref() == Some(r.name.as_str()));
            match cm {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        set(&mut env, &format!("{}{k}", src.prefix.as_deref().unwrap_or("")), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => bail!("envFrom: ConfigMap {} not in the manifest", r.name),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (_, Some(src)) => {
                if let Some(f) = &src.field_ref {
                    field_ref(&f.field_path, ctx)
                        .with_context(|| format!("env {}: fieldRef {}", e.name, f.field_path))?
                } else if let Some(r) = &src.config_map_key_ref {
                    let cm = ctx.config_maps.iter().find(|m| m.metadata.name.as_deref() == Some(r.name.as_str()));
                    match cm.and_then(|m| m.data.as_ref()).and_then(|d| d.get(&r.key)) {
                        Some(v) => v.clone(),
                        None if r.optional == Some(true) => continue,
                        None => bail!("env {}: ConfigMap {} key {} not found", e.name, r.name, r.key),
                    }
                } else if let Some(r) = &src.resource_field_ref {
                    cpu_field(c, &r.resource)
                } else {
                    bail!("env {}: unsupported valueFrom", e.name)
                }
            }
            (Some(v), None) => {
                let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                expand(v, &vars)
            }
            (None, None) => String::new(),
        };
        set(&mut env, &e.name, remap_paths(&value, mounts));
    }
    lab_overrides(&mut env, c, ctx);
    Ok(env)
}

/// What only the lab adds: the pod's own address for its listeners, Service names resolved to the
/// lab's proxies, telemetry to the lab's receiver, and PATH so exec hooks find their tools.
fn lab_overrides(env: &mut Vec<(String, String)>, c: &Container, ctx: &PodContext) {
    let role = c.args.iter().flatten().next().map(String::as_str).unwrap_or("");
    if let Some(listeners) = role_listeners(role).filter(|_| !ctx.net.own_netns) {
        for (key, port_name, default) in listeners {
            let port = c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(port_name))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .unwrap_or(default);
            set(env, &format!("GRACEFUL_{key}"), ctx.net.addr(port).to_string());
        }
    }
    let mut rules: Vec<String> = match env.iter().find(|(k, _)| k == "GRACEFUL_UPSTREAM__RESOLVE") {
        Some((_, v)) => serde_json::from_str(v).unwrap_or_default(),
        None => Vec::new(),
    };
    for s in ctx.services {
        for name in s.names_from(ctx.namespace) {
            rules.push(format!("{name}:{}:{}", s.port, s.proxy));
        }
    }
    set(env, "GRACEFUL_UPSTREAM__RESOLVE", serde_json::to_string(&rules).unwrap_or_default());
    if let Some(endpoint) = ctx.otlp_endpoint {
        // Overrides the in-cluster collector the manifests name; the receiver speaks OTLP/HTTP.
        env.retain(|(k, _)| k != "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" && k != "OTEL_SDK_DISABLED");
        set(env, "OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string());
        set(env, "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into());
        set(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf".into());
        // Export promptly so attribution needs no long wait after the run.
        set(env, "OTEL_BSP_SCHEDULE_DELAY", "200".into());
    }
    // A container has its image's PATH; only this machine's processes need the host's.
    if let Some(path) = std::env::var_os("PATH").filter(|_| !ctx.in_container) {
        set(env, "PATH", path.to_string_lossy().into_owned());
    }
}

fn field_ref(path: &str, ctx: &PodContext) -> Result<String> {
    let label = |prefix: &str, map: &BTreeMap<String, String>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.get(key).cloned().unwrap_or_default())
    };
    Ok(match path {
        "metadata.name" => ctx.name.to_string(),
        "metadata.namespace" => ctx.namespace.to_string(),
        "metadata.uid" => ctx.uid.to_string(),
        "spec.nodeName" => ctx.node.to_string(),
        "spec.serviceAccountName" => "default".to_string(),
        "status.podIP" | "status.podIPs" => ctx.net.ip.to_string(),
        "status.hostIP" | "status.hostIPs" if ctx.net.own_netns => crate::lab::kernel_node::node::NODE_IP.to_string(),
        "status.hostIP" | "status.hostIPs" => "127.0.0.1".to_string(),
        p if p.starts_with("metadata.labels['") => label("metadata.labels['", ctx.labels).unwrap_or_default(),
        p if p.starts_with("metadata.annotations['") => String::new(),
        other => bail!("field path `{other}` is not one the Downward API offers"),
    })
}

/// `resourceFieldRef` for CPU: whole cores, rounded up (divisor 1), the machine's when unset.
fn cpu_field(c: &Container, resource: &str) -> String {
    let (kind, _) = resource.split_once('.').unwrap_or(("limits", "cpu"));
    let res = c.resources.as_ref();
    let q = match kind {
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => res.and_then(|r| r.limits.as_ref()),
    }
    .and_then(|m| m.get("cpu"))
    .map(|q| q.0.clone());
    let cores = match q {
        Some(q) => match q.strip_suffix('m') {
            Some(milli) => milli.parse::<f64>().map(|m| m / 1000.0).unwrap_or(1.0),
            None => q.parse::<f64>().unwrap_or(1.0),
        },
        None => std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0),
    };
    (cores.ceil().max(1.0) as u64).to_string()
}

/// `--listen 0.0.0.0:5000` in a pod means the pod's own address.
fn bind_listen_flags(args: &mut [String], net: &PodNet) {
    let rebind = |v: &str| -> Option<String> {
        let addr: SocketAddr = v.parse().ok()?;
        Some(net.addr(addr.port()).to_string())
    };
    let mut i = 0;
    while i < args.len() {
        let a = args[i].clone();
        if a == "--listen" || a == "--admin-listen" {
            if let Some(v) = args.get(i + 1).and_then(|v| rebind(v)) {
                args[i + 1] = v;
            }
            i += 1;
        } else if let Some((flag, v)) = a.split_once('=') {
            if flag == "--listen" || flag == "--admin-listen" {
                if let Some(v) = rebind(v) {
                    args[i] = format!("{flag}={v}");
                }
            }
        }
        i += 1;
    }
}

fn port_of(port: &IntOrString, named: &BTreeMap<String, u16>) -> Result<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).context("port out of range"),
        IntOrString::String(s) => match s.parse::<u16>() {
            Ok(p) => Ok(p),
            Err(_) => named.get(s).copied().with_context(|| format!("no container port named `{s}`")),
        },
    }
}

/// Rewrites URL arguments of hook and probe commands: loopback hosts become the pod's address
/// (process node only: pods share the host's network there); Service names become the
/// Service's address.
fn rewrite_url(arg: &str, ctx: &PodContext) -> String {
    let Ok(mut url) = url::Url::parse(arg) else { return arg.to_string() };
    if url.scheme() != "http" {
        return arg.to_string();
    }
    let Some(host) = url.host_str().map(str::to_ascii_lowercase) else { return arg.to_string() };
    let port = url.port_or_known_default().unwrap_or(80);
    let loopback = host == "localhost" || host == "127.0.0.1" || host == "[::1]";
    let target = if loopback && ctx.net.own_netns {
        // The command runs inside the pod's own network namespace: its loopback is the pod's.
        None
    } else if loopback {
        Some(ctx.net.addr(port))
    } else {
        ctx.services.iter().find(|s| s.port == port && s.names_from(ctx.namespace).contains(&host)).map(|s| s.proxy)
    };
    match target {
        Some(addr) => {
            let _ = url.set_ip_host(addr.ip());
            let _ = url.set_port(Some(addr.port()));
            url.to_string()
        }
        None => arg.to_string(),
    }
}

/// Probes and lifecycle hooks share their handler fields.
trait HandlerFields {
    fn http_get(&self) -> Option<&HTTPGetAction>;
    fn tcp_socket(&self) -> Option<&TCPSocketAction>;
    fn exec(&self) -> Option<&ExecAction>;
    fn sleep(&self) -> Option<&SleepAction>;
}

impl HandlerFields for Probe {
    fn http_get(&self) -> Option<&HTTPGetAction> {
        self.http_get.as_ref()
    }
    fn tcp_socket(&self) -> Option<&TCPSocketAction> {
        self.tcp_socket.as_ref()
    }
    fn exec(&self) -> Option<&ExecAction> {
        self.exec.as_ref()
    }
    fn sleep(&self) -> Option<&SleepAction> {
        None
    }
}

impl HandlerFields for LifecycleHandler {
    fn http_get(&self) -> Option<&HTTPGetAction> {
        self.http_get.as_ref()
    }
    fn tcp_socket(&self) -> Option<&TCPSocketAction> {
        self.tcp_socket.as_ref()
    }
    fn exec(&self) -> Option<&ExecAction> {
        self.exec.as_ref()
    }
    fn sleep(&self) -> Option<&SleepAction> {
        self.sleep.as_ref()
    }
}

fn handler<H: HandlerFields>(
    h: &H,
    ctx: &PodContext,
    named: &BTreeMap<String, u16>,
    env: &[(String, String)],
    mounts: &Mounts,
) -> Result<Handler> {
    let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if let Some(g) = h.http_get() {
        let port = port_of(&g.port, named)?;
        let addr = match g.host.as_deref() {
            None | Some("") | Some("localhost") | Some("127.0.0.1") => ctx.net.addr(port),
            Some(other) => bail!("httpGet.host `{other}`: the lab probes the pod itself only"),
        };
        let headers = g.http_headers.iter().flatten().map(|h| (h.name.clone(), h.value.clone())).collect();
        let path = g.path.clone().unwrap_or_else(|| "/".into());
        return Ok(Handler::HttpGet { addr, host: addr.to_string(), path, headers });
    }
    if let Some(t) = h.tcp_socket() {
        return Ok(Handler::Tcp { addr: ctx.net.addr(port_of(&t.port, named)?) });
    }
    if let Some(e) = h.exec() {
        let cmd = e.command.clone().unwrap_or_default();
        let first = cmd.first().with_context(|| format!("{}: exec.command is empty", ctx.name))?;
        let program = if ctx.in_container { PathBuf::from(first) } else { program_for(Some(first), ctx.exe) };
        let args = cmd.iter().skip(1).map(|a| rewrite_url(&remap_paths(&expand(a, &vars), mounts), ctx)).collect();
        return Ok(Handler::Exec { program, args });
    }
    if let Some(s) = h.sleep() {
        return Ok(Handler::Sleep(Duration::from_secs(s.seconds.max(0) as u64)));
    }
    bail!("no handler the lab can run")
}

fn probe_plan(
    p: &Probe,
    ctx: &PodContext,
    named: &BTreeMap<String, u16>,
    env: &[(String, String)],
    mounts: &Mounts,
) -> Result<ProbePlan> {
    let secs = |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    Ok(ProbePlan {
        handler: handler(p, ctx, named, env, mounts)?,
        initial_delay: secs(p.initial_delay_seconds, 0),
        // The API's minimum for both is 1 s.
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        grace: p.termination_grace_period_seconds.map(|s| Duration::from_secs(s.max(0) as u64)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::network::ipam::{Mode, Net};

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars: BTreeMap<&str, &str> = [("A", "1"), ("B", "two")].into();
        assert_eq!(expand("x$(A)y$(B)", &vars), "x1ytwo");
        assert_eq!(expand("$$(A) $(C) $", &vars), "$(A) $(C) $");
    }

    #[test]
    fn mount_paths_are_remapped_by_component() {
        let mounts: Mounts = vec![("/etc/graceful".into(), PathBuf::from("/tmp/run/v"))];
        assert_eq!(remap_paths("/etc/graceful/graceful.toml", &mounts), "/tmp/run/v/graceful.toml");
        assert_eq!(remap_paths("--config=/etc/graceful/g.toml", &mounts), "--config=/tmp/run/v/g.toml");
        assert_eq!(remap_paths("/etc/gracefulness", &mounts), "/etc/gracefulness");
    }

    #[test]
    fn rendered_solution_plans_with_pod_addresses() {
        let (_, text) = crate::lab::embedded_overlays().into_iter().find(|(n, _)| *n == "solution").unwrap();
        let m = crate::lab::api::manifest::parse("solution", text).unwrap();
        let d = m.deployments.iter().find(|d| d.metadata.name.as_deref() == Some("backend")).unwrap();
        let template = &d.spec.as_ref().unwrap().template;
        let net = Net::new(Mode::PerIp).pod(&[5000, 5001]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let services = vec![ServiceDns {
            name: "svc-backend".into(),
            namespace: "default".into(),
            port: 5000,
            port_name: Some("http".into()),
            proxy: "127.0.9.1:5000".parse().unwrap(),
        }];
        let labels = BTreeMap::new();
        let ctx = PodContext {
            name: "backend-abc",
            namespace: "default",
            uid: "u",
            labels: &labels,
            net: &net,
            node: "lab-node",
            exe: Path::new("/bin/graceful-test"),
            dir: dir.path(),
            config_maps: &m.config_maps,
            services: &services,
            otlp_endpoint: Some("http://127.0.0.1:4318"),
            in_container: false,
        };
        let plan = plan(template, &ctx).unwrap();
        let env: BTreeMap<_, _> = plan.env.iter().cloned().collect();
        assert_eq!(env["POD_NAME"], "backend-abc");
        assert_eq!(env["POD_IP"], net.ip.to_string());
        assert_eq!(env["GRACEFUL_BACKEND__LISTEN"], format!("{}:5000", net.ip));
        assert_eq!(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://127.0.0.1:4318");
        assert!(env["GRACEFUL_UPSTREAM__RESOLVE"].contains("svc-backend:5000:127.0.9.1:5000"));
        let config = PathBuf::from(&plan.args[2]);
        assert!(config.starts_with(dir.path()) && config.is_file(), "{:?}", plan.args);
        match plan.pre_stop.unwrap() {
            Handler::Exec { program, args } => {
                assert_eq!(program, PathBuf::from("/bin/graceful-test"));
                assert!(args.contains(&format!("http://{}:5001/prestop", net.ip)), "{args:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(plan.grace, Duration::from_secs(25));
        assert!(matches!(plan.readiness.unwrap().handler, Handler::HttpGet { addr, .. } if addr == net.addr(5001)));
    }

    /// `--runtime oci`: the manifest's own paths and programs, the image's PATH, the volumes and
    /// /etc/hosts as bind mounts.
    #[test]
    fn in_a_container_paths_and_programs_stay_as_written() {
        let (_, text) = crate::lab::embedded_overlays().into_iter().find(|(n, _)| *n == "solution").unwrap();
        let m = crate::lab::api::manifest::parse("solution", text).unwrap();
        let d = m.deployments.iter().find(|d| d.metadata.name.as_deref() == Some("backend")).unwrap();
        let template = &d.spec.as_ref().unwrap().template;
        let net = Net::new(Mode::PerIp).pod(&[5000, 5001]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let labels = BTreeMap::new();
        let ctx = PodContext {
            name: "backend-abc",
            namespace: "default",
            uid: "u",
            labels: &labels,
            net: &net,
            node: "lab-node",
            exe: Path::new("/bin/graceful-test"),
            dir: dir.path(),
            config_maps: &m.config_maps,
            services: &[],
            otlp_endpoint: None,
            in_container: true,
        };
        let plan = plan(template, &ctx).unwrap();
        assert_eq!(plan.args[2], "/etc/graceful/graceful.toml");
        assert!(!plan.env.iter().any(|(k, _)| k == "PATH"), "the host's PATH leaked: {:?}", plan.env);
        assert_eq!(plan.image.as_deref(), Some("graceful:latest"));
        let config = plan.mounts.iter().find(|b| b.destination == Path::new("/etc/graceful")).unwrap();
        assert!(config.read_only && config.source.join("graceful.toml").is_file(), "{config:?}");
        let hosts = plan.mounts.iter().find(|b| b.destination == Path::new("/etc/hosts")).unwrap();
        let text = std::fs::read_to_string(&hosts.source).unwrap();
        assert!(text.contains(&format!("{}\tbackend-abc", net.ip)), "{text}");
        match plan.pre_stop.unwrap() {
            Handler::Exec { program, .. } => assert_eq!(program, PathBuf::from("/usr/local/bin/graceful")),
            other => panic!("{other:?}"),
        }
    }
}
