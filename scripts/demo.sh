#!/usr/bin/env bash
# The demo in one command on a fresh machine: installs what is missing, builds fleetlake and
# runs `fleetlake demo` (NATS started as a child process if none answers on 127.0.0.1:4222,
# the lake in ./lakehouse, the simulator and the HTTP API on 127.0.0.1:8080). Ctrl-C stops it.
# Extra arguments go to `fleetlake demo` (see `cargo run -- demo --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
exec cargo run --quiet --bin fleetlake -- demo "$@"
