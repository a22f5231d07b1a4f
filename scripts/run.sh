#!/usr/bin/env bash
# Build Hangar and start its main job on the embedded defaults: `hangar serve` with the
# JSON store in the default data folder, the API on port 3080. The first start prints the
# generated root password once. Arguments go to `hangar serve` (e.g. --port 8080).
# On a Linux host it also builds the small QEMU test guest (from Debian packages, cached)
# and offers it as the local image `test-guest`, so the quick start can boot a VM.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p hangar
CACHE="${HANGAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hangar}"
if [ "$(uname -s)" = Linux ] && [ "${HANGAR_SKIP_GUEST:-}" != 1 ]; then
    scripts/build-guest-image.sh "$CACHE/guest"
    export HOST_IMAGES_FOLDER="${HOST_IMAGES_FOLDER:-$CACHE/images}"
    mkdir -p "$HOST_IMAGES_FOLDER"
    ln -sfn "$CACHE/guest" "$HOST_IMAGES_FOLDER/test-guest"
fi
exec ./target/release/hangar serve "$@"
