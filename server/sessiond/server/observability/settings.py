"""Settings and `sessiond serve` flags for metrics, tracing and log lines."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

EXPORTERS = ("none", "otlp", "console")
LOG_FORMATS = ("text", "json")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SESSIOND_{name}", default)


@dataclass
class ObservabilitySettings:
    # "host:port" of the Prometheus /metrics endpoint; "" = off.
    metrics_address: str = ""
    # How often the queue gauges (depth, oldest pending age) are read from the store.
    metrics_interval_seconds: float = 5.0
    # OpenTelemetry tracing: none (off), otlp (OTLP/gRPC to otel_endpoint, or the
    # OTEL_EXPORTER_OTLP_* environment), console (spans on stdout, for debugging).
    otel_exporter: str = "none"
    otel_endpoint: str = ""
    otel_service_name: str = "sessiond"
    log_format: str = "text"  # text | json

    @classmethod
    def from_env(cls) -> ObservabilitySettings:
        s = cls()
        s.metrics_address = _env("METRICS_ADDRESS", s.metrics_address)
        s.otel_exporter = _env("OTEL_EXPORTER", s.otel_exporter)
        s.otel_endpoint = _env("OTEL_ENDPOINT", s.otel_endpoint)
        s.otel_service_name = _env("OTEL_SERVICE_NAME", s.otel_service_name)
        s.log_format = _env("LOG_FORMAT", s.log_format)
        return s

    def validate(self) -> None:
        if self.otel_exporter not in EXPORTERS:
            raise ValueError(f"--otel-exporter {self.otel_exporter!r}: use one of "
                             f"{', '.join(EXPORTERS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format {self.log_format!r}: use text or json")
        if self.metrics_interval_seconds <= 0:
            raise ValueError("--metrics-interval must be more than 0")


def add_observability_flags(p: argparse.ArgumentParser, env: ObservabilitySettings) -> None:
    g = p.add_argument_group("metrics, tracing and logs (see docs/deployment.md)")
    g.add_argument("--metrics-address", default=env.metrics_address,
                   help="serve Prometheus metrics on host:port (/metrics); off when empty "
                        "[SESSIOND_METRICS_ADDRESS]")
    g.add_argument("--metrics-interval", type=float, default=env.metrics_interval_seconds,
                   help="seconds between reads of the queue gauges")
    g.add_argument("--otel-exporter", choices=EXPORTERS, default=env.otel_exporter,
                   help="OpenTelemetry tracing (needs the 'otel' extra) "
                        "[SESSIOND_OTEL_EXPORTER]")
    g.add_argument("--otel-endpoint", default=env.otel_endpoint,
                   help="OTLP/gRPC collector endpoint (else OTEL_EXPORTER_OTLP_ENDPOINT)")
    g.add_argument("--otel-service-name", default=env.otel_service_name,
                   help="service.name of the spans")
    g.add_argument("--log-format", choices=LOG_FORMATS, default=env.log_format,
                   help="json: one JSON object per log line, with task/session/trace ids "
                        "[SESSIOND_LOG_FORMAT]")


def apply_observability_flags(ns: argparse.Namespace, s: ObservabilitySettings) -> None:
    s.metrics_address, s.metrics_interval_seconds = ns.metrics_address, ns.metrics_interval
    s.otel_exporter, s.otel_endpoint = ns.otel_exporter, ns.otel_endpoint
    s.otel_service_name, s.log_format = ns.otel_service_name, ns.log_format
