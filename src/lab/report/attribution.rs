//! Explains every failed request: on which hop it broke (client→frontend or frontend→backend),
//! on which pod, in which shutdown phase, how long after that pod's SIGTERM.
//!
//! First from the pods' own spans (joined by the trace id the load generator sent). Where a
//! pod left no span — a connection the Service proxy could not deliver, a pod killed before it
//! exported — the lab's own records stand in as the caller's client span: which endpoint the
//! proxy picked for that very socket, and the pod timeline the kubelet kept.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use crate::lab::api::cluster::{ms, Clock, Pod};
use crate::lab::load::generator::{Outcome, RequestRecord};
use crate::lab::network::service_proxy::{ConnRecord, End, Outcome as ProxyOutcome, BLACKHOLE_HOLD};
use crate::otlp_receiver::{SpanRecord, KIND_CLIENT, KIND_SERVER};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The failing pod's own span says it.
    Spans,
    /// The caller's span names the failure; the lab's proxy or pod records name the pod.
    SpansAndLab,
    /// No span: the lab's client and proxy records alone.
    Lab,
}

#[derive(Debug, Clone, Serialize)]
pub struct Attribution {
    pub request: u64,
    pub trace_id: String,
    /// `client→frontend` or `frontend→backend` (deployment names).
    pub hop: String,
    pub pod: String,
    pub deployment: String,
    /// The pod's shutdown phase: from its span (`serving`, `draining`, `stopping`) or the lab's
    /// timeline (`serving`, `prestop`, `after-sigterm`, `exited`).
    pub phase: String,
    pub ms_after_sigterm: Option<f64>,
    /// `error.type` from the caller's span, else the client's outcome class.
    pub cause: String,
    pub source: Source,
    /// Spans the pods exported for this trace: 0 means a trace viewer has nothing to show (the
    /// request never reached a pod, or its pod died before exporting).
    pub trace_spans: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unexplained {
    pub request: u64,
    pub trace_id: String,
    pub outcome: String,
    pub why: String,
    /// The trace's spans, one line each, to look at by hand.
    pub spans: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub failed: usize,
    pub attributed: usize,
    pub from_spans: usize,
    pub items: Vec<Attribution>,
    pub unexplained: Vec<Unexplained>,
}

/// A Service proxy's records with the Service it belongs to.
pub struct ProxyRecords<'a> {
    pub service: &'a str,
    pub records: Vec<ConnRecord>,
    /// How much later than the event its record's times may read, in ms: 0 for the user-space
    /// proxy (it stamps what it does), more for conntrack's events (stamped when read).
    pub late_ms: f64,
}

pub struct Inputs<'a> {
    pub clock: &'a Clock,
    pub requests: &'a [RequestRecord],
    pub spans: &'a [SpanRecord],
    pub pods: &'a [Pod],
    /// The Service the load goes through.
    pub entry: ProxyRecords<'a>,
    /// The other Services (frontend → backend hops).
    pub inner: Vec<ProxyRecords<'a>>,
}

fn span_pod(s: &SpanRecord) -> Option<&str> {
    s.resource.get("k8s.pod.name").and_then(|v| v.as_str()).filter(|p| !p.is_empty())
}

fn attr_f64(s: &SpanRecord, key: &str) -> Option<f64> {
    s.attributes.get(key).and_then(|v| v.as_f64())
}

fn attr_bool(s: &SpanRecord, key: &str) -> bool {
    s.attributes.get(key).is_some_and(|v| v.as_bool() == Some(true) || v.as_str() == Some("true"))
}

pub fn attribute(inp: &Inputs) -> Report {
    let pods: HashMap<&str, &Pod> = inp.pods.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut by_trace: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
    for s in inp.spans {
        by_trace.entry(s.trace_id.as_str()).or_default().push(s);
    }
    let mut used: HashSet<(usize, usize)> = HashSet::new();
    let mut report = Report::default();
    for r in inp.requests.iter().filter(|r| !r.outcome.is_ok()) {
        report.failed += 1;
        let spans = by_trace.get(r.trace_id.as_str()).cloned().unwrap_or_default();
        match explain(inp, r, &spans, &pods, &mut used) {
            Ok(a) => {
                report.attributed += 1;
                if a.source != Source::Lab {
                    report.from_spans += 1;
                }
                report.items.push(a);
            }
            Err(why) => report.unexplained.push(Unexplained {
                request: r.id,
                trace_id: r.trace_id.clone(),
                outcome: r.outcome.class(),
                why,
                spans: spans.iter().map(|s| describe_span(s, inp.clock)).collect(),
            }),
        }
    }
    report
}

