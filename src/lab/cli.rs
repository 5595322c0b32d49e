//! `graceful lab`'s flags and its timing profiles.

use std::path::PathBuf;
use std::time::Duration;

use crate::lab::kernel_node::node::DeadPod;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// 5 s warmup, 3 s cooldown.
    Default,
    /// For CI: 2 s warmup, 2 s cooldown.
    Short,
}

/// Which node runs the pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeKind {
    /// The kernel node where this machine allows it (root or unprivileged user namespaces, with
    /// ip, nft, conntrack and br_netfilter), else the process node.
    Auto,
    /// Pods in their own network namespaces on a bridge, Services as kube-proxy's nftables rules,
    /// all inside a private world that vanishes with the lab.
    Kernel,
    /// Pods as processes on this machine's loopback addresses, Services as user-space proxies.
    Process,
}

/// What runs a pod's container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A child process of this binary (the image's binary is this binary).
    Process,
    /// A container of the image the manifest names, under runc, in the pod's network namespace
    /// (kernel node only; images from --image).
    Oci,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
By default both embedded overlays run, problem then solution, and the comparison is printed.
Exit status: 0, 1 when an --expect… claim does not hold, 2 on bad flags or manifests or when interrupted
(SIGINT, SIGTERM). See docs/lab.md.

Examples:
  graceful lab
  graceful lab --expect --profile short
  graceful lab -f deploy/rendered/graceful.yaml -f my-overlay.yaml
  kubectl kustomize deploy/kustomize/overlays/solution | graceful lab -f -
  graceful lab --overlay solution --rollouts 10 --expect-clean solution
  graceful lab --sweep-lag 0,1,2,5,10 --profile short
  graceful lab --node kernel --dead-pod blackhole
  graceful lab --node kernel --runtime oci --expect --profile short
  graceful lab -f rendered.yaml --runtime oci --image shop:1.2=oci-archive:shop.tar --entry shop --path /healthz")]
pub struct LabArgs {
    /// A rendered overlay (`kubectl kustomize DIR`); `-` reads stdin. Repeatable: one run each.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub files: Vec<String>,
    /// Embedded overlay to run (problem, solution); repeatable. Default: both, unless -f is given.
    #[arg(long, value_name = "NAME")]
    pub overlay: Vec<String>,
    /// Requests per second (open model: constant arrival rate).
    #[arg(long, value_name = "N")]
    pub rate: Option<f64>,
    /// Load before the first rollout (steady state).
    #[arg(long, value_name = "DURATION")]
    pub warmup: Option<humantime::Duration>,
    /// Load after the last rollout.
    #[arg(long, value_name = "DURATION")]
    pub cooldown: Option<humantime::Duration>,
    /// Client timeout per request.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub timeout: humantime::Duration,
    /// Delay before an endpoint change reaches the Service proxies (kube-proxy, ingress, LB).
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    pub endpoint_lag: humantime::Duration,
    /// Run every overlay once per lag (seconds, e.g. 0,1,2,5,10) and print failures per lag.
    #[arg(long, value_name = "SECS", value_delimiter = ',')]
    pub sweep_lag: Vec<f64>,
    /// Rollouts back to back in each run.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub rollouts: usize,
    /// Deployments to restart (comma-separated). Default: all of them.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub restart: Vec<String>,
    /// Restart the Deployments one after the other instead of together
    /// (`kubectl rollout restart deploy/backend deploy/frontend` restarts them together).
    #[arg(long)]
    pub sequential: bool,
    /// The Service that takes the load. Default: the one NodePort/LoadBalancer Service.
    #[arg(long, value_name = "SERVICE")]
    pub entry: Option<String>,
    /// Path requested through the entry Service.
    #[arg(long, default_value = "/api/data")]
    pub path: String,
    /// Timing profile; explicit --rate/--warmup/--cooldown win.
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    pub profile: Profile,
    /// Run directory (pod logs, config volumes, timelines). Default: a new one under the temp dir.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Write every run's results (requests, pods, events, attribution) as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Shorthand for `--expect-clean solution --expect-failures problem`.
    #[arg(long)]
    pub expect: bool,
    /// Fail unless this run loses no request (repeatable).
    #[arg(long, value_name = "NAME")]
    pub expect_clean: Vec<String>,
    /// Fail unless this run loses at least one request (repeatable).
    #[arg(long, value_name = "NAME")]
    pub expect_failures: Vec<String>,
    /// Fail unless at least this percentage of each run's failures is attributed.
    #[arg(long, value_name = "PCT")]
    pub expect_attributed: Option<f64>,
    /// Fail unless, in every run expected clean, the worst latency during the rollouts stays
    /// within this much of the steady-state worst (e.g. 25ms): the drain must not make users wait.
    #[arg(long, value_name = "DURATION")]
    pub expect_rollout_latency: Option<humantime::Duration>,
    /// Do not collect spans (no OTLP receiver; attribution from the lab's own records only).
    #[arg(long)]
    pub no_tracing: bool,
    /// Also send every span the pods export to this OTLP endpoint (a local Jaeger:
    /// http://localhost:4318), tagged `graceful.lab.run=<run>`. Never slows the pods: what cannot
    /// be sent is dropped and counted.
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_forward: Option<String>,
    /// Protocol for --otlp-forward. Default: OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf.
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    pub otlp_forward_protocol: Option<crate::lab::otlp_forward::Protocol>,
    /// Time from a pod's last container exit to its sandbox (and address) being torn down.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub sandbox_teardown: humantime::Duration,
    /// Which node runs the pods (the report says which ran).
    #[arg(long, value_enum, default_value_t = NodeKind::Auto)]
    pub node: NodeKind,
    /// What runs the pods' containers: `process` (this binary as a child process) or `oci`
    /// (containers of the manifests' images under runc; needs --node kernel, root, runc, umoci).
    #[arg(long, value_enum, default_value_t = RuntimeKind::Process)]
    pub runtime: RuntimeKind,
    /// With --runtime oci: the local OCI image a manifest's image name stands for
    /// (`NAME=oci-archive:PATH[:TAG]` or `NAME=oci:DIR[:TAG]`); repeatable. graceful:latest
    /// defaults to target/image/graceful.oci.tar beside this binary, when present.
    #[arg(long = "image", value_name = "NAME=SOURCE")]
    pub images: Vec<crate::lab::node::oci::ImageRef>,
    /// On the kernel node, what a torn-down pod's address does to new connections: `unreachable`
    /// (no neighbour entry left: EHOSTUNREACH after ~3 s, as on a bridge CNI such as flannel)
    /// or `blackhole` (SYNs vanish: a bridge CNI with the entry still cached, Calico's blackhole
    /// route). docs/lab.md says which CNI does which.
    #[arg(long, value_enum, default_value_t = DeadPod::Unreachable)]
    pub dead_pod: DeadPod,
    /// Pod creation → container start, on top of what the real work here costs: sandbox and
    /// network set-up, runtime start and status sync on a real node (image already present).
    /// Default 1 s, inside Kubernetes' pod start-up SLO (p99 ≤ 5 s, image pull excluded);
    /// 0s shows the lab's own cost alone.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub pod_start: humantime::Duration,
    /// Internal: this lab already runs inside its private world (see --node kernel).
    #[arg(long, hide = true)]
    pub inside_world: bool,
    /// Most requests in flight before the generator counts new ones as overload.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub max_in_flight: usize,
    /// Use k6 as the load source: run this k6 script (loadtest/rolling-update.js) against the entry
    /// Service, start the rollout on its GRACEFUL-ROLLOUT-PHASE-START line, report k6's figures
    /// beside the lab's attribution of its failures. k6: $K6, PATH, or Python's scripts dir.
    #[arg(long, value_name = "SCRIPT")]
    pub k6: Option<PathBuf>,
    /// With --k6: length of k6's rollout phase (ROLLOUT). Default: 15 s + the endpoint lag per rollout.
    #[arg(long, value_name = "DURATION", requires = "k6")]
    pub k6_rollout: Option<humantime::Duration>,
    /// No progress line (one line per finished run remains, on stderr).
    #[arg(long, short)]
    pub quiet: bool,
    /// Let exec hooks, exec probes and `containers[].command` run programs of this machine other
    /// than this binary (refused by default: a manifest you did not write could run anything).
    #[arg(long)]
    pub allow_host_exec: bool,
    /// Internal: the guard that kills the run's process group when the lab ends (see run_group).
    #[arg(long, hide = true)]
    pub run_group_guard: bool,
}

