#!/usr/bin/env bash
# What tap costs a proxy (docs/benchmarks.md, "Tap when idle"): one server sidecar in
# front of httpbin, fed plaintext HTTP/1.1 by h2load on its inbound port; the proxy's
# CPU (utime + stime from /proc/PID/stat) per 10,000 requests and while idle with the
# control plane connected, for each proxy binary given and each tap state.
#
#   bench/tap-idle.sh BASE_PROXY TAP_PROXY [ROUNDS]
#
# BASE_PROXY is a weft-proxy built before tap, TAP_PROXY one with it; the control plane
# and `weft tap` are target/debug/weft (build both with the same profile). States:
# base (BASE_PROXY), idle (TAP_PROXY, no tap), nomatch (a tap whose filter matches
# nothing: --path /nothing), match (a tap matching every request, --max-rps 10000).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?base weft-proxy binary}
TAP=${2:?tap weft-proxy binary}
ROUNDS=${3:-3}
WEFT=target/debug/weft
H2LOAD=.tools/bin/h2load
N=${N:-20000}
IDLE_S=${IDLE_S:-30}
HZ=$(getconf CLK_TCK)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

app_port=$(port)
cat > "$work/svc.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: $app_port}]
YAML
"$WEFT" control --insecure-dev --dir "$work" --xds 127.0.0.1:0 --api 127.0.0.1:0 > "$work/control.out" 2>/dev/null &
pids+=($!)
until grep -q "API on" "$work/control.out" 2>/dev/null; do sleep 0.1; done
line=$(head -1 "$work/control.out")
xds=$(sed -E 's/.*xDS on ([^,]+),.*/\1/' <<<"$line")
api=$(sed -E 's/.*API on ([^ ]+).*/\1/' <<<"$line")
"$WEFT" demo httpbin "$app_port" > /dev/null 2>&1 &
pids+=($!)

run() { # state binary
    local state=$1 bin=$2 inbound admin metrics pid tap_pid="" t0 t1 i0 i1
    inbound=$(port); admin=$(port); metrics=$(port)
    cat > "$work/boot.yaml" <<YAML
node:
  id: reviews-$state.default
  name: reviews-$state
  workload_name: reviews
  namespace: default
  labels: {app: reviews}
  ports: [{name: http, port: $app_port, protocol: TCP}]
  inbound: 127.0.0.1:$inbound
  outbound: 127.0.0.1:$(port)
xds:
  address: http://$xds
admin: 127.0.0.1:$admin
metrics: 127.0.0.1:$metrics
access_log: "off"
YAML
    WEFT_LOG=warn "$bin" --bootstrap "$work/boot.yaml" --concurrency 1 > /dev/null 2>&1 &
    pid=$!
    until curl -sf "http://127.0.0.1:$admin/ready" > /dev/null; do sleep 0.1; done
    "$H2LOAD" --h1 -n 2000 -c 4 "http://127.0.0.1:$inbound/get" > /dev/null
    local tap_args=()
    case $state in
        nomatch) tap_args=(--path /nothing) ;;
        match) tap_args=(--max-rps 10000) ;;
    esac
    if [ ${#tap_args[@]} -gt 0 ]; then
        until curl -s "http://127.0.0.1:$metrics/stats/prometheus" | grep -q '^weft_tap_active 1'; do
            # weft tap exits while the proxy's tap stream is not up yet: start it again.
            if [ -z "$tap_pid" ] || ! kill -0 "$tap_pid" 2>/dev/null; then
                "$WEFT" tap deploy/reviews "${tap_args[@]}" --server "$api" > /dev/null 2>&1 &
                tap_pid=$!
            fi
            sleep 0.2
        done
    fi
    t0=$(ticks "$pid")
    "$H2LOAD" --h1 -n "$N" -c 4 "http://127.0.0.1:$inbound/get" | grep -E "^requests:" >&2
    t1=$(ticks "$pid")
    i0=$(ticks "$pid"); sleep "$IDLE_S"; i1=$(ticks "$pid")
    [ -n "$tap_pid" ] && kill "$tap_pid" 2>/dev/null
    kill "$pid"; wait "$pid" 2>/dev/null || true
    awk -v s="$state" -v t=$((t1 - t0)) -v i=$((i1 - i0)) -v hz="$HZ" -v n="$N" -v idle="$IDLE_S" \
        'BEGIN { printf "%s cpu_s_per_10k=%.3f idle_cpu_ms_per_min=%.1f\n", s, t / hz * 10000 / n, i / hz * 1000 * 60 / idle }'
}

for r in $(seq "$ROUNDS"); do
    echo "# round $r, load $(cut -d' ' -f1-3 /proc/loadavg)"
    run base "$BASE"
    run idle "$TAP"
    run nomatch "$TAP"
    run match "$TAP"
done
