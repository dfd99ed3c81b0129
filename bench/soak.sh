#!/usr/bin/env bash
# Memory under many concurrent connections (docs/benchmarks.md, "Memory under 500
# connections"): builds weft (the control plane), the proxy-only `weft-proxy` and the
# harness in release mode, then runs `weft-bench soak`: the weft stack (client sidecar ->
# mTLS -> server sidecar -> echo) under 500 concurrent HTTP/2 connections for 5 minutes,
# both sidecars' RSS sampled every 5 s during the load and for 60 s after it.
#
#   bench/soak.sh                                   # 500 connections, 300 s, then 60 s idle
#   bench/soak.sh --secs 60 --after-secs 30         # a shorter smoke run
#   bench/soak.sh --proto h1 --conns 200            # HTTP/1.1 downstream instead
#
# Arguments go to `weft-bench soak` (see `weft-bench soak --help`). Writes
# bench/results/soak-<date>.json and prints the samples as a Markdown table.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_INCREMENTAL=0 CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
echo "soak: building (release)" >&2
cargo build --release -q -p weft -p weft-bench --bin weft --bin weft-bench
# The shipped sidecar (scripts/build-proxy.sh: weft-proxy built alone, laid out by BOLT);
# weft-bench's --weft-proxy defaults to it through WEFT_BENCH_PROXY.
bash scripts/build-proxy.sh
export WEFT_BENCH_PROXY="$ROOT/target/shipped/weft-proxy"
# 500 connections through two proxies need more than the usual 1024 descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
pin=()
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then pin=(taskset -c 0); fi
exec "${pin[@]}" target/release/weft-bench soak "$@"