fn describe_span(s: &SpanRecord, clock: &Clock) -> String {
    format!(
        "{} {} kind={} pod={} {:.1}..{:.1} ms error={} attrs={}",
        s.service_name,
        s.name,
        s.kind,
        span_pod(s).unwrap_or("?"),
        clock.unix_nanos_to_ms(s.start_unix_nanos),
        clock.unix_nanos_to_ms(s.end_unix_nanos),
        s.status_error,
        serde_json::to_string(&s.attributes).unwrap_or_default()
    )
}

/// The pod's phase and ms after its SIGTERM at run time `t`, from the lab's timeline.
fn lab_phase(pods: &HashMap<&str, &Pod>, pod: &str, t: Duration) -> (String, Option<f64>) {
    match pods.get(pod) {
        Some(p) => (p.phase_at(t).to_string(), p.sigterm.map(|s| ms(t) - ms(s))),
        None => ("unknown".into(), None),
    }
}

fn deployment_of(pods: &HashMap<&str, &Pod>, pod: &str) -> String {
    pods.get(pod).map(|p| p.deployment.clone()).unwrap_or_else(|| "?".into())
}

/// Phase and ms after SIGTERM as the pod's own server span recorded them; when the span has no
/// SIGTERM offset, the lab's timeline gives it (span end vs. the pod's SIGTERM).
fn span_phase_at(s: &SpanRecord, pods: &HashMap<&str, &Pod>, clock: &Clock) -> (String, Option<f64>) {
    let (phase, msig) = span_phase(s);
    let msig = msig.or_else(|| {
        let pod = pods.get(span_pod(s)?)?;
        Some(clock.unix_nanos_to_ms(s.end_unix_nanos) - ms(pod.sigterm?))
    });
    (phase, msig)
}

fn span_phase(s: &SpanRecord) -> (String, Option<f64>) {
    let mut phase = s.attr_str("graceful.shutdown.phase").unwrap_or("unknown").to_string();
    if let Some(end) = s.attr_str("graceful.shutdown.phase_end") {
        if end != phase {
            phase = format!("{phase}→{end}");
        }
    }
    if attr_bool(s, "graceful.dropped") {
        phase.push_str(" (dropped at exit)");
    }
    (phase, attr_f64(s, "graceful.ms_since_sigterm"))
}

/// Who failed a request, before it becomes an [`Attribution`].
struct Verdict {
    hop: String,
    pod: String,
    phase: String,
    ms_after_sigterm: Option<f64>,
    cause: String,
    source: Source,
}

/// One failed request with what is known about it.
struct Case<'a> {
    inp: &'a Inputs<'a>,
    r: &'a RequestRecord,
    spans: &'a [&'a SpanRecord],
    pods: &'a HashMap<&'a str, &'a Pod>,
    /// The frontend's server span: the one whose parent is the client's (unexported) span.
    fe_server: Option<&'a SpanRecord>,
    /// The frontend's Deployment ("frontend" when no record names the pod).
    fe_deploy: String,
    end_of_request: Duration,
}

impl Case<'_> {
    /// The client → frontend hop, told by the frontend pod's own server span.
    fn first_hop_from_span(&self, fe: &SpanRecord) -> Attribution {
        let (phase, ms_after_sigterm) = span_phase_at(fe, self.pods, self.inp.clock);
        self.verdict(Verdict {
            hop: format!("client→{}", self.fe_deploy),
            pod: span_pod(fe).unwrap_or_default().to_string(),
            phase,
            ms_after_sigterm,
            cause: self.r.outcome.class(),
            source: Source::Spans,
        })
    }

    /// The hop to the pod an inner proxy's record names, in the phase the lab saw it in then.
    fn hop_from_proxy_record(&self, m: ProxyMatch, cause: String, source: Source) -> Attribution {
        let (phase, ms_after_sigterm) = lab_phase(self.pods, &m.pod, m.at);
        self.verdict(Verdict {
            hop: self.hop_to(&m.pod),
            phase: format!("{phase}{}", m.note),
            pod: m.pod,
            ms_after_sigterm,
            cause,
            source,
        })
    }

    fn verdict(&self, v: Verdict) -> Attribution {
        Attribution {
            request: self.r.id,
            trace_id: self.r.trace_id.clone(),
            hop: v.hop,
            deployment: deployment_of(self.pods, &v.pod),
            pod: v.pod,
            phase: v.phase,
            ms_after_sigterm: v.ms_after_sigterm,
            cause: v.cause,
            source: v.source,
            trace_spans: self.spans.len(),
        }
    }

    fn hop_to(&self, pod: &str) -> String {
        format!("{}→{}", self.fe_deploy, deployment_of(self.pods, pod))
    }
}

