// Helpers shared by smoke.js and rolling-update.js: environment parsing, W3C trace context,
// reading the frontend's JSON answers, and formatting numbers for the text summaries.
// Plain k6 JavaScript, no remote imports: the scripts run offline and unchanged anywhere.

/** A string from the environment (`k6 run -e NAME=value` or the process env), or `fallback`. */
export function envStr(name, fallback) {
  const v = __ENV[name];
  return v === undefined || v === '' ? fallback : String(v);
}

/** A finite number from the environment, or `fallback`; a malformed value stops the run at init. */
export function envNum(name, fallback) {
  const raw = envStr(name, undefined);
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n)) throw new Error(`${name}=${raw}: expected a number`);
  return n;
}

/** true/false/1/0/yes/no from the environment. */
export function envBool(name, fallback) {
  const raw = envStr(name, undefined);
  if (raw === undefined) return fallback;
  const v = raw.toLowerCase();
  if (['1', 'true', 'yes', 'on'].includes(v)) return true;
  if (['0', 'false', 'no', 'off'].includes(v)) return false;
  throw new Error(`${name}=${raw}: expected true or false`);
}

/**
 * Seconds from a duration: `250ms`, `10s`, `1.5m`, `1h`, or a bare number of seconds.
 * `what` names the setting in the error message.
 */
export function seconds(value, what) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(String(value));
  if (!m) throw new Error(`${what}=${value}: expected a duration such as 500ms, 10s or 2m`);
  const n = Number(m[1]);
  const unit = { ms: 0.001, s: 1, m: 60, h: 3600 }[m[2] || 's'];
  return n * unit;
}

/** A k6 duration string with millisecond precision (k6 accepts `1500ms`). */
export function k6Duration(secs) {
  return `${Math.round(secs * 1000)}ms`;
}

/** The frontend's base URL without a trailing slash. */
export function frontendUrl() {
  const url = envStr('FRONTEND_URL', 'http://127.0.0.1:8080').replace(/\/+$/, '');
  if (!/^https?:\/\/[^/]+/.test(url)) {
    throw new Error(`FRONTEND_URL=${url}: expected http://HOST:PORT (e.g. http://<node-ip>:30080)`);
  }
  return url;
}

function randomHex(chars) {
  let s = '';
  while (s.length < chars) s += Math.floor(Math.random() * 0x100000000).toString(16).padStart(8, '0');
  s = s.slice(0, chars);
  // An all-zero id is invalid in W3C trace context.
  return /^0+$/.test(s) ? `1${s.slice(1)}` : s;
}

/**
 * A fresh W3C `traceparent` (sampled). The frontend continues the caller's trace, so the id is
 * known even when no response arrives (status 0): it can still be looked up in Jaeger.
 */
export function newTraceContext() {
  const traceId = randomHex(32);
  return { traceId, header: `00-${traceId}-${randomHex(16)}-01` };
}

/** The JSON body, or null when the body is missing or not JSON. */
export function jsonBody(res) {
  if (!res || !res.body) return null;
  try {
    const v = JSON.parse(res.body);
    return v !== null && typeof v === 'object' ? v : null;
  } catch (_) {
    return null;
  }
}

/** The trace id the frontend reported (header first, then the JSON body), or ''. */
export function reportedTraceId(res, body) {
  const h = res && res.headers ? res.headers['X-Trace-Id'] || res.headers['x-trace-id'] : '';
  if (h) return h;
  return body && typeof body.trace_id === 'string' ? body.trace_id : '';
}

/** Which pod answered: the `x-graceful-pod` header or the body's `pod`, or ''. */
export function podOf(res, body) {
  const h = res && res.headers ? res.headers['X-Graceful-Pod'] || res.headers['x-graceful-pod'] : '';
  if (h) return h;
  return body && typeof body.pod === 'string' ? body.pod : '';
}

/** Why a request failed, in one token: the frontend's `error`, k6's error code, or the status. */
export function errorClass(res, body) {
  if (body && typeof body.error === 'string' && body.error) return body.error;
  if (res && res.status === 0) {
    // No HTTP response at all: name the transport failure from k6's error text.
    const e = String(res.error || '');
    if (/timeout|deadline/i.test(e)) return 'client_timeout';
    if (/refused/i.test(e)) return 'connection_refused';
    if (/reset/i.test(e)) return 'connection_reset';
    if (/no route to host|unreachable/i.test(e)) return 'no_route_to_host';
    if (/EOF|closed/i.test(e)) return 'closed_before_response';
    return res.error_code ? `k6_error_${res.error_code}` : 'no_response';
  }
  if (res && res.status === 200) return 'bad_body';
  return `http_${res ? res.status : 0}`;
}

/** A value for a key=value log line: quoted when it has spaces or quotes. */
export function kv(value) {
  const s = value === undefined || value === null || value === '' ? '-' : String(value);
  return /[\s"=]/.test(s) ? JSON.stringify(s) : s;
}

/** Percent with two decimals. */
export function pct(rate) {
  return `${(100 * (rate || 0)).toFixed(2)} %`;
}

/** Milliseconds, rounded sensibly. */
export function ms(v) {
  if (v === undefined || v === null || Number.isNaN(v)) return '-';
  return v >= 100 ? `${Math.round(v)} ms` : `${v.toFixed(1)} ms`;
}

/** A metric's values from handleSummary data, or an empty object. */
export function values(data, name) {
  const m = data.metrics[name];
  return m && m.values ? m.values : {};
}

/** Every threshold as `{ "metric": { "expr": passed } }`, and whether all passed. */
export function thresholdResults(data) {
  const out = {};
  let passed = true;
  for (const [name, metric] of Object.entries(data.metrics)) {
    if (!metric.thresholds) continue;
    out[name] = {};
    for (const [expr, res] of Object.entries(metric.thresholds)) {
      out[name][expr] = res.ok;
      if (!res.ok) passed = false;
    }
  }
  return { thresholds: out, passed };
}

/** One line per threshold: `  PASS  error_rate  rate==0`. */
export function thresholdLines(thresholds) {
  const lines = [];
  for (const [name, exprs] of Object.entries(thresholds)) {
    for (const [expr, ok] of Object.entries(exprs)) {
      lines.push(`  ${ok ? 'PASS' : 'FAIL'}  ${name}  ${expr}`);
    }
  }
  return lines;
}
