#!/usr/bin/env bash
# The outside method of issue 20 (docs/benchmarks.md, "Outside method"): no pinning,
# HTTP/1.1 at 1,000 requests/s over 16 connections (latency-corrected, 1 KiB answers)
# through each pair (no mesh, weft h2 and h1 between the sidecars, Envoy 1.40 static and
# xDS-fed, HAProxy 2.6), interleaved rounds, then a one-worker maximum. A few minutes.
#
#   bench/outside.sh                                  # 2 rounds, every pair
#   bench/outside.sh --rounds 3 --pairs baseline,weft-h2,haproxy
#   bench/outside.sh --alt-proxy /tmp/weft-proxy-old  # A/B: adds weft-*@alt pairs
#
# Arguments go to `weft-bench outside`. Writes bench/results/outside-<date>.json and
# outside-latest.json and prints the table; `weft-bench render` puts it in the report.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export CARGO_INCREMENTAL=0 CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
nice -n 19 cargo build --release -q -p weft -p weft-bench --bin weft --bin weft-bench
# The shipped sidecar (scripts/build-proxy.sh: weft-proxy built alone, laid out by BOLT);
# weft-bench's --weft-proxy defaults to it through WEFT_BENCH_PROXY.
bash scripts/build-proxy.sh
export WEFT_BENCH_PROXY="$ROOT/target/shipped/weft-proxy"
export PATH="$ROOT/.tools/bin:$PATH"
exec target/release/weft-bench outside --envoy "$ROOT/.tools/bin/envoy" "$@"
