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
# weft-proxy in its own invocation: built with `weft`, cargo would unify its dependencies'
# features with weft's (a bigger binary, ~1 MiB more resident) and change its symbol names,
# which crates/weft-proxy/link/symbol-order.txt (the code layout) is recorded from.
nice -n 19 cargo build --release -q -p weft-proxy --bin weft-proxy
exec target/release/weft-bench gate "$@"
