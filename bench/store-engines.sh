#!/usr/bin/env bash
# Durable commits/s and p50/p99 commit latency at 10,000 records, 1 and 16 writers, on the
# JSON engine, PostgreSQL and MariaDB in the same run (crates/hangar-store-sql/benches/
# store_engines.rs). Starts the test servers (scripts/test-services.sh: Debian packages,
# private instances on loopback, data on the same disk as the JSON store) unless they run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-services.sh start >/dev/null
eval "$(scripts/test-services.sh env)"
cargo bench --locked -p hangar-store-sql --bench store_engines
