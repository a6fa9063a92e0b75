"""OpenTelemetry tracing with the SDK's in-memory exporter: a Commit's trace holds its
Phase 2 (every stage and engine call), also when the task runs in another server
process life after a restart (the context is stored with the task)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from sessiond.server.observability import tracing
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import FailingEngine, GatedEngine, add, wait_task
from tests.conftest import ServerFactory
from tests.observability.spans import ids, named, one, parent_id, recording

STAGES = ("summarize", "extract", "relations", "active_counts", "index", "finalize")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recording() as exporter:
        yield exporter


def test_phase2_joins_the_commit_trace_across_a_restart(
        server_factory: ServerFactory, spans: InMemorySpanExporter, tmp_path: Path) -> None:
    data = tmp_path / "data"
    gated = GatedEngine()
    first = server_factory(data_dir=data, engine=gated)
    first.sessions.GetSession(session_pb2.GetSessionRequest(session_id="t", auto_create=True))
    add(first.sessions, "t", "Hi, my name is Ada. I prefer short answers.")
    reply = first.sessions.Commit(session_pb2.CommitRequest(session_id="t"))
    assert gated.entered.wait(10)  # Phase 2 is inside summarize
    first.loop.run(first.app.stop(0.2))  # stops mid-stage: resumed on the next start
    first.app._stopped_by_test = True  # type: ignore[attr-defined]

    second = server_factory(data_dir=data)  # a new process life, the offline engine
    task = wait_task(second.tasks, reply.task_id)
    assert task.state == task_pb2.TASK_STATE_COMPLETED and task.attempts == 2
    stored = second.loop.run(second.app.store.get_task(reply.task_id))
    assert stored is not None and "traceparent" in json.loads(stored.trace_context)

    got = spans.get_finished_spans()
    commit = one(got, "/sessiond.v1.SessionService/Commit")
    trace_id, commit_span = ids(commit)
    runs = named(got, "phase2 session_commit")
    assert len(runs) == 2  # the interrupted attempt and the one after the restart
    for run in runs:
        assert ids(run)[0] == trace_id and parent_id(run) == commit_span
    interrupted, resumed = sorted(runs, key=lambda s: s.start_time or 0)
    assert interrupted.status.status_code is StatusCode.ERROR
    assert interrupted.attributes is not None and interrupted.attributes["sessiond.attempt"] == 1
    assert resumed.attributes is not None and resumed.attributes["sessiond.attempt"] == 2
    assert resumed.status.status_code is not StatusCode.ERROR
    for stage in STAGES:
        done = [s for s in named(got, f"stage {stage}") if parent_id(s) == ids(resumed)[1]]
        assert len(done) == 1, stage
        assert ids(done[0])[0] == trace_id
    summarize = next(s for s in named(got, "stage summarize")
                     if parent_id(s) == ids(resumed)[1])
    engine = one([s for s in got if s.parent is not None
                  and parent_id(s) == ids(summarize)[1]], "engine summarize")
    assert engine.attributes is not None and engine.attributes["sessiond.engine"] == "offline"
    # The last span of the trace to end is the resumed run, right after its finalize.
    last = max((s for s in got if ids(s)[0] == trace_id), key=lambda s: s.end_time or 0)
    assert ids(last) == ids(resumed)


def test_failed_stage_span_has_the_reason_but_no_secret(
        server_factory: ServerFactory, spans: InMemorySpanExporter) -> None:
    srv = server_factory(engine=FailingEngine())
    srv.sessions.GetSession(session_pb2.GetSessionRequest(session_id="f", auto_create=True))
    add(srv.sessions, "f", "hello")
    reply = srv.sessions.Commit(session_pb2.CommitRequest(session_id="f"))
    assert wait_task(srv.tasks, reply.task_id).state == task_pb2.TASK_STATE_FAILED
    got = spans.get_finished_spans()
    extract = one(got, "stage extract")
    assert extract.status.status_code is StatusCode.ERROR
    assert extract.status.description == "LLM_AUTH"
    for s in got:
        dump = s.to_json()
        assert "sk-live-abcdef1234567890" not in dump and "abc.def.ghi" not in dump


def test_tracing_off_stores_no_context(server_factory: ServerFactory) -> None:
    assert not tracing.enabled()
    srv = server_factory()
    srv.sessions.GetSession(session_pb2.GetSessionRequest(session_id="n", auto_create=True))
    add(srv.sessions, "n", "hello")
    reply = srv.sessions.Commit(session_pb2.CommitRequest(session_id="n"))
    wait_task(srv.tasks, reply.task_id)
    stored = srv.loop.run(srv.app.store.get_task(reply.task_id))
    assert stored is not None and stored.trace_context == ""
