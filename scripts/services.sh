#!/usr/bin/env bash
# Local backing services for fleetlake: NATS JetStream and a SeaweedFS S3 server
# ("weed mini"), both bound to 127.0.0.1 only, state under <repo>/.services/.
#
#   scripts/services.sh up       install (if needed) and start both, wait until
#                                they answer, print the client environment
#   scripts/services.sh down     stop both (SIGTERM, SIGKILL after a timeout)
#   scripts/services.sh status   show whether each one runs and answers
#   scripts/services.sh env      print the client environment only
#
# `up` prints only `export NAME=value` lines on stdout (progress goes to stderr),
# so `eval "$(scripts/services.sh up)"` sets up the current shell.
# Both `up` and `down` are idempotent.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
VENV="$ROOT/.venv"
SVC="$ROOT/.services"
PY="$VENV/bin/python"
NATS_BIN="$VENV/bin/nats-server"
WEED_BIN="$VENV/bin/weed"


HOST=127.0.0.1
NATS_PORT=4222
S3_PORT=8333
S3_GRPC_PORT=19334
MASTER_PORT=18333
MASTER_GRPC_PORT=19333
VOLUME_PORT=18340
VOLUME_GRPC_PORT=19340
FILER_PORT=18888
FILER_GRPC_PORT=19888
# weed mini always starts the admin server (-admin.ui=false only hides the UI) and an
# embedded maintenance worker that dials admin.port+10000 whatever -admin.port.grpc
# says, so the admin gRPC port must be the HTTP port + 10000.
ADMIN_PORT=18646
ADMIN_GRPC_PORT=$((ADMIN_PORT + 10000))

# Keys of scripts/seaweedfs-s3.json (shared with docker-compose.yml).
S3_ACCESS_KEY=fleetlake
S3_SECRET_KEY=fleetlake-secret
S3_BUCKET=fleetlake
S3_REGION=us-east-1

READY_TIMEOUT="${SERVICES_READY_TIMEOUT:-60}"   # seconds, per service
STOP_TIMEOUT="${SERVICES_STOP_TIMEOUT:-30}"     # seconds before SIGKILL

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- install
ensure_tools() {
    "$ROOT/scripts/setup.sh"
    [[ -x "$NATS_BIN" ]] || die "$NATS_BIN missing after install"
    [[ -x "$WEED_BIN" ]] || die "$WEED_BIN missing after install"
}

# ---------------------------------------------------------------- processes
# A pid counts as ours only if it is alive (not a zombie) and runs our binary.
pid_alive() { # pid binary
    local pid="$1" bin="$2" state exe
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/stat" ]] || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
    [[ "$exe" == "$(readlink -f "$bin")" ]]
}

running_pid() { # name binary -> prints pid if running; removes a stale pid file
    local pidfile="$SVC/$1.pid" pid
    [[ -f "$pidfile" ]] || return 1
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if pid_alive "$pid" "$2"; then
        printf '%s\n' "$pid"
        return 0
    fi
    rm -f "$pidfile"
    return 1
}

