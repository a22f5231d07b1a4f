#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine or a developer's:
#   1. installs by package name what the tests need (QEMU, openssl, the test services),
#   2. builds the small QEMU test guest (cached under $HANGAR_CACHE/guest),
#   3. starts the S3 (moto), Azure Blob (Azurite) and Artifactory-like (nginx DAV) servers
#      on 127.0.0.1,
#   4. runs every test of the workspace,
#   5. stops the servers and fails on any process the tests left running, also when a
#      test fails (scripts/orphans.sh).
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p hangar`).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${HANGAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hangar}"
mkdir -p "$CACHE"
started=$(date +%s)
say() { echo "test.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else say "need root for: $*"; exit 1; fi
}

# Host packages the tests use directly. QEMU itself is installed by
# scripts/build-guest-image.sh, which knows how to pair qemu-utils with the system emulator.
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3 python3-venv)
command -v npm >/dev/null || need+=(npm)
command -v ip >/dev/null || need+=(iproute2)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
# tests/metrics.rs parses /metrics with the Prometheus project's parser (scripts/parse-metrics.py).
/usr/bin/python3 -c 'import prometheus_client' 2>/dev/null || need+=(python3-prometheus-client)
command -v systemd-analyze >/dev/null || need+=(systemd) # tests/service.rs verifies the unit
[ -x /usr/bin/chromium ] || need+=(chromium) # tests/browser drives Debian's Chromium
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The fleet test (crates/hangar/tests/fleet.rs) puts QEMU guests on the bridge hgvmbr0
# inside a network namespace; qemu-bridge-helper attaches only to bridges allowed here.
as_root mkdir -p /etc/qemu
grep -qx 'allow hgvmbr0' /etc/qemu/bridge.conf 2>/dev/null || echo 'allow hgvmbr0' | as_root tee -a /etc/qemu/bridge.conf >/dev/null

say "test guest image"
scripts/build-guest-image.sh "$CACHE/guest"
export HANGAR_GUEST_IMAGE_DIR="$CACHE/guest"

say "test services"
scripts/test-services.sh start >/dev/null
# Every temp folder of the tests lives under one folder per run (TMPDIR for cargo test), so
# at the end, also after a failure, scripts/orphans.sh finds exactly what they left running.
HANGAR_TEST_TMP=$(mktemp -d "${TMPDIR:-/tmp}/hangar-test.XXXXXX")
export HANGAR_TEST_TMP
finish() {
    local rc=$?
    scripts/test-services.sh stop >/dev/null 2>&1 || true
    scripts/orphans.sh || { say "processes outlived the tests (listed above, now stopped)"; rc=1; }
    rm -rf "$HANGAR_TEST_TMP"
    exit "$rc"
}
trap finish EXIT
eval "$(scripts/test-services.sh env)"

# The web console's files, so the hangar that cargo test builds embeds them.
say "web console (scripts/build-console.sh)"
scripts/build-console.sh

# crates/hangar/tests/oidc.rs and tests/browser: the OpenID provider (oidc-provider from npm,
# pinned by tests/oidc/package-lock.json).
say "OpenID provider (tests/oidc)"
(cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error)

# tests/runners_github.rs: GitHub's REST description served by Prism, its webhook examples
# and schemas (tests/github, pinned by its package-lock.json).
say "GitHub contract packages (tests/github)"
(cd tests/github && npm ci --no-audit --no-fund --loglevel=error)

say "cargo test"
# The catalog's acceptance image is 512 MiB (random, compressible and zero regions).
export HANGAR_TEST_BIG_IMAGE="${HANGAR_TEST_BIG_IMAGE:-1}"
TMPDIR="$HANGAR_TEST_TMP" cargo test --workspace --locked "$@"

# The web console in Chromium against the hangar just built (tests/browser; screenshots in
# $HANGAR_ARTIFACTS_DIR/console, default target/artifacts/console).
say "browser tests (tests/browser)"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error && TMPDIR="$HANGAR_TEST_TMP" npm test --silent)

# The Helm chart rendered and validated offline, and its container run with the binary just
# built, one pod on the JSON engine and two on one PostgreSQL database of the test services.
say "helm chart (scripts/check-helm.sh)"
scripts/check-helm.sh

# The static binary, the image with the real engine, the Compose proof of concept and the
# air-gapped bundle in a no-route namespace (HANGAR_DEPLOY_TESTS=0 skips them).
say "deployment checks (scripts/deploy-test.sh)"
scripts/deploy-test.sh
say "all tests passed in $(( $(date +%s) - started )) s"
