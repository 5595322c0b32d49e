// rolling-update.js: steady load on the frontend across a rolling update, in three phases.
//
//   warmup   (WARMUP)    load before anything changes: the baseline must be clean
//   rollout  (ROLLOUT)   the rollout is triggered when this phase starts (by rollout.sh, the lab,
//                        or by hand); every request dropped by the shutdown race lands here
//   cooldown (COOLDOWN)  the new pods alone, after the rollout
//
// Each phase is a constant-arrival-rate scenario: RATE requests per second whatever the latency,
// so a slow or hung backend shows as latency and failures, not as a quietly lower request rate.
//
//   k6 run -e FRONTEND_URL=http://<node-ip>:30080 loadtest/rolling-update.js
//
// Environment (all optional):
//   FRONTEND_URL     http://127.0.0.1:8080   base URL of the frontend Service
//   REQUEST_PATH     /api/data               path requested in every iteration
//   RATE             100                     requests per second, all phases
//   WARMUP           10s                     phase durations (ms, s, m, h or bare seconds);
//   ROLLOUT          40s                     WARMUP or COOLDOWN may be 0 to skip that phase
//   COOLDOWN         10s
//   REQUEST_TIMEOUT  10s                     a request with no answer by then counts as failed
//   P99_MS           1500                    latency threshold: p(99) below this, in ms
//   PRE_VUS / MAX_VUS                        VU pool for the arrival-rate executor
//   PROPAGATE        true                    send a W3C traceparent with every request
//   MAX_FAILURE_LOGS 25                      failure lines logged per VU (0 = none)
//   SUMMARY_JSON     rolling-update-summary.json   JSON summary path ('' = don't write it)
//
// Contract with drivers (rollout.sh, `graceful lab --k6`): when the rollout phase begins, one
// log line containing GRACEFUL-ROLLOUT-PHASE-START is written (k6 logs go to stderr unless
// --log-output says otherwise). Trigger the rollout when you see it. See loadtest/README.md.

import http from 'k6/http';
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';

import {
  envBool,
  envNum,
  envStr,
  errorClass,
  frontendUrl,
  jsonBody,
  k6Duration,
  kv,
  ms,
  newTraceContext,
  pct,
  podOf,
  reportedTraceId,
  seconds,
  thresholdLines,
  thresholdResults,
  values,
} from './lib.js';

// ---- configuration (init context: evaluated once per VU, identically) ----------------------

const BASE = frontendUrl();
const REQUEST_PATH = envStr('REQUEST_PATH', '/api/data');
const TARGET = BASE + (REQUEST_PATH.startsWith('/') ? REQUEST_PATH : `/${REQUEST_PATH}`);
const RATE = Math.round(envNum('RATE', 100));
if (RATE < 1) throw new Error(`RATE=${RATE}: expected at least 1 request per second`);
const TIMEOUT_S = seconds(envStr('REQUEST_TIMEOUT', '10s'), 'REQUEST_TIMEOUT');
if (TIMEOUT_S <= 0) throw new Error('REQUEST_TIMEOUT must be positive');
const P99_MS = envNum('P99_MS', 1500);
const PROPAGATE = envBool('PROPAGATE', true);
const MAX_FAILURE_LOGS = Math.max(0, Math.round(envNum('MAX_FAILURE_LOGS', 25)));
// Set but empty means "no JSON file"; unset means the default path.
const SUMMARY_JSON = __ENV.SUMMARY_JSON === undefined ? 'rolling-update-summary.json' : __ENV.SUMMARY_JSON;
const PRE_VUS = Math.max(1, Math.round(envNum('PRE_VUS', Math.max(5, Math.ceil(RATE / 2)))));
const MAX_VUS = Math.max(PRE_VUS, Math.round(envNum('MAX_VUS', Math.max(50, RATE * 3))));

/** The token drivers wait for. Keep in sync with loadtest/README.md and the lab. */
const ROLLOUT_BANNER = 'GRACEFUL-ROLLOUT-PHASE-START';

const PHASES = [
  { name: 'warmup', secs: seconds(envStr('WARMUP', '10s'), 'WARMUP') },
  { name: 'rollout', secs: seconds(envStr('ROLLOUT', '40s'), 'ROLLOUT') },
  { name: 'cooldown', secs: seconds(envStr('COOLDOWN', '10s'), 'COOLDOWN') },
];
if (PHASES[1].secs <= 0) throw new Error('ROLLOUT must be longer than 0s');

