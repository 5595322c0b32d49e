//! The `--expect…` claims: refused up front when they name a run that will not happen, checked
//! against the results at the end.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::lab::cli::LabArgs;
use crate::lab::report::result::RunResult;

#[derive(Debug, Serialize)]
pub struct Expectation {
    pub claim: String,
    pub held: bool,
    pub detail: String,
}

pub fn check_expectations(args: &LabArgs, runs: &[RunResult]) -> Result<Vec<Expectation>> {
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

/// Claims about runs that will not happen are mistakes: say so before minutes of running.
pub fn check_claims(args: &LabArgs, names: &[&str]) -> Result<()> {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::report;
    use clap::Parser;
    use std::path::PathBuf;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        lab: LabArgs,
    }

    fn result(name: &str, failed: usize) -> RunResult {
        RunResult {
            name: name.into(),
            node: "process".into(),
            runtime: crate::lab::cli::RuntimeKind::Process,
            datapath: None,
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
            traces: None,
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
}
