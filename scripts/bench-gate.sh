#!/usr/bin/env bash
# Performance regression gate (a few minutes; not part of the test suite): builds the
# release `weft-proxy` (and `weft`, `weft-bench`), then runs `weft-bench gate`: three
# interleaved rounds of no-proxy / weft-h2 / weft-h1 pairs (the outside method of
# docs/benchmarks.md, unpinned, one worker per proxy) compared with the saved baseline
# bench/gate-baseline.json. Exits 1 when a figure clearly regressed (see
# crates/weft-bench/src/gate.rs for the noise-aware thresholds).
#
#   scripts/bench-gate.sh            # compare
#   scripts/bench-gate.sh --save     # record the current build as the new baseline
#
# Further arguments go to `weft-bench gate` (`--rounds`, `--secs`, `--weft`, ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_INCREMENTAL=0 CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
nice -n 19 cargo build --release -q -p weft -p weft-bench --bin weft --bin weft-bench
# The shipped sidecar (scripts/build-proxy.sh: weft-proxy built alone, laid out by BOLT);
# weft-bench's --weft-proxy defaults to it through WEFT_BENCH_PROXY.
bash scripts/build-proxy.sh
export WEFT_BENCH_PROXY="$ROOT/target/shipped/weft-proxy"
exec target/release/weft-bench gate "$@"
