#!/usr/bin/env bash
# A Docker engine for the image and Compose scripts, without touching the machine's own:
#   scripts/docker-engine.sh start   use the engine DOCKER_HOST (or /var/run/docker.sock)
#                                    names if one answers; otherwise install Debian's
#                                    docker.io and start dockerd with its own data root,
#                                    no bridge and no iptables rules (containers use the host
#                                    network or none), and record that this script started it
#   scripts/docker-engine.sh env     print `export DOCKER_HOST=...` for the engine in use
#   scripts/docker-engine.sh stop    stop the engine only if `start` started it
# No image is ever pulled: the images are built FROM scratch or imported from a local root
# file system. Data root: $HANGAR_CACHE/docker (kept between runs, so built layers stay).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${HANGAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hangar}"
RUN_DIR="${HANGAR_DOCKER_RUN_DIR:-/run/hangar-docker}"
SOCK="unix://$RUN_DIR/docker.sock"
say() { echo "docker-engine.sh: $*" >&2; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else say "need root for: $*"; exit 1; fi
}

answers() { DOCKER_HOST="$1" timeout 10 docker info >/dev/null 2>&1; }

# The engine in use: DOCKER_HOST if it answers, then ours, then the system's default socket.
current() {
    if [ -n "${DOCKER_HOST:-}" ] && answers "$DOCKER_HOST"; then echo "$DOCKER_HOST"; return 0; fi
    if [ -S "$RUN_DIR/docker.sock" ] && answers "$SOCK"; then echo "$SOCK"; return 0; fi
    if [ -S /var/run/docker.sock ] && answers unix:///var/run/docker.sock; then echo unix:///var/run/docker.sock; return 0; fi
    return 1
}

start() {
    if h=$(current); then
        say "using the engine at $h"
        return 0
    fi
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        say "installing docker.io"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
    fi
    mkdir -p "$CACHE/docker" "$RUN_DIR/exec"
    local t0 log=$RUN_DIR/dockerd.log
    t0=$(date +%s%N)
    # setsid: the engine outlives this script (stop ends it by its pid file).
    setsid dockerd --data-root "$CACHE/docker" --exec-root "$RUN_DIR/exec" --host "$SOCK" \
        --pidfile "$RUN_DIR/dockerd.pid" --bridge=none --iptables=false --ip6tables=false \
        >"$log" 2>&1 < /dev/null &
    echo $! > "$RUN_DIR/started-here"
    local deadline=$(( $(date +%s) + 60 ))
    until answers "$SOCK"; do
        if ! kill -0 "$(cat "$RUN_DIR/started-here")" 2>/dev/null; then
            say "dockerd exited; its log:"; tail -20 "$log" >&2; rm -f "$RUN_DIR/started-here"; exit 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then say "dockerd did not answer within 60 s; log in $log"; exit 1; fi
        sleep 0.2
    done
    say "started dockerd ($SOCK, data root $CACHE/docker) in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
}

stop() {
    [ -f "$RUN_DIR/started-here" ] || { say "no engine started by this script"; return 0; }
    local pid
    pid=$(cat "$RUN_DIR/started-here")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        local deadline=$(( $(date +%s) + 30 ))
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$(date +%s)" -ge "$deadline" ]; then say "dockerd $pid still runs after 30 s; killing it"; kill -KILL "$pid" 2>/dev/null || true; break; fi
            sleep 0.2
        done
    fi
    rm -f "$RUN_DIR/started-here"
    say "stopped dockerd $pid"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) h=$(current) || { say "no engine answers; run: scripts/docker-engine.sh start"; exit 1; }; echo "export DOCKER_HOST=$h" ;;
    *) echo "usage: scripts/docker-engine.sh start|env|stop" >&2; exit 2 ;;
esac
