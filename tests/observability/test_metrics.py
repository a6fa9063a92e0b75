"""Prometheus metrics over HTTP from a real server: names, labels, values."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from collections import defaultdict

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sessiond.server.domain.values import TokenUsage
from sessiond.server.observability import metrics
from sessiond.server.observability.settings import ObservabilitySettings
from sessiond.server.phase2.engines.base import (
    RetryReporter,
    SummaryRequest,
    SummaryResponse,
    no_report,
)
from sessiond.server.phase2.engines.offline import OfflineEngine
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import FailingEngine, GatedEngine, add, wait_task
from tests.conftest import Running, ServerFactory

Samples = dict[str, list[tuple[dict[str, str], float]]]


class RetryOnceEngine(OfflineEngine):
    """Offline, but summarize reports one rate-limited retry first (as the OpenAI
    engine does after a 429)."""

    name = "retry-once-offline"

    async def summarize(self, request: SummaryRequest,
                        report: RetryReporter = no_report) -> SummaryResponse:
        await report(2, 5, "429")
        out = await super().summarize(request, report)
        return dataclasses.replace(out, usage=TokenUsage(prompt_tokens=120, completion_tokens=30))


def observed(**kw: object) -> ObservabilitySettings:
    s = ObservabilitySettings(metrics_address="127.0.0.1:0", metrics_interval_seconds=0.1)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def scrape(server: Running) -> Samples:
    port = server.app.metrics_port
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((dict(s.labels), s.value))
    return out


def local() -> Samples:
    """The registry's samples read in-process (the baseline before a test: metrics
    are process-wide and other tests may have run servers with metrics before)."""
    out: Samples = defaultdict(list)
    for family in metrics.REGISTRY.collect():
        for s in family.samples:
            out[s.name].append((dict(s.labels), s.value))
    return out


def value(samples: Samples, name: str, base: Samples | None = None, **labels: str) -> float:
    def total(src: Samples) -> float:
        return sum(v for lab, v in src.get(name, [])
                   if all(lab.get(k) == x for k, x in labels.items()))

    return total(samples) - (total(base) if base is not None else 0.0)


def test_metrics_are_off_by_default(server: Running) -> None:
    assert server.app.metrics_port == 0
    assert not metrics.enabled()


def test_rpc_phase2_store_and_watch_metrics(server_factory: ServerFactory) -> None:
    base = local()
    srv = server_factory(engine=RetryOnceEngine(), observe=observed())
    srv.sessions.GetSession(session_pb2.GetSessionRequest(session_id="m", auto_create=True))
    for text in ("Hi, my name is Ada.", "I prefer short answers."):
        add(srv.sessions, "m", text)
    with pytest.raises(grpc.RpcError):
        srv.sessions.GetSession(session_pb2.GetSessionRequest(session_id="missing"))
    reply = srv.sessions.Commit(session_pb2.CommitRequest(session_id="m"))
    task = wait_task(srv.tasks, reply.task_id)
    assert task.state == task_pb2.TASK_STATE_COMPLETED
    s = scrape(srv)

    def v(name: str, **labels: str) -> float:
        return value(s, name, base, **labels)

    m = "sessiond.v1.SessionService/AddMessage"
    assert v("sessiond_rpc_duration_seconds_count", method=m, code="OK") == 2
    assert v("sessiond_rpc_duration_seconds_bucket", method=m, code="OK", le="+Inf") == 2
    assert v("sessiond_rpc_duration_seconds_count",
                 method="sessiond.v1.SessionService/GetSession", code="NOT_FOUND") == 1
    assert v("sessiond_rpc_duration_seconds_count",
                 method="sessiond.v1.TaskService/WatchTask", code="OK") >= 1
    assert ({"method": m}, 0.0) in s["sessiond_rpc_in_flight"]

    for stage in ("summarize", "extract", "relations", "active_counts", "index", "finalize"):
        assert v("sessiond_phase2_stage_duration_seconds_count", stage=stage,
                     outcome="ok") == 1, stage
    assert v("sessiond_phase2_tasks_finished_total",
                 outcome="completed") == 1
    engine = "retry-once-offline"
    assert v("sessiond_engine_calls_total", engine=engine, call="summarize",
                 outcome="ok") == 1
    assert v("sessiond_engine_calls_total", engine=engine, call="extract",
                 outcome="ok") == 1
    assert v("sessiond_engine_retries_total", engine=engine, call="summarize",
                 reason="http_429") == 1
    assert v("sessiond_engine_tokens_total", engine=engine,
                 call="summarize", kind="prompt") == 120
    assert v("sessiond_engine_tokens_total", engine=engine,
                 call="summarize", kind="completion") == 30
    assert v("sessiond_store_operation_duration_seconds_count", operation="add_message",
                 outcome="ok") == 2
    assert v("sessiond_store_operation_duration_seconds_count", operation="commit",
                 outcome="ok") == 1
    assert s["sessiond_watchers_active"] == [({}, 0.0)]
    # Only fixed, low-cardinality label names; no ids anywhere.
    allowed = {"method", "code", "stage", "outcome", "engine", "call", "kind", "reason",
               "embedder",
               "operation", "scope", "le"}
    for name, rows in s.items():
        if name.startswith("sessiond_"):
            for labels, _ in rows:
                assert set(labels) <= allowed, (name, labels)
                assert not any(v.startswith(("task_", "msg_", "mem_")) or v == "m"
                               for v in labels.values()), (name, labels)


def scrape_free_counts() -> dict[str, float]:
    """Process-wide counters as they stand before a test (other tests ran before)."""
    return {o: metrics.TASKS_FINISHED.labels(o)._value.get()
            for o in ("completed", "failed", "cancelled")}


def test_queue_watchers_and_failures(server_factory: ServerFactory) -> None:
    before = scrape_free_counts()
    gated = GatedEngine()
    srv = server_factory(engine=gated, observe=observed(), worker_concurrency=1)
    for sid in ("q1", "q2"):
        srv.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid, auto_create=True))
        add(srv.sessions, sid, "hello")
    first = srv.sessions.Commit(session_pb2.CommitRequest(session_id="q1"))
    assert gated.entered.wait(10)
    srv.sessions.Commit(session_pb2.CommitRequest(session_id="q2"))  # waits: 1 worker
    watch = srv.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=first.task_id), timeout=20)
    next(watch)  # the snapshot: the stream is open
    deadline = time.monotonic() + 5
    while True:
        s = scrape(srv)
        depth = value(s, "sessiond_phase2_queue_depth")
        if depth == 1 and value(s, "sessiond_phase2_oldest_pending_age_seconds") > 0:
            break
        assert time.monotonic() < deadline, s.get("sessiond_phase2_queue_depth")
        time.sleep(0.1)
    assert value(s, "sessiond_watchers_active") == 1
    assert value(s, "sessiond_rpc_in_flight", method="sessiond.v1.TaskService/WatchTask") == 1
    gated.release()
    list(watch)

    failing = server_factory(data_dir=srv.app.settings.data_dir.parent / "fail",
                             engine=FailingEngine(), observe=observed())
    failing.sessions.GetSession(session_pb2.GetSessionRequest(session_id="f",
                                                              auto_create=True))
    add(failing.sessions, "f", "hello")
    reply = failing.sessions.Commit(session_pb2.CommitRequest(session_id="f"))
    assert wait_task(failing.tasks, reply.task_id).state == task_pb2.TASK_STATE_FAILED
    s = scrape(failing)
    assert value(s, "sessiond_engine_errors_total", engine="failing-offline", call="extract",
                 reason="LLM_AUTH") == 1
    assert value(s, "sessiond_engine_calls_total", engine="failing-offline", call="extract",
                 outcome="error") == 1
    assert value(s, "sessiond_phase2_stage_duration_seconds_count", stage="extract",
                 outcome="error") >= 1
    assert value(s, "sessiond_phase2_tasks_finished_total", outcome="failed") \
        - before["failed"] == 1


def test_rate_limit_rejection_counter() -> None:
    metrics.enable(True)
    try:
        start = metrics.RATE_LIMITED.labels("account")._value.get()
        metrics.record_rate_limit_rejection("account")
        assert metrics.RATE_LIMITED.labels("account")._value.get() == start + 1
    finally:
        metrics.enable(False)
