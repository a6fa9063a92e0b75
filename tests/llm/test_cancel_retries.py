"""CancelTask while a stage's model call is retrying: the cancel interrupts the backoff
sleep (and an attempt in flight), the task ends CANCELLED at once, and no further
attempt is sent."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sessiond.server.phase2.engines.openai import Backoff, OpenAIEngine
from sessiond.v1 import session_pb2, task_pb2

from tests.conftest import ServerFactory
from tests.llm.conftest import API_KEY, KEY_ENV, commit, llm_settings, say
from tests.llm.fake_openai import FakeLLM, Reply

RETRYING = task_pb2.TASK_EVENT_KIND_RETRYING
CANCELLED = task_pb2.TASK_EVENT_KIND_CANCELLED
# Long enough that, without the interruption, the retries would run for ~20 s.
SLOW = Backoff(base=4.0, max_delay=4.0, retry_after_max=5.0)


def _watch_until_retrying(stream: Iterator[task_pb2.WatchTaskResponse]
                          ) -> list[task_pb2.TaskEvent]:
    seen: list[task_pb2.TaskEvent] = []
    for item in stream:
        if item.WhichOneof("kind") != "event":
            continue
        seen.append(item.event)
        if item.event.kind == RETRYING:
            return seen
    raise AssertionError(f"no RETRYING event: {seen}")


def test_cancel_interrupts_the_backoff_sleep(server_factory: ServerFactory, fake_llm: FakeLLM,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    fake_llm.push("summary", *[Reply(500, error="boom") for _ in range(6)])
    engine = OpenAIEngine(llm_settings(fake_llm, max_retries=5), backoff=SLOW)
    running = server_factory(engine=engine)
    running.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s1"))
    say(running, "s1", "Hello, I like green tea.")
    task_id = commit(running, "s1")
    stream = running.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id), timeout=30)
    _watch_until_retrying(stream)  # the first attempt failed; the backoff sleep began
    sent_before = len(fake_llm.of("summary"))

    started = time.monotonic()
    reply = running.tasks.CancelTask(task_pb2.CancelTaskRequest(task_id=task_id))
    assert reply.cancel_requested
    rest = [i.event for i in stream if i.WhichOneof("kind") == "event"]
    took = time.monotonic() - started

    assert rest and rest[-1].kind == CANCELLED, rest
    assert took < 2.0, took  # not after the 4 s backoff, let alone the 20 s of retries
    task = running.tasks.GetTask(task_pb2.GetTaskRequest(task_id=task_id))
    assert task.state == task_pb2.TASK_STATE_CANCELLED
    assert task.error.message == "cancelled by request during summarize"
    assert not [e for e in rest if e.kind == RETRYING]
    time.sleep(0.3)
    assert len(fake_llm.of("summary")) == sent_before  # no attempt after the cancel
    # The archive stays pending and readable; the session can commit again.
    arch = running.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="s1", index=1))
    assert arch.state == session_pb2.ARCHIVE_STATE_PENDING


def test_cancel_interrupts_an_attempt_in_flight(server_factory: ServerFactory,
                                                fake_llm: FakeLLM,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    fake_llm.push("summary", Reply(500, error="boom"), Reply(delay=8.0))
    engine = OpenAIEngine(llm_settings(fake_llm, max_retries=3, timeout_seconds=10.0),
                          backoff=Backoff(base=0.01, max_delay=0.02))
    running = server_factory(engine=engine)
    running.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s2"))
    say(running, "s2", "Remember that the deadline is Friday.")
    task_id = commit(running, "s2")
    stream = running.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id), timeout=30)
    _watch_until_retrying(stream)
    deadline = time.monotonic() + 5
    while len(fake_llm.of("summary")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # the second (slow) attempt is in flight
    started = time.monotonic()
    running.tasks.CancelTask(task_pb2.CancelTaskRequest(task_id=task_id))
    rest = [i.event for i in stream if i.WhichOneof("kind") == "event"]
    assert rest[-1].kind == CANCELLED, rest
    assert time.monotonic() - started < 2.0
