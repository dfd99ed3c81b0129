#!/usr/bin/env bash
# The main job: `weft up`, the whole mesh running Istio's Bookinfo on this machine
# (control plane, a sidecar per workload, the apps, an ingress gateway on :8080).
# Extra arguments go to `weft up` (for example --transparent, --ingress-port 9000, -f DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ " $* " == *" --transparent "* ]]; then
  bash scripts/setup.sh >/dev/null   # iproute2 and iptables
fi
cargo build -p weft
exec target/debug/weft up "$@"
