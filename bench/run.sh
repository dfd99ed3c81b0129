#!/usr/bin/env bash
# The one command behind docs/benchmarks.md: installs what the scenarios need (Envoy 1.40
# via scripts/setup.sh, HAProxy from Debian), builds weft, the proxy-only `weft-proxy` the
# weft sidecars run, the harness and the control-plane scale example in release mode, runs
# every scenario (baseline, weft, Envoy, HAProxy) round after round, then mesh size,
# startup and control-plane scale, writes bench/results/<date>.json (+ latest.json) and
# renders docs/benchmarks.md.
#
#   bench/run.sh                      # everything: ~5 min release build, ~11 min of measurements
#   bench/run.sh --runs 1 --h1-secs 5 --grpc-secs 3 --cp-clients   # a quick look
#
# Arguments go to `weft-bench run` (see `weft-bench run --help`). Exits non-zero with a
# clear message when a scenario did not really run through its proxies.
set -euo pipefail

T0=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { printf 'bench: %s\n' "$*" >&2; }

bash scripts/setup.sh
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  say "apt-get install haproxy"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
  $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends haproxy >/dev/null
fi
command -v taskset >/dev/null 2>&1 || say "taskset not found: processes will not be pinned"

export CARGO_INCREMENTAL=0 CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
say "building (release)"
cargo build --release -q -p weft -p weft-bench --bin weft --bin weft-bench --example xds_scale
# The shipped sidecar (scripts/build-proxy.sh: weft-proxy built alone, laid out by BOLT);
# weft-bench's --weft-proxy defaults to it through WEFT_BENCH_PROXY.
bash scripts/build-proxy.sh
export WEFT_BENCH_PROXY="$ROOT/target/shipped/weft-proxy"

# The report states the whole time: set-up and build (here) plus the measurements.
export WEFT_BENCH_PREPARE_SECS=$((SECONDS - T0))
say "set-up and build took ${WEFT_BENCH_PREPARE_SECS} s"

# 10,000 simulated proxies need as many sockets.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
export PATH="$ROOT/.tools/bin:$PATH"
# The harness itself (load generator, echo server, control plane) on CPU 0; it starts
# the proxies on CPU 1.
pin=()
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then pin=(taskset -c 0); fi
exec "${pin[@]}" target/release/weft-bench run --envoy "$ROOT/.tools/bin/envoy" "$@"
