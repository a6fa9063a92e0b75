"""Prometheus metrics, served on `--metrics-address` (off by default).

Labels are low-cardinality only: RPC method names, status codes, stage names,
outcomes, engine names and reason codes. Never ids, never free text.

While metrics are off (`enabled()` is False) the recording functions return at
once and the RPC interceptor and the store timer are not installed, so a server
without `--metrics-address` pays nothing measurable.

`record_rate_limit_rejection(scope)` is for the rate limiter: call it once per call
refused with RESOURCE_EXHAUSTED (`scope` one of a few fixed words, e.g. "account",
"session", "global").
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = [
    "REGISTRY",
    "MetricsInterceptor",
    "TimedStore",
    "embedder_label",
    "embedding_call",
    "enable",
    "enabled",
    "engine_call",
    "reason_label",
    "record_embedding_retry",
    "record_embedding_tokens",
    "record_engine_retry",
    "record_rate_limit_rejection",
    "record_task_finished",
    "serve",
    "set_queue",
    "stage_timer",
    "watcher",
]

T = TypeVar("T")

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0)
_STAGE = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

RPC_DURATION = Histogram(
    "sessiond_rpc_duration_seconds",
    "Server-side RPC latency (streams: until the stream ends), by method and status code",
    ["method", "code"], buckets=_LATENCY, registry=REGISTRY)
RPC_IN_FLIGHT = Gauge("sessiond_rpc_in_flight", "RPCs being handled now, by method",
                      ["method"], registry=REGISTRY)
STAGE_DURATION = Histogram(
    "sessiond_phase2_stage_duration_seconds",
    "Phase 2 stage durations by stage and outcome (ok, error, stopped)",
    ["stage", "outcome"], buckets=_STAGE, registry=REGISTRY)
TASKS_FINISHED = Counter(
    "sessiond_phase2_tasks_finished_total",
    "Phase 2 tasks this process ended, by outcome (completed, failed, cancelled)",
    ["outcome"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("sessiond_phase2_queue_depth",
                    "Phase 2 tasks waiting to start (PENDING), store-wide", registry=REGISTRY)
OLDEST_PENDING = Gauge("sessiond_phase2_oldest_pending_age_seconds",
                       "Age of the oldest PENDING Phase 2 task (0 when none)",
                       registry=REGISTRY)
WATCHERS = Gauge("sessiond_watchers_active", "Open WatchTask streams on this process",
                 registry=REGISTRY)
ENGINE_CALLS = Counter(
    "sessiond_engine_calls_total",
    "Phase 2 engine calls (LLM; 'embed' is reserved for embedding calls) by engine, call "
    "and outcome (ok, error)", ["engine", "call", "outcome"], registry=REGISTRY)
ENGINE_TOKENS = Counter("sessiond_engine_tokens_total",
                        "Tokens the engine reported, by engine, call and kind (prompt, "
                        "completion)", ["engine", "call", "kind"], registry=REGISTRY)
ENGINE_RETRIES = Counter("sessiond_engine_retries_total",
                         "Engine call retries by engine, call and reason",
                         ["engine", "call", "reason"], registry=REGISTRY)
ENGINE_ERRORS = Counter("sessiond_engine_errors_total",
                        "Engine calls that failed for good, by engine, call and reason",
                        ["engine", "call", "reason"], registry=REGISTRY)
EMBED_CALLS = Counter(
    "sessiond_embedding_calls_total",
    "Embedding requests by embedder (openai, local), call (index: Phase 2, query: Recall, "
    "reindex) and outcome (ok, error); retries inside one request are not calls",
    ["embedder", "call", "outcome"], registry=REGISTRY)
EMBED_TEXTS = Counter("sessiond_embedding_texts_total",
                      "Texts sent to the embedder, by embedder and call",
                      ["embedder", "call"], registry=REGISTRY)
EMBED_TOKENS = Counter("sessiond_embedding_tokens_total",
                       "Tokens the embedding endpoint reported (local models report none), "
                       "by embedder", ["embedder"], registry=REGISTRY)
EMBED_RETRIES = Counter("sessiond_embedding_retries_total",
                        "Embedding request retries by embedder and reason",
                        ["embedder", "reason"], registry=REGISTRY)
EMBED_ERRORS = Counter("sessiond_embedding_errors_total",
                       "Embedding requests that failed for good (or timed out), by embedder, "
                       "call and reason", ["embedder", "call", "reason"], registry=REGISTRY)
STORE_DURATION = Histogram(
    "sessiond_store_operation_duration_seconds",
    "Store operation latency by operation and outcome (ok, error)",
    ["operation", "outcome"], buckets=_LATENCY, registry=REGISTRY)
RATE_LIMITED = Counter("sessiond_rate_limit_rejections_total",
                       "Calls refused by a rate limit, by scope", ["scope"],
                       registry=REGISTRY)

_enabled = False


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


def serve(address: str) -> tuple[Any, int]:
    """Start the /metrics HTTP endpoint on `address` ("host:port", port 0 = any) and
    switch recording on; returns (server, port)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"--metrics-address {address!r}: use host:port")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0",
                                        registry=REGISTRY)
    enable(True)
    return server, int(server.server_address[1])


