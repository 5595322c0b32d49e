//! A timeline SVG per run, hand-written (no plotting dependency): outcomes per 100 ms on top,
//! one lane per pod below with its life (starting, ready, preStop, after SIGTERM, exited), the
//! moments the Service proxy started / stopped routing to it, and its attributed failures.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::lab::api::cluster::{ms, EventKind, Pod};
use crate::lab::report::result::RunResult;

const W: f64 = 1400.0;
const LEFT: f64 = 250.0;
const RIGHT: f64 = 20.0;
const CHART_TOP: f64 = 60.0;
const CHART_H: f64 = 150.0;
const LANE_H: f64 = 20.0;
const BIN_MS: f64 = 100.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A pod lane's state: its life as the lab recorded it (not the pod's shutdown phase, which
/// attribution reads from spans).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Starting,
    Ready,
    NotReady,
    PreStop,
    AfterSigterm,
    Exited,
}

impl Lane {
    const ALL: [Lane; 6] =
        [Lane::Starting, Lane::Ready, Lane::NotReady, Lane::PreStop, Lane::AfterSigterm, Lane::Exited];

    fn colour(self) -> &'static str {
        match self {
            Lane::Starting => "#bdbdbd",
            Lane::Ready => "#66bb6a",
            Lane::NotReady => "#fff176",
            Lane::PreStop => "#ffa726",
            Lane::AfterSigterm => "#ef5350",
            Lane::Exited => "#616161",
        }
    }

    fn legend(self) -> &'static str {
        match self {
            Lane::Starting => "starting",
            Lane::Ready => "ready",
            Lane::NotReady => "running, not ready",
            Lane::PreStop => "deleted: preStop",
            Lane::AfterSigterm => "after SIGTERM",
            Lane::Exited => "exited",
        }
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lane::Starting => "starting",
            Lane::Ready => "ready",
            Lane::NotReady => "not-ready",
            Lane::PreStop => "prestop",
            Lane::AfterSigterm => "after-sigterm",
            Lane::Exited => "exited",
        })
    }
}

/// Run time (ms) to x pixel.
struct Scale {
    t_start: f64,
    t_end: f64,
    span: f64,
}

impl Scale {
    fn of(run: &RunResult) -> Scale {
        let t_end = run
            .events
            .iter()
            .map(|e| ms(e.at))
            .chain(run.requests.iter().map(|r| ms(r.start + r.latency)))
            .fold(1000.0_f64, f64::max);
        let t_start = run.requests.first().map(|r| ms(r.start) - 1000.0).unwrap_or(0.0).max(0.0);
        Scale { t_start, t_end, span: (t_end - t_start).max(1.0) }
    }

    fn x(&self, t: f64) -> f64 {
        LEFT + (t - self.t_start).max(0.0) / self.span * (W - LEFT - RIGHT)
    }
}

pub fn render(run: &RunResult) -> String {
    let sc = Scale::of(run);
    let mut pods = run.pods.clone();
    pods.sort_by(|a, b| a.deployment.cmp(&b.deployment).then(a.created.cmp(&b.created)));
    let lanes_top = CHART_TOP + CHART_H + 50.0;
    let height = lanes_top + pods.len() as f64 * LANE_H + 70.0;

    let mut s = String::new();
    header(&mut s, run, height);
    // Rollout windows behind everything.
    rollout_windows(&mut s, run, &sc, height);
    outcome_bins(&mut s, run, &sc);
    time_axis(&mut s, &sc, height);
    let failures_by_pod: BTreeMap<&str, Vec<f64>> = run.attribution.items.iter().fold(BTreeMap::new(), |mut m, a| {
        if let Some(r) = run.requests.iter().find(|r| r.id == a.request) {
            m.entry(a.pod.as_str()).or_default().push(ms(r.start));
        }
        m
    });
    for (i, pod) in pods.iter().enumerate() {
        let failures = failures_by_pod.get(pod.name.as_str()).into_iter().flatten().copied();
        pod_lane(&mut s, run, pod, lanes_top + i as f64 * LANE_H, &sc, failures);
    }
    legend(&mut s, height);
    s.push_str("</svg>\n");
    s
}

