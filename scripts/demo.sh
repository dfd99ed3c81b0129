#!/usr/bin/env bash
# Runs the weft proxy demo (`weft demo`). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo run -p weft -- demo "$@"
