//! Static checks of the container image recipe and the rendered Kubernetes manifests.
//!
//! Nothing here talks to a cluster. The committed renders in `deploy/rendered/` are parsed with
//! k8s-openapi's typed structs; container arguments and preStop commands are parsed with the
//! binary's own CLI, and the mounted `graceful.toml` plus the container's environment are layered
//! with the binary's own `Config` type, so a manifest that the binary would reject fails here.
//! `.ci/check-manifests` keeps the renders in step with the kustomizations.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use figment::Figment;
use graceful::cli::{Cli, Command, ProbeArgs};
use graceful::config::{Config, ENV_PREFIX, OTEL_ENV};
use graceful::lab::control_plane::deployment::resolve_fenceposts;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Namespace, PodSpec, Probe, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

/// The image's binary: every exec hook must start with it (no shell exists in the image).
const BINARY: &str = "/usr/local/bin/graceful";
/// Time kept in every grace budget for flushing logs and buffered spans after the last request.
const FLUSH_MARGIN: Duration = Duration::from_secs(3);
/// The pause before `shutdown-probe` retries the game-over POST.
const GAME_OVER_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Overlays that switch `features.graceful` on.
const GRACEFUL_OVERLAYS: &[&str] = &["graceful", "solution", "task-03"];
/// Overlays that run the app (as opposed to the otel stack).
const APP_OVERLAYS: &[&str] = &["problem", "graceful", "solution", "task-03"];
/// Annotation on each graceful Deployment: the endpoint-propagation lag its shutdown covers.
const LAG_ANNOTATION: &str = "graceful.dev/covers-endpoint-lag";

/// The checkout, or `GRACEFUL_MANIFESTS_ROOT`: `.ci/check-manifests` points it at mutated copies
/// of the renders and the Dockerfile to prove that these tests fail when they should.
fn root() -> PathBuf {
    match std::env::var_os("GRACEFUL_MANIFESTS_ROOT") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Loading the renders
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Render {
    name: String,
    deployments: BTreeMap<String, Deployment>,
    services: BTreeMap<String, Service>,
    config_maps: BTreeMap<String, ConfigMap>,
    pdbs: BTreeMap<String, PodDisruptionBudget>,
    namespaces: BTreeMap<String, Namespace>,
}

fn insert_unique<T>(map: &mut BTreeMap<String, T>, file: &str, kind: &str, name: String, value: T) {
    assert!(!map.contains_key(&name), "{file}: two {kind} objects named {name}");
    map.insert(name, value);
}

/// Independent of the lab's `api::manifest::parse` on purpose: this checks the rendered files as
/// Kubernetes objects (every kind expected, names unique), whatever the lab accepts or ignores.
fn parse_render(file: &str, text: &str) -> Render {
    let mut render = Render { name: file.to_string(), ..Render::default() };
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: not YAML: {e}"));
        if value.is_null() {
            continue;
        }
        let kind =
            value.get("kind").and_then(|k| k.as_str()).unwrap_or_else(|| panic!("{file}: document without kind"));
        let kind = kind.to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or_else(|| panic!("{file}: {kind} without metadata.name"))
            .to_string();
        let ctx = format!("{file}: {kind} {name}");
        match kind.as_str() {
            "Deployment" => {
                let d: Deployment = serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                insert_unique(&mut render.deployments, file, &kind, name, d);
            }
            "Service" => {
                let s: Service = serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                insert_unique(&mut render.services, file, &kind, name, s);
            }
            "ConfigMap" => {
                let c: ConfigMap = serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                insert_unique(&mut render.config_maps, file, &kind, name, c);
            }
            "PodDisruptionBudget" => {
                let p: PodDisruptionBudget = serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                insert_unique(&mut render.pdbs, file, &kind, name, p);
            }
            "Namespace" => {
                let n: Namespace = serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                insert_unique(&mut render.namespaces, file, &kind, name, n);
            }
            other => {
                panic!("{file}: unexpected kind {other} ({name}); teach tests/manifests.rs (and the lab) about it")
            }
        }
    }
    render
}

fn load(overlay: &str) -> Render {
    let file = format!("deploy/rendered/{overlay}.yaml");
    let text = read(&file);
    assert!(
        text.starts_with("# GENERATED by deploy/render.sh"),
        "{file}: missing the generated-file header; render it with deploy/render.sh"
    );
    parse_render(&file, &text)
}

impl Render {
    fn deployment(&self, name: &str) -> &Deployment {
        self.deployments.get(name).unwrap_or_else(|| panic!("{}: no Deployment {name}", self.name))
    }

    fn service(&self, name: &str) -> &Service {
        self.services.get(name).unwrap_or_else(|| panic!("{}: no Service {name}", self.name))
    }
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("Deployment without a pod spec")
}

fn dname(d: &Deployment) -> &str {
    d.metadata.name.as_deref().unwrap_or("?")
}

/// The app container (named like its Deployment).
fn app_container(d: &Deployment) -> &Container {
    let name = dname(d);
    pod_spec(d)
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("Deployment {name}: no container named {name}"))
}

fn env_map(c: &Container) -> BTreeMap<String, String> {
    c.env.iter().flatten().filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v))).collect()
}

fn port_named(c: &Container, name: &str) -> i32 {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container {}: no port named {name}", c.name))
        .container_port
}