impl LabArgs {
    /// Flag values that would make a run meaningless or hang, refused before anything starts.
    pub fn check(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.rollouts == 0 {
            bail!("--rollouts must be at least 1");
        }
        if self.rate.is_some_and(|r| !(r > 0.0 && r <= 5000.0)) {
            bail!("--rate must be in (0, 5000]");
        }
        if Duration::from(self.timeout).is_zero() {
            bail!("--timeout {}: must be more than 0 (every request would fail)", self.timeout);
        }
        if self.max_in_flight == 0 {
            bail!("--max-in-flight 0: must be at least 1 (every request would count as overload)");
        }
        if let Some(p) = self.expect_attributed {
            if !(0.0..=100.0).contains(&p) {
                bail!("--expect-attributed {p}: a percentage, 0 to 100");
            }
        }
        if let Some(s) = self.sweep_lag.iter().find(|s| !(s.is_finite() && **s >= 0.0 && **s <= 600.0)) {
            bail!("--sweep-lag {s}: each lag is in seconds, 0 to 600");
        }
        if Duration::from(self.endpoint_lag) > Duration::from_secs(600) {
            bail!("--endpoint-lag {}: at most 10m", self.endpoint_lag);
        }
        if self.k6_rollout.is_some_and(|d| Duration::from(d).is_zero()) {
            bail!("--k6-rollout 0s: k6's rollout phase must last more than 0");
        }
        if Duration::from(self.pod_start) > Duration::from_secs(60) {
            bail!("--pod-start {}: at most 60s", self.pod_start);
        }
        if self.runtime == RuntimeKind::Oci && self.node == NodeKind::Process {
            bail!("--runtime oci: needs the kernel node (--node kernel), not --node process");
        }
        if self.runtime == RuntimeKind::Process {
            if let Some(i) = self.images.first() {
                bail!("--image {i}: images are only run with --runtime oci");
            }
        }
        if !self.path.starts_with('/') {
            bail!("--path {}: must start with `/`", self.path);
        }
        Ok(())
    }
}

impl Profile {
    /// Warmup before the first rollout and cooldown after the last.
    pub fn warmup_cooldown(self) -> (Duration, Duration) {
        match self {
            Profile::Default => (Duration::from_secs(5), Duration::from_secs(3)),
            Profile::Short => (Duration::from_secs(2), Duration::from_secs(2)),
        }
    }
}
