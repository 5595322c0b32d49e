//! `graceful lab`: Kubernetes' termination race played on one machine, around the real binary.
//!
//! One folder per Kubernetes part: `api` (the store every controller acts through, manifest
//! admission), `control_plane` (Deployment, ReplicaSet, EndpointSlice controllers), `node` (the
//! kubelet, its prober, pod spec → process), `network` (addresses, kube-proxy), `load` (the
//! generator, k6) and `report` (results, attribution, timeline). `scenario` wires one run: the
//! objects of a rendered overlay, open-model load through the frontend Service, the rollouts,
//! and every failed request explained from the pods' spans. Dependencies point one way, in that
//! order. See docs/lab.md for what it mirrors and what it simplifies.

pub mod api;
pub mod cli;
pub mod control_plane;
pub mod expect;
pub mod kernel_node;
pub mod load;
pub mod network;
pub mod node;
pub mod otlp_forward;
pub mod report;
pub mod scenario;
pub mod world;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::config::ConfigFile;
use crate::otlp_receiver::OtlpReceiver;
use api::manifest::Manifest;
pub use cli::{LabArgs, Profile};
use expect::{check_expectations, Expectation};
use report::result::RunResult;
use scenario::RunConfig;

/// The overlays rendered by deploy/render.sh, compiled in so `graceful lab` needs no checkout.
pub fn embedded_overlays() -> Vec<(&'static str, &'static str)> {
    vec![
        ("problem", include_str!("../../deploy/rendered/problem.yaml")),
        ("solution", include_str!("../../deploy/rendered/solution.yaml")),
    ]
}

struct Input {
    name: String,
    manifest: Manifest,
}

fn load_inputs(args: &LabArgs) -> Result<Vec<Input>> {
    let admission = api::manifest::Admission {
        allow_host_exec: args.allow_host_exec,
        in_containers: args.runtime == cli::RuntimeKind::Oci,
    };
    let mut out = Vec::new();
    let embedded = embedded_overlays();
    let wanted: Vec<String> = if args.overlay.is_empty() && args.files.is_empty() {
        embedded.iter().map(|(n, _)| n.to_string()).collect()
    } else {
        args.overlay.clone()
    };
    for name in &wanted {
        let (_, text) = embedded.iter().find(|(n, _)| n == name).with_context(|| {
            let names: Vec<&str> = embedded.iter().map(|(n, _)| *n).collect();
            format!("--overlay {name}: not embedded (embedded: {}); use -f FILE", names.join(", "))
        })?;
        out.push(Input { name: name.clone(), manifest: api::manifest::admit(name, text, admission)? });
    }
    for f in &args.files {
        let (name, text) = if f == "-" {
            let mut s = String::new();
            // One byte over the bound is enough for admission to name the excess.
            std::io::stdin()
                .take(api::manifest::MAX_MANIFEST_BYTES as u64 + 1)
                .read_to_string(&mut s)
                .context("reading the manifest from stdin")?;
            ("stdin".to_string(), s)
        } else {
            let text = read_bounded(f)?;
            let stem = std::path::Path::new(f)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| f.clone());
            (stem, text)
        };
        out.push(Input { manifest: api::manifest::admit(&name, &text, admission)?, name });
    }
    let mut seen = std::collections::HashMap::new();
    for i in &mut out {
        let n = seen.entry(i.name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            i.name = format!("{}-{n}", i.name);
        }
    }
    Ok(out)
}