/// A probe's (path, port number), named ports resolved against the container.
fn http_probe(c: &Container, probe: &Probe) -> (String, i32) {
    let get = probe.http_get.as_ref().unwrap_or_else(|| panic!("container {}: probe is not httpGet", c.name));
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => port_named(c, name),
    };
    (get.path.clone().unwrap_or_default(), port)
}

fn parse_duration(s: &str, what: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{what}: `{s}` is not a duration: {e}"))
}

/// (replicas, maxSurge, maxUnavailable) as the controller will apply them.
fn rollout(d: &Deployment) -> (i32, i32, i32) {
    let spec = d.spec.as_ref().unwrap();
    let replicas = spec.replicas.unwrap_or(1);
    let strategy = spec.strategy.as_ref().unwrap_or_else(|| panic!("Deployment {}: strategy not stated", dname(d)));
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "Deployment {}", dname(d));
    let ru = strategy.rolling_update.as_ref().expect("rollingUpdate stated");
    let surge = ru.max_surge.as_ref().expect("maxSurge stated");
    let unavailable = ru.max_unavailable.as_ref().expect("maxUnavailable stated");
    // The lab's own rounding (surge up, unavailable down, both zero ⇒ one unavailable): one rule.
    let (surge, unavailable) = resolve_fenceposts(Some(surge), Some(unavailable), replicas as u32)
        .unwrap_or_else(|e| panic!("Deployment {}: {e:#}", dname(d)));
    (replicas, surge as i32, unavailable as i32)
}

// ---------------------------------------------------------------------------------------------
// What the binary will do with a container: its CLI, its config, its preStop
// ---------------------------------------------------------------------------------------------

/// The container's args parsed by the binary's own CLI (the image's ENTRYPOINT is the binary).
fn container_cli(d: &Deployment) -> Cli {
    let c = app_container(d);
    assert!(c.command.is_none(), "Deployment {}: `command` would bypass the ENTRYPOINT binary", dname(d));
    let args = c.args.clone().unwrap_or_default();
    let argv = std::iter::once("graceful".to_string()).chain(args.iter().cloned());
    Cli::try_parse_from(argv)
        .unwrap_or_else(|e| panic!("Deployment {}: args {args:?} rejected by the CLI:\n{e}", dname(d)))
}

/// The TOML file the container reads through `--config`, found via its volume mount and ConfigMap.
fn mounted_config(render: &Render, d: &Deployment) -> String {
    let cli = container_cli(d);
    let path = cli.config.unwrap_or_else(|| panic!("Deployment {}: no --config", dname(d)));
    let c = app_container(d);
    let (mount, key) = c
        .volume_mounts
        .iter()
        .flatten()
        .find_map(|m| {
            let rest = path.strip_prefix(&m.mount_path).ok()?;
            Some((m, rest.to_str()?.to_string()))
        })
        .unwrap_or_else(|| panic!("Deployment {}: nothing is mounted at {}", dname(d), path.display()));
    assert_eq!(mount.read_only, Some(true), "Deployment {}: config mount should be read-only", dname(d));
    let volume = pod_spec(d)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("Deployment {}: no volume {}", dname(d), mount.name));
    let cm_name = &volume.config_map.as_ref().expect("config volume is a ConfigMap").name;
    let cm = render.config_maps.get(cm_name).unwrap_or_else(|| panic!("{}: no ConfigMap {cm_name}", render.name));
    cm.data
        .as_ref()
        .and_then(|data| data.get(&key))
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} has no key {key}"))
        .clone()
}

/// Defaults < mounted TOML < OTEL_* env < GRACEFUL_* env, extracted into the binary's `Config`
/// (which rejects unknown keys), mirroring `graceful::config::figment`.
fn effective_config(render: &Render, d: &Deployment) -> Config {
    let toml = mounted_config(render, d);
    let env = env_map(app_container(d));
    let mut fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(&toml));
    for (var, key) in OTEL_ENV {
        if let Some(v) = env.get(*var).filter(|v| !v.is_empty()) {
            fig = fig.merge(Serialized::default(key, v.parse::<Value>().unwrap()));
        }
    }
    for (var, v) in &env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        assert_ne!(rest, "CONFIG", "Deployment {}: use --config in args, not GRACEFUL_CONFIG", dname(d));
        let key: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        fig = fig.merge(Serialized::default(&key.join("."), v.parse::<Value>().unwrap()));
    }
    fig.extract()
        .unwrap_or_else(|e| panic!("{}: Deployment {}: the binary would reject its config: {e}", render.name, dname(d)))
}

/// What a preStop hook does, worst and best case.
#[derive(Debug)]
struct PreStop {
    /// Longest the hook can take (every HTTP step at its timeout, the game-over retried once).
    worst: Duration,
    /// Shortest: the hold alone.
    hold: Duration,
    /// Whether it starts the app's drain clock (`--drain`).
    drains: bool,
    probe: Option<ProbeArgs>,
}

