#!/usr/bin/env bash
# Builds the shipped sidecar, `target/shipped/weft-proxy` (issue 20, docs/benchmarks.md
# "BOLT"): `weft-proxy` built alone (release profile: fat LTO, the code layout list of
# crates/weft-proxy/link/), then laid out again by BOLT from its own execution profile
# (scripts/bolt-proxy.sh: both weft pairs of the outside method, ~2 minutes). Also builds
# `weft` and `weft-bench` (the training runs them). The bench scripts run this, then point
# weft-bench at the result (`WEFT_BENCH_PROXY`).
#
# Without BOLT (another architecture, or `WEFT_BOLT=off`) the plain release build is copied
# there instead, with a warning.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_INCREMENTAL=0 CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
nice -n 19 cargo build --release -q -p weft -p weft-bench --bin weft --bin weft-bench
mkdir -p target/shipped
out=target/shipped/weft-proxy
if [ "${WEFT_BOLT:-}" = off ] || [ "$(uname -m)" != x86_64 ]; then
  # weft-proxy in its own invocation: built with `weft`, cargo would unify its dependencies'
  # features with weft's (a bigger binary, ~1 MiB more resident) and change its symbol
  # names, which crates/weft-proxy/link/symbol-order.txt (the code layout) is recorded from.
  nice -n 19 cargo build --release -q -p weft-proxy --bin weft-proxy
  echo "build-proxy: WARNING: without BOLT; $out is the plain release build" >&2
  cp target/release/weft-proxy "$out"
  rm -f "$out.input-sha256"
  exit 0
fi
WEFT_SETUP_BOLT=1 bash scripts/setup.sh
# Without packed relative relocations: the BOLT release used here mishandles them (its
# output crashes at start; fixed upstream in LLVM 23).
WEFT_LINK_RELR=off nice -n 19 cargo build --release -q -p weft-proxy --bin weft-proxy
# Laid out again only when the build changed (the training takes a few minutes).
sum="$(sha256sum target/release/weft-proxy | cut -d' ' -f1)"
if [ -x "$out" ] && [ "$(cat "$out.input-sha256" 2>/dev/null)" = "$sum" ]; then
  echo "build-proxy: $out is up to date"
  exit 0
fi
bash scripts/bolt-proxy.sh target/release/weft-proxy "$out.tmp"
mv "$out.tmp" "$out"
echo "$sum" >"$out.input-sha256"
echo "build-proxy: $out"
