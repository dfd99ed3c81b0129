#!/usr/bin/env bash
# Flake hunt: runs scripts/test.sh RUNS times in a row (default 5) while LOAD busy loops
# (default 2, one per core of a two-core CI machine) keep the CPU saturated. A test that
# passes alone but fails here waits on time instead of a fact: fix the test.
#   scripts/stress.sh                 # 5 runs under 2 busy cores
#   RUNS=3 LOAD=4 scripts/stress.sh outlier   # extra arguments go to test.sh (a name filter)
# Prints each run's summary line, and exits non-zero when any run failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${RUNS:-5}"
LOAD="${LOAD:-2}"

busy=()
stop_load() {
  for pid in "${busy[@]}"; do kill "$pid" 2>/dev/null; done
  wait "${busy[@]}" 2>/dev/null
}
trap stop_load EXIT
for _ in $(seq "$LOAD"); do
  ( while :; do :; done ) &
  busy+=("$!")
done

failed=0
summaries=()
for run in $(seq "$RUNS"); do
  log="$(mktemp)"
  echo "== stress run $run of $RUNS (load: $LOAD busy loops), log: $log"
  bash "$ROOT/scripts/test.sh" "$@" >"$log" 2>&1
  code=$?
  line="$(grep '^summary:' "$log" | tail -n 1)"
  summaries+=("run $run: exit $code; ${line:-no summary}")
  if [ "$code" -ne 0 ]; then
    failed=$((failed + 1))
    grep -E '^test .* FAILED$|panicked at' "$log" | head -n 20
  else
    rm -f "$log"
  fi
done
printf '%s\n' "${summaries[@]}"
echo "stress: $((RUNS - failed)) of $RUNS runs passed"
[ "$failed" -eq 0 ]