fn pre_stop(d: &Deployment) -> Option<PreStop> {
    let c = app_container(d);
    let handler = c.lifecycle.as_ref()?.pre_stop.as_ref()?;
    if let Some(sleep) = &handler.sleep {
        let t = Duration::from_secs(sleep.seconds as u64);
        return Some(PreStop { worst: t, hold: t, drains: false, probe: None });
    }
    let cmd = handler.exec.as_ref().and_then(|e| e.command.clone()).expect("preStop is exec or sleep");
    assert_eq!(cmd.first().map(String::as_str), Some(BINARY), "Deployment {}: preStop {cmd:?}", dname(d));
    let cli = Cli::try_parse_from(&cmd).unwrap_or_else(|e| panic!("Deployment {}: preStop {cmd:?}: {e}", dname(d)));
    let Command::ShutdownProbe(p) = cli.command else {
        panic!("Deployment {}: preStop is not shutdown-probe", dname(d))
    };
    let step = Duration::from(p.timeout);
    let hold = p.sleep.map(Duration::from).unwrap_or_default();
    let mut worst = hold;
    if p.drain.is_some() {
        worst += step;
    }
    if p.game_over.is_some() {
        // Bounded, one retry after a short pause (src/probe.rs).
        worst += 2 * step + GAME_OVER_RETRY_PAUSE;
    }
    Some(PreStop { worst, hold, drains: p.drain.is_some(), probe: Some(p) })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn every_render_parses_into_the_expected_objects() {
    for overlay in APP_OVERLAYS {
        let r = load(overlay);
        assert_eq!(r.deployments.keys().collect::<Vec<_>>(), ["backend", "frontend"], "{overlay}");
        assert_eq!(r.services.keys().collect::<Vec<_>>(), ["svc-backend", "svc-frontend"], "{overlay}");
        assert_eq!(r.config_maps.len(), 1, "{overlay}: one generated ConfigMap");
        let cm = r.config_maps.keys().next().unwrap();
        assert!(cm.starts_with("graceful-config-"), "{overlay}: ConfigMap {cm} should carry the generator's hash");
        for d in r.deployments.values() {
            let image = app_container(d).image.as_deref().unwrap_or_default();
            assert!(image == "graceful:latest", "{overlay}: {} runs image {image}", dname(d));
        }
    }
    let otel = load("otel");
    assert_eq!(otel.deployments.keys().collect::<Vec<_>>(), ["jaeger", "otel-collector"]);
}

#[test]
fn the_binary_accepts_every_container_config() {
    for overlay in APP_OVERLAYS {
        let r = load(overlay);
        for d in r.deployments.values() {
            let cli = container_cli(d);
            let config = effective_config(&r, d);
            let c = app_container(d);
            let (listen, admin) = match cli.command {
                Command::Backend(_) if dname(d) == "backend" => (config.backend.listen, config.backend.admin_listen),
                Command::Frontend(_) if dname(d) == "frontend" => {
                    (config.frontend.listen, config.frontend.admin_listen)
                }
                other => panic!("{overlay}: Deployment {} runs {other:?}", dname(d)),
            };
            assert_eq!(i32::from(listen.port()), port_named(c, "http"), "{overlay}: {} http port", dname(d));
            assert_eq!(i32::from(admin.port()), port_named(c, "admin"), "{overlay}: {} admin port", dname(d));
            assert_eq!(config.frontend.backend_url.as_str(), "http://svc-backend:5000/", "{overlay}");
            // Every environment variable is a Downward API field, a config key or an OTEL_* variable.
            for e in c.env.iter().flatten() {
                if let Some(src) = &e.value_from {
                    let path = src.field_ref.as_ref().map(|f| f.field_path.as_str());
                    let want = match e.name.as_str() {
                        "POD_NAME" => "metadata.name",
                        "POD_NAMESPACE" => "metadata.namespace",
                        "POD_IP" => "status.podIP",
                        "NODE_NAME" => "spec.nodeName",
                        other => {
                            panic!("{overlay}: {}: unexpected valueFrom env {other}", dname(d))
                        }
                    };
                    assert_eq!(path, Some(want), "{overlay}: {} env {}", dname(d), e.name);
                } else {
                    let known = e.name.starts_with(ENV_PREFIX) || OTEL_ENV.iter().any(|(v, _)| *v == e.name);
                    assert!(known, "{overlay}: {}: env {} is read by nothing", dname(d), e.name);
                    let v = e.value.as_deref().unwrap_or_default();
                    assert!(!v.contains("$("), "{overlay}: {}: env {} uses $(...) expansion", dname(d), e.name);
                }
            }
            let names: Vec<_> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
            for want in ["POD_NAME", "POD_NAMESPACE", "POD_IP", "NODE_NAME"] {
                assert!(names.contains(&want), "{overlay}: {} lacks Downward API {want}", dname(d));
            }
        }
    }
}

#[test]
fn grace_budget_covers_prestop_drain_shutdown_and_flush() {
    let mut checked = 0;
    for overlay in GRACEFUL_OVERLAYS {
        let r = load(overlay);
        for d in r.deployments.values() {
            let name = dname(d);
            let config = effective_config(&r, d);
            assert!(config.features.graceful, "{overlay}: {name} should run with features.graceful on");
            let hook = pre_stop(d).unwrap_or_else(|| panic!("{overlay}: {name} has no preStop"));
            let drain = config.shutdown.drain_delay;
            let in_flight = config.shutdown.shutdown_timeout;
            let budget = hook.worst + drain + in_flight + FLUSH_MARGIN;
            let grace = pod_spec(d).termination_grace_period_seconds.expect("terminationGracePeriodSeconds stated");
            let grace = Duration::from_secs(grace as u64);
            assert!(
                grace >= budget,
                "{overlay}: {name}: terminationGracePeriodSeconds {grace:?} < preStop {:?} + drain {drain:?} + \
                 shutdown {in_flight:?} + flush {FLUSH_MARGIN:?} = {budget:?}",
                hook.worst
            );
            // New connections keep being accepted until SIGTERM has arrived (after the hold) and
            // drain_delay has elapsed. `--drain` starts that clock when the hook starts, so the two
            // overlap; without it the clock starts at SIGTERM and they add up.
            let covered = if hook.drains { hook.hold.max(drain) } else { hook.hold + drain };
            let claimed = d
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LAG_ANNOTATION))
                .unwrap_or_else(|| panic!("{overlay}: {name} lacks the {LAG_ANNOTATION} annotation"));
            let claimed = parse_duration(claimed, LAG_ANNOTATION);
            assert!(
                claimed >= Duration::from_secs(3),
                "{overlay}: {name} claims only {claimed:?}: kube-proxy alone takes 1-3 s"
            );
            assert!(
                covered >= claimed,
                "{overlay}: {name}: shutdown covers {covered:?} of endpoint lag, claims {claimed:?}"
            );
            // The drain URL is this container's own admin /prestop.
            if let Some(url) = hook.probe.as_ref().and_then(|p| p.drain.as_deref()) {
                let admin = port_named(app_container(d), "admin");
                assert_eq!(url, format!("http://127.0.0.1:{admin}/prestop"), "{overlay}: {name} --drain");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * GRACEFUL_OVERLAYS.len(), "every Deployment of every graceful overlay is budgeted");
}

#[test]
fn the_budget_check_rejects_a_short_grace_period() {
    // Guard against a budget test that cannot fail: shrink solution's grace period and recompute.
    let r = load("solution");
    let d = r.deployment("backend");
    let config = effective_config(&r, d);
    let hook = pre_stop(d).unwrap();
    let budget = hook.worst + config.shutdown.drain_delay + config.shutdown.shutdown_timeout + FLUSH_MARGIN;
    let grace = Duration::from_secs(pod_spec(d).termination_grace_period_seconds.unwrap() as u64);
    assert!(grace >= budget);
    assert!(
        grace - Duration::from_secs(10) < budget,
        "10 s less grace must break the budget ({grace:?} vs {budget:?})"
    );
}

/// Removes what the problem and solution overlays are meant to differ in.
fn without_intended_differences(d: &Deployment) -> Deployment {
    let mut d = d.clone();
    if let Some(a) = d.metadata.annotations.as_mut() {
        a.remove(LAG_ANNOTATION);
        if a.is_empty() {
            d.metadata.annotations = None;
        }
    }
    let spec = d.spec.as_mut().unwrap();
    spec.strategy = None;
    let pod = spec.template.spec.as_mut().unwrap();
    pod.termination_grace_period_seconds = None;
    pod.topology_spread_constraints = None;
    for c in &mut pod.containers {
        c.lifecycle = None;
        c.liveness_probe = None;
        c.startup_probe = None;
        if let Some(env) = c.env.as_mut() {
            env.retain(|e| {
                !(e.name.starts_with("GRACEFUL_FEATURES__")
                    || e.name.starts_with("GRACEFUL_SHUTDOWN__")
                    || e.name.starts_with("OTEL_"))
            });
        }
    }
    d
}

#[test]
fn problem_and_solution_differ_exactly_as_intended() {
    let problem = load("problem");
    let solution = load("solution");

    // Same Services and the same config file (identical content gives an identical hashed name).
    assert_eq!(problem.services, solution.services, "Services must agree");
    assert_eq!(problem.config_maps, solution.config_maps, "the ConfigMap must agree");
    assert!(problem.pdbs.is_empty(), "problem: no PodDisruptionBudget");
    assert_eq!(solution.pdbs.keys().collect::<Vec<_>>(), ["backend", "frontend"]);

    for name in ["backend", "frontend"] {
        let p = problem.deployment(name);
        let s = solution.deployment(name);

        // Everything else agrees: names, labels, ports, images, args, readiness, resources, security.
        let (pn, sn) = (without_intended_differences(p), without_intended_differences(s));
        assert!(
            pn == sn,
            "{name}: problem and solution differ beyond the intended fields:\n--- problem\n{}\n--- solution\n{}",
            serde_yaml::to_string(&pn).unwrap(),
            serde_yaml::to_string(&sn).unwrap()
        );

        // Toggles.
        let pc = effective_config(&problem, p);
        let sc = effective_config(&solution, s);
        assert!(!pc.features.graceful && !pc.features.retry && !pc.features.timeouts, "problem {name}: features off");
        assert!(sc.features.graceful, "solution {name}: graceful on");
        if name == "frontend" {
            assert!(sc.features.retry && sc.features.timeouts, "solution frontend: retry and timeouts on");
        }
        // Both export traces the same way: the problem's failures are what Jaeger must show.
        assert!(sc.telemetry.otlp_endpoint.is_some(), "solution {name}: traces exported");
        assert_eq!(sc.telemetry.service_name.as_deref(), Some(name), "solution {name}: OTEL_SERVICE_NAME");
        let otel_env = |d: &Deployment| -> Vec<EnvVar> {
            app_container(d).env.iter().flatten().filter(|e| e.name.starts_with("OTEL_")).cloned().collect()
        };
        assert!(!otel_env(p).is_empty(), "problem {name}: traces exported");
        assert_eq!(otel_env(p), otel_env(s), "{name}: problem and solution trace alike");

        // preStop.
        assert!(pre_stop(p).is_none(), "problem {name}: no preStop");
        let hook = pre_stop(s).expect("solution preStop");
        assert!(hook.drains, "solution {name}: the preStop drains the pod");

        // Probes: readiness in both (the same one); startup and an independent liveness only in solution.
        let (pc_, sc_) = (app_container(p), app_container(s));
        let readiness = pc_.readiness_probe.as_ref().expect("problem readiness probe");
        assert_eq!(Some(readiness), sc_.readiness_probe.as_ref());
        assert_eq!(http_probe(pc_, readiness), ("/readyz".to_string(), port_named(pc_, "admin")));
        assert!(pc_.liveness_probe.is_none() && pc_.startup_probe.is_none(), "problem {name}: readiness only");
        let liveness = sc_.liveness_probe.as_ref().expect("solution liveness");
        assert_eq!(http_probe(sc_, liveness), ("/livez".to_string(), port_named(sc_, "admin")));
        assert!(sc_.startup_probe.is_some(), "solution {name}: startup probe");

        // Strategy: the problem lets a pod go before its replacement is ready; the solution never does.
        let (pr, psurge, punav) = rollout(p);
        let (sr, ssurge, sunav) = rollout(s);
        assert_eq!((pr, psurge, punav), (3, 1, 1), "problem {name}: 3 replicas, maxSurge 1, maxUnavailable 1");
        assert_eq!((sr, ssurge, sunav), (3, 1, 0), "solution {name}: 3 replicas, maxSurge 1, maxUnavailable 0");

        // Grace period differs (the budget test checks the solution's value).
        assert_ne!(pod_spec(p).termination_grace_period_seconds, pod_spec(s).termination_grace_period_seconds);
        assert!(pod_spec(p).topology_spread_constraints.is_none());
        assert!(pod_spec(s).topology_spread_constraints.is_some());
    }
}

#[test]
fn the_difference_check_notices_an_unintended_change() {
    let problem = load("problem");
    let d = problem.deployment("backend");
    let mut changed = d.clone();
    let pod = changed.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    pod.containers[0].image = Some("graceful:other".into());
    assert!(without_intended_differences(d) != without_intended_differences(&changed));
}

#[test]
fn task_03_meets_its_rubric() {
    let r = load("task-03");
    assert!(r.namespaces.contains_key("task-03"), "task-03: the Namespace object is part of the overlay");
    let namespaced = r
        .deployments
        .values()
        .map(|d| (&d.metadata, "Deployment"))
        .chain(r.services.values().map(|s| (&s.metadata, "Service")))
        .chain(r.config_maps.values().map(|c| (&c.metadata, "ConfigMap")))
        .chain(r.pdbs.values().map(|p| (&p.metadata, "PodDisruptionBudget")));
    for (meta, kind) in namespaced {
        assert_eq!(meta.namespace.as_deref(), Some("task-03"), "{kind} {:?}", meta.name);
    }

    for name in ["backend", "frontend"] {
        let d = r.deployment(name);
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1), "{name}: one replica");
        let pod_name = app_container(d).env.iter().flatten().find(|e| e.name == "POD_NAME").expect("POD_NAME");
        let field =
            pod_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("POD_NAME from the Downward API");
        assert_eq!(field.field_path, "metadata.name");
        // The task's `kubectl delete pod -l app=frontend` (and `app=backend`) must select these pods.
        assert_eq!(pod_label(d, "app"), Some(name), "{name}: pod label app={name}");
    }

    // Services and ports.
    let backend = app_container(r.deployment("backend"));
    let frontend = app_container(r.deployment("frontend"));
    let svc_b = r.service("svc-backend").spec.as_ref().unwrap();
    assert_eq!(svc_b.type_.as_deref(), Some("ClusterIP"));
    let pb = &svc_b.ports.as_ref().unwrap()[0];
    assert_eq!(pb.port, 5000);
    assert_eq!(pb.target_port, Some(IntOrString::String("http".into())));
    assert_eq!(port_named(backend, "http"), 5000);
    let svc_f = r.service("svc-frontend").spec.as_ref().unwrap();
    assert_eq!(svc_f.type_.as_deref(), Some("NodePort"));
    let pf = &svc_f.ports.as_ref().unwrap()[0];
    assert_eq!((pf.port, pf.node_port), (8080, Some(30080)));
    assert_eq!(pf.target_port, Some(IntOrString::String("http".into())));
    assert_eq!(port_named(frontend, "http"), 8080);

    // Frontend probes.
    let startup = frontend.startup_probe.as_ref().expect("frontend startup probe");
    assert_eq!(http_probe(frontend, startup), ("/startup".to_string(), 8080));
    let liveness = frontend.liveness_probe.as_ref().expect("frontend liveness probe");
    assert_eq!(http_probe(frontend, liveness), ("/health".to_string(), 8080));
    assert_eq!((liveness.period_seconds, liveness.failure_threshold), (Some(5), Some(3)));

    // Frontend preStop: game-over through shutdown-probe, exec form, no shell.
    let hook = pre_stop(r.deployment("frontend")).expect("frontend preStop");
    let probe = hook.probe.expect("an exec shutdown-probe, not a sleep");
    assert_eq!(probe.game_over.as_deref(), Some("http://svc-backend:5000/game-over"));
}

