#!/usr/bin/env bash
# The orchestrator at scale: `hangar serve` (modules api,orchestrator) against
# `hangar-fleet-sim` playing HOSTS host agents with VMS VMs each on loopback (one listener per
# host), everything on 127.0.0.1.
#
# The simulator registers its hosts (POST /orchestrator/hosts, X-Api-Key credentials), waits
# until every host is healthy and every VM is listed, then for WINDOW seconds changes
# CHANGES VM states a second across the fleet while lag probes flip one VM at a time on its
# host and poll GET /orchestrator/machines/{id} every 10 ms until the orchestrator shows
# the new state (event-to-state lag), and samples the orchestrator's /proc (VmRSS, VmHWM,
# CPU time). Then it times CREATES creates through POST /orchestrator/machines. Last, the
# in-process placement benchmark (cargo bench -p hangar-orchestrator --bench placement)
# gives placement p99 at 5,000 hosts. One table, goals next to the figures.
#
# Usage: bench/fleet.sh   (env: HOSTS=1000 VMS=10 WINDOW=60 CHANGES=100 CREATES=200
#                          CREATE_CONCURRENCY=1 ENGINE=json|postgres PORT=18590 BASE_PORT=0
#                          HOST_AUTH=api-key|password PLACEMENT=1 CARGO_TARGET_DIR)
# ENGINE=postgres starts the test PostgreSQL (scripts/test-services.sh) and uses a fresh
# database on it. Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTS="${HOSTS:-1000}"
VMS="${VMS:-10}"
WINDOW="${WINDOW:-60}"
CHANGES="${CHANGES:-100}"
CREATES="${CREATES:-200}"
CREATE_CONCURRENCY="${CREATE_CONCURRENCY:-1}"
ENGINE="${ENGINE:-json}"
PORT="${PORT:-18590}"
BASE_PORT="${BASE_PORT:-0}"
HOST_AUTH="${HOST_AUTH:-api-key}"
PLACEMENT="${PLACEMENT:-1}"
ROOT_PW='Fleet-Bench-Passw0rd!'

# Two sockets per host on each side (event stream, pooled HTTP) plus the listeners.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
command -v python3 >/dev/null || {
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3
}

# An existing CARGO_TARGET_DIR is honoured (a separate one keeps the release build off a
# shared target directory's lock).
cargo build --release -p hangar -p hangar-fleet-sim
BIN="${CARGO_TARGET_DIR:-target}/release"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

SETTINGS=(--set API_HOST=127.0.0.1 --set ENABLED_MODULES=api,orchestrator)
if [ "$ENGINE" = postgres ]; then
    scripts/test-services.sh start >/dev/null
    eval "$(scripts/test-services.sh env)"
    DB=hangar_fleet_bench
    python3 - "$HANGAR_TEST_POSTGRES_URL" "$DB" <<'EOF'
import subprocess, sys
url, db = sys.argv[1], sys.argv[2]
for sql in (f"DROP DATABASE IF EXISTS {db}", f"CREATE DATABASE {db}"):
    subprocess.run(["psql", url, "-q", "-c", sql], check=True)
EOF
    SETTINGS+=(--set "DATABASE_URL=${HANGAR_TEST_POSTGRES_URL%/*}/$DB")
elif [ "$ENGINE" != json ]; then
    echo "ENGINE is json or postgres" >&2
    exit 2
fi

ROOT_PASSWORD="$ROOT_PW" LOG_LEVEL=warn "$BIN/hangar" serve --data-dir "$WORK/orch" --port "$PORT" "${SETTINGS[@]}" \
    >"$WORK/orch.out" 2>"$WORK/orch.log" &
ORCH_PID=$!
PIDS+=("$ORCH_PID")
URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 600); do
    if grep -q "log in:" "$WORK/orch.out" 2>/dev/null; then break; fi
    kill -0 "$ORCH_PID" 2>/dev/null || { cat "$WORK/orch.log" >&2; exit 1; }
    sleep 0.1
done
grep -q "log in:" "$WORK/orch.out" || { echo "the orchestrator did not start" >&2; cat "$WORK/orch.log" >&2; exit 1; }

# An API key for root: what the simulator registers hosts and creates VMs with.
export HANGAR_CONFIG_DIR="$WORK/cli"
printf '%s' "$ROOT_PW" | "$BIN/hangar" --url "$URL" login --username root --password-stdin >/dev/null
KEY="$("$BIN/hangar" --url "$URL" --output json apikey create fleet-sim \
    | python3 -c 'import json, sys; v = json.load(sys.stdin); v = v[0] if isinstance(v, list) else v; print(v["encoded"])')"

echo "orchestrator pid $ORCH_PID on $URL ($ENGINE engine); simulator: $HOSTS hosts x $VMS VMs" >&2
HANGAR_FLEET_SIM_API_KEY="$KEY" "$BIN/hangar-fleet-sim" --orchestrator "$URL" --orchestrator-pid "$ORCH_PID" \
    --hosts "$HOSTS" --vms "$VMS" --base-port "$BASE_PORT" --window "$WINDOW" --changes-per-second "$CHANGES" \
    --creates "$CREATES" --create-concurrency "$CREATE_CONCURRENCY" --host-auth "$HOST_AUTH" \
    --json "$WORK/fleet.json" | tee "$WORK/fleet.txt"
# The orchestrator goes before the placement benchmark: with the simulator gone it keeps
# reconnecting to 1,000 dead hosts, CPU the in-process figures would share.
kill "$ORCH_PID" 2>/dev/null || true
wait "$ORCH_PID" 2>/dev/null || true

if [ "$PLACEMENT" = 1 ]; then
    # In-process placement at 100, 1,000 and 5,000 hosts of 10 VMs each (no HTTP, no store).
    cargo bench -p hangar-orchestrator --bench placement -- quick | tee "$WORK/placement.txt"
    P99_5000="$(awk '/^placement p99 at 5000 hosts:/ { print $6 }' "$WORK/placement.txt")"
    printf '  %-38s %16s   %s\n' "placement p99 at 5,000 hosts (in-proc)" "${P99_5000:-?} us" "< 5000 us"
fi
