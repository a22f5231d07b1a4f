#!/usr/bin/python3
"""Parse a /metrics exposition (OpenMetrics 1.0 text) from stdin with the Prometheus
project's own parser (Debian's python3-prometheus-client, which scripts/test.sh installs)
and print it as JSON: {"families": [{"name", "type", "unit", "samples": [{"name",
"labels", "value"}]}]}. A text the parser refuses exits 1 with its message on stderr.
Used by crates/hangar/tests/metrics.rs."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

try:
    families = [
        {
            "name": f.name,
            "type": f.type,
            "unit": f.unit,
            "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples],
        }
        for f in text_string_to_metric_families(sys.stdin.read())
    ]
except Exception as e:  # the parser raises ValueError and friends on a bad text
    print(f"not a valid OpenMetrics exposition: {e}", file=sys.stderr)
    sys.exit(1)
json.dump({"families": families}, sys.stdout)
