#!/usr/bin/env bash
# Placement p50/p99 at 5,000 simulated hosts on the JSON engine, PostgreSQL and MariaDB in
# the same run (crates/hangar-store-sql/benches/placement_engines.rs): on the SQL engines
# each placement commits its cross-replica hold, as a replica does; also creates through
# the scheduler one at a time and 16 at once. Starts the test servers
# (scripts/test-services.sh: Debian packages, private instances on loopback) unless they
# run. `bench/placement-engines.sh quick` places fewer times.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-services.sh start >/dev/null
eval "$(scripts/test-services.sh env)"
cargo bench --locked -p hangar-store-sql --bench placement_engines -- "$@"
