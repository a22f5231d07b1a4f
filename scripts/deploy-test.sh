#!/usr/bin/env bash
# The deployment checks of .ci/run (called by scripts/test.sh after `cargo test`), each
# step timed:
#   1. the static binary (scripts/build-static.sh: one compile of the `hangar` crate over
#      the dependencies `cargo test` built),
#   2. the image with the real engine (scripts/docker-image.sh --check --save: Debian's
#      docker.io with its own data root; the HEALTHCHECK must say healthy),
#   3. the Compose proof of concept (scripts/compose-poc.sh test: a VM created through it),
#   4. the air-gapped install from `hangar bundle` in a namespace with no route
#      (scripts/airgap-test.sh).
# HANGAR_DEPLOY_TESTS=0 skips them all (they run by default, in CI too); HANGAR_STATIC_BIN
# gives a static binary already built (step 1 is then skipped). Needs root (the engine,
# QEMU, network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "deploy-test.sh: $*" >&2; }
if [ "${HANGAR_DEPLOY_TESTS:-1}" = 0 ]; then
    say "skipped (HANGAR_DEPLOY_TESTS=0)"
    exit 0
fi
[ "$(id -u)" = 0 ] || { say "needs root (dockerd, network namespaces); run as root or set HANGAR_DEPLOY_TESTS=0"; exit 1; }
started=$(date +%s)
step() {
    local name=$1 t0
    shift
    t0=$(date +%s%N)
    "$@"
    say "$name: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
}

work=$(mktemp -d /tmp/hangar-deploy.XXXXXX)
engine_started=0
cleanup() {
    rm -rf "$work"
    [ "$engine_started" = 0 ] || scripts/docker-engine.sh stop
}
trap cleanup EXIT

if [ -n "${HANGAR_STATIC_BIN:-}" ]; then
    bin=$HANGAR_STATIC_BIN
    say "static binary: $bin (HANGAR_STATIC_BIN)"
else
    step "static binary" sh -c "scripts/build-static.sh --profile debug > '$work/bin-path'"
    bin=$(cat "$work/bin-path")
fi
if ! scripts/docker-engine.sh env >/dev/null 2>&1; then
    step "docker engine start" scripts/docker-engine.sh start
    engine_started=1
fi
eval "$(scripts/docker-engine.sh env)"
step "image (build, HEALTHCHECK healthy, save)" scripts/docker-image.sh --binary "$bin" --check --save "$work/image.tar"
step "compose proof of concept (up, VM running, down)" env HANGAR_BIN="$bin" scripts/compose-poc.sh test
step "air-gapped bundle install in a no-route namespace" scripts/airgap-test.sh --binary "$bin" --image "$work/image.tar"
say "all deployment checks passed in $(( $(date +%s) - started )) s"