fn explain<'a>(
    inp: &'a Inputs<'a>,
    r: &'a RequestRecord,
    spans: &'a [&'a SpanRecord],
    pods: &'a HashMap<&'a str, &'a Pod>,
    used: &mut HashSet<(usize, usize)>,
) -> Result<Attribution, String> {
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let fe_server = spans.iter().copied().find(|s| s.kind == KIND_SERVER && !ids.contains(s.parent_span_id.as_str()));
    let end_of_request = r.start + r.latency;
    let fe_pod_name = fe_server
        .and_then(|s| span_pod(s))
        .map(str::to_string)
        .or_else(|| r.frontend_pod.clone())
        .or_else(|| r.local.and_then(|l| lookup(&inp.entry, l, end_of_request)).and_then(|c| c.pod.clone()));
    let fe_deploy = fe_pod_name.as_deref().map(|p| deployment_of(pods, p)).unwrap_or_else(|| "frontend".into());
    let case = Case { inp, r, spans, pods, fe_server, fe_deploy, end_of_request };
    let frontend_answered = matches!(r.outcome, Outcome::Http(_) | Outcome::BadBody) && r.status.is_some();
    if frontend_answered {
        explain_frontend_error(&case, used)
    } else {
        explain_client_hop(&case, used)
    }
}

/// The frontend answered with an error: look one hop further, at its failed upstream attempt.
fn explain_frontend_error(c: &Case, used: &mut HashSet<(usize, usize)>) -> Result<Attribution, String> {
    let (inp, r) = (c.inp, c.r);
    let mut attempts: Vec<&SpanRecord> = c
        .spans
        .iter()
        .copied()
        .filter(|s| s.kind == KIND_CLIENT && (s.attr_str("error.type").is_some() || s.status_error))
        .collect();
    attempts.sort_by_key(|s| s.start_unix_nanos);
    if let Some(attempt) = attempts.last() {
        return explain_attempt(c, attempt, used);
    }
    if let Some(fe) = c.fe_server {
        // The frontend failed on its own (e.g. 503 while draining): first hop.
        return Ok(c.first_hop_from_span(fe));
    }
    // No spans at all: the lab's proxies alone.
    let cause = r.error.clone().unwrap_or_default();
    let a = Attempt::new(ms(r.start), ms(c.end_of_request), &cause, None, 5.0);
    let m = join_by_time(&inner(inp), &a, used).ok_or("HTTP error without spans or a matching proxy record")?;
    Ok(c.hop_from_proxy_record(m, r.error.clone().unwrap_or_else(|| r.outcome.class()), Source::Lab))
}

