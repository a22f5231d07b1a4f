#!/usr/bin/env bash
# Builds the web console (console/, Preact + Vite) into console/dist, which the next cargo
# build of hangar embeds (crates/hangar-console). Needs Node.js >= 20.19 and npm; installs
# npm from Debian when it is missing. The Rust build works without this: the binary then
# serves a page saying the console is not built.
set -euo pipefail
cd "$(dirname "$0")/../console"
if ! command -v npm >/dev/null; then
    echo "build-console.sh: installing npm" >&2
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
npm ci --no-audit --no-fund --loglevel=error
npm run build --silent
echo "build-console.sh: built $(pwd)/dist ($(find dist -type f | wc -l) files); rebuild hangar to embed it" >&2