// Chain the phases: each starts when the previous one's arrivals stop. A phase of 0 s is left out.
const scenarios = {};
const thresholds = {
  error_rate: ['rate==0'],
  latency: [`p(99)<${P99_MS}`],
};
let offset = 0;
for (const p of PHASES) {
  p.start = offset;
  if (p.secs <= 0) continue;
  scenarios[p.name] = {
    executor: 'constant-arrival-rate',
    rate: RATE,
    timeUnit: '1s',
    startTime: k6Duration(offset),
    duration: k6Duration(p.secs),
    preAllocatedVUs: PRE_VUS,
    maxVUs: MAX_VUS,
    // Requests still in flight when a phase ends may finish (they time out by then anyway).
    gracefulStop: k6Duration(TIMEOUT_S + 2),
  };
  // Per-phase submetrics: the summary shows where the failures and the slow requests were.
  thresholds[`error_rate{scenario:${p.name}}`] = ['rate==0'];
  thresholds[`latency{scenario:${p.name}}`] = [`p(99)<${P99_MS}`];
  offset += p.secs;
}

export const options = {
  scenarios,
  thresholds,
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
  // Names the load generator in the frontend's access logs and traces.
  userAgent: 'graceful-loadtest/rolling-update (k6)',
};

// ---- metrics --------------------------------------------------------------------------------

const outcomeOk = new Counter('outcome_ok');
const outcomeCounters = {
  0: new Counter('outcome_status_0'),
  502: new Counter('outcome_status_502'),
  503: new Counter('outcome_status_503'),
  504: new Counter('outcome_status_504'),
};
const outcomeOther = new Counter('outcome_status_other');
const outcomeBadBody = new Counter('outcome_bad_body');
const errorRate = new Rate('error_rate');
const latency = new Trend('latency', true);
const retryCount = new Counter('retry_count');
const retriedRequests = new Rate('retried_requests');

// ---- the load -------------------------------------------------------------------------------

let failuresLogged = 0; // per VU

function announce(phase) {
  const p = PHASES.find((x) => x.name === phase);
  const fields =
    `phase=${phase} start_s=${p.start} duration_s=${p.secs} rate=${RATE} ` +
    `target=${kv(TARGET)} unix_ms=${Date.now()}`;
  if (phase === 'rollout') {
    console.log(`${ROLLOUT_BANNER} ${fields} -- trigger the rolling update now`);
  } else {
    console.log(`GRACEFUL-PHASE-START ${fields}`);
  }
}

/** Fails fast (exit code 107) when the frontend cannot be reached at all: a wrong URL, not a race. */
export function setup() {
  const res = http.get(`${BASE}/livez`, { timeout: '5s', tags: { name: 'setup' } });
  if (res.status === 0) {
    throw new Error(`FRONTEND_URL=${BASE} is unreachable (${res.error}); is the frontend Service exposed there?`);
  }
  return { target: TARGET };
}

export default function () {
  const phase = exec.scenario.name;
  // iterationInTest is unique across the scenario's VUs: exactly one iteration announces it.
  if (exec.scenario.iterationInTest === 0) announce(phase);

  const trace = PROPAGATE ? newTraceContext() : null;
  const params = {
    timeout: k6Duration(TIMEOUT_S),
    headers: trace ? { traceparent: trace.header } : {},
    tags: { name: REQUEST_PATH },
    responseCallback: http.expectedStatuses(200),
  };
  const t0 = Date.now();
  const res = http.get(TARGET, params);
  const elapsed = Date.now() - t0;

  const body = jsonBody(res);
  const ok = res.status === 200 && body !== null && body.status === 'ok';
  let outcome;
  if (ok) {
    outcome = 'ok';
    outcomeOk.add(1);
  } else if (res.status === 200) {
    outcome = 'bad_body';
    outcomeBadBody.add(1);
  } else if (outcomeCounters[res.status]) {
    outcome = `status_${res.status}`;
    outcomeCounters[res.status].add(1);
  } else {
    outcome = 'status_other';
    outcomeOther.add(1);
  }
  errorRate.add(!ok);
  latency.add(elapsed, { outcome });
  const retries = body && typeof body.retries === 'number' ? body.retries : 0;
  retryCount.add(retries);
  retriedRequests.add(retries > 0);

  if (!ok && failuresLogged < MAX_FAILURE_LOGS) {
    failuresLogged += 1;
    const reported = reportedTraceId(res, body);
    const traceId = reported || (trace ? trace.traceId : '');
    const detail = (body && (body.message || body.error)) || res.error || '';
    console.warn(
      `GRACEFUL-FAILED phase=${phase} status=${res.status} error=${kv(errorClass(res, body))} ` +
        `trace_id=${kv(traceId)} trace_id_from=${reported ? 'response' : trace ? 'sent' : 'none'} ` +
        `retries=${retries} pod=${kv(podOf(res, body))} elapsed_ms=${elapsed} detail=${kv(detail)}` +
        (failuresLogged === MAX_FAILURE_LOGS ? ' (last failure logged by this VU; raise MAX_FAILURE_LOGS)' : ''),
    );
  }
}

// ---- summary --------------------------------------------------------------------------------

function count(data, name) {
  return values(data, name).count || 0;
}