/// The frontend's last failed upstream attempt: the backend's span, else the pod the frontend
/// named, else the inner proxies' records.
fn explain_attempt(c: &Case, attempt: &SpanRecord, used: &mut HashSet<(usize, usize)>) -> Result<Attribution, String> {
    let (inp, pods) = (c.inp, c.pods);
    let cause = attempt.attr_str("error.type").unwrap_or("error").to_string();
    let attempt_end = inp.clock.unix_nanos_to_ms(attempt.end_unix_nanos);
    let attempt_start = inp.clock.unix_nanos_to_ms(attempt.start_unix_nanos);
    let be_server = c.spans.iter().find(|s| s.kind == KIND_SERVER && s.parent_span_id == attempt.span_id);
    if let Some(be) = be_server.filter(|s| span_pod(s).is_some()) {
        let pod = span_pod(be).unwrap_or_default().to_string();
        let (phase, ms_after_sigterm) = span_phase_at(be, pods, inp.clock);
        return Ok(c.verdict(Verdict {
            hop: c.hop_to(&pod),
            pod,
            phase,
            ms_after_sigterm,
            cause,
            source: Source::Spans,
        }));
    }
    if let Some(peer) = attempt.attr_str("graceful.peer.pod").filter(|p| !p.is_empty()) {
        let (phase, ms_after_sigterm) = lab_phase(pods, peer, dur_ms(attempt_end));
        return Ok(c.verdict(Verdict {
            hop: c.hop_to(peer),
            pod: peer.to_string(),
            phase,
            ms_after_sigterm,
            cause,
            source: Source::SpansAndLab,
        }));
    }
    let local = attempt
        .attr_str("network.local.address")
        .zip(attempt.attr_i64("network.local.port"))
        .and_then(|(a, p)| format!("{a}:{p}").parse().ok());
    let a = Attempt::new(attempt_start, attempt_end, &cause, local, 5.0);
    let Some(m) = join_by_time(&inner(inp), &a, used) else {
        return Err(format!("the frontend's attempt failed with {cause} but no backend pod could be matched"));
    };
    Ok(c.hop_from_proxy_record(m, cause, Source::SpansAndLab))
}

/// The client's own hop broke (refused, reset, closed, timeout, short body).
fn explain_client_hop(c: &Case, used: &mut HashSet<(usize, usize)>) -> Result<Attribution, String> {
    let (inp, r, pods) = (c.inp, c.r, c.pods);
    if let Some(fe) = c.fe_server.filter(|s| span_pod(s).is_some()) {
        return Ok(c.first_hop_from_span(fe));
    }
    let conn = r.local.and_then(|l| lookup(&inp.entry, l, c.end_of_request));
    let lab = |hop: String, pod: String, (phase, ms_after_sigterm): (String, Option<f64>)| {
        c.verdict(Verdict { hop, pod, phase, ms_after_sigterm, cause: r.outcome.class(), source: Source::Lab })
    };
    match conn {
        Some(conn) => match &conn.pod {
            Some(pod) => {
                let at = failure_time(&conn, c.end_of_request);
                let (mut phase, msig) = lab_phase(pods, pod, at);
                if conn.outcome == ProxyOutcome::Blackholed {
                    phase = format!("{phase} (pod gone: no address)");
                }
                Ok(lab(format!("client→{}", deployment_of(pods, pod)), pod.clone(), (phase, msig)))
            }
            None => Ok(lab(format!("client→{}", c.fe_deploy), "(no endpoint)".into(), ("none ready".into(), None))),
        },
        None if r.local.is_none() && r.outcome != Outcome::Overload => {
            // A client that does not say which socket it used (k6): join by time with what the
            // entry proxy did during the request. Its clock is the log line's, so more slack.
            let cause = r.error.clone().unwrap_or_else(|| r.outcome.class());
            let a = Attempt::new(ms(r.start), ms(c.end_of_request), &cause, None, UNTIMED_CLIENT_SLACK_MS);
            let entry = [(ENTRY_PROXY, &inp.entry)];
            let m = join_by_time(&entry, &a, used)
                .ok_or("no span, and nothing the entry proxy did during the request matches it")?;
            let (phase, msig) = lab_phase(pods, &m.pod, m.at);
            Ok(lab(format!("client→{}", deployment_of(pods, &m.pod)), m.pod, (format!("{phase}{}", m.note), msig)))
        }
        None => Err(match r.outcome {
            Outcome::Overload => "the load generator had too many requests in flight".into(),
            _ => "no span and no proxy record for this request's connection".into(),
        }),
    }
}

/// The index [`join_by_time`] gives the entry Service's proxy (the inner ones count from 0).
const ENTRY_PROXY: usize = usize::MAX;
/// Time slack for a client whose request times come from its log lines (k6: whole
/// milliseconds, read when the line arrives).
const UNTIMED_CLIENT_SLACK_MS: f64 = 60.0;

fn inner<'a>(inp: &'a Inputs) -> Vec<(usize, &'a ProxyRecords<'a>)> {
    inp.inner.iter().enumerate().collect()
}

fn dur_ms(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1000.0)
}