fn header(s: &mut String, run: &RunResult, height: f64) {
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!(
        "graceful lab — {}: {} requests at {:.0}/s, {} failed ({:.2} %), endpoint lag {:.1} s",
        run.name,
        run.summary.requests,
        run.rate,
        run.summary.failed,
        run.summary.failed_pct,
        run.endpoint_lag_ms / 1000.0
    );
    let _ = writeln!(s, r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#, esc(&title));
}

fn rollout_windows(s: &mut String, run: &RunResult, sc: &Scale, height: f64) {
    for w in &run.rollouts {
        let (a, b) = (sc.x(ms(w.start)), sc.x(ms(w.end)));
        let _ = writeln!(
            s,
            r##"<rect x="{a:.1}" y="{CHART_TOP}" width="{:.1}" height="{:.1}" fill="#e3f2fd"/>"##,
            (b - a).max(1.0),
            height - CHART_TOP - 40.0
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#1565c0">rollout {}</text>"##,
            a + 3.0,
            CHART_TOP + 12.0,
            w.index + 1
        );
    }
}

/// Outcomes per 100 ms bin, ok stacked under failed.
fn outcome_bins(s: &mut String, run: &RunResult, sc: &Scale) {
    let mut bins: BTreeMap<i64, (u32, u32)> = BTreeMap::new();
    for r in &run.requests {
        let b = (ms(r.start) / BIN_MS).floor() as i64;
        let e = bins.entry(b).or_default();
        if r.outcome.is_ok() {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    let peak = bins.values().map(|(o, f)| o + f).max().unwrap_or(1).max(1) as f64;
    let bw = (BIN_MS / sc.span * (W - LEFT - RIGHT)).max(1.0);
    for (b, (ok, failed)) in &bins {
        let bx = sc.x(*b as f64 * BIN_MS);
        let h_ok = f64::from(*ok) / peak * CHART_H;
        let h_f = f64::from(*failed) / peak * CHART_H;
        let base = CHART_TOP + CHART_H;
        if *ok > 0 {
            let _ = writeln!(
                s,
                r##"<rect x="{bx:.1}" y="{:.1}" width="{bw:.1}" height="{h_ok:.1}" fill="#43a047"/>"##,
                base - h_ok
            );
        }
        if *failed > 0 {
            let _ = writeln!(
                s,
                r##"<rect x="{bx:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="#e53935"><title>{} failed</title></rect>"##,
                base - h_ok - h_f.max(2.0),
                h_f.max(2.0),
                failed
            );
        }
    }
    let _ = writeln!(s, r#"<text x="10" y="{:.1}">requests per 100 ms</text>"#, CHART_TOP + CHART_H / 2.0);
    let _ = writeln!(s, r##"<text x="10" y="{:.1}" fill="#43a047">■ ok</text>"##, CHART_TOP + CHART_H / 2.0 + 16.0);
    let _ = writeln!(s, r##"<text x="60" y="{:.1}" fill="#e53935">■ failed</text>"##, CHART_TOP + CHART_H / 2.0 + 16.0);
    let _ = writeln!(s, r#"<text x="10" y="{:.1}" fill="gray">peak {peak:.0}</text>"#, CHART_TOP + 10.0);
}

fn time_axis(s: &mut String, sc: &Scale, height: f64) {
    let axis_y = CHART_TOP + CHART_H + 14.0;
    let step = if sc.span > 60_000.0 {
        10_000.0
    } else if sc.span > 20_000.0 {
        5_000.0
    } else {
        1_000.0
    };
    let mut t = (sc.t_start / step).ceil() * step;
    while t <= sc.t_end {
        let tx = sc.x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{tx:.1}" x2="{tx:.1}" y1="{CHART_TOP}" y2="{:.1}" stroke="#eeeeee"/>"##,
            height - 40.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{tx:.1}" y="{axis_y:.1}" text-anchor="middle" fill="gray">{:.0} s</text>"#,
            t / 1000.0
        );
        t += step;
    }
}

/// One pod's lane: its states, the proxy's routing changes, SIGKILL, preStop and its failures.
fn pod_lane(s: &mut String, run: &RunResult, pod: &Pod, y: f64, sc: &Scale, failures: impl Iterator<Item = f64>) {
    let _ = writeln!(s, r#"<text x="10" y="{:.1}">{}</text>"#, y + 13.0, esc(&pod.name));
    let mut events: Vec<_> = run.events.iter().filter(|e| e.pod == pod.name).collect();
    events.sort_by_key(|e| e.at);
    let mut state = Lane::Starting;
    let mut since = ms(pod.created);
    let mut deleted = false;
    let end_of_lane = pod.gone.map(ms).unwrap_or(sc.t_end).min(sc.t_end);
    let seg = |s: &mut String, from: f64, to: f64, st: Lane| {
        if to > from {
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {st} {:.1}–{:.1} s</title></rect>"#,
                sc.x(from),
                y + 3.0,
                (sc.x(to) - sc.x(from)).max(0.5),
                LANE_H - 6.0,
                st.colour(),
                esc(&pod.name),
                from / 1000.0,
                to / 1000.0
            );
        }
    };
    for e in &events {
        let at = ms(e.at);
        let next = match e.kind {
            EventKind::Ready => Some(Lane::Ready),
            EventKind::NotReady if !deleted => Some(Lane::NotReady),
            EventKind::Deleted => {
                deleted = true;
                Some(Lane::PreStop)
            }
            EventKind::Sigterm => Some(Lane::AfterSigterm),
            EventKind::Exited => Some(Lane::Exited),
            EventKind::ContainerStarted => Some(Lane::Starting),
            _ => None,
        };
        if let Some(n) = next {
            seg(s, since, at, state);
            state = n;
            since = at;
        }
        let mark = |colour: &str, label: &str| {
            format!(
                r#"<line x1="{0:.1}" x2="{0:.1}" y1="{1:.1}" y2="{2:.1}" stroke="{colour}" stroke-width="2"><title>{label} at {3:.2} s</title></line>"#,
                sc.x(at),
                y,
                y + LANE_H,
                at / 1000.0
            )
        };
        match e.kind {
            EventKind::EndpointAdded => {
                let _ = writeln!(s, "{}", mark("#1e88e5", &format!("proxy routes to it ({})", e.detail)));
            }
            EventKind::EndpointRemoved => {
                let _ = writeln!(s, "{}", mark("#0d47a1", &format!("proxy stops routing to it ({})", e.detail)));
            }
            EventKind::Sigkill => {
                let _ = writeln!(s, "{}", mark("black", "SIGKILL"));
            }
            EventKind::PreStopStarted => {
                let _ = writeln!(s, "{}", mark("#e65100", "preStop"));
            }
            _ => {}
        }
    }
    seg(s, since, end_of_lane, state);
    // Address gone, yet the lagging proxies still send new connections there.
    if let Some(gone) = pod.gone.map(ms) {
        let routed_until = events
            .iter()
            .filter(|e| e.kind == EventKind::EndpointRemoved && ms(e.at) > gone)
            .map(|e| ms(e.at))
            .fold(f64::NAN, f64::max);
        if routed_until.is_finite() {
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" x2="{:.1}" y1="{2:.1}" y2="{2:.1}" stroke="#b71c1c" stroke-width="1.5" stroke-dasharray="4 3"><title>gone, still routed by the proxy until {3:.2} s</title></line>"##,
                sc.x(gone),
                sc.x(routed_until),
                y + LANE_H / 2.0,
                routed_until / 1000.0
            );
        }
    }
    for t in failures {
        let _ = writeln!(s, r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#b71c1c"/>"##, sc.x(t), y + LANE_H / 2.0);
    }
}

fn legend(s: &mut String, height: f64) {
    let ly = height - 22.0;
    let mut lx = 10.0;
    for st in Lane::ALL {
        let label = st.legend();
        let _ = writeln!(s, r#"<rect x="{lx}" y="{:.1}" width="12" height="12" fill="{}"/>"#, ly - 10.0, st.colour());
        let _ = writeln!(s, r#"<text x="{}" y="{ly:.1}">{label}</text>"#, lx + 16.0);
        lx += 30.0 + label.len() as f64 * 6.5;
    }
    let _ = writeln!(
        s,
        r##"<text x="{lx}" y="{ly:.1}"><tspan fill="#1e88e5">| proxy starts</tspan>  <tspan fill="#0d47a1">| proxy stops routing</tspan>  <tspan fill="#b71c1c">- - gone, still routed  ● failed request hit it (at its start)</tspan></text>"##
    );
}
