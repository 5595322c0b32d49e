//! `graceful lab`: Kubernetes' termination race played on one machine, around the real binary.
//!
//! The lab plays the cluster's part — kube-proxy and endpoints (`service_proxy`, `endpoints`),
//! the kubelet (`kubelet`, `probes`, `container`), the Deployment controller (`deployment`) —
//! for the objects of a rendered overlay (`manifest`), puts open-model load through the
//! frontend Service (`load`), rolls the Deployments, and explains every failed request from the
//! pods' spans (`attribution`). See docs/lab.md for what it mirrors and what it simplifies.

pub mod api;
pub mod control_plane;
pub mod kernel_node;
pub mod load;
pub mod network;
pub mod node;
pub mod report;
pub mod scenario;

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
use report::result::RunResult;
use scenario::RunConfig;

/// The overlays rendered by deploy/render.sh, compiled in so `graceful lab` needs no checkout.
pub fn embedded_overlays() -> Vec<(&'static str, &'static str)> {
    vec![
        ("problem", include_str!("../../deploy/rendered/problem.yaml")),
        ("solution", include_str!("../../deploy/rendered/solution.yaml")),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// 5 s warmup, 3 s cooldown.
    Default,
    /// For CI: 2 s warmup, 2 s cooldown.
    Short,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
By default both embedded overlays run, problem then solution, and the comparison is printed.
Exit status: 0, or 1 when an --expect… claim does not hold. See docs/lab.md.

Examples:
  graceful lab
  graceful lab --expect --profile short
  graceful lab -f deploy/rendered/graceful.yaml -f my-overlay.yaml
  kubectl kustomize deploy/kustomize/overlays/solution | graceful lab -f -
  graceful lab --overlay solution --rollouts 10 --expect-clean solution
  graceful lab --sweep-lag 0,1,2,5,10 --profile short")]
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
    /// Time from a pod's last container exit to its sandbox (and address) being torn down.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub sandbox_teardown: humantime::Duration,
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
}

struct Input {
    name: String,
    manifest: Manifest,
}

fn load_inputs(args: &LabArgs) -> Result<Vec<Input>> {
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
        out.push(Input { name: name.clone(), manifest: api::manifest::parse(name, text)? });
    }
    for f in &args.files {
        let (name, text) = if f == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading the manifest from stdin")?;
            ("stdin".to_string(), s)
        } else {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?;
            let stem = std::path::Path::new(f)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| f.clone());
            (stem, text)
        };
        out.push(Input { manifest: api::manifest::parse(&name, &text)?, name });
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

#[derive(Debug, Serialize)]
struct Expectation {
    claim: String,
    held: bool,
    detail: String,
}

fn check_expectations(args: &LabArgs, runs: &[RunResult]) -> Result<Vec<Expectation>> {
    let mut clean = args.expect_clean.clone();
    let mut failing = args.expect_failures.clone();
    if args.expect {
        // The shorthand speaks about the embedded overlays that ran.
        for (name, list) in [("solution", &mut clean), ("problem", &mut failing)] {
            if runs.iter().any(|r| r.name == name) {
                list.push(name.into());
            }
        }
    }
    let mut out = Vec::new();
    let find = |name: &str| -> Result<Vec<&RunResult>> {
        let v: Vec<&RunResult> = runs.iter().filter(|r| r.name == name).collect();
        if v.is_empty() {
            let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
            bail!("--expect…: no run named `{name}` (runs: {})", names.join(", "));
        }
        Ok(v)
    };
    for name in &clean {
        for r in find(name)? {
            let (held, detail) = match &r.k6 {
                Some(k) => (
                    r.summary.failed == 0 && k.passed(),
                    format!(
                        "{} of {} failed; k6 exit {}, thresholds {}",
                        r.summary.failed,
                        r.summary.requests,
                        k.exit_text(),
                        k.thresholds_text()
                    ),
                ),
                None => (r.summary.failed == 0, format!("{} of {} failed", r.summary.failed, r.summary.requests)),
            };
            out.push(Expectation {
                claim: format!("{name} (lag {:.1} s) loses no request", r.endpoint_lag_ms / 1000.0),
                held,
                detail,
            });
            if let Some(within) = args.expect_rollout_latency {
                let within_ms = Duration::from(within).as_secs_f64() * 1000.0;
                let (steady, rollout) = (r.summary.steady_max_ms, r.summary.rollout_max_ms);
                out.push(Expectation {
                    claim: format!(
                        "{name} (lag {:.1} s): worst latency during rollout within {within} of steady state",
                        r.endpoint_lag_ms / 1000.0
                    ),
                    held: rollout - steady <= within_ms,
                    detail: format!("rollout max {rollout:.0} ms, steady-state max {steady:.0} ms"),
                });
            }
        }
    }
    for name in &failing {
        for r in find(name)? {
            out.push(Expectation {
                claim: format!("{name} (lag {:.1} s) loses requests", r.endpoint_lag_ms / 1000.0),
                held: r.summary.failed > 0,
                detail: format!("{} of {} failed", r.summary.failed, r.summary.requests),
            });
        }
    }
    if let Some(pct) = args.expect_attributed {
        for r in runs.iter().filter(|r| r.attribution.failed > 0) {
            let got = 100.0 * r.attribution.attributed as f64 / r.attribution.failed as f64;
            out.push(Expectation {
                claim: format!("{}: ≥ {pct} % of failures attributed", r.name),
                held: got >= pct,
                detail: format!("{}/{} ({got:.1} %)", r.attribution.attributed, r.attribution.failed),
            });
        }
    }
    Ok(out)
}