/// When the request met the pod: the proxy's attempt for a connection it could not deliver,
/// the pod's close or reset for one it had delivered, else the request's end.
fn failure_time(c: &ConnRecord, end_of_request: Duration) -> Duration {
    match (c.outcome, c.end) {
        (ProxyOutcome::Refused | ProxyOutcome::NoEndpoints | ProxyOutcome::Blackholed, _) => c.accepted,
        (_, Some((t, End::PodClosed | End::PodReset | End::Closed))) if t <= end_of_request => t,
        _ => end_of_request.max(c.accepted),
    }
}

/// The connection a client socket had open when a request on it ended: a socket carries one
/// connection at a time, so the latest one opened before then (allowing for records whose
/// times read late, see [`ProxyRecords::late_ms`]).
fn lookup(records: &ProxyRecords, client: std::net::SocketAddr, until: Duration) -> Option<ConnRecord> {
    // Earlier uses of the same port are common over a run; a next use within the records'
    // lateness of the request's end is rare (random ephemeral ports): the latest one wins.
    let until = until + dur_ms(records.late_ms);
    records.records.iter().rev().find(|r| r.client == client && r.accepted <= until).cloned()
}

/// Matches a failed attempt (run-time window in ms) with what the given Service proxies saw:
/// the inner ones for a frontend→backend attempt, the entry one for a client that cannot name
/// its socket. Each proxy record explains one failure at most.
/// - With the caller's local socket (`network.local.address`/`.port` on its span): the very
///   connection, exactly.
/// - Else by time: a connection refused or blackholed during the attempt, or closed / reset by
///   the pod during it.
/// - Else a connection the pod had closed before the attempt: the caller reused a stale pooled
///   connection (the most recent such close is taken).
fn join_by_time(
    proxies: &[(usize, &ProxyRecords)],
    attempt: &Attempt,
    used: &mut HashSet<(usize, usize)>,
) -> Option<ProxyMatch> {
    let slack = attempt.slack_ms;
    if let Some(local) = attempt.local {
        for &(pi, proxy) in proxies {
            let found = proxy
                .records
                .iter()
                .enumerate()
                .rev()
                .find(|(_, r)| r.client == local && ms(r.accepted) <= attempt.end_ms + slack + proxy.late_ms);
            if let Some((ri, rec)) = found {
                let pod = rec.pod.clone()?;
                used.insert((pi, ri));
                let end = dur_ms(attempt.end_ms);
                return Some(ProxyMatch { pod, at: failure_time(rec, end), note: "" });
            }
        }
    }
    // (distance from the attempt's anchor, proxy, record, the match)
    let mut best: Option<(f64, (usize, usize), ProxyMatch)> = None;
    for &(pi, proxy) in proxies {
        for (ri, rec) in proxy.records.iter().enumerate() {
            if used.contains(&(pi, ri)) {
                continue;
            }
            let Some(pod) = &rec.pod else { continue };
            // Connections the proxy could not deliver happened when the attempt connected (its
            // start); a blackholed one fails BLACKHOLE_HOLD later. Connections the pod closed
            // or reset under a request happened at its end.
            let duration = attempt.end_ms - attempt.start_ms;
            let hold = ms(BLACKHOLE_HOLD);
            let (t, anchor, fits) = match rec.outcome {
                ProxyOutcome::Refused | ProxyOutcome::NoEndpoints => {
                    (ms(rec.accepted), attempt.start_ms, duration < hold - 50.0 && !attempt.cause.timeout)
                }
                // The user-space proxy holds such a connection for BLACKHOLE_HOLD; the kernel
                // fails every SYN queued on an unresolved neighbour at once when it gives up,
                // so later ones fail sooner: not a quick failure is all that can be asked.
                ProxyOutcome::Blackholed => (
                    ms(rec.accepted),
                    attempt.start_ms,
                    duration >= BLACKHOLE_MIN_MS.min(hold - 50.0) || attempt.cause.timeout,
                ),
                ProxyOutcome::Spliced => match rec.end {
                    Some((t, End::PodClosed | End::PodReset | End::Closed)) => {
                        (ms(t), attempt.end_ms, !attempt.cause.refused)
                    }
                    _ => continue,
                },
            };
            if !fits || t < attempt.start_ms - slack || t > attempt.end_ms + slack + proxy.late_ms {
                continue;
            }
            let dist = (t - anchor).abs();
            let note = if rec.outcome == ProxyOutcome::Blackholed { " (pod gone: no address)" } else { "" };
            if best.as_ref().is_none_or(|b| dist < b.0) {
                best = Some((dist, (pi, ri), ProxyMatch { pod: pod.clone(), at: dur_ms(t), note }));
            }
        }
    }
    if let Some((_, record, m)) = best {
        used.insert(record);
        return Some(m);
    }
    if !attempt.cause.connection_lost {
        return None;
    }
    // A stale pooled connection: closed by its pod shortly before.
    // (close time in ms, proxy, record, pod, close time)
    let mut stale: Option<(f64, (usize, usize), &String, Duration)> = None;
    for &(pi, proxy) in proxies {
        for (ri, rec) in proxy.records.iter().enumerate() {
            if used.contains(&(pi, ri)) || rec.outcome != ProxyOutcome::Spliced {
                continue;
            }
            let (Some(pod), Some((t, End::PodClosed | End::PodReset | End::Closed))) = (&rec.pod, rec.end) else {
                continue;
            };
            let t_ms = ms(t);
            if t_ms > attempt.start_ms + slack + proxy.late_ms || t_ms < attempt.start_ms - STALE_WINDOW_MS {
                continue;
            }
            if stale.as_ref().is_none_or(|b| t_ms > b.0) {
                stale = Some((t_ms, (pi, ri), pod, t));
            }
        }
    }
    let (_, record, pod, at) = stale?;
    used.insert(record);
    Some(ProxyMatch { pod: pod.clone(), at, note: " (stale pooled connection)" })
}

