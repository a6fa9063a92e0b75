"""Metrics (Prometheus), tracing (OpenTelemetry, optional) and structured logs.

The domain and services call the small functions here; none of it knows gRPC except
the RPC interceptor in `metrics.py`. Everything is off unless switched on by the
server's flags (`--metrics-address`, `--otel-exporter`, `--log-format json`)."""
