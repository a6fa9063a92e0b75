"""CancelTask interrupts an embedding call of the index stage in flight (as it does
an LLM call): the task ends CANCELLED at once, not when the slow /v1/embeddings
answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from sessiond.server.embedders.openai import OpenAIEmbedder
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import add
from tests.conftest import ServerFactory
from tests.embedders.fake_embeddings import FakeEmbeddings
from tests.embedders.test_openai_embedder import FAST, KEY, KEY_ENV, settings


class SlowEmbeddings(FakeEmbeddings):
    """Holds every embeddings request until `release` is set (or 30 s pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Event()
        self.release = threading.Event()

    def handle_post(self, h: BaseHTTPRequestHandler) -> None:
        self.arrived.set()
        self.release.wait(30)
        super().handle_post(h)


@pytest.fixture
def slow() -> Iterator[SlowEmbeddings]:
    f = SlowEmbeddings().start()
    yield f
    f.release.set()
    f.stop()


def test_cancel_interrupts_an_embedding_call_in_flight(
        server_factory: ServerFactory, slow: SlowEmbeddings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    embedder = OpenAIEmbedder(settings(slow, timeout_seconds=60.0), backoff=FAST)
    running = server_factory(embedder=embedder)
    running.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="e1"))
    add(running.sessions, "e1", "Our puppy Biscuit loves the beach.")
    reply = running.sessions.Commit(session_pb2.CommitRequest(session_id="e1"))
    stream = running.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                     timeout=30)
    assert slow.arrived.wait(20)  # the index stage is waiting for its embeddings
    started = time.monotonic()
    assert running.tasks.CancelTask(
        task_pb2.CancelTaskRequest(task_id=reply.task_id)).cancel_requested
    rest = [i.event for i in stream if i.WhichOneof("kind") == "event"]
    took = time.monotonic() - started
    assert rest[-1].kind == task_pb2.TASK_EVENT_KIND_CANCELLED, rest
    assert took < 3.0, took  # not after the 30 s the endpoint holds the request
    task = running.tasks.GetTask(task_pb2.GetTaskRequest(task_id=reply.task_id))
    assert task.state == task_pb2.TASK_STATE_CANCELLED
    assert task.error.message == "cancelled by request during index"
    arch = running.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="e1", index=1))
    assert arch.state == session_pb2.ARCHIVE_STATE_PENDING
