#!/usr/bin/env bash
# The whole test suite: installs the real peers (scripts/setup.sh), then runs
# `cargo test --workspace` with them on PATH. Exits with cargo's exit code.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

export PATH="$ROOT/.tools/bin:$PATH"
export WEFT_ENVOY="$ROOT/.tools/bin/envoy"
# Two cores: two compile jobs, and few enough test threads that tests which start
# Envoy or several servers do not starve each other into timeouts.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

set +e
log="$(mktemp)"
cargo test --workspace "$@" 2>&1 | tee "$log"
code=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one summary per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$code"
