#!/usr/bin/env bash
# Image push/pull throughput against moto (S3), Azurite and the DAV server on loopback, beside plain
# PUT/GET of the same bytes and a cp of the unpacked image.
# Usage: bench/image-throughput.sh [image MiB] [concurrency]
# Starts the test services if needed (scripts/test-services.sh) and leaves
# them running; stop them with `scripts/test-services.sh stop`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HANGAR_BENCH_IMAGE_MIB="${1:-${HANGAR_BENCH_IMAGE_MIB:-256}}"
export HANGAR_BENCH_CONCURRENCY="${2:-${HANGAR_BENCH_CONCURRENCY:-8}}"
eval "$(scripts/test-services.sh start)"
cargo bench -p hangar-image --bench image_throughput
