#!/usr/bin/env bash
# Exact instruction counts per request of the frontend → backend chain, per tracing mode.
#
#   benches/callgrind.sh [--bin PATH] [--modes "untraced sdk_disabled sampled10 sampled100"]
#                        [--small 500] [--large 2500] [--out DIR] [--top 25]
#
# Each mode runs twice under `valgrind --tool=callgrind` (both roles), with `small` and then
# `large` GET /api/data requests on one keep-alive connection; instructions per request =
# (large − small) / (large − small requests), so start-up and exit cancel out. The same
# difference, per function, gives the profile's top entries (self cost per request).
# Spans go to a local OTLP/HTTP sink (python3, standard library) that answers 200 and counts
# the POSTs. Needs valgrind, python3 and a release build with symbols for readable names:
#   CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
#     cargo build --release --bin graceful
# Extra valgrind flags in VG_EXTRA (e.g. --separate-threads=yes: one file per thread, to split
# the request path from the span exporter thread; the totals then read the .cg file only).
# Every wait is bounded; every process it starts is stopped on exit.
set -euo pipefail

BIN=target/release/graceful
MODES="untraced sdk_disabled sampled10 sampled100"
SMALL=500
LARGE=2500
OUT=
TOP=25
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --small) SMALL=$2; shift 2 ;;
    --large) LARGE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --top) TOP=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "callgrind.sh: unknown argument \`$1\` (see --help)" >&2; exit 2 ;;
  esac
done
for tool in valgrind callgrind_annotate python3; do
  command -v "$tool" >/dev/null || { echo "callgrind.sh: \`$tool\` is not installed" >&2; exit 2; }
done
[ -x "$BIN" ] || { echo "callgrind.sh: --bin \`$BIN\` is not an executable (build it first)" >&2; exit 2; }
[[ "$SMALL" =~ ^[0-9]+$ && "$LARGE" =~ ^[0-9]+$ && "$LARGE" -gt "$SMALL" && "$LARGE" -le 20000 ]] \
  || { echo "callgrind.sh: need 0 ≤ --small < --large ≤ 20000 (got $SMALL, $LARGE)" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d /tmp/callgrind.XXXXXX)}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)

PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# Waits (bounded) for a role's `serving` log line and prints its public address.
listen_addr() {
  local log=$1 i
  for i in $(seq 1 600); do
    if grep -q '"message":"serving"' "$log" 2>/dev/null; then
      grep -o '"listen":"[^"]*"' "$log" | head -1 | cut -d'"' -f4
      return 0
    fi
    sleep 0.1
  done
  echo "callgrind.sh: no serving line in $log within 60 s" >&2
  tail -5 "$log" >&2
  return 1
}

# SIGTERM, then waits up to 60 s (valgrind writes its output at exit), then SIGKILL.
stop() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  echo "callgrind.sh: pid $pid did not exit within 60 s of SIGTERM; killed" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

mode_env() {
  case "$1" in
    untraced) ;;
    sdk_disabled) echo "OTEL_EXPORTER_OTLP_ENDPOINT=$2 OTEL_SDK_DISABLED=true" ;;
    sampled0) echo "OTEL_EXPORTER_OTLP_ENDPOINT=$2 OTEL_TRACES_SAMPLER=always_off" ;;
    sampled10) echo "OTEL_EXPORTER_OTLP_ENDPOINT=$2 OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1" ;;
    sampled100) echo "OTEL_EXPORTER_OTLP_ENDPOINT=$2 OTEL_TRACES_SAMPLER=always_on" ;;
    *) echo "callgrind.sh: unknown mode \`$1\` (untraced, sdk_disabled, sampled0, sampled10, sampled100)" >&2; return 2 ;;
  esac
}

run_once() {
  local mode=$1 n=$2 dir="$OUT/$1-$2"
  mkdir -p "$dir"
  python3 "$HERE/callgrind_helpers.py" sink "$dir/sink.port" "$dir/sink.count" &
  local sink=$!
  PIDS+=("$sink")
  local i
  for i in $(seq 1 100); do [ -s "$dir/sink.port" ] && break; sleep 0.05; done
  [ -s "$dir/sink.port" ] || { echo "callgrind.sh: the OTLP sink did not start" >&2; return 1; }
  local endpoint envs
  endpoint="http://127.0.0.1:$(cat "$dir/sink.port")"
  envs=$(mode_env "$mode" "$endpoint")
  local common=(env -u RUST_LOG GRACEFUL_TELEMETRY__LOG_FORMAT=json GRACEFUL_TELEMETRY__LOG_LEVEL=info
    GRACEFUL_BACKEND__WORK_MIN=0ms GRACEFUL_BACKEND__WORK_MAX=0ms $envs)
  local vg=(valgrind --tool=callgrind --dump-instr=no --compress-strings=no --compress-pos=no ${VG_EXTRA:-})
  POD_NAME=cg-backend "${common[@]}" "${vg[@]}" --callgrind-out-file="$dir/backend.cg" \
    "$BIN" backend --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --drain-delay 0s --shutdown-timeout 2s \
    >"$dir/backend.log" 2>"$dir/backend.vg" &
  local b=$!
  PIDS+=("$b")
  local baddr faddr
  baddr=$(listen_addr "$dir/backend.log")
  POD_NAME=cg-frontend "${common[@]}" "${vg[@]}" --callgrind-out-file="$dir/frontend.cg" \
    "$BIN" frontend --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --drain-delay 0s --shutdown-timeout 2s \
    --backend-url "http://$baddr" >"$dir/frontend.log" 2>"$dir/frontend.vg" &
  local f=$!
  PIDS+=("$f")
  faddr=$(listen_addr "$dir/frontend.log")
  python3 "$HERE/callgrind_helpers.py" client "$faddr" "$n" >"$dir/client.txt"
  stop "$f"
  stop "$b"
  sleep 0.3
  kill -TERM "$sink" 2>/dev/null || true
  wait "$sink" 2>/dev/null || true
}

echo "callgrind: $BIN, modes: $MODES, requests $SMALL and $LARGE, output in $OUT"
for mode in $MODES; do
  mode_env "$mode" x >/dev/null
  for n in "$SMALL" "$LARGE"; do
    echo "  $mode, $n requests ..." >&2
    run_once "$mode" "$n"
  done
done
python3 "$HERE/callgrind_helpers.py" report "$OUT" "$SMALL" "$LARGE" "$TOP" $MODES
