//! Numbers per run and the tables printed at the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, CellAlignment, Table};
use serde::Serialize;

use crate::lab::api::cluster::{ms, ser_ms, Event, Pod};
use crate::lab::control_plane::deployment::RolloutStats;
use crate::lab::load::generator::{Outcome, RequestRecord};
use crate::lab::load::k6::K6Figures;
use crate::lab::report::attribution::{self, Group};
use crate::lab::report::trace_export::TraceOutput;

/// One rollout window (all deployments restarted together, or one after the other).
#[derive(Debug, Clone, Serialize)]
pub struct RolloutWindow {
    pub index: usize,
    #[serde(serialize_with = "ser_ms", rename = "start_ms")]
    pub start: Duration,
    /// All rollouts complete and every old pod stopped.
    #[serde(serialize_with = "ser_ms", rename = "end_ms")]
    pub end: Duration,
    pub deployments: Vec<RolloutStats>,
    pub failed: usize,
    pub requests: usize,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    pub requests: usize,
    pub failed: usize,
    pub failed_pct: f64,
    pub by_class: BTreeMap<String, usize>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Worst latency of requests started before the first rollout.
    pub steady_max_ms: f64,
    /// Worst latency of requests started during a rollout.
    pub rollout_max_ms: f64,
    pub retries: u64,
    pub requests_retried: usize,
    /// Sum of the rollout windows.
    pub rollout_ms: f64,
}

/// Everything one run produced.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub name: String,
    /// Which node ran it: `kernel` or `process`.
    pub node: String,
    /// What ran the pods' containers: `process` or `oci`.
    pub runtime: crate::lab::cli::RuntimeKind,
    /// The kernel node's datapath: nftables transactions and conntrack's warnings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath: Option<Datapath>,
    pub endpoint_lag_ms: f64,
    pub rate: f64,
    pub summary: Summary,
    pub rollouts: Vec<RolloutWindow>,
    pub attribution: attribution::Report,
    pub groups: Vec<Group>,
    pub spans_received: usize,
    pub run_ms: f64,
    pub run_dir: PathBuf,
    pub timeline: PathBuf,
    pub pods: Vec<Pod>,
    pub events: Vec<Event>,
    /// Every request: from the built-in generator, or with `--k6` the failed ones k6 logged
    /// (`GRACEFUL-FAILED`, which the attribution explains) and the successful ones from its
    /// CSV samples.
    pub requests: Vec<RequestRecord>,
    /// k6's own figures when k6 was the load source (`--k6`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k6: Option<K6Figures>,
    /// The run's spans as OTLP JSON lines, and where they were forwarded (none with --no-tracing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traces: Option<TraceOutput>,
}