port_open() { # port: true if something accepts TCP connections on it
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

check_ports_free() { # name port...
    local name="$1" p busy=()
    shift
    for p in "$@"; do
        if port_open "$p"; then busy+=("$p"); fi
    done
    if ((${#busy[@]})); then
        die "cannot start $name: port(s) ${busy[*]} on $HOST already in use by another process"
    fi
}

launch() { # name binary args... (detached, own session, log appended)
    local name="$1" bin="$2" pid
    shift 2
    printf '\n==== %s starting %s\n' "$(date -u +%FT%TZ)" "$name" >>"$SVC/$name.log"
    if command -v setsid >/dev/null; then
        setsid "$bin" "$@" </dev/null >>"$SVC/$name.log" 2>&1 &
    else
        nohup "$bin" "$@" </dev/null >>"$SVC/$name.log" 2>&1 &
    fi
    pid=$!
    printf '%s\n' "$pid" >"$SVC/$name.pid"
}

stop_one() { # name binary
    local name="$1" bin="$2" pid i
    if ! pid="$(running_pid "$name" "$bin")"; then
        log "$name: not running"
        rm -f "$SVC/$name.pid"
        return 0
    fi
    log "$name: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        pid_alive "$pid" "$bin" || break
        sleep 0.1
    done
    if pid_alive "$pid" "$bin"; then
        log "$name: still running after ${STOP_TIMEOUT}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$SVC/$name.pid"
    log "$name: stopped"
}

# ---------------------------------------------------------------- probes
# NATS: protocol handshake plus a JetStream API call ($JS.API.INFO) that must succeed.
probe_nats() {
    "$PY" - "$HOST" "$NATS_PORT" <<'EOF' 2>/dev/null
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
s.settimeout(2)
f = s.makefile("rb")
if not f.readline().startswith(b"INFO "):
    sys.exit(1)
s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n'
          b'SUB _INBOX.services_probe 1\r\nPUB $JS.API.INFO _INBOX.services_probe 0\r\n\r\n')
while True:
    line = f.readline()
    if not line or line.startswith(b"-ERR"):
        sys.exit(1)
    if line.startswith(b"MSG "):
        body = f.read(int(line.split()[-1]) + 2)
        sys.exit(1 if "error" in json.loads(body) else 0)
EOF
}

# S3: signed (SigV4) HEAD of the bucket must answer 200, so keys and bucket both work.
probe_s3() {
    "$PY" - "$HOST" "$S3_PORT" "$S3_BUCKET" "$S3_ACCESS_KEY" "$S3_SECRET_KEY" "$S3_REGION" <<'EOF' 2>/dev/null
import datetime, hashlib, hmac, http.client, sys
host, port, bucket, ak, sk, region = sys.argv[1:7]
now = datetime.datetime.now(datetime.timezone.utc)
amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
payload = hashlib.sha256(b"").hexdigest()
hosthdr = f"{host}:{port}"
signed = "host;x-amz-content-sha256;x-amz-date"
creq = "\n".join(["HEAD", f"/{bucket}", "", f"host:{hosthdr}", f"x-amz-content-sha256:{payload}",
                  f"x-amz-date:{amz_date}", "", signed, payload])
scope = f"{day}/{region}/s3/aws4_request"
sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])
k = ("AWS4" + sk).encode()
for part in (day, region, "s3", "aws4_request"):
    k = hmac.new(k, part.encode(), hashlib.sha256).digest()
sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
c = http.client.HTTPConnection(host, int(port), timeout=2)
c.request("HEAD", f"/{bucket}", headers={
    "Host": hosthdr, "x-amz-date": amz_date, "x-amz-content-sha256": payload,
    "Authorization": f"AWS4-HMAC-SHA256 Credential={ak}/{scope}, SignedHeaders={signed}, Signature={sig}"})
sys.exit(0 if c.getresponse().status == 200 else 1)
EOF
}

wait_ready() { # name binary probe_fn
    local name="$1" bin="$2" probe="$3" pid start i
    pid="$(cat "$SVC/$name.pid")"
    start=$SECONDS
    for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
        if ! pid_alive "$pid" "$bin"; then
            log "$name exited during startup; last lines of $SVC/$name.log:"
            tail -n 20 "$SVC/$name.log" >&2 || true
            rm -f "$SVC/$name.pid"
            return 1
        fi
        if "$probe"; then
            log "$name: ready (pid $pid, ~$((SECONDS - start))s)"
            return 0
        fi
        sleep 0.1
    done
    log "$name: not ready after ${READY_TIMEOUT}s; last lines of $SVC/$name.log:"
    tail -n 20 "$SVC/$name.log" >&2 || true
    return 1
}

# ---------------------------------------------------------------- services
start_nats() {
    if running_pid nats "$NATS_BIN" >/dev/null; then
        log "nats: already running (pid $(cat "$SVC/nats.pid"))"
        return 0
    fi
    check_ports_free nats "$NATS_PORT"
    mkdir -p "$SVC/nats"
    # No -m/--http_port: no monitoring listener. Only the client port is opened.
    launch nats "$NATS_BIN" \
        -a "$HOST" \
        -p "$NATS_PORT" \
        -n fleetlake \
        -js \
        -sd "$SVC/nats"
    log "nats: started pid $(cat "$SVC/nats.pid")"
}

start_weed() {
    if running_pid seaweedfs "$WEED_BIN" >/dev/null; then
        log "seaweedfs: already running (pid $(cat "$SVC/seaweedfs.pid"))"
        return 0
    fi
    check_ports_free seaweedfs "$S3_PORT" "$S3_GRPC_PORT" "$MASTER_PORT" "$MASTER_GRPC_PORT" \
        "$VOLUME_PORT" "$VOLUME_GRPC_PORT" "$FILER_PORT" "$FILER_GRPC_PORT" "$ADMIN_PORT" "$ADMIN_GRPC_PORT"
    mkdir -p "$SVC/seaweedfs"
    remove_weed_sockets
    # Local unix sockets default to /tmp/seaweedfs-{filer,s3}-PORT.sock; keep them here
    # when the path fits a unix socket name (108 bytes).
    local sockets=()
    if ((${#SVC} < 80)); then
        sockets=(-filer.localSocket="$SVC/seaweedfs-filer.sock" -s3.localSocket="$SVC/seaweedfs-s3.sock")
    fi
    # Every listener is set explicitly (weed mini also reads DIR/mini.options for any
    # flag not given, so keep them all on the command line).
    launch seaweedfs "$WEED_BIN" mini \
        -dir="$SVC/seaweedfs" \
        -ip="$HOST" \
        -ip.bind="$HOST" \
        -master.port="$MASTER_PORT" \
        -master.port.grpc="$MASTER_GRPC_PORT" \
        -master.telemetry=false \
        -volume.port="$VOLUME_PORT" \
        -volume.port.grpc="$VOLUME_GRPC_PORT" \
        -volume.preStopSeconds=0 \
        -filer.port="$FILER_PORT" \
        -filer.port.grpc="$FILER_GRPC_PORT" \
        -s3.port="$S3_PORT" \
        -s3.port.grpc="$S3_GRPC_PORT" \
        -s3.port.iceberg=0 \
        -s3.port.lance=0 \
        -s3.config="$ROOT/scripts/seaweedfs-s3.json" \
        -admin.ui=false \
        -admin.port="$ADMIN_PORT" \
        -admin.port.grpc="$ADMIN_GRPC_PORT" \
        -webdav=false \
        -bucket="$S3_BUCKET" \
        "${sockets[@]}"
    log "seaweedfs: started pid $(cat "$SVC/seaweedfs.pid")"
}

print_env() {
    cat <<EOF
export AWS_ENDPOINT_URL=http://$HOST:$S3_PORT
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_REGION=$S3_REGION
export AWS_ALLOW_HTTP=true
export FLEETLAKE_LAKE_LOCATION=s3://$S3_BUCKET/lake
export FLEETLAKE_NATS_URL=nats://$HOST:$NATS_PORT
EOF
}

cmd_up() {
    ensure_tools
    mkdir -p "$SVC"
    start_nats
    start_weed
    local ok=1
    wait_ready nats "$NATS_BIN" probe_nats || ok=0
    wait_ready seaweedfs "$WEED_BIN" probe_s3 || ok=0
    ((ok)) || die "services did not come up (logs in $SVC); run '$0 down' to clean up"
    print_env
}

# weed leaves unix sockets behind (those of the gRPC ports always go to
# /tmp/seaweedfs-<role>-grpc-<port>.sock); remove only the ones for our ports.
remove_weed_sockets() {
    rm -f "$SVC/seaweedfs-filer.sock" "$SVC/seaweedfs-s3.sock" \
        "/tmp/seaweedfs-master-grpc-$MASTER_GRPC_PORT.sock" \
        "/tmp/seaweedfs-volume-grpc-$VOLUME_GRPC_PORT.sock" \
        "/tmp/seaweedfs-filer-grpc-$FILER_GRPC_PORT.sock" \
        "/tmp/seaweedfs-s3-grpc-$S3_GRPC_PORT.sock" \
        "/tmp/seaweedfs-admin-grpc-$ADMIN_GRPC_PORT.sock"
}

cmd_down() {
    stop_one seaweedfs "$WEED_BIN"
    remove_weed_sockets
    stop_one nats "$NATS_BIN"
}

cmd_status() {
    local rc=0 pid
    if pid="$(running_pid nats "$NATS_BIN")"; then
        if probe_nats; then
            echo "nats: running pid $pid, JetStream answering on nats://$HOST:$NATS_PORT"
        else
            echo "nats: running pid $pid, NOT answering on nats://$HOST:$NATS_PORT"
            rc=3
        fi
    else
        echo "nats: stopped"
        rc=3
    fi
    if pid="$(running_pid seaweedfs "$WEED_BIN")"; then
        if probe_s3; then
            echo "seaweedfs: running pid $pid, bucket s3://$S3_BUCKET answering on http://$HOST:$S3_PORT"
        else
            echo "seaweedfs: running pid $pid, bucket s3://$S3_BUCKET NOT answering on http://$HOST:$S3_PORT"
            rc=3
        fi
    else
        echo "seaweedfs: stopped"
        rc=3
    fi
    return "$rc"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) print_env ;;
    *)
        echo "usage: $0 {up|down|status|env}" >&2
        exit 2
        ;;
esac