/// The value of a label on a Deployment's pod template.
fn pod_label<'a>(d: &'a Deployment, key: &str) -> Option<&'a str> {
    let labels = d.spec.as_ref()?.template.metadata.as_ref()?.labels.as_ref()?;
    labels.get(key).map(String::as_str)
}

/// Every app overlay labels each tier `app: backend` / `app: frontend` (pods, Deployment and
/// Service), and `-l app=<tier>` selects that tier's pods only.
#[test]
fn app_labels_select_each_tier() {
    for overlay in APP_OVERLAYS {
        let r = load(overlay);
        for tier in ["backend", "frontend"] {
            let d = r.deployment(tier);
            assert_eq!(pod_label(d, "app"), Some(tier), "{overlay}: pods of {tier} lack app={tier}");
            let meta_app = |labels: Option<&BTreeMap<String, String>>| labels.and_then(|l| l.get("app")).cloned();
            assert_eq!(meta_app(d.metadata.labels.as_ref()).as_deref(), Some(tier), "{overlay}: Deployment {tier}");
            let svc = r.service(&format!("svc-{tier}"));
            assert_eq!(meta_app(svc.metadata.labels.as_ref()).as_deref(), Some(tier), "{overlay}: svc-{tier}");
            let selected: Vec<&str> =
                r.deployments.values().filter(|d| pod_label(d, "app") == Some(tier)).map(dname).collect();
            assert_eq!(selected, [tier], "{overlay}: -l app={tier} selects the pods of {selected:?}");
        }
    }
}