/// What the kernel node's kube-proxy did during a run.
#[derive(Debug, Clone, Serialize)]
pub struct Datapath {
    pub nft: crate::lab::network::kernel_proxy::ApplyStats,
    /// conntrack's warnings (an overrun buffer loses events, hence records).
    pub conntrack_warnings: Vec<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn in_rollout(windows: &[RolloutWindow], t: Duration) -> bool {
    windows.iter().any(|w| t >= w.start && t <= w.end)
}

pub fn summarize(requests: &[RequestRecord], windows: &[RolloutWindow]) -> Summary {
    let mut s = Summary { requests: requests.len(), ..Default::default() };
    let mut lat: Vec<f64> = Vec::with_capacity(requests.len());
    let first_rollout = windows.first().map(|w| w.start).unwrap_or(Duration::MAX);
    for r in requests {
        *s.by_class.entry(r.outcome.class()).or_default() += 1;
        if !r.outcome.is_ok() {
            s.failed += 1;
        }
        if r.outcome != Outcome::Overload {
            lat.push(ms(r.latency));
        }
        s.retries += u64::from(r.retries);
        if r.retries > 0 {
            s.requests_retried += 1;
        }
        if r.start < first_rollout && r.outcome.is_ok() {
            s.steady_max_ms = s.steady_max_ms.max(ms(r.latency));
        }
        if in_rollout(windows, r.start) {
            s.rollout_max_ms = s.rollout_max_ms.max(ms(r.latency));
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    s.p50_ms = percentile(&lat, 50.0);
    s.p99_ms = percentile(&lat, 99.0);
    s.max_ms = lat.last().copied().unwrap_or(0.0);
    s.failed_pct = if s.requests == 0 { 0.0 } else { 100.0 * s.failed as f64 / s.requests as f64 };
    s.rollout_ms = windows.iter().map(|w| ms(w.end.saturating_sub(w.start))).sum();
    s
}

/// The run's summary from k6's figures (`--k6`): k6's own count of every request, which holds
/// even when its CSV samples are missing. Outcome classes are k6's (`status_0`, `status_502`,
/// …, `bad_body`).
pub fn summary_from_k6(k: &K6Figures, windows: &[RolloutWindow]) -> Summary {
    let phase_max = |p: &str| k.phases.pointer(&format!("/{p}/latency_ms/max")).and_then(|v| v.as_f64()).unwrap_or(0.0);
    let requests = k.requests as usize;
    Summary {
        requests,
        failed: k.failed as usize,
        failed_pct: 100.0 * k.error_rate,
        by_class: k.outcomes.iter().filter(|(_, n)| **n > 0).map(|(c, n)| (c.clone(), *n as usize)).collect(),
        p50_ms: k.p50_ms,
        p99_ms: k.p99_ms,
        max_ms: k.max_ms,
        steady_max_ms: phase_max("warmup"),
        rollout_max_ms: phase_max("rollout"),
        retries: k.retry_count,
        requests_retried: (k.retried_requests_rate * requests as f64).round() as usize,
        rollout_ms: windows.iter().map(|w| ms(w.end.saturating_sub(w.start))).sum(),
    }
}

/// `3015` → `3 015`, as the seed demos print counts.
pub fn count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn millis(v: f64) -> String {
    format!("{} ms", count(v.round() as usize))
}

fn secs(v_ms: f64) -> String {
    format!("{:.1} s", v_ms / 1000.0)
}

fn right(s: impl Into<String>) -> Cell {
    Cell::new(s.into()).set_alignment(CellAlignment::Right)
}

/// The side-by-side comparison of runs.
pub fn comparison(runs: &[RunResult]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    let mut header = vec![Cell::new("")];
    header.extend(runs.iter().map(|r| {
        right(if runs.iter().filter(|x| x.name == r.name).count() > 1 {
            format!("{} (lag {})", r.name, secs(r.endpoint_lag_ms))
        } else {
            r.name.clone()
        })
    }));
    t.set_header(header);
    let mut row = |label: &str, f: &dyn Fn(&RunResult) -> String| {
        let mut cells = vec![Cell::new(label)];
        cells.extend(runs.iter().map(|r| right(f(r))));
        t.add_row(cells);
    };
    let with_k6 = runs.iter().any(|r| r.k6.is_some());
    if with_k6 {
        row("load source", &|r| if r.k6.is_some() { "k6".into() } else { "lab".into() });
    }
    row("requests", &|r| count(r.summary.requests));
    row("failed", &|r| format!("{} ({:.2} %)", count(r.summary.failed), r.summary.failed_pct));
    let mut classes: Vec<String> =
        runs.iter().flat_map(|r| r.summary.by_class.keys().cloned()).filter(|c| c != "ok").collect();
    classes.sort();
    classes.dedup();
    for c in &classes {
        row(&format!("  {c}"), &|r| count(r.summary.by_class.get(c).copied().unwrap_or(0)));
    }
    if with_k6 {
        row("k6 exit / thresholds", &|r| match &r.k6 {
            Some(k) => format!("{} / {}", k.exit_text(), k.thresholds_text()),
            None => "–".into(),
        });
        row("k6 failures logged", &|r| r.k6.as_ref().map(|k| count(k.failures_logged)).unwrap_or_else(|| "–".into()));
    }
    row("latency p50 / p99", &|r| format!("{} / {}", millis(r.summary.p50_ms), millis(r.summary.p99_ms)));
    row("latency max", &|r| millis(r.summary.max_ms));
    row("  steady-state max", &|r| millis(r.summary.steady_max_ms));
    row("  max during rollout", &|r| millis(r.summary.rollout_max_ms));
    row("retries (requests)", &|r| {
        format!("{} ({})", count(r.summary.retries as usize), count(r.summary.requests_retried))
    });
    row("rollout", &|r| {
        if r.k6.as_ref().is_some_and(|k| k.rollout_overran_phase) {
            format!("{} (past k6's rollout phase)", secs(r.summary.rollout_ms))
        } else if r.rollouts.len() > 1 {
            format!("{} × {}", r.rollouts.len(), secs(r.summary.rollout_ms / r.rollouts.len() as f64))
        } else {
            secs(r.summary.rollout_ms)
        }
    });
    if runs.iter().any(|r| r.rollouts.len() > 1) {
        row("failed per rollout", &|r| r.rollouts.iter().map(|w| w.failed.to_string()).collect::<Vec<_>>().join(" "));
    }
    row("attributed", &|r| {
        let a = &r.attribution;
        if a.failed == 0 {
            "–".into()
        } else {
            format!(
                "{}/{} ({:.0} %), {} via spans",
                a.attributed,
                a.failed,
                100.0 * a.attributed as f64 / a.failed as f64,
                a.from_spans
            )
        }
    });
    row("spans received", &|r| count(r.spans_received));
    row("run", &|r| secs(r.run_ms));
    t
}

/// Where one run's failures came from.
pub fn failure_table(run: &RunResult) -> Option<Table> {
    if run.groups.is_empty() {
        return None;
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_header(vec!["hop", "pod phase", "cause", "failed", "pods", "ms after SIGTERM", "from", "example trace"]);
    for g in &run.groups {
        let range = match (g.ms_after_sigterm_min, g.ms_after_sigterm_max) {
            (Some(a), Some(b)) if (a - b).abs() < 0.5 => format!("{a:.0}"),
            (Some(a), Some(b)) => format!("{a:.0} … {b:.0}"),
            _ => "–".into(),
        };
        let from = match g.source {
            attribution::Source::Spans => "pod span",
            attribution::Source::SpansAndLab => "caller span + lab",
            attribution::Source::Lab => "lab records",
        };
        t.add_row(vec![
            Cell::new(&g.hop),
            Cell::new(&g.phase),
            Cell::new(&g.cause),
            right(count(g.count)),
            right(g.pods.to_string()),
            right(range),
            Cell::new(from),
            Cell::new(g.example_trace.as_deref().unwrap_or("– (no span)")),
        ]);
    }
    Some(t)
}

/// Failures per endpoint lag (rows) and run name (columns).
pub fn sweep_table(runs: &[RunResult]) -> Table {
    let mut names: Vec<String> = Vec::new();
    for r in runs {
        if !names.contains(&r.name) {
            names.push(r.name.clone());
        }
    }
    let mut lags: Vec<f64> = runs.iter().map(|r| r.endpoint_lag_ms).collect();
    lags.sort_by(|a, b| a.total_cmp(b));
    lags.dedup();
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    let mut header = vec![Cell::new("endpoint lag")];
    header.extend(names.iter().map(|n| right(format!("{n}: failed / requests"))));
    t.set_header(header);
    for lag in lags {
        let mut cells = vec![right(secs(lag))];
        for n in &names {
            let cell = runs
                .iter()
                .find(|r| &r.name == n && r.endpoint_lag_ms == lag)
                .map(|r| {
                    format!(
                        "{} / {} ({:.2} %)",
                        count(r.summary.failed),
                        count(r.summary.requests),
                        r.summary.failed_pct
                    )
                })
                .unwrap_or_default();
            cells.push(right(cell));
        }
        t.add_row(cells);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start_ms: u64, latency_ms: u64, outcome: Outcome) -> RequestRecord {
        RequestRecord::new(start_ms, Duration::from_millis(start_ms), Duration::from_millis(latency_ms), outcome)
    }

    #[test]
    fn summary_splits_steady_state_and_rollout() {
        let windows = vec![RolloutWindow {
            index: 0,
            start: Duration::from_millis(1000),
            end: Duration::from_millis(2000),
            deployments: vec![],
            failed: 0,
            requests: 0,
        }];
        let recs = vec![
            rec(0, 150, Outcome::Ok),
            rec(500, 200, Outcome::Ok),
            rec(1500, 5000, Outcome::Http(504)),
            rec(2500, 100, Outcome::Ok),
        ];
        let s = summarize(&recs, &windows);
        assert_eq!((s.requests, s.failed), (4, 1));
        assert_eq!(s.steady_max_ms, 200.0);
        assert_eq!(s.rollout_max_ms, 5000.0);
        assert_eq!(s.by_class["http_504"], 1);
        assert_eq!(s.failed_pct, 25.0);
    }

    #[test]
    fn counts_group_thousands() {
        assert_eq!(count(3015), "3 015");
        assert_eq!(count(25), "25");
        assert_eq!(count(1234567), "1 234 567");
    }
}
