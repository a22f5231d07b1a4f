#!/usr/bin/env bash
# Builds the Hangar image (deploy/docker/Dockerfile, FROM scratch) from a binary cargo
# already built on this machine: no Rust toolchain image, no pull.
#
#   scripts/docker-image.sh [--binary FILE] [--profile debug|release] [--tag NAME]
#                           [--save FILE] [--check] [--no-strip]
#
#   --binary FILE   the static binary to ship (default: scripts/build-static.sh --profile P)
#   --tag NAME      image name (default hangar:local)
#   --save FILE     also write the image as a `docker save` archive (for `hangar bundle`)
#   --check         run the image on the host network and wait for its HEALTHCHECK to say
#                   healthy (and `hangar health` from outside), then remove the container
#   --no-strip      ship the binary with its debug sections (default: `strip --strip-debug`
#                   on the copy in the context; function names stay for backtraces)
# The engine: scripts/docker-engine.sh (the one DOCKER_HOST names, or Debian's docker.io
# started with its own data root and no bridge); an engine this script started is stopped
# at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

binary="" profile=debug tag=hangar:local save="" check=0 strip=1
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --profile) profile=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --save) save=$2; shift 2 ;;
        --check) check=1; shift ;;
        --no-strip) strip=0; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "docker-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
say() { echo "docker-image.sh: $*" >&2; }
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) say "no image architecture for $(uname -m)"; exit 1 ;;
esac
if [ -z "$binary" ]; then
    t=$(date +%s%N)
    binary=$(scripts/build-static.sh --profile "$profile")
    say "static binary $binary in $(ms "$t") ms"
fi
[ -x "$binary" ] || { say "$binary is not an executable"; exit 1; }
case "$(file -b "$binary")" in
    *"statically linked"*|*"static-pie linked"*) ;;
    *) say "$binary is not static ($(file -b "$binary")); build one with scripts/build-static.sh"; exit 1 ;;
esac
ca=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca" ] || { say "no CA roots at $ca (Debian's ca-certificates package)"; exit 1; }

started_engine=0
if engine=$(scripts/docker-engine.sh env 2>/dev/null); then
    eval "$engine"
else
    scripts/docker-engine.sh start
    started_engine=1
    eval "$(scripts/docker-engine.sh env)"
fi
ctx=$(mktemp -d /tmp/hangar-image.XXXXXX)
container=""
cleanup() {
    [ -z "$container" ] || docker rm -f -v "$container" >/dev/null 2>&1 || true
    rm -rf "$ctx"
    [ "$started_engine" = 0 ] || scripts/docker-engine.sh stop
}
trap cleanup EXIT

# The context: see the comment at the top of the Dockerfile.
t=$(date +%s%N)
mkdir -p "$ctx/bin/$arch" "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/tmp" "$ctx/data"
chmod 1777 "$ctx/rootfs/tmp"
if [ "$strip" = 1 ]; then
    strip --strip-debug -o "$ctx/bin/$arch/hangar" "$binary"
else
    cp "$binary" "$ctx/bin/$arch/hangar"
fi
chmod 0755 "$ctx/bin/$arch/hangar"
cp "$ca" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nhangar:x:10001:10001:Hangar:/data:/sbin/nologin\n' > "$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nhangar:x:10001:\n' > "$ctx/rootfs/etc/group"
cp deploy/docker/Dockerfile "$ctx/Dockerfile"
version=$("$binary" --version | awk '{print $2}')
say "context ($(du -sh "$ctx" | cut -f1)) in $(ms "$t") ms"

t=$(date +%s%N)
DOCKER_BUILDKIT=0 docker build -q --build-arg "TARGETARCH=$arch" --build-arg "VERSION=$version" -t "$tag" "$ctx" >/dev/null
say "built $tag ($(docker image inspect "$tag" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')) in $(ms "$t") ms"

if [ -n "$save" ]; then
    t=$(date +%s%N)
    docker save -o "$save" "$tag"
    say "saved $tag to $save ($(du -h "$save" | cut -f1)) in $(ms "$t") ms"
fi

if [ "$check" = 1 ]; then
    t=$(date +%s%N)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    container=hangar-image-check-$$
    docker run -d --name "$container" --network host --health-interval 1s --health-start-period 1s \
        -e API_HOST=127.0.0.1 -e "API_PORT=$port" -e ENABLED_MODULES=api,orchestrator,catalog \
        "$tag" >/dev/null
    deadline=$(( $(date +%s) + 60 ))
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ]; do
        if [ "$(docker inspect -f '{{.State.Running}}' "$container")" != true ] || [ "$(date +%s)" -ge "$deadline" ]; then
            say "the container did not become healthy:"; docker logs "$container" 2>&1 | tail -20 >&2
            docker inspect -f '{{json .State.Health}}' "$container" >&2; exit 1
        fi
        sleep 0.2
    done
    user=$(docker inspect -f '{{.Config.User}}' "$container")
    "$binary" health --url "http://127.0.0.1:$port" >/dev/null
    say "the image runs as $user and its HEALTHCHECK says healthy after $(ms "$t") ms"
fi
echo "$tag"
