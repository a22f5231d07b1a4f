#!/usr/bin/env bash
# Render the Helm chart deploy/helm/hangar and validate every object it renders, offline.
# Helm itself is not a Debian package: the chart is rendered by Helm's own Go SDK as the
# PyPI package helm-python-sdk ships it (libhelm_c, Helm v4), and validated against the
# Kubernetes JSON schemas that the PyPI package kubernetes-validate ships. Both are installed
# by name into a virtualenv under $HANGAR_CACHE. Then the Deployment's container is run with
# the hangar binary of this tree on loopback. What is checked: scripts/check-helm.py.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${HANGAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hangar}"
VENV="$CACHE/helm-check-venv"
say() { echo "check-helm.sh: $*" >&2; }

if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    say "installing python3-venv"
    if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
fi
started=$(date +%s%N)
# Pinned: a new renderer or new schemas change what passes only when this line changes.
PACKAGES=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)
if ! "$VENV/bin/python" -c 'import helm_python, kubernetes_validate' 2>/dev/null \
    || [ "$(cat "$VENV/.packages" 2>/dev/null)" != "${PACKAGES[*]}" ]; then
    say "installing ${PACKAGES[*]} into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}"
    echo "${PACKAGES[*]}" > "$VENV/.packages"
fi
# The pod's container is run with the binary of this tree (HANGAR_CHECK_HELM_POD=0: render only).
args=()
if [ "${HANGAR_CHECK_HELM_POD:-1}" != 0 ] && command -v cargo >/dev/null; then
    built=$(date +%s%N)
    cargo build -q -p hangar --locked
    started=$(( started + $(date +%s%N) - built ))
    args=(--binary "${CARGO_TARGET_DIR:-target}/debug/hangar")
fi
"$VENV/bin/python" scripts/check-helm.py "${args[@]}"
ms=$(( ($(date +%s%N) - started) / 1000000 ))
say "chart checked in $((ms / 1000)).$(printf '%03d' $((ms % 1000))) s (tools installed when missing, not the cargo build)"
