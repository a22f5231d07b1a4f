#!/usr/bin/env bash
# Boot and clone benchmark of the QEMU driver (crates/hangar-qemu/benches/qemu_boot.rs).
# Needs the test guest: scripts/build-guest-image.sh DIR, then HANGAR_GUEST_IMAGE_DIR=DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${HANGAR_GUEST_IMAGE_DIR:=/tmp/hangar-guest}"
export HANGAR_GUEST_IMAGE_DIR
scripts/build-guest-image.sh "$HANGAR_GUEST_IMAGE_DIR"
exec cargo bench -p hangar-qemu --bench qemu_boot
