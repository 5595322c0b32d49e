//! The lab's "API server": pod objects with their conditions and timestamps, an event log for
//! the timeline, and a change signal every controller watches.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};
use serde::Serialize;
use tokio::sync::watch;

use crate::lab::network::ipam::PodNet;

/// One time base for the whole run: monotonic offsets, convertible to and from the Unix time
/// that spans carry. tokio's `Instant` so that tests with a paused clock see the same time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    unix_start_nanos: u128,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    pub fn new() -> Clock {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        Clock { start: Instant::now(), unix_start_nanos: unix }
    }

    /// Time since the run began.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn at(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }

    pub fn instant(&self, d: Duration) -> Instant {
        self.start + d
    }

    /// A span timestamp as milliseconds since the run began (negative if before).
    pub fn unix_nanos_to_ms(&self, nanos: u64) -> f64 {
        (nanos as f64 - self.unix_start_nanos as f64) / 1e6
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((ms(*d) * 10.0).round() / 10.0)
}

pub(crate) fn ser_opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_ms(d, s),
        None => s.serialize_none(),
    }
}

/// A container's named ports (`http` -> 5000), for named targetPorts and probe ports.
pub fn named_ports(c: &Container) -> BTreeMap<String, u16> {
    c.ports.iter().flatten().filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?))).collect()
}

/// A pod as the API server and kubelet report it. Times are offsets from the run's start.
#[derive(Debug, Clone, Serialize)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub deployment: String,
    /// `pod-template-hash`: which ReplicaSet the pod belongs to.
    pub template_hash: String,
    pub labels: BTreeMap<String, String>,
    pub ip: std::net::IpAddr,
    #[serde(skip)]
    pub net: PodNet,
    /// The container's named ports (`http` -> 5000), for Services' named targetPorts.
    #[serde(skip)]
    pub named_ports: BTreeMap<String, u16>,
    #[serde(serialize_with = "ser_ms", rename = "created_ms")]
    pub created: Duration,
    /// A container process is running.
    pub running: bool,
    /// The startup probe has passed (or there is none).
    pub started: bool,
    /// The pod's Ready condition.
    pub ready: bool,
    #[serde(serialize_with = "ser_opt_ms", rename = "ready_since_ms")]
    pub ready_since: Option<Duration>,
    /// deletionTimestamp: the pod is Terminating from here on.
    #[serde(serialize_with = "ser_opt_ms", rename = "deleted_ms")]
    pub deleted: Option<Duration>,
    #[serde(serialize_with = "ser_opt_ms", rename = "sigterm_ms")]
    pub sigterm: Option<Duration>,
    #[serde(serialize_with = "ser_opt_ms", rename = "exited_ms")]
    pub exited: Option<Duration>,
    /// Removed from the API: its last container has stopped after deletion.
    #[serde(serialize_with = "ser_opt_ms", rename = "gone_ms")]
    pub gone: Option<Duration>,
    pub restarts: u32,
    /// The pod's spec as the API holds it; the kubelet reads it to start the container.
    #[serde(skip)]
    pub spec: Arc<PodTemplateSpec>,
    #[serde(skip)]
    pub uid: String,
    /// The kubelet could not turn the spec into a container (CreateContainerConfigError).
    #[serde(skip)]
    pub config_error: Option<String>,
}

impl Pod {
    /// A pod as its ReplicaSet first writes it: nothing running or observed yet, no labels, an
    /// empty spec. Callers set the rest with struct update syntax.
    pub fn new(name: &str, deployment: &str, template_hash: &str, net: PodNet) -> Pod {
        Pod {
            name: name.to_string(),
            namespace: "default".to_string(),
            deployment: deployment.to_string(),
            template_hash: template_hash.to_string(),
            labels: BTreeMap::new(),
            ip: net.ip,
            net,
            named_ports: BTreeMap::new(),
            created: Duration::ZERO,
            running: false,
            started: false,
            ready: false,
            ready_since: None,
            deleted: None,
            sigterm: None,
            exited: None,
            gone: None,
            restarts: 0,
            spec: Arc::default(),
            uid: String::new(),
            config_error: None,
        }
    }

    /// Ready for at least `min_ready` now: the Deployment controller's "available".
    pub fn available(&self, now: Duration, min_ready: Duration) -> bool {
        self.ready && self.deleted.is_none() && self.ready_since.is_some_and(|t| now.saturating_sub(t) >= min_ready)
    }

