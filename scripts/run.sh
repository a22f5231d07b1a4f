#!/usr/bin/env bash
# Build Hangar and start its main job on the embedded defaults: `hangar serve` with the
# JSON store in the default data folder, the API on port 3080. The first start prints the
# generated root password once. Arguments go to `hangar serve` (e.g. --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p hangar
exec ./target/release/hangar serve "$@"