/// Reads a manifest file, refusing one larger than admission's bound before reading it all.
fn read_bounded(f: &str) -> Result<String> {
    let file = std::fs::File::open(f).with_context(|| format!("reading {f}"))?;
    let mut text = String::new();
    file.take(api::manifest::MAX_MANIFEST_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {f}"))?;
    Ok(text)
}

pub fn run(args: LabArgs, config: Option<ConfigFile>) -> Result<ExitCode> {
    if args.run_group_guard {
        return Ok(node::run_group::guard());
    }
    if let Some(c) = config {
        eprintln!(
            "note: {} ({}) is not used by the lab: its pods read their configuration from the manifests",
            c.path.display(),
            c.via
        );
    }
    args.check()?;
    let decided = world::decide(&args)?;
    if matches!(decided, world::Decided::EnterWorld) {
        return world::run_in_world();
    }
    if args.runtime == cli::RuntimeKind::Oci && matches!(decided, world::Decided::Process) {
        bail!("--runtime oci: needs the kernel node, which this machine does not offer (see above); use --runtime process");
    }
    let inputs = load_inputs(&args)?;
    check_names(&args, &inputs)?;
    let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
    expect::check_claims(&args, &names)?;
    let k6 = match &args.k6 {
        Some(script) => {
            let script =
                std::fs::canonicalize(script).with_context(|| format!("--k6 {}: no such script", script.display()))?;
            Some((load::k6::find_k6().context("--k6")?, script))
        }
        None => None,
    };
    raise_fd_limit();
    // Declared before the runtime so it drops after it: the pods are killed first, then the
    // guard kills whatever of the run's process group is left (a hook's own children).
    let exe = std::env::current_exe().context("locating this binary (the pods run it)")?;
    let _group = node::run_group::RunGroup::start(&exe)?;
    // The kernel node is built before the runtimes, whose threads are then born in it (and the
    // client's runtime in the client namespace).
    // Spans forwarded to the user's endpoint leave from the host's network, not the node's.
    let host_rt = match (&decided, &args.otlp_forward) {
        (world::Decided::Kernel, Some(url)) if !args.no_tracing => Some(world::host_runtime().with_context(|| {
            format!("--otlp-forward {url}: the kernel node cannot reach the host's network here (use --node process)")
        })?),
        _ => None,
    };
    let kernel = match decided {
        world::Decided::Kernel => {
            let (node, isolation) = world::build_node()?;
            let client_netns = node.lock().unwrap_or_else(|e| e.into_inner()).client.clone();
            let client_rt = client_netns.runtime(1)?;
            Some((node, isolation, client_netns, client_rt))
        }
        _ => None,
    };
    let env = match &kernel {
        Some((node, isolation, client_netns, client_rt)) => {
            let env = scenario::KernelEnv {
                node: node.clone(),
                client: client_rt.handle().clone(),
                client_netns: client_netns.clone(),
                dead_pod: args.dead_pod,
                oci: None,
            };
            (scenario::NodeEnv::Kernel(env), Some(*isolation))
        }
        None => (scenario::NodeEnv::Process, None),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("lab")
        .build()
        .context("starting the lab's runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // SIGTERM (a CI runner's cancel, `kill`) takes the same path as Ctrl-C.
        let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        tokio::select! {
            r = run_all(&args, inputs, k6, &env, host_rt.as_ref().map(|r| r.handle().clone())) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted (SIGINT); every pod was killed"),
            _ = term.recv() => bail!("interrupted (SIGTERM); every pod was killed"),
        }
    })
}

/// `--entry` and `--restart` name objects every input must have: refused before any pod starts.
fn check_names(args: &LabArgs, inputs: &[Input]) -> Result<()> {
    for input in inputs {
        let m = &input.manifest;
        let services: Vec<&str> = m.services.iter().filter_map(|s| s.metadata.name.as_deref()).collect();
        if let Some(entry) = args.entry.as_deref().filter(|e| !services.contains(e)) {
            bail!("--entry {entry}: no such Service in {} (it has {})", input.name, services.join(", "));
        }
        let deployments: Vec<&str> = m.deployments.iter().filter_map(|d| d.metadata.name.as_deref()).collect();
        if let Some(r) = args.restart.iter().find(|r| !deployments.contains(&r.as_str())) {
            bail!("--restart {r}: no such Deployment in {} (it has {})", input.name, deployments.join(", "));
        }
    }
    Ok(())
}

/// Hung connections (a gone pod's address) pile up for seconds at 200 req/s, each holding a client
/// and a proxy socket: lift the soft file-descriptor limit (often 1024) to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

async fn run_all(
    args: &LabArgs,
    inputs: Vec<Input>,
    k6: Option<(PathBuf, PathBuf)>,
    (env, isolation): &(scenario::NodeEnv, Option<kernel_node::private_world::Isolation>),
    forward_from: Option<tokio::runtime::Handle>,
) -> Result<ExitCode> {
    let started = tokio::time::Instant::now();
    let plan = Plan::of(args, k6)?;
    let Plan { rate, ref lags, ref out, ref k6, .. } = plan;
    let env = &match (env, args.runtime) {
        (scenario::NodeEnv::Kernel(k), cli::RuntimeKind::Oci) => {
            let manifests: Vec<&Manifest> = inputs.iter().map(|i| &i.manifest).collect();
            let oci = node::runtime::OciNode::start(args.images.clone(), &plan.exe, out, &manifests).await?;
            scenario::NodeEnv::Kernel(scenario::KernelEnv { oci: Some(Arc::new(oci)), ..k.clone() })
        }
        _ => env.clone(),
    };
    let (net, receiver_addr) = match env {
        scenario::NodeEnv::Process => (network::ipam::Net::detect(), "127.0.0.1:0"),
        // Inside the node's namespace: the pods reach it on the bridge's address.
        scenario::NodeEnv::Kernel(k) => (network::ipam::Net::kernel(k.node.clone()), "0.0.0.0:0"),
    };
    let net = Arc::new(net);
    let receiver = if args.no_tracing {
        None
    } else {
        Some(OtlpReceiver::start(receiver_addr.parse().unwrap()).context("starting the OTLP receiver")?)
    };
    let traces = report::trace_export::start(args, receiver.as_ref(), forward_from.clone())?;
    let progress = report::progress::Progress::new(args.quiet);
    let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
    let node = match (env, isolation) {
        (scenario::NodeEnv::Kernel(k), Some(i)) => {
            format!(
                "kernel node (namespaces, nftables, conntrack; {}; dead pods {:?})",
                match i {
                    kernel_node::private_world::Isolation::Root => "as root",
                    kernel_node::private_world::Isolation::UserNamespace => "rootless, in a user namespace",
                },
                k.dead_pod
            )
            .to_lowercase()
                + &k.oci.as_ref().map(|o| format!("; {}", o.describe())).unwrap_or_default()
        }
        _ => "process node".to_string(),
    };
    progress.println(&format!(
        "graceful lab on the {node}: {} at {rate:.0} req/s{}, endpoint lag {}, pod start {}, {} rollout(s){}; run dir {}",
        names.join(", "),
        k6.as_ref().map(|(b, s)| format!(" by k6 ({} {})", b.display(), s.display())).unwrap_or_default(),
        lags.iter().map(|l| format!("{:.1} s", l.as_secs_f64())).collect::<Vec<_>>().join(" / "),
        args.pod_start,
        args.rollouts,
        if matches!(net.mode, network::ipam::Mode::SharedLoopback) {
            " (shared 127.0.0.1: ports remapped)"
        } else {
            ""
        },
        out.display()
    ));

    let mut results: Vec<RunResult> = Vec::new();
    for lag in lags {
        for input in &inputs {
            let dir_name =
                if lags.len() > 1 { format!("{}-lag{}ms", input.name, lag.as_millis()) } else { input.name.clone() };
            let cfg = plan.run_config(args, &input.name, &dir_name, *lag);
            if let Some(t) = &traces {
                t.begin_run(&report::trace_export::run_name(&dir_name), &cfg.run_dir)?;
            }
            let mut r = scenario::run(&cfg, &input.manifest, env, net.clone(), receiver.as_ref(), &progress)
                .await
                .with_context(|| format!("run `{}` (logs under {})", input.name, cfg.run_dir.display()))?;
            if let Some(t) = &traces {
                r.traces = t.end_run().await;
            }
            progress.println(&one_line(&r));
            if let Some(t) = &r.traces {
                progress.println(&format!("    traces: {}", t.line()));
            }
            results.push(r);
        }
    }
    progress.done();
    print_report(args, &results, rate, lags.len() > 1);
    let expectations = check_expectations(args, &results)?;
    for e in &expectations {
        println!("{} {} ({})", if e.held { "✔" } else { "✘" }, e.claim, e.detail);
    }
    println!(
        "lab finished in {:.1} s on the {} node; pod logs under {}",
        started.elapsed().as_secs_f64(),
        env.describe(),
        out.display()
    );
    if let Some(path) = &args.json {
        write_json(path, &results, &expectations)?;
    }
    Ok(if expectations.iter().all(|e| e.held) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// A finished run in one line (the progress output).
fn one_line(r: &RunResult) -> String {
    format!(
        "  {:<10} lag {:>4.1} s: {} requests, {} failed ({:.2} %), worst {:.0} ms, rollout {:.1} s, {}/{} attributed — {}",
        r.name,
        r.endpoint_lag_ms / 1000.0,
        r.summary.requests,
        r.summary.failed,
        r.summary.failed_pct,
        r.summary.max_ms,
        r.summary.rollout_ms / 1000.0,
        r.attribution.attributed,
        r.attribution.failed,
        r.timeline.display()
    )
}

/// The tables: the sweep's, or the comparison with each run's failures and timeline.
fn print_report(args: &LabArgs, results: &[RunResult], rate: f64, sweep: bool) {
    if sweep {
        println!("Failures per endpoint lag ({} rollout(s) per run, {rate:.0} req/s):", args.rollouts);
        println!("{}", report::result::sweep_table(results));
    } else {
        println!("{}", report::result::comparison(results));
        for r in results {
            if let Some(t) = report::result::failure_table(r) {
                println!("\n{}: where the {} failures happened", r.name, r.summary.failed);
                println!("{t}");
            }
            if !r.attribution.unexplained.is_empty() {
                println!("{}: {} failures not attributed:", r.name, r.attribution.unexplained.len());
                for u in r.attribution.unexplained.iter().take(10) {
                    println!("  request {} ({}, trace {}): {}", u.request, u.outcome, u.trace_id, u.why);
                }
            }
        }
        println!();
        for r in results {
            println!("timeline {}: {}", r.name, r.timeline.display());
        }
    }
}

/// `--json`: every run and every claim.
fn write_json(path: &std::path::Path, results: &[RunResult], expectations: &[Expectation]) -> Result<()> {
    #[derive(Serialize)]
    struct Doc<'a> {
        runs: &'a [RunResult],
        expectations: &'a [Expectation],
    }
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    serde_json::to_writer(std::io::BufWriter::new(file), &Doc { runs: results, expectations })
        .with_context(|| format!("writing {}", path.display()))
}

/// What every run of this invocation shares, from the flags.
struct Plan {
    warmup: Duration,
    cooldown: Duration,
    rate: f64,
    lags: Vec<Duration>,
    out: PathBuf,
    exe: PathBuf,
    /// k6's binary and script, with --k6.
    k6: Option<(PathBuf, PathBuf)>,
}

impl Plan {
    fn of(args: &LabArgs, k6: Option<(PathBuf, PathBuf)>) -> Result<Plan> {
        let (warmup, cooldown) = args.profile.warmup_cooldown();
        let lags: Vec<Duration> = if args.sweep_lag.is_empty() {
            vec![args.endpoint_lag.into()]
        } else {
            args.sweep_lag.iter().map(|s| Duration::from_secs_f64(s.max(0.0))).collect()
        };
        // Absolute: container bundles and bind mounts name paths under it, and runc resolves a
        // relative one against the bundle, not against where the lab was started.
        let out = match &args.out {
            Some(d) => std::path::absolute(d).with_context(|| format!("--out {}", d.display()))?,
            None => {
                let stamp =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
                std::env::temp_dir().join(format!("graceful-lab-{stamp}-{}", std::process::id()))
            }
        };
        Ok(Plan {
            warmup: args.warmup.map(Into::into).unwrap_or(warmup),
            cooldown: args.cooldown.map(Into::into).unwrap_or(cooldown),
            rate: args.rate.unwrap_or(200.0),
            lags,
            out,
            exe: std::env::current_exe().context("locating this binary (the pods run it)")?,
            k6,
        })
    }

    fn run_config(&self, args: &LabArgs, name: &str, dir_name: &str, lag: Duration) -> RunConfig {
        RunConfig {
            name: name.to_string(),
            lag,
            rate: self.rate,
            warmup: self.warmup,
            cooldown: self.cooldown,
            timeout: args.timeout.into(),
            rollouts: args.rollouts,
            restart: args.restart.clone(),
            sequential: args.sequential,
            entry: args.entry.clone(),
            path: args.path.clone(),
            max_in_flight: args.max_in_flight,
            exe: self.exe.clone(),
            run_dir: self.out.join(dir_name),
            sandbox_teardown: args.sandbox_teardown.into(),
            pod_start: args.pod_start.into(),
            limit: Duration::from_secs(120),
            k6: self.k6.as_ref().map(|(bin, script)| scenario::K6Source {
                bin: bin.clone(),
                script: script.clone(),
                rollout_phase: args
                    .k6_rollout
                    .map(Into::into)
                    .unwrap_or((Duration::from_secs(15) + lag) * args.rollouts as u32),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        lab: LabArgs,
    }

    /// runc resolves relative paths against the bundle: a relative `--out` must not reach it.
    #[test]
    fn the_run_directory_is_absolute_whatever_out_says() {
        let args = <Cli as clap::Parser>::parse_from(["lab", "--out", "target/ci/lab"]).lab;
        let plan = Plan::of(&args, None).unwrap();
        assert!(plan.out.is_absolute() && plan.out.ends_with("target/ci/lab"), "{}", plan.out.display());
    }

    #[test]
    fn embedded_overlays_are_the_rendered_ones() {
        let names: Vec<&str> = embedded_overlays().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["problem", "solution"]);
    }
}