pub fn run(args: LabArgs, config: Option<ConfigFile>) -> Result<ExitCode> {
    if let Some(c) = config {
        eprintln!(
            "note: {} ({}) is not used by the lab: its pods read their configuration from the manifests",
            c.path.display(),
            c.via
        );
    }
    if args.rollouts == 0 {
        bail!("--rollouts must be at least 1");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r <= 5000.0)) {
        bail!("--rate must be in (0, 5000]");
    }
    let inputs = load_inputs(&args)?;
    // Claims about runs that will not happen are mistakes: say so before minutes of running.
    let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
    let mut claimed: Vec<&String> = args.expect_clean.iter().chain(&args.expect_failures).collect();
    let defaults = ["solution".to_string(), "problem".to_string()];
    if args.expect {
        claimed.extend(defaults.iter().filter(|n| names.contains(&n.as_str())));
    }
    for c in claimed {
        if !names.contains(&c.as_str()) {
            bail!("--expect…: no run named `{c}` (runs: {})", names.join(", "));
        }
    }
    let k6 = match &args.k6 {
        Some(script) => {
            let script =
                std::fs::canonicalize(script).with_context(|| format!("--k6 {}: no such script", script.display()))?;
            Some((load::k6::find_k6().context("--k6")?, script))
        }
        None => None,
    };
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("lab")
        .build()
        .context("starting the lab's runtime")?;
    rt.block_on(async {
        tokio::select! {
            r = run_all(&args, inputs, k6) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted; every pod was killed"),
        }
    })
}