function latencyOf(v) {
  return { avg: v.avg, min: v.min, med: v.med, p90: v['p(90)'], p95: v['p(95)'], p99: v['p(99)'], max: v.max };
}

/** The run in a stable, small shape (what the JSON file and the text report are made from). */
function digest(data) {
  const { thresholds: crossed, passed } = thresholdResults(data);
  // In the order they were declared (global first, then phase by phase); CLI extras last.
  const results = {};
  for (const name of Object.keys(thresholds).concat(Object.keys(crossed))) {
    if (crossed[name]) results[name] = crossed[name];
  }
  const err = values(data, 'error_rate');
  const phases = {};
  for (const p of PHASES) {
    if (p.secs <= 0) continue;
    const e = values(data, `error_rate{scenario:${p.name}}`);
    const l = values(data, `latency{scenario:${p.name}}`);
    phases[p.name] = {
      start_s: p.start,
      duration_s: p.secs,
      requests: (e.passes || 0) + (e.fails || 0),
      errors: e.passes || 0,
      error_rate: e.rate || 0,
      latency_ms: latencyOf(l),
    };
  }
  const requests = (err.passes || 0) + (err.fails || 0);
  return {
    script: 'rolling-update',
    // No request at all (setup failed, or the run was aborted early) proves nothing: not a pass.
    passed: passed && requests > 0,
    config: {
      target: TARGET,
      rate: RATE,
      warmup_s: PHASES[0].secs,
      rollout_s: PHASES[1].secs,
      cooldown_s: PHASES[2].secs,
      request_timeout_s: TIMEOUT_S,
      p99_ms: P99_MS,
      propagate_trace_context: PROPAGATE,
    },
    requests,
    errors: err.passes || 0,
    error_rate: err.rate || 0,
    outcomes: {
      ok: count(data, 'outcome_ok'),
      status_0: count(data, 'outcome_status_0'),
      status_502: count(data, 'outcome_status_502'),
      status_503: count(data, 'outcome_status_503'),
      status_504: count(data, 'outcome_status_504'),
      status_other: count(data, 'outcome_status_other'),
      bad_body: count(data, 'outcome_bad_body'),
    },
    retry_count: count(data, 'retry_count'),
    retried_requests_rate: values(data, 'retried_requests').rate || 0,
    dropped_iterations: count(data, 'dropped_iterations'),
    latency_ms: latencyOf(values(data, 'latency')),
    phases,
    thresholds: results,
    duration_s: data.state.testRunDurationMs / 1000,
  };
}

/** The human-readable report printed at the end of the run. */
function report(d) {
  const o = d.outcomes;
  const l = d.latency_ms;
  const lines = [
    '',
    `graceful rolling-update: ${d.passed ? 'PASSED' : 'FAILED'}` +
      (d.requests === 0 ? ' (no request was made: see the errors above)' : ''),
    `  target      ${d.config.target} at ${d.config.rate}/s`,
    `  requests    ${d.requests} in ${d.duration_s.toFixed(1)} s` +
      (d.dropped_iterations ? ` (${d.dropped_iterations} iterations DROPPED: raise MAX_VUS)` : ''),
    `  outcomes    ok ${o.ok} | no response (status 0) ${o.status_0} | 502 ${o.status_502} | ` +
      `503 ${o.status_503} | 504 ${o.status_504} | other status ${o.status_other} | bad body ${o.bad_body}`,
    `  error_rate  ${pct(d.error_rate)} (${d.errors} failed)`,
    `  retries     ${d.retry_count} upstream retries by the frontend; ${pct(d.retried_requests_rate)} of requests needed one`,
    `  latency     avg ${ms(l.avg)} | p50 ${ms(l.med)} | p90 ${ms(l.p90)} | p95 ${ms(l.p95)} | p99 ${ms(l.p99)} | max ${ms(l.max)}`,
    '  phases',
  ];
  for (const [name, p] of Object.entries(d.phases)) {
    lines.push(
      `    ${name.padEnd(9)} ${String(p.duration_s).padStart(5)} s  ${String(p.requests).padStart(7)} requests  ` +
        `${String(p.errors).padStart(6)} failed (${pct(p.error_rate)})  p99 ${ms(p.latency_ms.p99)}`,
    );
  }
  lines.push('  thresholds');
  lines.push(...thresholdLines(d.thresholds).map((x) => `  ${x}`));
  if (d.errors > 0) {
    lines.push('  failed requests are logged as GRACEFUL-FAILED lines with their trace_id (see loadtest/README.md)');
  }
  return `${lines.join('\n')}\n\n`;
}

export function handleSummary(data) {
  const d = digest(data);
  const out = { stdout: report(d) };
  if (SUMMARY_JSON) {
    out[SUMMARY_JSON] = `${JSON.stringify(Object.assign({}, d, { metrics: data.metrics }), null, 2)}\n`;
  }
  return out;
}