/// The shortest failure a vanished pod address can explain (see [`join_by_time`]).
const BLACKHOLE_MIN_MS: f64 = 100.0;

/// How far back a pod's close can explain a failure on a reused connection (the upstream
/// pool's idle limit is below this).
const STALE_WINDOW_MS: f64 = 15_000.0;

/// A failed frontend→backend attempt as its client span tells it.
struct Attempt {
    start_ms: f64,
    end_ms: f64,
    cause: CauseSays,
    local: Option<std::net::SocketAddr>,
    /// How far outside the attempt's window a proxy event may lie and still match it.
    slack_ms: f64,
}

impl Attempt {
    fn new(start_ms: f64, end_ms: f64, cause: &str, local: Option<std::net::SocketAddr>, slack_ms: f64) -> Attempt {
        Attempt { start_ms, end_ms, cause: CauseSays::read(cause), local, slack_ms }
    }
}

/// What a failure's cause text (`error.type` from a span, or the client's error) says, read
/// once so that matching branches on fields, not on substrings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CauseSays {
    timeout: bool,
    refused: bool,
    /// Reset or closed by the peer.
    connection_lost: bool,
}

impl CauseSays {
    fn read(cause: &str) -> CauseSays {
        CauseSays {
            timeout: cause.contains("timeout"),
            refused: cause.contains("refused"),
            connection_lost: cause.contains("reset") || cause.contains("closed"),
        }
    }
}

/// The pod a proxy record names for a failure, when it met it, and a note for the phase.
struct ProxyMatch {
    pod: String,
    at: Duration,
    note: &'static str,
}

/// Failures grouped for the report: (hop, phase, cause) → count and ms-after-SIGTERM range.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub hop: String,
    pub phase: String,
    pub cause: String,
    pub count: usize,
    pub pods: usize,
    pub ms_after_sigterm_min: Option<f64>,
    pub ms_after_sigterm_max: Option<f64>,
    pub source: Source,
    /// One failed request's trace id to paste into Jaeger: the first with spans, if any has.
    pub example_trace: Option<String>,
}

/// Per group: count, pods, ms-after-SIGTERM range, the first trace id with spans.
type Tally = (usize, HashSet<String>, Option<f64>, Option<f64>, Option<String>);

