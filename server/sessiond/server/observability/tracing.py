"""OpenTelemetry tracing (optional: the `otel` extra; off unless `--otel-exporter`).

* Every RPC is a server span (opentelemetry-instrumentation-grpc's interceptor).
* Commit stores the trace context of its RPC span with the task (`carrier()` ->
  `tasks.trace_context`). Phase 2 starts its `phase2` span from that stored context
  (`task_span`), so its stages (`stage <name>`), engine calls (`engine <call>`) and
  each LLM request (`llm chat.completions`) are spans of the Commit's trace, whichever
  replica runs the task and however many restarts happen in between.
* Retries are span events with their (sanitized) reason.

Without the extra installed, or with tracing off, every function here is a no-op
(`carrier()` returns ""), and nothing imports opentelemetry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sessiond.server.version import version

if TYPE_CHECKING:
    from sessiond.server.domain.values import Task
    from sessiond.server.observability.settings import ObservabilitySettings

__all__ = [
    "add_event",
    "carrier",
    "configure",
    "current_ids",
    "disable",
    "enabled",
    "server_interceptors",
    "set_attributes",
    "shutdown",
    "span",
    "task_span",
    "use_provider",
]

log = logging.getLogger(__name__)

Attributes = Mapping[str, str | int | float | bool]

_provider: Any = None
_tracer: Any = None
_owned = False  # configure() made the provider: shutdown() flushes and closes it


def enabled() -> bool:
    return _tracer is not None


def configure(settings: ObservabilitySettings) -> bool:
    """Set up tracing from the settings; False when it is off."""
    if settings.otel_exporter == "none":
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ValueError("--otel-exporter needs the otel extra: pip install "
                         "'sessiond[otel]'") from None
    provider = TracerProvider(resource=Resource.create({
        "service.name": settings.otel_service_name, "service.version": version()}))
    if settings.otel_exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )
        except ImportError:
            raise ValueError("--otel-exporter otlp needs opentelemetry-exporter-otlp: pip "
                             "install 'sessiond[otel]'") from None
        exporter: Any = OTLPSpanExporter(endpoint=settings.otel_endpoint or None)
    else:
        exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use_provider(provider, owned=True)
    return True


def use_provider(provider: Any, owned: bool = False) -> None:
    """Trace with this TracerProvider (tests pass one with an in-memory exporter)."""
    global _provider, _tracer, _owned
    _provider, _owned = provider, owned
    _tracer = provider.get_tracer("sessiond", version())


def disable() -> None:
    global _provider, _tracer, _owned
    _provider, _tracer, _owned = None, None, False


def shutdown() -> None:
    """Flush and close a provider `configure` made (no-op for one given by a caller)."""
    if _owned and _provider is not None:
        try:
            _provider.shutdown()
        except Exception as exc:  # exporting must never break a shutdown
            log.warning("closing the trace exporter failed: %s", exc)
        disable()


def server_interceptors() -> list[Any]:
    """The gRPC server interceptor that makes a span of every RPC ([] when off)."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider)]  # type: ignore[no-untyped-call]


def carrier() -> str:
    """The current trace context as a JSON W3C carrier ("" when off or no span)."""
    if not enabled():
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    out: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(out)
    return json.dumps(out, separators=(",", ":"), sort_keys=True) if out else ""


def _context_of(stored: str) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    try:
        data = json.loads(stored) if stored else {}
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return TraceContextTextMapPropagator().extract({str(k): str(v) for k, v in data.items()})


@contextmanager
def task_span(task: Task) -> Iterator[None]:
    """The `phase2` span of one run of a task, a child of its Commit's span."""
    if not enabled():
        yield
        return
    attrs: dict[str, Any] = {"sessiond.task_id": task.task_id,
                             "sessiond.session_id": task.session_id,
                             "sessiond.archive_index": task.archive_index,
                             "sessiond.attempt": task.attempts,
                             "sessiond.resumed_after": task.done_stage.value}
    with _tracer.start_as_current_span(f"phase2 {task.task_type}",
                                       context=_context_of(task.trace_context),
                                       attributes=attrs, record_exception=False,
                                       set_status_on_exception=False) as current:
        with _error_status(current):
            yield


@contextmanager
def span(name: str, attributes: Attributes | None = None) -> Iterator[None]:
    """A child span of the current one (no-op when off)."""
    if not enabled():
        yield
        return
    with _tracer.start_as_current_span(name, attributes=dict(attributes or {}),
                                       record_exception=False,
                                       set_status_on_exception=False) as current:
        with _error_status(current):
            yield


@contextmanager
def _error_status(current: Any) -> Iterator[None]:
    """An exception leaving a span sets its status to ERROR with the error's reason
    code (e.g. LLM_RATE_LIMITED) only: exception texts may quote an upstream's reply,
    and spans leave the process, so they get no message and no traceback."""
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):
            from opentelemetry.trace import Status, StatusCode

            reason = str(getattr(exc, "reason", "") or type(exc).__name__)[:64]
            current.set_status(Status(StatusCode.ERROR, reason))
            current.set_attribute("error.type", type(exc).__name__)
        raise


def add_event(name: str, attributes: Attributes | None = None) -> None:
    if not enabled():
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, dict(attributes or {}))


def set_attributes(attributes: Attributes) -> None:
    if not enabled():
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(dict(attributes))


def current_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span as hex, ("", "") when none."""
    if not enabled():
        return "", ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
