#!/usr/bin/env bash
# The air-gapped install, tested: `hangar bundle` writes the tarball (static binary, image
# archive, chart, compose file), then inside a network namespace with no route at all
# (only loopback) the bundle is unpacked, install.sh installs into a temporary prefix, the
# installed binary starts and answers its liveness probe over loopback. A damaged bundle
# must be refused. Each step prints its time.
#
#   scripts/airgap-test.sh [--binary FILE] [--image FILE] [--keep]
#
#   --binary FILE   static binary (default: scripts/build-static.sh --profile debug)
#   --image FILE    a `docker save` archive (default: scripts/docker-image.sh --save)
#   --keep          keep the work folder (its path is printed)
# Needs root (ip netns).
set -euo pipefail
cd "$(dirname "$0")/.."

binary="" image="" keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --image) image=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "airgap-test.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
say() { echo "airgap-test.sh: $*" >&2; }
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
[ "$(id -u)" = 0 ] || { say "needs root (network namespaces)"; exit 1; }
command -v ip >/dev/null || { say "needs iproute2"; exit 1; }

work=$(mktemp -d /tmp/hangar-airgap.XXXXXX)
ns=hangar-airgap-$$
server=""
cleanup() {
    local rc=$?
    if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
        kill -TERM "$server" 2>/dev/null || true
        local deadline=$(( $(date +%s) + 20 ))
        while kill -0 "$server" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
        kill -KILL "$server" 2>/dev/null || true
    fi
    # Stopping the server must stop it: nothing of the test outlives it.
    if pgrep -f "$work/prefix/bin/hangar" >/dev/null; then
        say "a process of the installed hangar outlived the test; killing it"
        pkill -KILL -f "$work/prefix/bin/hangar" || true
        rc=1
    fi
    ip netns del "$ns" 2>/dev/null || true
    if [ "$keep" = 1 ]; then say "kept $work"; else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
started=$(date +%s%N)

t=$(date +%s%N)
[ -n "$binary" ] || binary=$(scripts/build-static.sh --profile debug)
if [ -z "$image" ]; then
    image=$work/hangar-image.tar
    scripts/docker-image.sh --binary "$binary" --save "$image" >/dev/null
fi
say "binary and image archive ready in $(ms "$t") ms"

t=$(date +%s%N)
# The bundle ships the binary without its debug sections (function names stay), as the image does.
strip --strip-debug -o "$work/hangar" "$binary"
"$binary" --output json bundle --out "$work/hangar-bundle.tar.gz" --binary "$work/hangar" --image "$image" > "$work/bundle.json"
say "bundle $(du -h "$work/hangar-bundle.tar.gz" | cut -f1) ($(python3 -c 'import json,sys; print(", ".join(f["name"].split("/")[0] for f in json.load(open(sys.argv[1]))["files"] if not f["name"].startswith("helm/") or f["name"].endswith("Chart.yaml")))' "$work/bundle.json")) in $(ms "$t") ms"

# The namespace: loopback only, no route in the main table (IPv4 or IPv6).
t=$(date +%s%N)
ip netns add "$ns"
ip -n "$ns" link set lo up
in_ns() { ip netns exec "$ns" "$@"; }
routes="$(ip -n "$ns" -4 route show table main)$(ip -n "$ns" -6 route show table main | grep -v '^::1 ' || true)"
[ -z "$routes" ] || { say "the namespace has routes: $routes"; exit 1; }
if in_ns python3 -c 'import socket; socket.create_connection(("192.0.2.1", 80), timeout=2)' 2>/dev/null; then
    say "the namespace reaches 192.0.2.1; it must have no route"; exit 1
fi
say "namespace $ns: loopback only, no route (a connection out fails) in $(ms "$t") ms"

t=$(date +%s%N)
mkdir -p "$work/unpack" "$work/damaged"
in_ns tar -xzf "$work/hangar-bundle.tar.gz" -C "$work/unpack"
top=$(ls "$work/unpack")
# A Docker engine's unix socket is no network: when one answers, install.sh loads the image.
engine=$(scripts/docker-engine.sh env 2>/dev/null | sed -n 's/^export DOCKER_HOST=//p' || true)
in_ns env ${engine:+DOCKER_HOST=$engine} "$work/unpack/$top/install.sh" --prefix "$work/prefix" > "$work/install.log"
[ -x "$work/prefix/bin/hangar" ] || { say "install.sh did not install the binary"; cat "$work/install.log" >&2; exit 1; }
[ -f "$work/prefix/share/hangar/compose/docker-compose.yml" ] || { say "install.sh did not copy the compose file"; exit 1; }
say "unpacked and installed into $work/prefix without network in $(ms "$t") ms ($(grep -c . "$work/install.log") lines of output, image $(grep -q 'Loaded image' "$work/install.log" && echo "loaded into $engine" || echo 'not loaded: no engine'))"

# A damaged bundle is refused before anything is installed.
t=$(date +%s%N)
tar -xzf "$work/hangar-bundle.tar.gz" -C "$work/damaged"
echo "# changed" >> "$work/damaged/$top/compose/docker-compose.yml"
if in_ns "$work/damaged/$top/install.sh" --prefix "$work/damaged-prefix" > "$work/damaged.log" 2>&1; then
    say "install.sh installed from a damaged bundle"; exit 1
fi
[ ! -e "$work/damaged-prefix/bin/hangar" ] || { say "install.sh installed the binary of a damaged bundle"; exit 1; }
grep -q "checksum mismatch" "$work/damaged.log" || { say "unexpected refusal: $(cat "$work/damaged.log")"; exit 1; }
say "a damaged bundle is refused ($(grep -c FAILED "$work/damaged.log") file FAILED) in $(ms "$t") ms"

# The installed binary serves inside the namespace and answers over loopback.
t=$(date +%s%N)
port=3080
# Not through in_ns: a backgrounded shell function is a subshell, whose pid is not the
# server's (stopping it left the server running after the test). ip and env exec, so $! is
# the server itself.
ip netns exec "$ns" env -u ROOT_PASSWORD -u HANGAR_CONFIG ROOT_PASSWORD=Airgap-Passw0rd-1 "$work/prefix/bin/hangar" serve \
    --data-dir "$work/data" --port "$port" --set API_HOST=127.0.0.1 --set ENABLED_MODULES=api,orchestrator \
    > "$work/server.log" 2>&1 < /dev/null &
server=$!
deadline=$(( $(date +%s) + 60 ))
until in_ns "$work/prefix/bin/hangar" health --url "http://127.0.0.1:$port" --timeout 2s >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
        say "the installed server did not answer:"; tail -20 "$work/server.log" >&2; exit 1
    fi
    sleep 0.2
done
say "the installed hangar is live on 127.0.0.1:$port inside $ns after $(ms "$t") ms"
say "air-gapped install test passed in $(ms "$started") ms"