#[test]
fn exec_hooks_and_probes_never_use_a_shell() {
    let mut execs = 0;
    for overlay in APP_OVERLAYS.iter().chain(&["otel"]) {
        let r = load(overlay);
        for d in r.deployments.values() {
            for c in &pod_spec(d).containers {
                let handlers = c.lifecycle.iter().flat_map(|l| [l.pre_stop.as_ref(), l.post_start.as_ref()]).flatten();
                let commands = handlers
                    .filter_map(|h| h.exec.as_ref())
                    .chain(
                        [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
                            .into_iter()
                            .flatten()
                            .filter_map(|p| p.exec.as_ref()),
                    )
                    .filter_map(|e| e.command.as_ref());
                for cmd in commands {
                    execs += 1;
                    assert_eq!(cmd.first().map(String::as_str), Some(BINARY), "{overlay}: {}: exec {cmd:?}", dname(d));
                    assert!(
                        !cmd.iter().any(|a| a == "-c" || a.ends_with("/sh") || a == "sh"),
                        "{overlay}: shell in {cmd:?}"
                    );
                }
            }
        }
    }
    assert!(execs >= 6, "expected the graceful overlays' exec hooks, found {execs}");
}

#[test]
fn app_pods_are_locked_down_and_sized() {
    for overlay in APP_OVERLAYS {
        let r = load(overlay);
        for d in r.deployments.values() {
            let name = dname(d);
            let pod = pod_spec(d);
            assert_eq!(pod.automount_service_account_token, Some(false), "{overlay}: {name}");
            let psc = pod.security_context.as_ref().expect("pod securityContext");
            assert_eq!(psc.run_as_non_root, Some(true), "{overlay}: {name}");
            assert_eq!(psc.run_as_user, Some(65532), "{overlay}: {name}");
            assert_eq!(psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()), Some("RuntimeDefault"));
            for c in &pod.containers {
                let sc = c.security_context.as_ref().expect("container securityContext");
                assert_eq!(sc.run_as_non_root, Some(true), "{overlay}: {name}");
                assert_eq!(sc.run_as_user, Some(65532), "{overlay}: {name}");
                assert_eq!(sc.read_only_root_filesystem, Some(true), "{overlay}: {name}");
                assert_eq!(sc.allow_privilege_escalation, Some(false), "{overlay}: {name}");
                let drop = sc.capabilities.as_ref().and_then(|c| c.drop.clone()).unwrap_or_default();
                assert_eq!(drop, ["ALL"], "{overlay}: {name}: capabilities.drop");
                let res = c.resources.as_ref().expect("resources");
                for (kind, set) in [("requests", &res.requests), ("limits", &res.limits)] {
                    let set = set.as_ref().unwrap_or_else(|| panic!("{overlay}: {name}: no {kind}"));
                    assert!(set.contains_key("cpu") && set.contains_key("memory"), "{overlay}: {name}: {kind}");
                }
                // A rollout of 3 replicas under load must finish in well under a minute.
                for p in [&c.readiness_probe, &c.startup_probe].into_iter().flatten() {
                    assert!(
                        p.period_seconds.unwrap_or(10) <= 2,
                        "{overlay}: {name}: probe period {:?}",
                        p.period_seconds
                    );
                }
            }
        }
        // The admin port (probes, /metrics, /prestop) is never behind a Service.
        for (svc_name, svc) in &r.services {
            let spec = svc.spec.as_ref().unwrap();
            for p in spec.ports.iter().flatten() {
                let target = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
                assert_eq!(target, IntOrString::String("http".into()), "{overlay}: {svc_name} targets {target:?}");
            }
        }
    }
}

