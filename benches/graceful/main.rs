//! What the pattern costs, measured side by side in one run on loopback: throughput and latency
//! of backend, frontend → backend chain and chain with OTLP export (as ratios), memory, binary
//! size, time to ready, time from the end of the drain to exit, and the lab's Service proxy.
//!
//!   cargo bench --bench graceful -- [--short] [--json FILE]
//!
//! See benches/README.md for what each figure means and how it is taken.

mod bare;
mod flood;
mod http;
mod kernel;
/// The process harness shared with the black-box tests.
#[path = "../../tests/common/process.rs"]
#[allow(dead_code)] // each user takes the part it needs
mod process;
mod procs;
mod proxy;
mod wrk;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use comfy_table::{presets, Table};
use serde::Serialize;

use graceful::otlp_receiver::OtlpReceiver;
use procs::{Mem, Proc, Spec};

const MIB: f64 = 1024.0 * 1024.0;
/// Targets (sizes in MiB).
const TARGET_TRACING_COST: f64 = 0.10;
const TARGET_EXIT_MS: f64 = 100.0;
const TARGET_RSS_MIB: f64 = 20.0;
/// Share of what a connection flood added to RSS that must be given back within seconds.
const TARGET_FLOOD_RETURNED: f64 = 0.5;
const TARGET_BINARY_MIB: f64 = 20.0;
/// kube-proxy's nftables rules add a DNAT and a conntrack lookup per packet: next to nothing.
const TARGET_KERNEL_DATAPATH: f64 = 0.9;
const TARGET_READY_MS: f64 = 100.0;
/// Graceful chain req/s against the bare actix → awc → actix chain, at saturation.
const TARGET_VS_BARE_CHAIN_RPS: f64 = 0.8;
/// Each graceful hop's CPU per request against the bare hop's (tracing off).
const TARGET_VS_BARE_HOP_CPU: f64 = 1.3;
/// App CPU per request against the untraced chain: 100 % sampled, 10 % sampled, SDK disabled.
const TARGET_TRACED_CPU: f64 = 1.25;
const TARGET_SAMPLED_CPU: f64 = 1.05;
const TARGET_SDK_DISABLED_CPU: f64 = 0.05;
/// Service names of the 10 %-sampled pair, so its spans are counted apart.
const SAMPLED_BACKEND: &str = "graceful-backend-sampled";
const SAMPLED_FRONTEND: &str = "graceful-frontend-sampled";

