"""RetryTask and the automatic retry over a real server on both backends, with
`OpenAIEngine` against the fake model server: an outage (500s) ends Phase 2 FAILED in
extract; a retry runs again from extract, keeps the summary (not asked again, its
tokens counted once) and completes; the journal goes on and resuming by seq works."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sessiond.client import watch_task
from sessiond.server.store.base import Store
from sessiond.server.store.postgres.store import PostgresStore
from sessiond.v1 import session_pb2, task_pb2

from tests.conftest import Running, ServerFactory
from tests.llm.conftest import EngineFactory, commit, say, watch
from tests.llm.fake_openai import FakeLLM, Reply
from tests.pg import temporary_database

K = task_pb2
OUTAGE = [Reply(500, error="boom"), Reply(500, error="boom")]  # max_retries=1: 2 attempts


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def start(request: pytest.FixtureRequest, server_factory: ServerFactory,
          make_engine: EngineFactory, tmp_path: Path) -> Iterator[Any]:
    """Start a server on the backend under test with the fake model server engine."""
    with (temporary_database("sessiond_retry") if request.param == "postgres"
          else _no_database()) as url:
        def make(**overrides: Any) -> Running:
            store: Store | None = (PostgresStore(url, min_size=1, max_size=4) if url
                                   else None)
            return server_factory(engine=make_engine(max_retries=1), store=store,
                                  data_dir=tmp_path / "data", **overrides)

        yield make


class _no_database:
    def __enter__(self) -> str:
        return ""

    def __exit__(self, *exc: object) -> None:
        return None


def failed_in_extract(running: Running, fake: FakeLLM, sid: str = "s1") -> str:
    fake.push("extract", *OUTAGE)
    running.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=sid))
    say(running, sid, "Hello, my name is Ada and I prefer short answers.")
    say(running, sid, "Noted, Ada.", session_pb2.ROLE_ASSISTANT)
    task_id = commit(running, sid)
    w = watch(running, task_id)
    assert w.last.kind == K.TASK_EVENT_KIND_FAILED and w.last.stage == "extract", w.events
    return task_id


def reason_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for d in status.details:
        info = error_details_pb2.ErrorInfo()
        if d.Unpack(info):
            return str(info.reason)
    raise AssertionError("no ErrorInfo")


def test_retry_after_an_llm_outage_completes_with_the_summary_kept(
        start: Any, fake_llm: FakeLLM) -> None:
    running: Running = start()
    task_id = failed_in_extract(running, fake_llm)
    failed = running.tasks.GetTask(K.GetTaskRequest(task_id=task_id))
    assert failed.state == K.TASK_STATE_FAILED and failed.error.code == 14
    arch = running.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="s1", index=1))
    assert arch.state == session_pb2.ARCHIVE_STATE_PENDING and arch.overview
    overview = arch.overview

    req = K.RetryTaskRequest(task_id=task_id, request_id="retry-1")
    task = running.tasks.RetryTask(req)
    assert task.retries == 1 and task.last_seq == failed.last_seq + 1
    assert task.state in (K.TASK_STATE_PENDING, K.TASK_STATE_RUNNING, K.TASK_STATE_COMPLETED)
    assert task.state != K.TASK_STATE_PENDING or not task.HasField("error")
    # A watcher resuming after the FAILED event follows the retry to the end.
    items = list(running.tasks.WatchTask(
        K.WatchTaskRequest(task_id=task_id, after_seq=failed.last_seq), timeout=20))
    events = [i.event for i in items[1:] if i.WhichOneof("kind") == "event"]
    assert [e.seq for e in events] == list(range(failed.last_seq + 1, events[-1].seq + 1))
    assert events[0].kind == K.TASK_EVENT_KIND_RETRIED and events[0].attempt == 1
    assert "resumes at extract" in events[0].message
    assert events[1].kind == K.TASK_EVENT_KIND_STARTED and events[1].attempt == 2
    assert events[2].kind == K.TASK_EVENT_KIND_STAGE_STARTED and events[2].stage == "extract"
    assert events[-1].kind == K.TASK_EVENT_KIND_COMPLETED
    assert "summarize" not in {e.stage for e in events}
    # The whole journal, from 0, goes through the FAILED event to the end.
    whole = watch(running, task_id)
    kinds = [e.kind for e in whole.events]
    assert kinds.count(K.TASK_EVENT_KIND_FAILED) == 1 and kinds[-1] == K.TASK_EVENT_KIND_COMPLETED
    assert [e.seq for e in whole.events] == list(range(1, whole.last.seq + 1))
    # so does the client library's resuming watch
    seen = list(watch_task(running.channel, task_id, timeout=20))
    assert [e.seq for e in seen] == [e.seq for e in whole.events]

    # summarize ran once; extract twice failed, then once more for the retry
    assert len(fake_llm.of("summary")) == 1
    assert [r.reply.status for r in fake_llm.of("extract") if r.reply] == [500, 500, 200]
    done = running.tasks.GetTask(K.GetTaskRequest(task_id=task_id))
    assert done.state == K.TASK_STATE_COMPLETED and done.retries == 1 and done.attempts == 2
    usage = done.result.token_usage
    assert (usage.prompt_tokens, usage.completion_tokens) == fake_llm.returned_usage()
    meta = running.sessions.GetSession(session_pb2.GetSessionRequest(session_id="s1"))
    assert meta.commit_count == 1
    assert (meta.llm_token_usage.prompt_tokens, meta.llm_token_usage.completion_tokens) == \
        fake_llm.returned_usage()
    arch = running.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="s1", index=1))
    assert arch.state == session_pb2.ARCHIVE_STATE_DONE and arch.overview == overview

    # The same request id replays (no second retry); another request with it conflicts.
    again = running.tasks.RetryTask(req)
    assert again.retries == 1 and again.state == K.TASK_STATE_COMPLETED
    with pytest.raises(grpc.RpcError) as exc:
        running.tasks.RetryTask(K.RetryTaskRequest(task_id="tsk_other", request_id="retry-1"))
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Wrong state: FAILED_PRECONDITION with a reason.
    with pytest.raises(grpc.RpcError) as exc:
        running.tasks.RetryTask(K.RetryTaskRequest(task_id=task_id))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(exc.value) == "TASK_NOT_RETRYABLE"
    assert "COMPLETED" in str(exc.value.details())


def test_retry_of_unknown_or_foreign_tasks_is_not_found(start: Any, fake_llm: FakeLLM) -> None:
    running: Running = start()
    task_id = failed_in_extract(running, fake_llm)
    for tid, md in ((task_id, (("x-sessiond-user", "mallory"),)), ("tsk_nope", ())):
        with pytest.raises(grpc.RpcError) as exc:
            running.tasks.RetryTask(K.RetryTaskRequest(task_id=tid), metadata=md)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason_of(exc.value) == "TASK_NOT_FOUND"
    with pytest.raises(grpc.RpcError) as exc:
        running.tasks.RetryTask(K.RetryTaskRequest(task_id=""))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    t = running.tasks.GetTask(K.GetTaskRequest(task_id=task_id))
    assert t.state == K.TASK_STATE_FAILED and t.retries == 0


def test_auto_retry_with_backoff_up_to_the_limit(start: Any, fake_llm: FakeLLM) -> None:
    running: Running = start(auto_retry_failed=True, auto_retry_max=2,
                             auto_retry_backoff_seconds=0.4,
                             auto_retry_backoff_max_seconds=10.0,
                             auto_retry_interval_seconds=0.1)
    # two more outages after the first: automatic retries 1 and 2 fail too
    fake_llm.push("extract", *OUTAGE, *OUTAGE)
    task_id = failed_in_extract(running, fake_llm)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        t = running.tasks.GetTask(K.GetTaskRequest(task_id=task_id))
        if t.retries == 2 and t.state == K.TASK_STATE_FAILED:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"expected two failed automatic retries, got {t}")
    events = watch(running, task_id).events
    retried = [e for e in events if e.kind == K.TASK_EVENT_KIND_RETRIED]
    failed = [e for e in events if e.kind == K.TASK_EVENT_KIND_FAILED]
    assert [e.attempt for e in retried] == [1, 2] and len(failed) == 3
    assert all(e.message.startswith("automatic retry") for e in retried)
    # exponential backoff: 0.4 s after the first failure, 0.8 s after the second
    waits = [(r.time.ToDatetime() - f.time.ToDatetime()).total_seconds()
             for f, r in zip(failed, retried, strict=False)]
    assert waits[0] >= 0.4 and waits[1] >= 0.8, waits
    time.sleep(1.0)  # no third retry: the limit is 2
    t = running.tasks.GetTask(K.GetTaskRequest(task_id=task_id))
    assert t.state == K.TASK_STATE_FAILED and t.retries == 2
    assert len(fake_llm.of("summary")) == 1  # the summary was kept through every retry


def test_auto_retry_skips_errors_that_do_not_pass(start: Any, fake_llm: FakeLLM) -> None:
    running: Running = start(auto_retry_failed=True, auto_retry_backoff_seconds=0.1,
                             auto_retry_interval_seconds=0.1)
    fake_llm.push("extract", Reply(401, error="bad key"))
    running.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s2"))
    say(running, "s2", "Hello.")
    task_id = commit(running, "s2")
    assert watch(running, task_id).last.kind == K.TASK_EVENT_KIND_FAILED
    time.sleep(0.8)
    t = running.tasks.GetTask(K.GetTaskRequest(task_id=task_id))
    assert t.state == K.TASK_STATE_FAILED and t.retries == 0 and t.error.code == 9
    # while a manual retry of it is still allowed
    assert running.tasks.RetryTask(K.RetryTaskRequest(task_id=task_id)).retries == 1