#[test]
fn pod_disruption_budgets_and_spread_select_their_own_pods() {
    for overlay in GRACEFUL_OVERLAYS {
        let r = load(overlay);
        for d in r.deployments.values() {
            let name = dname(d);
            let selector = d.spec.as_ref().unwrap().selector.match_labels.clone();
            let pdb = r.pdbs.get(name).unwrap_or_else(|| panic!("{overlay}: no PDB for {name}"));
            let spec = pdb.spec.as_ref().unwrap();
            assert_eq!(spec.selector.as_ref().and_then(|s| s.match_labels.clone()), selector, "{overlay}: PDB {name}");
            assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)), "{overlay}: PDB {name}");
            let spread = pod_spec(d).topology_spread_constraints.as_ref().expect("topologySpreadConstraints");
            assert!(spread.iter().all(|t| t.label_selector.as_ref().and_then(|s| s.match_labels.clone()) == selector));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The otel stack
// ---------------------------------------------------------------------------------------------

#[test]
fn otel_pipeline_keeps_every_error_trace_and_reaches_jaeger() {
    let r = load("otel");
    let cm = r
        .config_maps
        .values()
        .find(|c| c.metadata.name.as_deref().unwrap_or("").starts_with("otel-collector-config"))
        .expect("collector ConfigMap");
    let text = cm.data.as_ref().and_then(|d| d.get("collector.yaml")).expect("collector.yaml");
    let cfg: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
    let pipeline = &cfg["service"]["pipelines"]["traces"];
    let list = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_sequence().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
    };
    assert_eq!(list(&pipeline["receivers"]), ["otlp"]);
    let processors = list(&pipeline["processors"]);
    assert!(
        processors.contains(&"tail_sampling".to_string()) && processors.contains(&"batch".to_string()),
        "{processors:?}"
    );
    let policies = cfg["processors"]["tail_sampling"]["policies"].as_sequence().expect("tail_sampling policies");
    let keeps_errors = policies.iter().any(|p| {
        p["type"] == "status_code"
            && p["status_code"]["status_codes"].as_sequence().is_some_and(|s| s.iter().any(|c| c == "ERROR"))
    });
    assert!(keeps_errors, "tail sampling must keep every trace with an error span");
    let exporters = list(&pipeline["exporters"]);
    assert_eq!(exporters.len(), 1);
    assert_eq!(cfg["exporters"][exporters[0].as_str()]["endpoint"].as_str(), Some("jaeger:4317"));

    let ports = |svc: &str| -> Vec<i32> {
        r.service(svc).spec.as_ref().unwrap().ports.iter().flatten().map(|p| p.port).collect::<Vec<_>>()
    };
    assert_eq!(ports("jaeger"), [4317, 4318, 16686]);
    assert_eq!(ports("otel-collector"), [4317, 4318]);
    let ns = r.service("otel-collector").metadata.namespace.clone().expect("otel namespace");

    // The tracing component points at this collector's OTLP/HTTP port.
    let solution = load("solution");
    for d in solution.deployments.values() {
        let env = env_map(app_container(d));
        let want = format!("http://otel-collector.{ns}.svc:4318");
        assert_eq!(env.get("OTEL_EXPORTER_OTLP_ENDPOINT"), Some(&want), "solution {}", dname(d));
        assert_eq!(env.get("OTEL_EXPORTER_OTLP_PROTOCOL").map(String::as_str), Some("http/protobuf"));
        assert!(env.get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("k8s.deployment.name=")));
    }
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------------------------