pub fn groups(items: &[Attribution]) -> Vec<Group> {
    let mut map: BTreeMap<(String, String, String, Source), Tally> = BTreeMap::new();
    for a in items {
        let e = map.entry((a.hop.clone(), a.phase.clone(), a.cause.clone(), a.source)).or_insert((
            0,
            HashSet::new(),
            None,
            None,
            None,
        ));
        e.0 += 1;
        e.1.insert(a.pod.clone());
        if e.4.is_none() && a.trace_spans > 0 {
            e.4 = Some(a.trace_id.clone());
        }
        if let Some(m) = a.ms_after_sigterm {
            e.2 = Some(e.2.map_or(m, |x: f64| x.min(m)));
            e.3 = Some(e.3.map_or(m, |x: f64| x.max(m)));
        }
    }
    let mut out: Vec<Group> = map
        .into_iter()
        .map(|((hop, phase, cause, source), (count, pods, lo, hi, example_trace))| Group {
            hop,
            phase,
            cause,
            count,
            pods: pods.len(),
            ms_after_sigterm_min: lo,
            ms_after_sigterm_max: hi,
            source,
            example_trace,
        })
        .collect();
    out.sort_by_key(|g| std::cmp::Reverse(g.count));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k6_failure(id: u64, start_ms: u64, latency_ms: u64, outcome: Outcome, error: &str) -> RequestRecord {
        RequestRecord {
            error: Some(error.into()),
            trace_id: format!("{id:032x}"),
            ..RequestRecord::new(id, Duration::from_millis(start_ms), Duration::from_millis(latency_ms), outcome)
        }
    }

    fn conn(port: u16, accepted_ms: u64, pod: &str, outcome: ProxyOutcome, end: Option<(u64, End)>) -> ConnRecord {
        ConnRecord {
            client: format!("127.0.0.1:{port}").parse().unwrap(),
            accepted: Duration::from_millis(accepted_ms),
            pod: Some(pod.into()),
            outcome,
            end: end.map(|(t, e)| (Duration::from_millis(t), e)),
        }
    }

    /// k6 cannot say which socket a request used: its failures are joined by time with what
    /// the entry proxy did, each proxy record explaining one failure at most.
    #[test]
    fn socketless_client_failures_join_the_entry_proxy_by_time() {
        let clock = Clock::new();
        let entry = ProxyRecords {
            service: "svc-frontend",
            records: vec![
                conn(40001, 1_000, "frontend-a", ProxyOutcome::Refused, None),
                conn(40002, 500, "frontend-b", ProxyOutcome::Spliced, Some((2_000, End::PodReset))),
            ],
            late_ms: 0.0,
        };
        let requests = vec![
            // Refused at the pod: the userspace proxy resets the client at once.
            k6_failure(1, 990, 12, Outcome::Reset, "connection_reset"),
            // Reset mid-request when frontend-b exited.
            k6_failure(2, 1_900, 95, Outcome::Reset, "connection_reset"),
            // Nothing the proxy did explains this one (and the refused record is used up).
            k6_failure(3, 995, 8, Outcome::Reset, "connection_reset"),
        ];
        let report =
            attribute(&Inputs { clock: &clock, requests: &requests, spans: &[], pods: &[], entry, inner: vec![] });
        assert_eq!((report.failed, report.attributed), (3, 2), "{report:?}");
        let pods: Vec<(u64, &str)> = report.items.iter().map(|a| (a.request, a.pod.as_str())).collect();
        assert_eq!(pods, vec![(1, "frontend-a"), (2, "frontend-b")]);
        assert!(report.items.iter().all(|a| a.source == Source::Lab && a.hop.starts_with("client→")));
        assert_eq!(report.unexplained[0].request, 3);
    }

    #[test]
    fn a_group_names_a_trace_that_has_spans() {
        let item = |request: u64, pod: &str, trace_spans: usize| Attribution {
            request,
            trace_id: format!("{request:032x}"),
            hop: "client→frontend".into(),
            pod: pod.into(),
            deployment: "frontend".into(),
            phase: "exited".into(),
            ms_after_sigterm: Some(request as f64),
            cause: "refused".into(),
            source: Source::Lab,
            trace_spans,
        };
        let g = groups(&[item(1, "a", 0), item(2, "b", 3), item(3, "a", 5)]);
        assert_eq!(g.len(), 1);
        assert_eq!((g[0].count, g[0].pods), (3, 2));
        assert_eq!(g[0].example_trace.as_deref(), Some(format!("{:032x}", 2).as_str()));
        assert_eq!(groups(&[item(1, "a", 0)])[0].example_trace, None, "no span, no trace to open");
    }
}
