#!/usr/bin/env bash
# The whole check CI runs (.ci/run is exactly this script):
#   1. scripts/setup.sh           installs the real peers the tests talk to
#   2. cargo fmt --all -- --check formatting
#   3. cargo clippy --workspace --all-targets -- -D warnings
#   4. cargo test --workspace --no-fail-fast  with the peers on PATH (extra arguments go here),
#      stopped after WEFT_TEST_BUDGET_SECS (default 2700) so a hung test fails the run
# Every step runs even when an earlier one failed, so one run shows everything; the
# last line is one summary, and the exit code is non-zero when any step failed
# (cargo test's code first, then clippy's, then fmt's).
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

# rustfmt and clippy come with the toolchain's default profile; add them when missing.
for component in rustfmt:fmt clippy:clippy; do
  if ! cargo "${component#*:}" --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 || { echo "test.sh: cargo ${component#*:} missing and no rustup" >&2; exit 1; }
    rustup component add "${component%%:*}"
  fi
done

set +e
echo "== cargo fmt --all -- --check"
cargo fmt --all -- --check
fmt=$?
# Before the tests: a lint failure shows within minutes, not after the whole suite.
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
clippy=$?
echo "== cargo test --workspace --no-fail-fast $*"
log="$(mktemp)"
# A budget for the tests (build included): a test that hangs fails the run with the
# summary printed, instead of running into CI's time limit with nothing reported. A
# normal run takes 15-25 minutes on 2 cores. `timeout` signals its whole process group:
# cargo, the test binaries and what they started.
budget="${WEFT_TEST_BUDGET_SECS:-2700}"
timeout --kill-after=30 "$budget" cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
tests=${PIPESTATUS[0]}
if [ "$tests" -eq 124 ] || [ "$tests" -eq 137 ]; then
  echo "test.sh: cargo test ran over its budget of ${budget} s (WEFT_TEST_BUDGET_SECS) and was stopped;" \
    "the tests still running are those reported above as 'has been running for over 60 seconds'" | tee -a "$log"
fi
set -e

verdict() { if [ "$1" -eq 0 ]; then echo ok; else echo FAILED; fi; }
# One closing line for the whole run (cargo prints one summary per test binary).
awk -v fmt="$(verdict "$fmt")" -v clippy="$(verdict "$clippy")" -v tests="$tests" \
  '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
   END { printf "summary: %d passed, %d failed%s; fmt %s; clippy %s\n", p, f, (tests != 0 && f == 0) ? " (cargo test exit " tests ")" : "", fmt, clippy }' "$log"
rm -f "$log"
for code in "$tests" "$clippy" "$fmt"; do
  if [ "$code" -ne 0 ]; then exit "$code"; fi
done
exit 0