/// (INSTRUCTION, arguments) with continuations joined and comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (word, rest) = current.split_once(char::is_whitespace).unwrap_or((current.as_str(), ""));
        out.push((word.to_ascii_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    out
}

#[test]
fn dockerfile_builds_a_static_binary_into_an_empty_nonroot_image() {
    let text = read("Dockerfile");
    let ins = dockerfile_instructions(&text);
    let froms: Vec<usize> = ins.iter().enumerate().filter(|(_, (k, _))| k == "FROM").map(|(i, _)| i).collect();
    assert!(froms.len() >= 2, "multi-stage build expected");
    let last = *froms.last().unwrap();
    let runtime_base = ins[last].1.split_whitespace().next().unwrap();
    assert!(
        runtime_base == "scratch" || runtime_base.starts_with("gcr.io/distroless/static"),
        "runtime stage is FROM {runtime_base}"
    );
    let build = &ins[..last];
    let runtime = &ins[last..];

    // A static musl target, and a locked cargo build for it.
    let musl = build.iter().any(|(k, a)| (k == "ARG" || k == "ENV") && a.contains("x86_64-unknown-linux-musl"))
        || build.iter().any(|(k, a)| k == "RUN" && a.contains("--target x86_64-unknown-linux-musl"));
    assert!(musl, "the build stage targets x86_64-unknown-linux-musl");
    let builds: Vec<usize> = build
        .iter()
        .enumerate()
        .filter(|(_, (k, a))| k == "RUN" && a.contains("cargo build"))
        .map(|(i, _)| i)
        .collect();
    assert!(builds.len() >= 2, "a dependency build and a source build");
    for &i in &builds {
        assert!(build[i].1.contains("--target") && build[i].1.contains("--locked") && build[i].1.contains("--release"));
    }
    // Dependency layer cached apart from the sources: manifests copied and built before `src`.
    let copy_manifests =
        build.iter().position(|(k, a)| k == "COPY" && a.contains("Cargo.lock")).expect("COPY Cargo.lock");
    let copy_src = build.iter().position(|(k, a)| k == "COPY" && a.starts_with("src")).expect("COPY src");
    assert!(
        copy_manifests < builds[0] && builds[0] < copy_src && copy_src < builds[1],
        "dependency layer before sources"
    );

    // Runtime: numeric non-root user, the binary as exec-form ENTRYPOINT, OCI labels.
    let user = runtime.iter().rev().find(|(k, _)| k == "USER").map(|(_, a)| a.as_str()).expect("USER in runtime stage");
    for part in user.split(':') {
        let id: u32 = part.parse().unwrap_or_else(|_| panic!("USER {user} must be numeric"));
        assert_ne!(id, 0, "USER {user} must not be root");
    }
    let entry = runtime.iter().rev().find(|(k, _)| k == "ENTRYPOINT").map(|(_, a)| a.as_str()).expect("ENTRYPOINT");
    let entry: Vec<String> =
        serde_json::from_str(entry).unwrap_or_else(|_| panic!("ENTRYPOINT {entry} must be exec form"));
    assert_eq!(entry, [BINARY], "ENTRYPOINT is the binary itself: no shell, no init");
    assert!(
        runtime.iter().any(|(k, a)| k == "COPY" && a.contains("--from=")),
        "the runtime stage copies the binary from the build stage"
    );
    assert!(text.contains(&format!("/out{BINARY}")), "the binary lands at {BINARY}");
    let labels: String = runtime.iter().filter(|(k, _)| k == "LABEL").map(|(_, a)| a.as_str()).collect();
    for key in ["title", "description", "licenses", "version", "revision"] {
        assert!(labels.contains(&format!("org.opencontainers.image.{key}=")), "OCI label {key}");
    }

    // The build context leaves out target/ (gigabytes) and anything not needed.
    let ignore = read(".dockerignore");
    let rules: Vec<&str> = ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert!(
        rules.first() == Some(&"*") || rules.iter().any(|r| r.trim_matches('/') == "target"),
        ".dockerignore must exclude target/"
    );
}

#[test]
fn the_dockerfile_parser_sees_through_continuations() {
    let ins = dockerfile_instructions("# c\nFROM a AS b\nRUN x \\\n  && y\n\nENTRYPOINT [\"/z\"]\n");
    assert_eq!(
        ins,
        [
            ("FROM".to_string(), "a AS b".to_string()),
            ("RUN".to_string(), "x  && y".to_string()),
            ("ENTRYPOINT".to_string(), "[\"/z\"]".to_string())
        ]
    );
}

/// Files the crate embeds at compile time (`include_str!("...")` / `include_bytes!("...")` in
/// `src/`), as paths relative to the repository root.
fn embedded_files() -> Vec<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    walk(&repo.join("src"), &mut sources);
    let mut out = Vec::new();
    for file in sources {
        let text = std::fs::read_to_string(&file).unwrap();
        // Test modules (by convention at the end of a file) are not compiled into the image.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for macro_name in ["include_str!(\"", "include_bytes!(\""] {
            for (i, _) in text.match_indices(macro_name) {
                let rest = &text[i + macro_name.len()..];
                let Some(end) = rest.find('"') else { continue };
                let target = file.parent().unwrap().join(&rest[..end]);
                let mut parts: Vec<String> = Vec::new();
                for c in target.strip_prefix(&repo).unwrap().components() {
                    match c {
                        std::path::Component::ParentDir => {
                            parts.pop();
                        }
                        std::path::Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
                        _ => {}
                    }
                }
                let rel_src = file.strip_prefix(&repo).unwrap().display().to_string();
                out.push((rel_src, parts.join("/")));
            }
        }
    }
    out
}