    /// Where in its life the pod was at `t`, from the lab's own records.
    pub fn phase_at(&self, t: Duration) -> PodPhase {
        if self.exited.is_some_and(|e| t >= e) && self.deleted.is_some() {
            PodPhase::Exited
        } else if self.sigterm.is_some_and(|s| t >= s) {
            PodPhase::AfterSigterm
        } else if self.deleted.is_some_and(|d| t >= d) {
            PodPhase::PreStop
        } else if self.ready_since.is_some_and(|r| t >= r) {
            PodPhase::Serving
        } else {
            PodPhase::Starting
        }
    }
}

/// A pod's shutdown phase at some moment, as the lab's records tell it (attribution's fallback
/// when no span says it; the timeline's lanes are a different, finer view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Starting,
    Serving,
    PreStop,
    AfterSigterm,
    Exited,
}

impl std::fmt::Display for PodPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PodPhase::Starting => "starting",
            PodPhase::Serving => "serving",
            PodPhase::PreStop => "prestop",
            PodPhase::AfterSigterm => "after-sigterm",
            PodPhase::Exited => "exited",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Created,
    ContainerStarted,
    Ready,
    NotReady,
    Deleted,
    PreStopStarted,
    PreStopFinished,
    PreStopFailed,
    Sigterm,
    Sigkill,
    Exited,
    ProbeFailed,
    Restarting,
    Gone,
    /// The Service proxy starts routing new connections to the pod (after the lag).
    EndpointAdded,
    /// The Service proxy stops routing new connections to the pod (after the lag).
    EndpointRemoved,
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    #[serde(serialize_with = "ser_ms", rename = "at_ms")]
    pub at: Duration,
    pub pod: String,
    pub kind: EventKind,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Default)]
struct State {
    pods: BTreeMap<String, Pod>,
    events: Vec<Event>,
}

pub struct Cluster {
    pub clock: Clock,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Cluster {
    pub fn new(clock: Clock) -> Cluster {
        Cluster { clock, state: Mutex::default(), changed: watch::channel(0).0 }
    }

    /// A receiver that wakes on every pod change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    pub fn add_pod(&self, pod: Pod) {
        let name = pod.name.clone();
        let at = pod.created;
        {
            let mut st = self.state.lock().unwrap();
            st.pods.insert(name.clone(), pod);
            st.events.push(Event { at, pod: name, kind: EventKind::Created, detail: String::new() });
        }
        self.bump();
    }

    /// Changes a pod and signals watchers; returns false when the pod does not exist.
    pub fn update_pod(&self, name: &str, f: impl FnOnce(&mut Pod)) -> bool {
        let found = {
            let mut st = self.state.lock().unwrap();
            match st.pods.get_mut(name) {
                Some(p) => {
                    f(p);
                    true
                }
                None => false,
            }
        };
        if found {
            self.bump();
        }
        found
    }

    /// Sets the deletionTimestamp (once); the kubelet watching the pod takes it from there.
    pub fn delete_pod(&self, name: &str) {
        let at = self.clock.now();
        {
            let mut st = self.state.lock().unwrap();
            match st.pods.get_mut(name) {
                Some(p) if p.deleted.is_none() => p.deleted = Some(at),
                _ => return,
            }
            // Logged before watchers wake, so the kubelet's preStop event comes after it.
            st.events.push(Event { at, pod: name.to_string(), kind: EventKind::Deleted, detail: String::new() });
        }
        self.bump();
    }

    /// A pod the API no longer has counts as deleted.
    pub fn is_deleted(&self, name: &str) -> bool {
        self.state.lock().unwrap().pods.get(name).is_none_or(|p| p.deleted.is_some())
    }

    pub fn event(&self, pod: &str, kind: EventKind, detail: impl Into<String>) {
        let at = self.clock.now();
        self.state.lock().unwrap().events.push(Event { at, pod: pod.to_string(), kind, detail: detail.into() });
    }

    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.state.lock().unwrap().pods.get(name).cloned()
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.state.lock().unwrap().pods.values().cloned().collect()
    }

    pub fn events(&self) -> Vec<Event> {
        self.state.lock().unwrap().events.clone()
    }

    /// The pod listening at `addr` (pod addresses are never reused within a lab process).
    pub fn pod_by_addr(&self, addr: std::net::SocketAddr) -> Option<Pod> {
        self.state.lock().unwrap().pods.values().find(|p| p.net.owns(addr)).cloned()
    }
}
