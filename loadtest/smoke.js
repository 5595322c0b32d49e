// smoke.js: a few requests to every public endpoint of the frontend, with checks on status and
// body. Run it before a load test (is the URL right, does the chain answer?) and after a deploy.
//
//   k6 run -e FRONTEND_URL=http://<node-ip>:30080 loadtest/smoke.js
//
// Environment (all optional):
//   FRONTEND_URL     http://127.0.0.1:8080   base URL of the frontend Service
//   ITERATIONS       3                       rounds over all endpoints (1 VU, one after another)
//   REQUEST_TIMEOUT  10s
//
// Exit code 0 when every check passed, 99 when one failed (threshold `checks: rate==1`).

import http from 'k6/http';
import { check, group } from 'k6';

import {
  envNum,
  envStr,
  errorClass,
  frontendUrl,
  jsonBody,
  k6Duration,
  kv,
  newTraceContext,
  podOf,
  reportedTraceId,
  seconds,
} from './lib.js';

const BASE = frontendUrl();
const ITERATIONS = Math.max(1, Math.round(envNum('ITERATIONS', 3)));
const TIMEOUT = k6Duration(seconds(envStr('REQUEST_TIMEOUT', '10s'), 'REQUEST_TIMEOUT'));

export const options = {
  scenarios: {
    smoke: { executor: 'per-vu-iterations', vus: 1, iterations: ITERATIONS, maxDuration: '2m' },
  },
  thresholds: {
    checks: ['rate==1'],
    'http_req_duration{expected_response:true}': ['p(99)<3000'],
  },
  userAgent: 'graceful-loadtest/smoke (k6)',
};

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const nonEmptyString = (v) => typeof v === 'string' && v.length > 0;

// Per endpoint: the expected status and what the JSON body must look like.
const ENDPOINTS = [
  {
    path: '/',
    body: {
      'status is "ok"': (b) => b.status === 'ok',
      'names the frontend pod': (b) => nonEmptyString(b.pod),
      'carries the backend answer': (b) => isObject(b.backend) && nonEmptyString(b.backend.pod),
      'reports retries': (b) => Number.isInteger(b.retries) && b.retries >= 0,
    },
  },
  {
    path: '/api/data',
    body: {
      'status is "ok"': (b) => b.status === 'ok',
      'names the frontend pod': (b) => nonEmptyString(b.pod),
      'backend did its work': (b) => isObject(b.backend) && typeof b.backend.work_ms === 'number',
      'reports retries': (b) => Number.isInteger(b.retries) && b.retries >= 0,
    },
  },
  {
    // 503 until the frontend has fetched the backend's code; the smoke test wants it started.
    path: '/startup',
    body: {
      'status is "started"': (b) => b.status === 'started',
      'has the backend code': (b) => nonEmptyString(b.code),
    },
  },
  {
    path: '/who-am-i',
    body: {
      'has a name': (b) => nonEmptyString(b.name),
    },
  },
  {
    path: '/readyz',
    body: {
      'status is "ready"': (b) => b.status === 'ready',
    },
  },
  {
    path: '/livez',
    body: {
      'status is "alive"': (b) => b.status === 'alive',
    },
  },
];

export default function () {
  for (const ep of ENDPOINTS) {
    group(ep.path, () => {
      const trace = newTraceContext();
      const res = http.get(BASE + ep.path, {
        timeout: TIMEOUT,
        headers: { traceparent: trace.header },
        tags: { name: ep.path },
      });
      const body = jsonBody(res);
      const checks = {
        [`${ep.path} answers 200`]: (r) => r.status === 200,
        [`${ep.path} answers JSON`]: () => body !== null,
      };
      for (const [name, fn] of Object.entries(ep.body)) {
        checks[`${ep.path} ${name}`] = () => body !== null && fn(body);
      }
      if (!check(res, checks)) {
        const reported = reportedTraceId(res, body);
        console.warn(
          `GRACEFUL-FAILED path=${ep.path} status=${res.status} error=${kv(errorClass(res, body))} ` +
            `trace_id=${kv(reported || trace.traceId)} trace_id_from=${reported ? 'response' : 'sent'} ` +
            `pod=${kv(podOf(res, body))} body=${kv((res.body || res.error || '').slice(0, 300))}`,
        );
      }
    });
  }
}