/// `cargo bench --bench graceful -- [--short] [--json FILE] [options]`
#[derive(Debug, clap::Parser)]
#[command(
    name = "graceful bench",
    about = "What the pattern costs, measured side by side on loopback (benches/README.md)"
)]
struct Args {
    /// CI profile: 1 s load runs, 1 round, 3 repeats (no timing is asserted)
    #[arg(long)]
    short: bool,
    /// Also write every figure as JSON
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Length of each measured load run, seconds [default: 5, short 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    seconds: Option<u32>,
    /// Warm-up run before each measured one, seconds
    #[arg(long = "warmup", value_name = "N", default_value_t = 1)]
    warmup_seconds: u32,
    /// Load rounds; cases alternate within each round [default: 3, short 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    rounds: Option<u64>,
    /// Start and exit measurements per case [default: 10, short 3]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    repeats: Option<u64>,
    /// wrk connections
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// wrk threads
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    threads: u32,
    /// Drain delay of the exit measurement, ms
    #[arg(long = "drain-delay", value_name = "MS", default_value_t = 300)]
    drain_delay_ms: u64,
    /// Idle keep-alive connections held open in the exit measurement
    #[arg(long = "keepalive", value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive_connections: u64,
    /// Internal: serve as a bare reference server (the bench starts these itself)
    #[arg(long, value_name = "ROLE", hide = true)]
    bare_serve: Option<bare::BareRole>,
    /// Internal: measure the kernel node's datapath inside a private world (JSON plan)
    #[arg(long, value_name = "PLAN", hide = true)]
    kernel_datapath_inner: Option<String>,
    /// Internal: the bare frontend's upstream
    #[arg(long, value_name = "ADDR", hide = true)]
    bare_upstream: Option<SocketAddr>,
    /// Passed by `cargo bench` to harness = false targets (`cargo test` does not).
    #[arg(long, hide = true)]
    bench: bool,
}

/// The options as measured with (written into the JSON).
#[derive(Debug, Clone, Serialize)]
struct Opts {
    #[serde(skip)]
    bench: bool,
    short: bool,
    #[serde(skip)]
    json: Option<PathBuf>,
    seconds: u32,
    warmup_seconds: u32,
    rounds: usize,
    repeats: usize,
    connections: u32,
    threads: u32,
    drain_delay_ms: u64,
    keepalive_connections: usize,
}

impl Opts {
    fn from_args(a: Args) -> Result<Opts> {
        if a.threads > a.connections {
            bail!("--threads must not exceed --connections");
        }
        let short = a.short;
        Ok(Opts {
            bench: a.bench,
            short,
            json: a.json,
            seconds: a.seconds.unwrap_or(if short { 1 } else { 5 }),
            warmup_seconds: a.warmup_seconds,
            rounds: a.rounds.map_or(if short { 1 } else { 3 }, |n| n as usize),
            repeats: a.repeats.map_or(if short { 3 } else { 10 }, |n| n as usize),
            connections: a.connections,
            threads: a.threads,
            drain_delay_ms: a.drain_delay_ms,
            keepalive_connections: a.keepalive_connections as usize,
        })
    }
}

fn main() -> ExitCode {
    // clap prints its own usage and exits 2 on a bad argument (0 for --help).
    let args = <Args as clap::Parser>::parse();
    if let Some(role) = args.bare_serve {
        return bare::serve(role, args.bare_upstream);
    }
    if let Some(plan) = &args.kernel_datapath_inner {
        return kernel::inner(plan);
    }
    let opts = match Opts::from_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("graceful bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !opts.bench {
        // `cargo test --all-targets` builds and runs bench targets without --bench.
        println!("graceful bench: not started by `cargo bench`, nothing measured (run `cargo bench --bench graceful`)");
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let mut b = Bench::new(opts);
    b.run();
    b.report.meta.total_seconds = started.elapsed().as_secs_f64();
    b.report.meta.loadavg_end = loadavg();
    b.evaluate_targets();
    b.print();
    if let Some(path) = &b.opts.json {
        let text = serde_json::to_string_pretty(&b.report).expect("the report serializes");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("graceful bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("JSON: {}", path.display());
    }
    if b.report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("graceful bench: {} measurement(s) failed (see above)", b.report.errors.len());
        ExitCode::FAILURE
    }
}

// ------------------------------------------------------------------------------------------------
// Report

#[derive(Debug, Default, Serialize)]
struct Report {
    meta: Meta,
    binary: Option<Binary>,
    load: Option<Load>,
    memory: Vec<MemRow>,
    flood: Option<flood::Flood>,
    spans: Option<SpanCheck>,
    readiness: Vec<Samples>,
    exit: Vec<ExitCase>,
    service_proxy: ProxyResult,
    kernel_datapath: KernelResult,
    targets: Vec<Target>,
    errors: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct Meta {
    profile: &'static str,
    options: Option<Opts>,
    started_unix: u64,
    git_rev: Option<String>,
    binary: String,
    cores: usize,
    kernel: String,
    loadavg_start: String,
    loadavg_end: String,
    wrk: String,
    total_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Binary {
    path: String,
    bytes: u64,
    mib: f64,
    /// No `.symtab` section: `strip = true` took effect.
    stripped: bool,
}

#[derive(Debug, Serialize)]
struct Load {
    cases: Vec<Case>,
    ratios: Vec<Ratio>,
}

#[derive(Debug, Clone, Serialize)]
struct Case {
    name: &'static str,
    what: &'static str,
    connections: u32,
    /// One measured wrk run per round.
    runs: Vec<wrk::Run>,
    /// Requests completed including warm-up runs (the span check counts them).
    total_requests: u64,
    /// CPU time per request of each process involved, µs, one value per round.
    cpu_us_per_request: BTreeMap<String, Vec<f64>>,
    median: CaseMedian,
}

#[derive(Debug, Clone, Serialize)]
struct CaseMedian {
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    errors: u64,
    cpu_us_per_request: BTreeMap<String, f64>,
    /// Sum over the application processes (not the OTLP sink or the proxy).
    app_cpu_us_per_request: f64,
}

/// A comparison of two cases, taken within each round: a ratio, or a difference in µs.
#[derive(Debug, Clone, Serialize)]
struct Ratio {
    name: String,
    unit: &'static str,
    per_round: Vec<f64>,
    median: f64,
    min: f64,
    max: f64,
}

/// The kernel node's datapath against going straight to the pod (wrk from the client namespace).
#[derive(Debug, Default, Serialize)]
struct KernelResult {
    /// measured | skipped | error
    status: &'static str,
    reason: Option<String>,
    rounds: Option<kernel::Rounds>,
    ratios: Vec<Ratio>,
}

#[derive(Debug, Serialize)]
struct MemRow {
    process: &'static str,
    idle: Mem,
    after_load: Mem,
}

#[derive(Debug, Serialize)]
struct SpanCheck {
    requests_to_traced_backend: u64,
    requests_to_traced_frontend: u64,
    spans_by_service: BTreeMap<String, u64>,
    backend_spans_per_request: f64,
    frontend_spans_per_request: f64,
    /// The 10 %-sampled chain: both roles' spans per request (3 per sampled request).
    requests_to_sampled_frontend: u64,
    sampled_spans_per_request: f64,
    exports: u64,
    export_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Samples {
    name: String,
    values_ms: Vec<f64>,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

impl Samples {
    fn new(name: impl Into<String>, values: Vec<f64>) -> Samples {
        Samples {
            name: name.into(),
            median_ms: median(&values),
            min_ms: values.iter().copied().fold(f64::INFINITY, f64::min),
            max_ms: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            values_ms: values,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct ExitSample {
    /// From our kill(SIGTERM) to the `listener_closed` event: the drain delay as the pod kept it.
    sigterm_to_listener_closed_ms: Option<f64>,
    listener_closed_to_drained_ms: Option<f64>,
    drained_to_exit_event_ms: Option<f64>,
    exit_event_to_process_gone_ms: Option<f64>,
    /// The headline: end of drain (`listener_closed`, else SIGTERM + drain delay) to process gone.
    drain_end_to_exit_ms: f64,
    drain_end_from_log: bool,
    exit_code: Option<i32>,
    shutdown_timeout_hit: bool,
}

#[derive(Debug, Serialize)]
struct ExitCase {
    role: &'static str,
    keepalive_connections: usize,
    samples: Vec<ExitSample>,
    drain_end_to_exit: Samples,
    sigterm_to_listener_closed: Samples,
}

#[derive(Debug, Default, Serialize)]
struct ProxyResult {
    /// measured | error
    status: &'static str,
    reason: Option<String>,
    cases: Vec<Case>,
    ratios: Vec<Ratio>,
}

#[derive(Debug, Serialize)]
struct Target {
    what: &'static str,
    target: String,
    figure: String,
    /// None: not measured in this run.
    met: Option<bool>,
}

// ------------------------------------------------------------------------------------------------
// Measurements

struct Bench {
    opts: Opts,
    report: Report,
}

/// A URL under load and the processes whose CPU it spends.
struct LoadTarget {
    name: &'static str,
    what: &'static str,
    url: String,
    /// wrk connections: `--connections` saturates; 1 gives the unloaded latency of one request.
    connections: u32,
    /// (label, pid, counts as application CPU)
    cpu: Vec<(&'static str, i32, bool)>,
}

fn quick_exit() -> [&'static str; 4] {
    // Load processes need no drain; the exit measurement sets its own.
    ["--drain-delay", "0s", "--shutdown-timeout", "2s"]
}

fn backend() -> Spec {
    Spec::new("backend").ephemeral().args(quick_exit())
}

fn frontend(backend: SocketAddr) -> Spec {
    Spec::new("frontend").ephemeral().args(quick_exit()).arg("--backend-url").arg(format!("http://{backend}"))
}

fn expect_200(addr: SocketAddr, path: &str, what: &str) -> Result<()> {
    match http::get_once(addr, path, Duration::from_secs(5)) {
        Ok(200) => Ok(()),
        Ok(s) => bail!("{what}: GET {path} answered {s}"),
        Err(e) => bail!("{what}: GET {path}: {e}"),
    }
}

impl Bench {
    fn new(opts: Opts) -> Bench {
        let meta = Meta {
            profile: if opts.short { "short" } else { "full" },
            options: Some(opts.clone()),
            started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            git_rev: git_rev(),
            binary: procs::bin(),
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
            loadavg_start: loadavg(),
            ..Meta::default()
        };
        Bench { opts, report: Report { meta, ..Report::default() } }
    }

    fn step<T>(&mut self, what: &str, f: impl FnOnce(&mut Bench) -> Result<T>) -> Option<T> {
        let t = Instant::now();
        eprintln!("graceful bench: {what} ...");
        match f(self) {
            Ok(v) => {
                eprintln!("graceful bench: {what}: done in {:.1} s", t.elapsed().as_secs_f64());
                Some(v)
            }
            Err(e) => {
                let msg = format!("{what}: {e:#}");
                eprintln!("graceful bench: FAILED {msg}");
                self.report.errors.push(msg);
                None
            }
        }
    }

    fn run(&mut self) {
        self.report.binary = self.step("binary size", |_| binary_info());
        let wrk = self.step("load tool", |_| wrk::Wrk::ensure());
        if let Some(w) = &wrk {
            self.report.meta.wrk = w.version.clone();
            self.step("throughput, latency, CPU and memory", |b| b.load_section(w));
        }
        let flood_size = if self.opts.short { 1000 } else { 4000 };
        self.report.flood = self.step("memory after a connection flood", |_| flood::measure(&backend(), flood_size));
        self.step("time to ready", |b| b.readiness_section());
        self.step("time from drain end to exit", |b| b.exit_section());
        match &wrk {
            Some(w) => {
                if self.step("Service proxy overhead", |b| b.proxy_section(w)).is_none() {
                    self.report.service_proxy.status = "error";
                    self.report.service_proxy.reason = self.report.errors.last().cloned();
                }
            }
            None => {
                self.report.service_proxy.status = "error";
                self.report.service_proxy.reason = Some("no load tool".into());
            }
        }
        self.kernel_section();
    }

    /// Kernel datapath vs direct, where the kernel node can run; skipped (with the reason) elsewhere.
    fn kernel_section(&mut self) {
        let k = &mut self.report.kernel_datapath;
        if let Err(e) = graceful::lab::kernel_node::private_world::check_host() {
            k.status = "skipped";
            k.reason = Some(format!("{e:#}"));
            return;
        }
        let plan = kernel::Plan {
            seconds: self.opts.seconds,
            warmup_seconds: self.opts.warmup_seconds,
            rounds: self.opts.rounds,
            connections: self.opts.connections,
            threads: self.opts.threads,
        };
        match self.step("kernel datapath vs direct", |_| kernel::measure(&plan)) {
            Some(rounds) => {
                let runs = |name: &str| {
                    rounds.targets.iter().find(|(n, _, _)| n == name).map(|(_, _, r)| r.clone()).unwrap_or_default()
                };
                let (direct, cluster_ip, node_port) = (runs("direct"), runs("cluster_ip"), runs("node_port"));
                let per_round = |a: &[wrk::Run], b: &[wrk::Run], f: fn(&wrk::Run) -> f64| -> Vec<f64> {
                    a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect()
                };
                let k = &mut self.report.kernel_datapath;
                k.status = "measured";
                k.ratios = vec![
                    ratio_of("ClusterIP / direct, req/s", per_round(&cluster_ip, &direct, |r| r.rps)),
                    ratio_of("NodePort / direct, req/s", per_round(&node_port, &direct, |r| r.rps)),
                    ratio_of("ClusterIP / direct, p50 latency", per_round(&cluster_ip, &direct, |r| r.p50_ms)),
                    ratio_of("NodePort / direct, p99 latency", per_round(&node_port, &direct, |r| r.p99_ms)),
                ];
                k.rounds = Some(rounds);
            }
            None => {
                let reason = self.report.errors.last().cloned();
                let k = &mut self.report.kernel_datapath;
                k.status = "error";
                k.reason = reason;
            }
        }
    }

    /// Runs every target once per round, rotating the order each round, and collects the figures.
    fn run_cases(&self, wrk: &wrk::Wrk, targets: &[LoadTarget]) -> Result<Vec<Case>> {
        let o = &self.opts;
        let mut cases: Vec<Case> = targets
            .iter()
            .map(|t| Case {
                name: t.name,
                what: t.what,
                connections: t.connections,
                runs: Vec::new(),
                total_requests: 0,
                cpu_us_per_request: BTreeMap::new(),
                median: CaseMedian {
                    rps: 0.0,
                    p50_ms: 0.0,
                    p90_ms: 0.0,
                    p99_ms: 0.0,
                    errors: 0,
                    cpu_us_per_request: BTreeMap::new(),
                    app_cpu_us_per_request: 0.0,
                },
            })
            .collect();
        for round in 0..o.rounds {
            for k in 0..targets.len() {
                let i = (k + round) % targets.len();
                let t = &targets[i];
                let threads = o.threads.min(t.connections);
                if o.warmup_seconds > 0 {
                    let w = wrk.run(&t.url, threads, t.connections, o.warmup_seconds)?;
                    cases[i].total_requests += w.requests;
                }
                let pids: Vec<i32> = t.cpu.iter().map(|c| c.1).collect();
                let before = procs::cpu_snapshot(&pids);
                let run = wrk.run(&t.url, threads, t.connections, o.seconds)?;
                let after = procs::cpu_snapshot(&pids);
                if run.requests == 0 {
                    bail!("{}: no request completed in {} s", t.name, o.seconds);
                }
                for (label, pid, _) in &t.cpu {
                    let ns = after[pid].saturating_sub(before[pid]) as f64;
                    cases[i]
                        .cpu_us_per_request
                        .entry(label.to_string())
                        .or_default()
                        .push(ns / 1e3 / run.requests as f64);
                }
                cases[i].total_requests += run.requests;
                eprintln!(
                    "  round {}/{} {:<15} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  errors {}",
                    round + 1,
                    o.rounds,
                    t.name,
                    run.rps,
                    run.p50_ms,
                    run.p99_ms,
                    run.errors
                );
                cases[i].runs.push(run);
            }
        }
        for (c, t) in cases.iter_mut().zip(targets) {
            let of = |f: fn(&wrk::Run) -> f64| median(&c.runs.iter().map(f).collect::<Vec<_>>());
            c.median.rps = of(|r| r.rps);
            c.median.p50_ms = of(|r| r.p50_ms);
            c.median.p90_ms = of(|r| r.p90_ms);
            c.median.p99_ms = of(|r| r.p99_ms);
            c.median.errors = c.runs.iter().map(|r| r.errors).sum();
            for (label, v) in &c.cpu_us_per_request {
                c.median.cpu_us_per_request.insert(label.clone(), median(v));
            }
            let app: Vec<f64> = (0..c.runs.len())
                .map(|r| t.cpu.iter().filter(|x| x.2).map(|x| c.cpu_us_per_request[x.0][r]).sum())
                .collect();
            c.median.app_cpu_us_per_request = median(&app);
        }
        Ok(cases)
    }

    fn load_section(&mut self, wrk: &wrk::Wrk) -> Result<()> {
        let sink = OtlpReceiver::start_counting(([127, 0, 0, 1], 0).into())?;
        let otlp = sink.endpoint();
        let b0 = Proc::start(&backend())?;
        let f0 = Proc::start(&frontend(b0.listen))?;
        let mut b1 = Proc::start(&backend().traced(&otlp))?;
        let mut f1 = Proc::start(&frontend(b1.listen).traced(&otlp))?;
        // Head sampling at 10 %: the frontend decides, the backend follows the caller's flag.
        let sampled = |s: Spec, name: &str| {
            s.traced(&otlp)
                .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
                .env("OTEL_TRACES_SAMPLER_ARG", "0.1")
                .env("OTEL_SERVICE_NAME", name)
        };
        let mut b2 = Proc::start(&sampled(backend(), SAMPLED_BACKEND))?;
        let mut f2 = Proc::start(&sampled(frontend(b2.listen), SAMPLED_FRONTEND))?;
        // An endpoint configured but the SDK switched off: must cost what no endpoint costs.
        let disabled = |s: Spec| s.traced(&otlp).env("OTEL_SDK_DISABLED", "true");
        let b3 = Proc::start(&disabled(backend()))?;
        let f3 = Proc::start(&disabled(frontend(b3.listen)))?;
        // The physical limit of this stack here: bare actix, and bare actix → awc → actix.
        let bare_b = Proc::start_bare(bare::BareRole::Backend, None)?;
        let bare_f = Proc::start_bare(bare::BareRole::Frontend, Some(bare_b.listen))?;
        for (p, what) in
            [(&b0, "backend"), (&f0, "chain"), (&b1, "traced backend"), (&f1, "traced chain"), (&f2, "sampled chain")]
                .into_iter()
                .chain([(&f3, "SDK-disabled chain"), (&bare_b, "bare backend"), (&bare_f, "bare chain")])
        {
            expect_200(p.listen, "/api/data", what)?;
        }
        std::thread::sleep(Duration::from_millis(500));
        let procs: [(&'static str, &Proc); 4] =
            [("backend", &b0), ("frontend", &f0), ("backend + OTLP", &b1), ("frontend + OTLP", &f1)];
        let idle: Vec<Mem> = procs.iter().map(|(_, p)| p.mem()).collect::<Result<_>>()?;

        let me = std::process::id() as i32;
        let url = |p: &Proc| format!("http://{}/api/data", p.listen);
        let c = self.opts.connections;
        let backend_cpu = vec![("backend", b0.pid, true)];
        let chain_cpu = vec![("frontend", f0.pid, true), ("backend", b0.pid, true)];
        let traced_cpu = vec![("frontend", f1.pid, true), ("backend", b1.pid, true), ("otlp_sink", me, false)];
        let targets = [
            LoadTarget {
                name: "backend",
                what: "wrk → backend",
                url: url(&b0),
                connections: c,
                cpu: backend_cpu.clone(),
            },
            LoadTarget {
                name: "backend_traced",
                what: "wrk → backend, OTLP export on",
                url: url(&b1),
                connections: c,
                cpu: vec![("backend", b1.pid, true), ("otlp_sink", me, false)],
            },
            LoadTarget {
                name: "chain",
                what: "wrk → frontend → backend",
                url: url(&f0),
                connections: c,
                cpu: chain_cpu.clone(),
            },
            LoadTarget {
                name: "chain_traced",
                what: "wrk → frontend → backend, OTLP export on",
                url: url(&f1),
                connections: c,
                cpu: traced_cpu.clone(),
            },
            LoadTarget {
                name: "chain_sampled",
                what: "wrk → frontend → backend, OTLP on, 10 % sampled",
                url: url(&f2),
                connections: c,
                cpu: vec![("frontend", f2.pid, true), ("backend", b2.pid, true), ("otlp_sink", me, false)],
            },
            LoadTarget {
                name: "chain_sdk_disabled",
                what: "wrk → frontend → backend, endpoint set, OTEL_SDK_DISABLED=true",
                url: url(&f3),
                connections: c,
                cpu: vec![("frontend", f3.pid, true), ("backend", b3.pid, true)],
            },
            LoadTarget {
                name: "bare_backend",
                what: "wrk → bare actix handler",
                url: url(&bare_b),
                connections: c,
                cpu: vec![("backend", bare_b.pid, true)],
            },
            LoadTarget {
                name: "bare_chain",
                what: "wrk → bare actix → awc → bare actix",
                url: url(&bare_f),
                connections: c,
                cpu: vec![("frontend", bare_f.pid, true), ("backend", bare_b.pid, true)],
            },
            LoadTarget { name: "backend_1conn", what: "1 connection", url: url(&b0), connections: 1, cpu: backend_cpu },
            LoadTarget { name: "chain_1conn", what: "1 connection", url: url(&f0), connections: 1, cpu: chain_cpu },
            LoadTarget {
                name: "chain_traced_1conn",
                what: "1 connection",
                url: url(&f1),
                connections: 1,
                cpu: traced_cpu,
            },
        ];
        let cases = self.run_cases(wrk, &targets)?;
        let after: Vec<Mem> = procs.iter().map(|(_, p)| p.mem()).collect::<Result<_>>()?;
        self.report.memory = procs
            .iter()
            .zip(idle.into_iter().zip(after))
            .map(|((name, _), (idle, after_load))| MemRow { process: name, idle, after_load })
            .collect();

        let get = |n: &str| cases.iter().find(|c| c.name == n).expect("case exists");
        let (be, bt, ch, ct) = (get("backend"), get("backend_traced"), get("chain"), get("chain_traced"));
        let (be1, ch1, ct1) = (get("backend_1conn"), get("chain_1conn"), get("chain_traced_1conn"));
        let cs = get("chain_sampled");
        let (cd, bb, bc) = (get("chain_sdk_disabled"), get("bare_backend"), get("bare_chain"));
        let ratios = vec![
            ratio("chain / backend, req/s", ch, be, |r| r.rps),
            ratio("chain / backend, p50 latency", ch, be, |r| r.p50_ms),
            ratio("chain / backend, p99 latency", ch, be, |r| r.p99_ms),
            cpu_ratio("chain / backend, app CPU per request", ch, be),
            diff_us("chain − backend, p50 at 1 connection", ch1, be1, |r| r.p50_ms),
            ratio("traced / untraced chain, req/s", ct, ch, |r| r.rps),
            ratio("traced / untraced chain, p50 latency", ct, ch, |r| r.p50_ms),
            ratio("traced / untraced chain, p99 latency", ct, ch, |r| r.p99_ms),
            cpu_ratio("traced / untraced chain, app CPU per request", ct, ch),
            diff_us("traced − untraced chain, p50 at 1 connection", ct1, ch1, |r| r.p50_ms),
            ratio("traced / untraced backend, req/s", bt, be, |r| r.rps),
            cpu_ratio("traced / untraced backend, app CPU per request", bt, be),
            ratio("10 % sampled / untraced chain, req/s", cs, ch, |r| r.rps),
            cpu_ratio("10 % sampled / untraced chain, app CPU per request", cs, ch),
            ratio("SDK disabled / untraced chain, req/s", cd, ch, |r| r.rps),
            cpu_ratio("SDK disabled / untraced chain, app CPU per request", cd, ch),
            ratio("chain / bare chain, req/s", ch, bc, |r| r.rps),
            ratio("backend / bare backend, req/s", be, bb, |r| r.rps),
            hop_cpu_ratio("frontend hop / bare frontend hop, CPU per request", ch, bc, "frontend"),
            hop_cpu_ratio("backend hop / bare backend hop, CPU per request", be, bb, "backend"),
        ];

        // The traced pair flushes its batch exporter on the way out; count what arrived.
        for p in [&mut f1, &mut b1, &mut f2, &mut b2] {
            p.signal(nix::sys::signal::Signal::SIGTERM);
        }
        for p in [&mut f1, &mut b1, &mut f2, &mut b2] {
            if p.wait_exit(Duration::from_secs(10)).is_none() {
                bail!("traced {} did not exit within 10 s of SIGTERM", p.role);
            }
        }
        let counts = sink.counts();
        let span_count = |svc: &str| counts.spans.get(svc).copied().unwrap_or(0);
        let to_backend = bt.total_requests + ct.total_requests + ct1.total_requests;
        let to_frontend = ct.total_requests + ct1.total_requests;
        self.report.spans = Some(SpanCheck {
            requests_to_traced_backend: to_backend,
            requests_to_traced_frontend: to_frontend,
            backend_spans_per_request: span_count("graceful-backend") as f64 / to_backend.max(1) as f64,
            frontend_spans_per_request: span_count("graceful-frontend") as f64 / to_frontend.max(1) as f64,
            requests_to_sampled_frontend: cs.total_requests,
            sampled_spans_per_request: (span_count(SAMPLED_BACKEND) + span_count(SAMPLED_FRONTEND)) as f64
                / cs.total_requests.max(1) as f64,
            spans_by_service: counts.spans,
            exports: counts.exports,
            export_bytes: counts.bytes,
        });
        self.report.load = Some(Load { cases, ratios });
        Ok(())
    }

    fn readiness_section(&mut self) -> Result<()> {
        let sink = OtlpReceiver::start_counting(([127, 0, 0, 1], 0).into())?;
        let helper = Proc::start(&backend())?;
        let otlp = sink.endpoint();
        let variants: [(&str, Spec); 4] = [
            ("backend", Spec::new("backend")),
            ("frontend", Spec::new("frontend").arg("--backend-url").arg(format!("http://{}", helper.listen))),
            ("backend + OTLP", Spec::new("backend").traced(&otlp)),
            (
                "frontend + OTLP",
                Spec::new("frontend").arg("--backend-url").arg(format!("http://{}", helper.listen)).traced(&otlp),
            ),
        ];
        let mut values: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        for i in 0..self.opts.repeats {
            for k in 0..variants.len() {
                let v = (k + i) % variants.len();
                let ms = time_to_ready(&variants[v].1)?;
                values[v].push(ms);
            }
        }
        self.report.readiness =
            variants.iter().zip(values).map(|((name, _), vals)| Samples::new(*name, vals)).collect();
        Ok(())
    }

    fn exit_section(&mut self) -> Result<()> {
        let helper = Proc::start(&backend())?;
        let dd = Duration::from_millis(self.opts.drain_delay_ms);
        let ka = self.opts.keepalive_connections;
        let drain = ["--drain-delay".to_string(), format!("{}ms", self.opts.drain_delay_ms)];
        let cases: [(&'static str, usize, Spec); 4] = [
            ("backend", 0, Spec::new("backend")),
            ("backend", ka, Spec::new("backend")),
            ("frontend", 0, Spec::new("frontend").arg("--backend-url").arg(format!("http://{}", helper.listen))),
            ("frontend", ka, Spec::new("frontend").arg("--backend-url").arg(format!("http://{}", helper.listen))),
        ];
        let mut samples: Vec<Vec<ExitSample>> = vec![Vec::new(); cases.len()];
        for i in 0..self.opts.repeats {
            for k in 0..cases.len() {
                let c = (k + i) % cases.len();
                let spec = cases[c].2.clone().ephemeral().args(drain.clone());
                samples[c].push(time_to_exit(&spec, cases[c].1, ka, dd)?);
            }
        }
        self.report.exit = cases
            .iter()
            .zip(samples)
            .map(|((role, keepalive, _), s)| {
                let label =
                    if *keepalive > 0 { format!("{role}, {keepalive} keep-alive") } else { format!("{role}, idle") };
                ExitCase {
                    role,
                    keepalive_connections: *keepalive,
                    drain_end_to_exit: Samples::new(label.clone(), s.iter().map(|x| x.drain_end_to_exit_ms).collect()),
                    sigterm_to_listener_closed: Samples::new(
                        label,
                        s.iter().filter_map(|x| x.sigterm_to_listener_closed_ms).collect(),
                    ),
                    samples: s,
                }
            })
            .collect();
        Ok(())
    }

    fn proxy_section(&mut self, wrk: &wrk::Wrk) -> Result<()> {
        let b = Proc::start(&backend())?;
        let px = proxy::Proxy::start(b.listen)?;
        expect_200(px.addr, "/api/data", "through the Service proxy")?;
        let me = std::process::id() as i32;
        let direct_url = format!("http://{}/api/data", b.listen);
        let proxied_url = format!("http://{}/api/data", px.addr);
        let direct_cpu = vec![("backend", b.pid, true)];
        let proxied_cpu = vec![("backend", b.pid, true), ("service_proxy", me, false)];
        let c = self.opts.connections;
        let targets = [
            LoadTarget {
                name: "direct",
                what: "wrk → backend",
                url: direct_url.clone(),
                connections: c,
                cpu: direct_cpu.clone(),
            },
            LoadTarget {
                name: "proxied",
                what: "wrk → lab Service proxy → backend",
                url: proxied_url.clone(),
                connections: c,
                cpu: proxied_cpu.clone(),
            },
            LoadTarget { name: "direct_1conn", what: "1 connection", url: direct_url, connections: 1, cpu: direct_cpu },
            LoadTarget {
                name: "proxied_1conn",
                what: "1 connection",
                url: proxied_url,
                connections: 1,
                cpu: proxied_cpu,
            },
        ];
        let cases = self.run_cases(wrk, &targets)?;
        let (d, p, d1, p1) = (&cases[0], &cases[1], &cases[2], &cases[3]);
        let r = &mut self.report.service_proxy;
        r.status = "measured";
        r.ratios = vec![
            ratio("proxied / direct, req/s", p, d, |x| x.rps),
            ratio("proxied / direct, p50 latency", p, d, |x| x.p50_ms),
            ratio("proxied / direct, p99 latency", p, d, |x| x.p99_ms),
            diff_us("proxied − direct, p50 at 1 connection", p1, d1, |x| x.p50_ms),
            diff_us("proxied − direct, p99 at 1 connection", p1, d1, |x| x.p99_ms),
        ];
        r.cases = cases;
        drop(px);
        Ok(())
    }

    // --------------------------------------------------------------------------------------------
    // Targets and printing

    fn evaluate_targets(&mut self) {
        let r = &self.report;
        let mut t = Vec::new();

        let find = |name: &str| r.load.as_ref().and_then(|l| l.ratios.iter().find(|x| x.name == name));
        let tracing = find("traced / untraced chain, req/s");
        let sampled = find("10 % sampled / untraced chain, req/s");
        t.push(match tracing {
            Some(x) => Target {
                what: "tracing cost (chain throughput, 100 % sampled)",
                target: format!("≤ {:.0} %", TARGET_TRACING_COST * 100.0),
                figure: format!(
                    "{:.1} % (rounds: {:.1}–{:.1} %){}",
                    (1.0 - x.median) * 100.0,
                    (1.0 - x.max) * 100.0,
                    (1.0 - x.min) * 100.0,
                    sampled.map(|s| format!("; 10 % sampled: {:.1} %", (1.0 - s.median) * 100.0)).unwrap_or_default()
                ),
                met: Some(1.0 - x.median <= TARGET_TRACING_COST),
            },
            None => not_measured(
                "tracing cost (chain throughput, 100 % sampled)",
                format!("≤ {:.0} %", TARGET_TRACING_COST * 100.0),
            ),
        });

        t.push(ratio_target(
            "app CPU/request, 100 % sampled vs untraced",
            format!("≤ {TARGET_TRACED_CPU:.2}×"),
            find("traced / untraced chain, app CPU per request"),
            |m| m <= TARGET_TRACED_CPU,
        ));
        t.push(ratio_target(
            "app CPU/request, 10 % sampled vs untraced",
            format!("≤ {TARGET_SAMPLED_CPU:.2}×"),
            find("10 % sampled / untraced chain, app CPU per request"),
            |m| m <= TARGET_SAMPLED_CPU,
        ));
        t.push(ratio_target(
            "app CPU/request, OTEL_SDK_DISABLED vs untraced",
            format!("within ±{:.0} %", TARGET_SDK_DISABLED_CPU * 100.0),
            find("SDK disabled / untraced chain, app CPU per request"),
            |m| (m - 1.0).abs() <= TARGET_SDK_DISABLED_CPU,
        ));
        t.push(ratio_target(
            "chain req/s vs bare actix → awc → actix",
            format!("≥ {TARGET_VS_BARE_CHAIN_RPS:.1}×"),
            find("chain / bare chain, req/s"),
            |m| m >= TARGET_VS_BARE_CHAIN_RPS,
        ));
        for (what, row) in [
            ("frontend hop CPU/request vs bare hop", "frontend hop / bare frontend hop, CPU per request"),
            ("backend hop CPU/request vs bare hop", "backend hop / bare backend hop, CPU per request"),
        ] {
            t.push(ratio_target(what, format!("≤ {TARGET_VS_BARE_HOP_CPU:.1}×"), find(row), |m| {
                m <= TARGET_VS_BARE_HOP_CPU
            }));
        }

        let exit_target = format!("≤ {TARGET_EXIT_MS:.0} ms");
        t.push(if r.exit.is_empty() {
            not_measured("drain end → exit (median)", exit_target)
        } else {
            let worst = r.exit.iter().map(|c| c.drain_end_to_exit.median_ms).fold(0.0, f64::max);
            Target {
                what: "drain end → exit (median)",
                target: exit_target,
                figure: r
                    .exit
                    .iter()
                    .map(|c| format!("{} {:.1}", c.drain_end_to_exit.name, c.drain_end_to_exit.median_ms))
                    .collect::<Vec<_>>()
                    .join("; ")
                    + " ms",
                met: Some(worst <= TARGET_EXIT_MS),
            }
        });

        let rss_target = format!("< {TARGET_RSS_MIB:.0} MiB");
        t.push(if r.memory.is_empty() {
            not_measured("peak RSS per role under load", rss_target)
        } else {
            let worst = r.memory.iter().map(|m| m.after_load.hwm_kib).max().unwrap_or(0) as f64 / 1024.0;
            Target {
                what: "peak RSS per role under load",
                target: rss_target,
                figure: r
                    .memory
                    .iter()
                    .map(|m| format!("{} {:.1}", m.process, m.after_load.hwm_kib as f64 / 1024.0))
                    .collect::<Vec<_>>()
                    .join("; ")
                    + " MiB",
                met: Some(worst < TARGET_RSS_MIB),
            }
        });

        let flood_target = format!("≥ {:.0} % of the growth", TARGET_FLOOD_RETURNED * 100.0);
        t.push(match &r.flood {
            Some(f) => Target {
                what: "memory given back after a connection flood",
                target: flood_target,
                figure: format!(
                    "{:.0} %: {} connections, {} → {} → {} MiB",
                    f.returned() * 100.0,
                    f.connections,
                    mib(f.idle_rss_kib),
                    mib(f.peak_rss_kib),
                    mib(f.after_rss_kib)
                ),
                met: Some(f.returned() >= TARGET_FLOOD_RETURNED),
            },
            None => not_measured("memory given back after a connection flood", flood_target),
        });

        let bin_target = format!("< {TARGET_BINARY_MIB:.0} MiB");
        t.push(match &r.binary {
            Some(b) => Target {
                what: "release binary (stripped)",
                target: bin_target,
                figure: format!("{:.1} MiB{}", b.mib, if b.stripped { "" } else { " (NOT stripped)" }),
                met: Some(b.mib < TARGET_BINARY_MIB && b.stripped),
            },
            None => not_measured("release binary (stripped)", bin_target),
        });

        let ready_target = format!("< {TARGET_READY_MS:.0} ms");
        t.push(if r.readiness.is_empty() {
            not_measured("start → /readyz 200 (median)", ready_target)
        } else {
            let worst = r.readiness.iter().map(|s| s.median_ms).fold(0.0, f64::max);
            Target {
                what: "start → /readyz 200 (median)",
                target: ready_target,
                figure: r
                    .readiness
                    .iter()
                    .map(|s| format!("{} {:.1}", s.name, s.median_ms))
                    .collect::<Vec<_>>()
                    .join("; ")
                    + " ms",
                met: Some(worst < TARGET_READY_MS),
            }
        });
        let kernel = r.kernel_datapath.ratios.iter().find(|x| x.name == "ClusterIP / direct, req/s");
        t.push(ratio_target(
            "kernel node datapath: ClusterIP vs direct to the pod, req/s",
            format!("≈ 1.0× (≥ {TARGET_KERNEL_DATAPATH:.2}×)"),
            kernel,
            |m| m >= TARGET_KERNEL_DATAPATH,
        ));
        self.report.targets = t;
    }

    fn print(&self) {
        let r = &self.report;
        let o = &self.opts;
        println!();
        println!(
            "graceful bench ({} profile): {} core(s), load average {} → {}, {}",
            r.meta.profile, r.meta.cores, r.meta.loadavg_start, r.meta.loadavg_end, r.meta.wrk
        );
        println!(
            "wrk: {} thread(s), {} connections, {} s runs after {} s warm-up, {} round(s) alternating; {} repeats for start/exit",
            o.threads, o.connections, o.seconds, o.warmup_seconds, o.rounds, o.repeats
        );
        println!("binary: {}", r.meta.binary);

        if let Some(l) = &r.load {
            section("Throughput and latency at 0 ms backend work (medians over rounds)");
            print_cases(&l.cases);
            section("Ratios (computed per round, median and range over rounds)");
            print_ratios(&l.ratios);
        }
        if let Some(s) = &r.spans {
            println!(
                "spans exported: backend {:.2} per request ({} requests), frontend {:.2} per request ({} requests), \
                 10 % sampled chain {:.3} per request ({} requests); {} exports, {:.1} MiB",
                s.backend_spans_per_request,
                s.requests_to_traced_backend,
                s.frontend_spans_per_request,
                s.requests_to_traced_frontend,
                s.sampled_spans_per_request,
                s.requests_to_sampled_frontend,
                s.exports,
                s.export_bytes as f64 / MIB
            );
        }
        if !r.memory.is_empty() || r.binary.is_some() {
            section("Memory (MiB; /proc/PID/status)");
            let mut t =
                table(["process", "idle RSS", "idle peak (VmHWM)", "peak under load (VmHWM)", "RSS after load"]);
            for m in &r.memory {
                t.add_row([
                    m.process.to_string(),
                    mib(m.idle.rss_kib),
                    mib(m.idle.hwm_kib),
                    mib(m.after_load.hwm_kib),
                    mib(m.after_load.rss_kib),
                ]);
            }
            println!("{t}");
            if let Some(f) = &r.flood {
                println!(
                    "connection flood (backend, {} connections, each answered once): idle {} MiB, all open {} MiB, \
                     {} ms after they closed {} MiB ({:.0} % of the growth given back)",
                    f.connections,
                    mib(f.idle_rss_kib),
                    mib(f.peak_rss_kib),
                    f.settle_ms,
                    mib(f.after_rss_kib),
                    f.returned() * 100.0
                );
            }
            if let Some(b) = &r.binary {
                println!(
                    "binary: {:.2} MiB ({} bytes), {}",
                    b.mib,
                    b.bytes,
                    if b.stripped { "stripped" } else { "NOT stripped" }
                );
            }
        }
        if !r.readiness.is_empty() {
            section("Process start → admin /readyz 200 (ms)");
            let mut t = table(["role", "median", "min", "max", "n"]);
            for s in &r.readiness {
                t.add_row([s.name.clone(), f2(s.median_ms), f2(s.min_ms), f2(s.max_ms), s.values_ms.len().to_string()]);
            }
            println!("{t}");
        }
        if !r.exit.is_empty() {
            section(&format!("Drain end → process exit (ms; drain delay {} ms)", o.drain_delay_ms));
            let mut t = table([
                "pod",
                "median",
                "max",
                "SIGTERM → listener_closed (median)",
                "listener_closed → drained (median)",
                "exit event → gone (median)",
                "exit codes",
            ]);
            for c in &r.exit {
                let med = |f: fn(&ExitSample) -> Option<f64>| {
                    let v: Vec<f64> = c.samples.iter().filter_map(f).collect();
                    if v.is_empty() {
                        "-".to_string()
                    } else {
                        f2(median(&v))
                    }
                };
                let mut codes: Vec<String> =
                    c.samples.iter().map(|s| s.exit_code.map_or("signal".into(), |x| x.to_string())).collect();
                codes.dedup();
                t.add_row([
                    c.drain_end_to_exit.name.clone(),
                    f2(c.drain_end_to_exit.median_ms),
                    f2(c.drain_end_to_exit.max_ms),
                    med(|s| s.sigterm_to_listener_closed_ms),
                    med(|s| s.listener_closed_to_drained_ms),
                    med(|s| s.exit_event_to_process_gone_ms),
                    codes.join(","),
                ]);
            }
            println!("{t}");
        }
        section("Lab Service proxy (graceful::lab::network::service_proxy) vs direct");
        let p = &r.service_proxy;
        if p.status == "measured" {
            print_cases(&p.cases);
            print_ratios(&p.ratios);
        } else {
            println!("{}: {}", p.status, p.reason.as_deref().unwrap_or("-"));
        }
        section("Kernel node datapath (kube-proxy's nftables rules, conntrack, bridge) vs direct to the pod");
        let k = &r.kernel_datapath;
        match &k.rounds {
            Some(rounds) => {
                let mut t = table(["target", "what", "req/s (median)", "p50 ms", "p99 ms", "errors"]);
                for (name, what, runs) in &rounds.targets {
                    let med = |f: fn(&wrk::Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
                    t.add_row([
                        name.clone(),
                        what.clone(),
                        format!("{:.0}", med(|r| r.rps)),
                        format!("{:.3}", med(|r| r.p50_ms)),
                        format!("{:.3}", med(|r| r.p99_ms)),
                        runs.iter().map(|r| r.errors).sum::<u64>().to_string(),
                    ]);
                }
                println!("{t}");
                print_ratios(&k.ratios);
            }
            None => println!("{}: {}", k.status, k.reason.as_deref().unwrap_or("-")),
        }
        section("Targets");
        let mut t = table(["what", "target", "figure", "met"]);
        for x in &r.targets {
            let met = match x.met {
                Some(true) => "yes",
                Some(false) => "MISSED",
                None => "not measured",
            };
            t.add_row([x.what.to_string(), x.target.clone(), x.figure.clone(), met.to_string()]);
        }
        println!("{t}");
        for e in &r.errors {
            println!("error: {e}");
        }
        println!("total: {:.0} s", r.meta.total_seconds);
    }
}

fn not_measured(what: &'static str, target: String) -> Target {
    Target { what, target, figure: "-".into(), met: None }
}

fn ratio(name: &str, num: &Case, den: &Case, f: fn(&wrk::Run) -> f64) -> Ratio {
    let per_round: Vec<f64> = num.runs.iter().zip(&den.runs).map(|(a, b)| f(a) / f(b)).collect();
    ratio_of(name, per_round)
}

/// `a − b` of a figure in ms, as µs.
fn diff_us(name: &str, a: &Case, b: &Case, f: fn(&wrk::Run) -> f64) -> Ratio {
    let per_round: Vec<f64> = a.runs.iter().zip(&b.runs).map(|(x, y)| (f(x) - f(y)) * 1e3).collect();
    Ratio { unit: "µs", ..ratio_of(name, per_round) }
}

fn cpu_ratio(name: &str, num: &Case, den: &Case) -> Ratio {
    let app = |c: &Case, r: usize| -> f64 {
        c.cpu_us_per_request.iter().filter(|(k, _)| k.as_str() != "otlp_sink").map(|(_, v)| v[r]).sum()
    };
    let per_round = (0..num.runs.len().min(den.runs.len())).map(|r| app(num, r) / app(den, r)).collect();
    ratio_of(name, per_round)
}

/// One process's CPU per request (`label`) in two cases, per round.
fn hop_cpu_ratio(name: &str, num: &Case, den: &Case, label: &str) -> Ratio {
    let (a, b) = (&num.cpu_us_per_request[label], &den.cpu_us_per_request[label]);
    ratio_of(name, a.iter().zip(b).map(|(x, y)| x / y).collect())
}

/// A target on a ratio row: its median and range, and whether `ok(median)`.
fn ratio_target(what: &'static str, target: String, r: Option<&Ratio>, ok: impl Fn(f64) -> bool) -> Target {
    match r {
        Some(x) => Target {
            what,
            target,
            figure: format!("{:.2}× (rounds {:.2}–{:.2})", x.median, x.min, x.max),
            met: Some(ok(x.median)),
        },
        None => not_measured(what, target),
    }
}

fn ratio_of(name: &str, per_round: Vec<f64>) -> Ratio {
    Ratio {
        name: name.to_string(),
        unit: "×",
        median: median(&per_round),
        min: per_round.iter().copied().fold(f64::INFINITY, f64::min),
        max: per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        per_round,
    }
}

fn time_to_ready(spec: &Spec) -> Result<f64> {
    let [public, admin] = procs::free_ports()?;
    let spec = spec.clone().args([
        "--listen".to_string(),
        format!("127.0.0.1:{public}"),
        "--admin-listen".into(),
        format!("127.0.0.1:{admin}"),
    ]);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let t0 = Instant::now();
    let mut p = Proc::spawn(&spec)?;
    let deadline = t0 + Duration::from_secs(10);
    loop {
        if let Ok(200) = http::get_once(admin, "/readyz", Duration::from_millis(500)) {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            p.kill();
            return Ok(ms);
        }
        if p.wait_exit(Duration::ZERO).is_some() {
            bail!("{} exited before it was ready:\n{}", spec.role, p.log_tail(20));
        }
        if Instant::now() >= deadline {
            bail!("{} not ready within 10 s:\n{}", spec.role, p.log_tail(20));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn time_to_exit(spec: &Spec, keepalive: usize, requests: usize, drain: Duration) -> Result<ExitSample> {
    let mut p = Proc::start(spec)?;
    // The same traffic either way; the keep-alive case keeps `keepalive` connections open and idle.
    let mut held = Vec::new();
    for _ in 0..requests {
        if held.len() < keepalive {
            let (c, status) = http::KeepAlive::open(p.listen, "/api/data", Duration::from_secs(5))?;
            if status != 200 {
                bail!("{}: /api/data answered {status}", spec.role);
            }
            held.push(c);
        } else {
            expect_200(p.listen, "/api/data", spec.role)?;
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    let open = held.iter().filter(|c| !c.closed_by_server()).count();
    if open != keepalive {
        bail!("{}: only {open} of {keepalive} keep-alive connections stayed open before SIGTERM", spec.role);
    }
    let sigterm = SystemTime::now();
    p.signal(nix::sys::signal::Signal::SIGTERM);
    let bound = drain + Duration::from_secs(20);
    let (status, gone) = p.wait_exit(bound).ok_or_else(|| anyhow!("{} did not exit within {bound:?}", spec.role))?;
    drop(held);
    let ev = |name: &str| p.event_time(name);
    let listener_closed = ev("listener_closed");
    let drained = ev("drained");
    let exit_ev = ev("exit");
    let drain_end = listener_closed.unwrap_or(sigterm + drain);
    Ok(ExitSample {
        sigterm_to_listener_closed_ms: listener_closed.map(|t| ms_between(sigterm, t)),
        listener_closed_to_drained_ms: listener_closed.zip(drained).map(|(a, b)| ms_between(a, b)),
        drained_to_exit_event_ms: drained.zip(exit_ev).map(|(a, b)| ms_between(a, b)),
        exit_event_to_process_gone_ms: exit_ev.map(|t| ms_between(t, gone)),
        drain_end_to_exit_ms: ms_between(drain_end, gone),
        drain_end_from_log: listener_closed.is_some(),
        exit_code: status.code(),
        shutdown_timeout_hit: p
            .events()
            .iter()
            .any(|v| v["message"].as_str().is_some_and(|m| m.contains("shutdown_timeout reached"))),
    })
}

/// b - a in milliseconds (negative when b is earlier).
fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn binary_info() -> Result<Binary> {
    let bin = procs::bin();
    let bytes = std::fs::read(&bin).with_context(|| format!("reading {bin}"))?;
    Ok(Binary {
        path: bin,
        bytes: bytes.len() as u64,
        mib: bytes.len() as f64 / MIB,
        stripped: !elf_has_section(&bytes, ".symtab")?,
    })
}

/// Whether an ELF64 little-endian file has a section named `name`.
fn elf_has_section(b: &[u8], name: &str) -> Result<bool> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        bail!("not an ELF64 little-endian file");
    }
    let u16_at = |o: usize| -> Result<usize> {
        Ok(u16::from_le_bytes(b.get(o..o + 2).ok_or_else(|| anyhow!("truncated ELF"))?.try_into()?) as usize)
    };
    let u32_at = |o: usize| -> Result<usize> {
        Ok(u32::from_le_bytes(b.get(o..o + 4).ok_or_else(|| anyhow!("truncated ELF"))?.try_into()?) as usize)
    };
    let u64_at = |o: usize| -> Result<usize> {
        Ok(u64::from_le_bytes(b.get(o..o + 8).ok_or_else(|| anyhow!("truncated ELF"))?.try_into()?) as usize)
    };
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28)?, u16_at(0x3A)?, u16_at(0x3C)?, u16_at(0x3E)?);
    let sh = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(sh(shstrndx) + 0x18)?;
    for i in 0..shnum {
        let off = strtab + u32_at(sh(i))?;
        let end = b[off..].iter().position(|c| *c == 0).map(|p| off + p).ok_or_else(|| anyhow!("bad section name"))?;
        if &b[off..end] == name.as_bytes() {
            return Ok(true);
        }
    }
    Ok(false)
}

fn git_rev() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("git").args(["-C", dir, "rev-parse", "--short", "HEAD"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let rev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dirty = std::process::Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    Some(if dirty { format!("{rev}+dirty") } else { rev })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::ASCII_MARKDOWN).set_header(header);
    t
}

fn print_cases(cases: &[Case]) {
    let mut t = table(["case", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "CPU µs/request (per process)"]);
    for c in cases {
        let cpu = c.median.cpu_us_per_request.iter().map(|(k, v)| format!("{k} {v:.1}")).collect::<Vec<_>>().join(", ");
        t.add_row([
            format!("{} ({})", c.name, c.what),
            format!("{:.0}", c.median.rps),
            f2(c.median.p50_ms),
            f2(c.median.p90_ms),
            f2(c.median.p99_ms),
            c.median.errors.to_string(),
            cpu,
        ]);
    }
    println!("{t}");
}

fn print_ratios(ratios: &[Ratio]) {
    let mut t = table(["comparison", "median", "range over rounds"]);
    for r in ratios {
        let (m, range) = if r.unit == "µs" {
            (format!("{:+.0} µs", r.median), format!("{:+.0} – {:+.0} µs", r.min, r.max))
        } else {
            (format!("{:.3} ×", r.median), format!("{:.3} – {:.3}", r.min, r.max))
        };
        t.add_row([r.name.clone(), m, range]);
    }
    println!("{t}");
}

fn f2(x: f64) -> String {
    format!("{x:.2}")
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}
