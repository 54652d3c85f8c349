"""Operating the bridge: Prometheus metrics and logging (one event per line, secrets masked)."""
