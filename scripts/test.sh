#!/usr/bin/env bash
# The tests in one command on a fresh machine: installs what is missing (scripts/setup.sh), then
# runs every test. Integration tests start their own NATS and SeaweedFS servers on free loopback
# ports in temporary directories; nothing needs to be running beforehand.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh -p fleetlake-tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
# The engine's modules import one another without a circle (ARCHITECTURE.md, "Rooms").
python3 scripts/module-cycles.py
# The crash tests run the real binary as a child process: build it first.
cargo build --bin fleetlake
exec cargo test --workspace "$@"
