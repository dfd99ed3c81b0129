#!/usr/bin/env bash
# Lays out a linked `weft-proxy` again from its own execution profile, with LLVM's BOLT
# (issue 20, bench/notes.md "BOLT"). The binary must be linked with `--emit-relocs`
# (crates/weft-proxy/build.rs does, for release builds).
#
#   scripts/bolt-proxy.sh [IN] [OUT]     (default: target/release/weft-proxy -> IN.bolt)
#
# 1. `llvm-bolt -instrument`: a copy of IN that counts every branch it takes.
# 2. Training: both weft pairs of the outside method (mTLS between the sidecars, HTTP/1.1
#    and h2 between them, metrics, peer metadata, RBAC evaluated) at a fixed rate, then a
#    closed loop. weft-bench stops the proxies with SIGTERM (`WEFT_BENCH_STOP=term`) so
#    that each writes its profile at exit.
# 3. `llvm-bolt -data`: hot blocks of each function together, cold ones split out, hot
#    functions ordered by who calls whom.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
in="${1:-target/release/weft-proxy}"
out="${2:-$in.bolt}"
bolt_dir="${BOLT_DIR:-}"
if [ -z "$bolt_dir" ] && [ -x "$ROOT/.tools/bin/llvm-bolt" ]; then
  bolt_dir="$ROOT/.tools/bin"   # scripts/setup.sh with WEFT_SETUP_BOLT=1
fi
if [ -z "$bolt_dir" ]; then
  bolt_dir="$(ls -d /usr/lib/llvm-*/bin 2>/dev/null | sort -V | while read -r d; do
    [ -x "$d/llvm-bolt" ] && echo "$d"; done | tail -n 1)"
fi
if [ -z "$bolt_dir" ] || [ ! -x "$bolt_dir/llvm-bolt" ]; then
  echo "bolt-proxy: llvm-bolt not found (WEFT_SETUP_BOLT=1 scripts/setup.sh installs it; or set BOLT_DIR)" >&2
  exit 1
fi
if ! readelf -S "$in" | grep -q '\.rela\.text'; then
  echo "bolt-proxy: $in has no relocations: link it with -Wl,--emit-relocs" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$bolt_dir/llvm-bolt" "$in" -instrument -o "$work/weft-proxy.inst" \
  --instrumentation-file="$work/prof" --instrumentation-file-append-pid >"$work/instrument.log" 2>&1 ||
  { cat "$work/instrument.log" >&2; exit 1; }
export PATH="$ROOT/.tools/bin:$PATH" WEFT_BENCH_STOP=term WEFT_DRAIN_DURATION=0s
bench="${WEFT_BENCH:-target/release/weft-bench}"
train() { "$@" >>"$work/train.log" 2>&1 || { tail -n 30 "$work/train.log" >&2; exit 1; }; }
train "$bench" wake --pairs weft-h1,weft-h2 --rounds 1 --rps 3000 --secs 5 --weft-proxy "$work/weft-proxy.inst"
train "$bench" outside --rounds 1 --pairs weft-h1,weft-h2 --weft-proxy "$work/weft-proxy.inst" --out "$work/outside"
ls "$work"/prof.*.fdata >/dev/null
"$bolt_dir/merge-fdata" "$work"/prof.*.fdata >"$work/all.fdata" 2>/dev/null
"$bolt_dir/llvm-bolt" "$in" -o "$out" -data="$work/all.fdata" \
  -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold -split-eh \
  -icf=1 -use-gnu-stack -dyno-stats >"$work/optimize.log" 2>&1 ||
  { cat "$work/optimize.log" >&2; exit 1; }
grep -E "BOLT-INFO: (profile|.*functions with profile)|executed forward branches|taken branches" "$work/optimize.log" || true
echo "bolt-proxy: wrote $out from $(ls "$work"/prof.*.fdata | wc -l) proxies' profiles"