/// Hung connections (a gone pod's address) pile up for seconds at 200 req/s, each holding a client
/// and a proxy socket: lift the soft file-descriptor limit (often 1024) to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn run_all(args: &LabArgs, inputs: Vec<Input>, k6: Option<(PathBuf, PathBuf)>) -> Result<ExitCode> {
    let started = tokio::time::Instant::now();
    let (warmup, cooldown) = match args.profile {
        Profile::Default => (Duration::from_secs(5), Duration::from_secs(3)),
        Profile::Short => (Duration::from_secs(2), Duration::from_secs(2)),
    };
    let warmup = args.warmup.map(Into::into).unwrap_or(warmup);
    let cooldown = args.cooldown.map(Into::into).unwrap_or(cooldown);
    let rate = args.rate.unwrap_or(200.0);
    let lags: Vec<Duration> = if args.sweep_lag.is_empty() {
        vec![args.endpoint_lag.into()]
    } else {
        args.sweep_lag.iter().map(|s| Duration::from_secs_f64(s.max(0.0))).collect()
    };
    let out = match &args.out {
        Some(d) => d.clone(),
        None => {
            let stamp =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            std::env::temp_dir().join(format!("graceful-lab-{stamp}-{}", std::process::id()))
        }
    };
    let exe = std::env::current_exe().context("locating this binary (the pods run it)")?;
    let net = Arc::new(network::ipam::Net::detect());
    let receiver = if args.no_tracing {
        None
    } else {
        Some(OtlpReceiver::start("127.0.0.1:0".parse().unwrap()).context("starting the OTLP receiver")?)
    };
    let progress = report::progress::Progress::new(args.quiet);
    let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
    progress.println(&format!(
        "graceful lab: {} at {rate:.0} req/s{}, endpoint lag {}, {} rollout(s){}; run dir {}",
        names.join(", "),
        k6.as_ref().map(|(b, s)| format!(" by k6 ({} {})", b.display(), s.display())).unwrap_or_default(),
        lags.iter().map(|l| format!("{:.1} s", l.as_secs_f64())).collect::<Vec<_>>().join(" / "),
        args.rollouts,
        if matches!(net.mode, network::ipam::Mode::SharedLoopback) {
            " (shared 127.0.0.1: ports remapped)"
        } else {
            ""
        },
        out.display()
    ));

    let mut results: Vec<RunResult> = Vec::new();
    for lag in &lags {
        for input in &inputs {
            let dir_name =
                if lags.len() > 1 { format!("{}-lag{}ms", input.name, lag.as_millis()) } else { input.name.clone() };
            let cfg = RunConfig {
                name: input.name.clone(),
                lag: *lag,
                rate,
                warmup,
                cooldown,
                timeout: args.timeout.into(),
                rollouts: args.rollouts,
                restart: args.restart.clone(),
                sequential: args.sequential,
                entry: args.entry.clone(),
                path: args.path.clone(),
                max_in_flight: args.max_in_flight,
                exe: exe.clone(),
                run_dir: out.join(&dir_name),
                sandbox_teardown: args.sandbox_teardown.into(),
                limit: Duration::from_secs(120),
                k6: k6.as_ref().map(|(bin, script)| scenario::K6Source {
                    bin: bin.clone(),
                    script: script.clone(),
                    rollout_phase: args
                        .k6_rollout
                        .map(Into::into)
                        .unwrap_or((Duration::from_secs(15) + *lag) * args.rollouts as u32),
                }),
            };
            let r = scenario::run(&cfg, &input.manifest, net.clone(), receiver.as_ref(), &progress)
                .await
                .with_context(|| format!("run `{}` (logs under {})", input.name, cfg.run_dir.display()))?;
            progress.println(&format!(
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
            ));
            results.push(r);
        }
    }
    progress.done();

    if lags.len() > 1 {
        println!("Failures per endpoint lag ({} rollout(s) per run, {rate:.0} req/s):", args.rollouts);
        println!("{}", report::result::sweep_table(&results));
    } else {
        println!("{}", report::result::comparison(&results));
        for r in &results {
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
        for r in &results {
            println!("timeline {}: {}", r.name, r.timeline.display());
        }
    }
    let expectations = check_expectations(args, &results)?;
    for e in &expectations {
        println!("{} {} ({})", if e.held { "✔" } else { "✘" }, e.claim, e.detail);
    }
    println!("lab finished in {:.1} s; pod logs under {}", started.elapsed().as_secs_f64(), out.display());
    if let Some(path) = &args.json {
        #[derive(Serialize)]
        struct Doc<'a> {
            runs: &'a [RunResult],
            expectations: &'a [Expectation],
        }
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer(std::io::BufWriter::new(file), &Doc { runs: &results, expectations: &expectations })
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if expectations.iter().all(|e| e.held) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        lab: LabArgs,
    }

    fn result(name: &str, failed: usize) -> RunResult {
        RunResult {
            name: name.into(),
            endpoint_lag_ms: 2000.0,
            rate: 200.0,
            summary: report::result::Summary { requests: 1000, failed, ..Default::default() },
            rollouts: vec![],
            attribution: report::attribution::Report { failed, attributed: failed, ..Default::default() },
            groups: vec![],
            spans_received: 0,
            run_ms: 0.0,
            run_dir: PathBuf::new(),
            timeline: PathBuf::new(),
            pods: vec![],
            events: vec![],
            requests: vec![],
            k6: None,
        }
    }

    #[test]
    fn expect_shorthand_holds_both_claims() {
        let args = Cli::parse_from(["lab", "--expect"]).lab;
        let held = |p, s| check_expectations(&args, &[result("problem", p), result("solution", s)]).unwrap();
        assert!(held(25, 0).iter().all(|e| e.held));
        assert!(!held(0, 0).iter().all(|e| e.held), "a problem that loses nothing breaks the claim");
        assert!(!held(25, 1).iter().all(|e| e.held), "a solution that loses one request breaks the claim");
    }

    #[test]
    fn rollout_latency_claim_compares_with_the_steady_state() {
        let args = Cli::parse_from(["lab", "--expect-clean", "solution", "--expect-rollout-latency", "25ms"]).lab;
        let with = |steady, rollout| {
            let mut r = result("solution", 0);
            (r.summary.steady_max_ms, r.summary.rollout_max_ms) = (steady, rollout);
            check_expectations(&args, &[r]).unwrap()
        };
        assert!(with(205.0, 229.0).iter().all(|e| e.held));
        let e = with(205.0, 231.0);
        assert!(!e[1].held && e[1].detail.contains("231"), "{:?}", e[1].detail);
    }

    #[test]
    fn embedded_overlays_are_the_rendered_ones() {
        let names: Vec<&str> = embedded_overlays().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["problem", "solution"]);
    }
}
