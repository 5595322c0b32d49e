//! The live progress line: a spinner on a terminal, a plain line every few seconds otherwise
//! (CI logs), both on stderr so stdout keeps only the report. `--quiet` keeps only one line per
//! finished run.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::lab::api::cluster::Cluster;
use crate::lab::load::generator::LiveStats;

#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    label: String,
    phase: String,
    cluster: Option<Arc<Cluster>>,
    load: Option<Arc<LiveStats>>,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        let p = Progress { bar, quiet, state: Arc::default() };
        if !quiet {
            p.spawn_ticker();
        }
        p
    }

    fn spawn_ticker(&self) {
        let me = self.clone();
        let period = if self.bar.is_some() { Duration::from_millis(200) } else { Duration::from_secs(5) };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tick.tick().await;
                let line = me.line();
                if line.is_empty() {
                    continue;
                }
                match &me.bar {
                    Some(b) => b.set_message(line),
                    None => eprintln!("  {line}"),
                }
            }
        });
    }

    pub fn run(&self, label: &str, cluster: Arc<Cluster>) {
        let mut s = self.state.lock().unwrap();
        s.label = label.to_string();
        s.cluster = Some(cluster);
        s.load = None;
    }

    pub fn load(&self, stats: Arc<LiveStats>) {
        self.state.lock().unwrap().load = Some(stats);
    }

    pub fn phase(&self, phase: &str) {
        self.state.lock().unwrap().phase = phase.to_string();
        if self.quiet {
            return;
        }
        let line = self.line();
        match &self.bar {
            Some(b) => b.set_message(line),
            None => eprintln!("  {line}"),
        }
    }

    /// A message that stays (above the spinner on a terminal).
    pub fn println(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    pub fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        *self.state.lock().unwrap() = State::default();
    }

    fn line(&self) -> String {
        let s = self.state.lock().unwrap();
        let Some(cluster) = &s.cluster else { return String::new() };
        let mut out = format!("[{}] {} {:.1} s", s.label, s.phase, cluster.clock.now().as_secs_f64());
        if let Some(l) = &s.load {
            out.push_str(&format!(
                " | {} req, {} failed, {} in flight",
                l.sent.load(Ordering::Relaxed),
                l.failed.load(Ordering::Relaxed),
                l.in_flight.load(Ordering::Relaxed)
            ));
        }
        let mut per: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
        let now = cluster.clock.now();
        for p in cluster.pods() {
            let state = if p.gone.is_some_and(|g| g <= now) {
                continue;
            } else if p.deleted.is_some() {
                "terminating"
            } else if p.ready {
                "ready"
            } else {
                "starting"
            };
            *per.entry(p.deployment.clone()).or_default().entry(state).or_default() += 1;
        }
        for (d, states) in per {
            let parts: Vec<String> = states.iter().map(|(k, v)| format!("{v} {k}")).collect();
            out.push_str(&format!(" | {d}: {}", parts.join(", ")));
        }
        out
    }
}
