#!/usr/bin/env bash
# The Docker Compose proof of concept (deploy/compose/docker-compose.yml):
#   scripts/compose-poc.sh up     the server (api + orchestrator + catalog) from the image
#                                 hangar:local under Debian's docker-compose, and one QEMU
#                                 host agent beside it on this machine, joined to the
#                                 orchestrator with a single-use enrollment token
#   scripts/compose-poc.sh test   up, then create a VM through the orchestrator from the
#                                 agent's local test guest, wait until it runs, delete it,
#                                 and down; each step prints its time
#   scripts/compose-poc.sh down   delete the agent's VMs, stop the agent, remove the stack and
#                                 its volumes, stop an engine `up` started
# Environment: HANGAR_BIN (the binary for the agent and the CLI; default: the static one
# from scripts/build-static.sh), HANGAR_IMAGE (default hangar:local, built with
# scripts/docker-image.sh when missing), HANGAR_GUEST_IMAGE_DIR (the QEMU test guest; built
# with scripts/build-guest-image.sh when missing), HANGAR_POC_DIR (state; default
# /tmp/hangar-compose-poc).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

CACHE="${HANGAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hangar}"
STATE="${HANGAR_POC_DIR:-/tmp/hangar-compose-poc}"
PROJECT=hangar-poc
COMPOSE_FILE="$repo/deploy/compose/docker-compose.yml"
export HANGAR_IMAGE="${HANGAR_IMAGE:-hangar:local}"
say() { echo "compose-poc.sh: $*" >&2; }
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else say "need root for: $*"; exit 1; fi
}
json() { python3 -c "import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1], {'v': v}))" "$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

binary() {
    if [ -n "${HANGAR_BIN:-}" ]; then echo "$HANGAR_BIN"; else scripts/build-static.sh --profile debug; fi
}
compose() { docker-compose -p "$PROJECT" -f "$COMPOSE_FILE" "$@"; }

# Wait until "$@" succeeds, at most $1 seconds.
wait_for() {
    local limit=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then say "$what: not within $limit s"; return 1; fi
        sleep 0.2
    done
}

# CLI calls as root of the orchestrator (o) or of the agent (a): each keeps its own login.
cli_o() { HANGAR_CONFIG_DIR="$STATE/cli-orch" "$BIN" --url "$(cat "$STATE/orch-url")" "$@"; }
cli_a() { HANGAR_CONFIG_DIR="$STATE/cli-agent" "$BIN" --url "$(cat "$STATE/agent-url")" "$@"; }
# One API call to the orchestrator with root's saved login: api_o METHOD PATH (under /api/v1).
api_o() {
    python3 - "$1" "$2" "$(cat "$STATE/orch-url")" "$STATE/cli-orch/credentials.json" <<'PY'
import json, sys, urllib.request
method, path, url, creds = sys.argv[1:5]
token = json.load(open(creds))["token"]
req = urllib.request.Request(url + "/api/v1" + path, method=method, headers={"Authorization": "Bearer " + token})
with urllib.request.urlopen(req, timeout=30) as r:
    body = r.read()
    print(body.decode() if body else "{}")
PY
}
vm_running() {
    api_o GET "/orchestrator/machines/$1" | python3 -c 'import json,sys; v=json.load(sys.stdin); sys.exit(0 if str(v.get("State", v.get("state"))).lower() == "running" else 1)'
}
agent_alive() { [ -f "$STATE/agent.pid" ] && kill -0 "$(cat "$STATE/agent.pid")" 2>/dev/null; }

up() {
    local t0 t
    t0=$(date +%s%N)
    command -v docker-compose >/dev/null || {
        say "installing docker-compose"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
    }
    if agent_alive || [ -f "$STATE/orch-url" ]; then
        say "already up (state in $STATE); run scripts/compose-poc.sh down first"
        exit 1
    fi
    mkdir -p "$STATE"
    chmod 0700 "$STATE"
    BIN=$(binary)
    echo "$BIN" > "$STATE/bin"
    local engine
    if engine=$(scripts/docker-engine.sh env 2>/dev/null); then
        eval "$engine"
    else
        scripts/docker-engine.sh start
        touch "$STATE/engine-started-here"
        eval "$(scripts/docker-engine.sh env)"
    fi
    if ! docker image inspect "$HANGAR_IMAGE" >/dev/null 2>&1; then
        [ "$HANGAR_IMAGE" = hangar:local ] || { say "no image $HANGAR_IMAGE"; exit 1; }
        scripts/docker-image.sh --binary "$BIN" >/dev/null
    fi

    # The server: root's password in a file only the image's user (10001) reads.
    local port
    port=$(free_port)
    echo "http://127.0.0.1:$port" > "$STATE/orch-url"
    python3 -c 'import secrets; print("Poc-" + secrets.token_urlsafe(18) + "!1")' > "$STATE/root-password"
    chown 10001:10001 "$STATE/root-password" 2>/dev/null || true
    chmod 0400 "$STATE/root-password"
    t=$(date +%s%N)
    HANGAR_PORT=$port HANGAR_ROOT_PASSWORD_FILE="$STATE/root-password" compose up -d >/dev/null 2>"$STATE/compose-up.log" || {
        cat "$STATE/compose-up.log" >&2; exit 1; }
    wait_for 60 "the server's healthcheck" sh -c "[ \"\$(docker inspect -f '{{.State.Health.Status}}' \$(docker-compose -p $PROJECT -f $COMPOSE_FILE ps -q hangar))\" = healthy ]" || {
        compose logs --tail 30 >&2; exit 1; }
    say "server up and healthy at $(cat "$STATE/orch-url") in $(ms "$t") ms"

    # The QEMU host agent beside the stack, with the test guest as its local image.
    t=$(date +%s%N)
    command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null || scripts/build-guest-image.sh "$CACHE/guest" >/dev/null
    local guest="${HANGAR_GUEST_IMAGE_DIR:-$CACHE/guest}"
    [ -f "$guest/image.json" ] || scripts/build-guest-image.sh "$guest" >/dev/null
    mkdir -p "$STATE/agent-images" "$STATE/agent-data"
    ln -sfn "$guest" "$STATE/agent-images/test-guest"
    cp "$STATE/root-password" "$STATE/agent-password"
    chmod 0600 "$STATE/agent-password"
    port=$(free_port)
    echo "http://127.0.0.1:$port" > "$STATE/agent-url"
    setsid env -u ROOT_PASSWORD -u HANGAR_CONFIG ROOT_PASSWORD_FILE="$STATE/agent-password" \
        "$BIN" serve --data-dir "$STATE/agent-data" --port "$port" --set API_HOST=127.0.0.1 \
        --set ENABLED_MODULES=api,host --set HYPERVISOR=qemu --set "HOST_IMAGES_FOLDER=$STATE/agent-images" \
        --set SYSTEM_RESERVED_CPU=0 >"$STATE/agent.log" 2>&1 < /dev/null &
    echo $! > "$STATE/agent.pid"
    wait_for 60 "the agent" "$BIN" health --url "$(cat "$STATE/agent-url")" || { tail -20 "$STATE/agent.log" >&2; exit 1; }
    say "QEMU agent up at $(cat "$STATE/agent-url") in $(ms "$t") ms"

    # Join: a token made on the orchestrator, used by the agent (which makes an API key on
    # itself for the orchestrator).
    t=$(date +%s%N)
    cli_o login --username root --password-stdin < "$STATE/agent-password" >/dev/null
    cli_a login --username root --password-stdin < "$STATE/agent-password" >/dev/null
    local token host_id
    token=$(cli_o --output json host token agent-1 --ttl 10m | json 'v["token"]')
    host_id=$(HANGAR_ENROLLMENT_TOKEN="$token" cli_a --output json agent join --orchestrator "$(cat "$STATE/orch-url")" --tags qemu | json 'v["id"]')
    echo "$host_id" > "$STATE/host-id"
    wait_for 60 "host agent-1 healthy" sh -c "HANGAR_CONFIG_DIR='$STATE/cli-orch' '$BIN' --url '$(cat "$STATE/orch-url")' --output json host get '$host_id' | grep -q '\"state\": \"healthy\"'"
    say "agent joined with an enrollment token and is healthy ($host_id) in $(ms "$t") ms"
    say "up in $(ms "$t0") ms; log in with: hangar login --url $(cat "$STATE/orch-url") --username root (password in $STATE/root-password)"
}

down() {
    local t0
    t0=$(date +%s%N)
    BIN=$(cat "$STATE/bin" 2>/dev/null || echo "${HANGAR_BIN:-hangar}")
    if agent_alive; then
        # The agent's QEMU guests outlive it: delete them first.
        local vms
        vms=$(cli_a --output json vm list 2>/dev/null | json '" ".join(m["ID"] for m in v)' || true)
        for vm in $vms; do cli_a vm delete "$vm" --force >/dev/null 2>&1 || say "could not delete VM $vm"; done
        local pid
        pid=$(cat "$STATE/agent.pid")
        kill -TERM "$pid"
        wait_for 30 "the agent to stop" sh -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/agent.pid"
    local engine
    if engine=$(scripts/docker-engine.sh env 2>/dev/null); then
        eval "$engine"
        HANGAR_ROOT_PASSWORD_FILE="$STATE/root-password" compose down -v >/dev/null 2>&1 || say "docker-compose down failed"
    fi
    if [ -f "$STATE/engine-started-here" ]; then
        scripts/docker-engine.sh stop
    fi
    rm -rf "$STATE"
    say "down in $(ms "$t0") ms"
}

test_poc() {
    if agent_alive || [ -f "$STATE/orch-url" ]; then
        say "a proof of concept is already up (state in $STATE); run scripts/compose-poc.sh down first"
        exit 1
    fi
    # Torn down whatever happens, also when `up` stops half-way.
    trap down EXIT
    up
    BIN=$(cat "$STATE/bin")
    local t vm
    t=$(date +%s%N)
    vm=$(cli_o --output json vm create poc-guest --image test-guest --orchestrator --architecture x86_64 \
        --cpus 1 --memory 192 --start | json 'v["id"]')
    wait_for 120 "VM $vm running" vm_running "$vm"
    say "VM $vm created through the orchestrator and running in $(ms "$t") ms"
    t=$(date +%s%N)
    api_o DELETE "/orchestrator/machines/$vm?force=true" >/dev/null
    say "VM $vm deleted in $(ms "$t") ms"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    test) test_poc ;;
    *) echo "usage: scripts/compose-poc.sh up|test|down" >&2; exit 2 ;;
esac