#[test]
fn the_image_build_context_holds_every_embedded_file() {
    let ins = dockerfile_instructions(&read("Dockerfile"));
    let copied: Vec<String> = ins
        .iter()
        .filter(|(k, a)| k == "COPY" && !a.contains("--from="))
        .flat_map(|(_, a)| {
            let words: Vec<&str> = a.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            words[..words.len().saturating_sub(1)]
                .iter()
                .map(|w| w.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let ignore = read(".dockerignore");
    let allowed: Vec<String> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|p| p.trim_end_matches("/**").trim_end_matches('/').to_string())
        .collect();
    let under = |path: &str, prefix: &String| path == prefix || path.starts_with(&format!("{prefix}/"));
    // The checker itself must be able to fail.
    assert!(!copied.iter().any(|c| under("target/debug/x", c)), "target/ must not be copied");
    for (src, path) in embedded_files() {
        assert!(copied.iter().any(|c| under(&path, c)), "{src} embeds {path}, which no Dockerfile COPY brings in");
        assert!(allowed.iter().any(|a| under(&path, a)), "{src} embeds {path}, which .dockerignore leaves out");
        assert!(root().join(&path).exists(), "{src} embeds {path}, which does not exist");
    }
    for want in ["Cargo.toml", "Cargo.lock", "src"] {
        assert!(copied.contains(&want.to_string()), "the build copies {want}");
        assert!(allowed.contains(&want.to_string()), ".dockerignore lets {want} through");
    }
}