_REASON = re.compile(r"[A-Za-z0-9_]+")


def reason_label(text: str) -> str:
    """A bounded label from a reason text: its first word (an error reason such as
    LLM_RATE_LIMITED, an HTTP status, 'timeout'), at most 32 characters."""
    m = _REASON.search(text)
    if m is None:
        return "other"
    word = m.group(0)[:32]
    return f"http_{word}" if word.isdigit() else word.lower() if not word.isupper() else word


# -- RPCs -------------------------------------------------------------------------------

def _code_name(context: grpc.aio.ServicerContext[Any, Any], failed: bool) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN" if failed else "OK"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Latency, count by code, and in-flight RPCs, for every method. The wrapped
    handler of a method is made once and reused while the inner handler is the same."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler_call_details.method.lstrip("/"), handler)
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(method: str, handler: grpc.RpcMethodHandler[Any, Any]
              ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # sessiond has no client- or bidi-streaming methods


class _Durations:
    """The latency children of one method, one per status code, looked up once."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.by_code: dict[str, Any] = {"OK": RPC_DURATION.labels(method, "OK")}

    def observe(self, context: grpc.aio.ServicerContext[Any, Any], failed: bool,
                seconds: float) -> None:
        code = _code_name(context, failed)
        child = self.by_code.get(code)
        if child is None:
            child = self.by_code[code] = RPC_DURATION.labels(self.method, code)
        child.observe(seconds)


def _unary(method: str, fn: Any) -> Any:
    in_flight = RPC_IN_FLIGHT.labels(method)
    durations = _Durations(method)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        in_flight.inc()
        start = time.perf_counter()
        failed = True
        try:
            reply = await fn(request, context)
            failed = False
            return reply
        finally:
            in_flight.dec()
            durations.observe(context, failed, time.perf_counter() - start)

    return wrapper


def _stream(method: str, fn: Any) -> Any:
    in_flight = RPC_IN_FLIGHT.labels(method)
    durations = _Durations(method)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                      ) -> AsyncIterator[Any]:
        in_flight.inc()
        start = time.perf_counter()
        failed = True
        try:
            result = fn(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result
            failed = False
        finally:
            in_flight.dec()
            durations.observe(context, failed, time.perf_counter() - start)

    return wrapper


# -- Phase 2 ------------------------------------------------------------------------------

class StageTimer:
    """Set `outcome` before leaving (default: 'error' when an exception leaves)."""

    outcome = "ok"


@contextmanager
def stage_timer(stage: str) -> Iterator[StageTimer]:
    timer = StageTimer()
    start = time.perf_counter()
    try:
        yield timer
    except BaseException:
        timer.outcome = "error"
        raise
    finally:
        if _enabled:
            STAGE_DURATION.labels(stage, timer.outcome).observe(time.perf_counter() - start)


def record_task_finished(outcome: str) -> None:
    if _enabled:
        TASKS_FINISHED.labels(outcome).inc()


def set_queue(depth: int, oldest_age_seconds: float) -> None:
    QUEUE_DEPTH.set(depth)
    OLDEST_PENDING.set(max(0.0, oldest_age_seconds))


@contextmanager
def watcher() -> Iterator[None]:
    WATCHERS.inc()
    try:
        yield
    finally:
        WATCHERS.dec()


@contextmanager
def engine_call(engine: str, call: str) -> Iterator[Callable[[int, int], None]]:
    """Around one engine call; the yielded function records its token usage."""

    def tokens(prompt: int, completion: int) -> None:
        if _enabled:
            ENGINE_TOKENS.labels(engine, call, "prompt").inc(max(0, prompt))
            ENGINE_TOKENS.labels(engine, call, "completion").inc(max(0, completion))

    try:
        yield tokens
    except BaseException as exc:
        if _enabled and not isinstance(exc, GeneratorExit):
            reason = getattr(exc, "reason", "") or type(exc).__name__
            ENGINE_CALLS.labels(engine, call, "error").inc()
            ENGINE_ERRORS.labels(engine, call, reason_label(str(reason))).inc()
        raise
    else:
        if _enabled:
            ENGINE_CALLS.labels(engine, call, "ok").inc()


def record_engine_retry(engine: str, call: str, reason: str) -> None:
    if _enabled:
        ENGINE_RETRIES.labels(engine, call, reason_label(reason)).inc()


def embedder_label(model: str) -> str:
    """The embedder's kind from its model name ("openai:text-embedding-3-small" ->
    "openai"): one label value per configured kind, never the model name."""
    return reason_label(model.split(":", 1)[0]).lower()


@contextmanager
def embedding_call(model: str, call: str, texts: int) -> Iterator[None]:
    """Around one embedding request of `texts` texts for `call` (index, query,
    reindex)."""
    embedder = embedder_label(model)
    try:
        yield
    except BaseException as exc:
        if _enabled and not isinstance(exc, GeneratorExit):
            if isinstance(exc, TimeoutError):
                reason = "timeout"
            elif isinstance(exc, asyncio.CancelledError):
                reason = "cancelled"
            else:
                reason = reason_label(str(getattr(exc, "reason", "") or type(exc).__name__))
            EMBED_CALLS.labels(embedder, call, "error").inc()
            EMBED_ERRORS.labels(embedder, call, reason).inc()
        raise
    else:
        if _enabled:
            EMBED_CALLS.labels(embedder, call, "ok").inc()
            EMBED_TEXTS.labels(embedder, call).inc(texts)


def record_embedding_retry(embedder: str, reason: str) -> None:
    if _enabled:
        EMBED_RETRIES.labels(reason_label(embedder).lower(), reason_label(reason)).inc()


def record_embedding_tokens(embedder: str, tokens: int) -> None:
    if _enabled and tokens > 0:
        EMBED_TOKENS.labels(reason_label(embedder).lower()).inc(tokens)


def record_rate_limit_rejection(scope: str) -> None:
    """One call refused by a rate limit (RESOURCE_EXHAUSTED). `scope`: a fixed word."""
    if _enabled:
        RATE_LIMITED.labels(reason_label(scope)).inc()


# -- the store ----------------------------------------------------------------------------

class TimedStore:
    """A proxy of a Store that times each of its coroutine methods (label: the
    method's name, a fixed set). Everything else passes through unchanged."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._timed: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        timed = self._timed.get(name)
        if timed is not None:
            return timed
        attr = getattr(self._inner, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr):
            return attr
        timed = self._timed[name] = _timed(name, attr)
        return timed


def _timed(name: str, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    ok = STORE_DURATION.labels(name, "ok")
    error = STORE_DURATION.labels(name, "error")

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        try:
            result = await fn(*args, **kwargs)
        except BaseException:
            error.observe(time.perf_counter() - start)
            raise
        ok.observe(time.perf_counter() - start)
        return result

    return wrapper
