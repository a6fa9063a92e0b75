"""Fixtures of the LLM engine tests: a fake OpenAI-compatible server on loopback and
helpers that drive a real sessiond (tests/conftest.py `server_factory`) through gRPC."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sessiond.server.config import LLMSettings
from sessiond.server.domain.values import Task
from sessiond.server.phase2.engines.openai import Backoff, OpenAIEngine
from sessiond.v1 import session_pb2, task_pb2

from tests.conftest import Running
from tests.llm.fake_openai import FakeLLM

API_KEY = "test-key-7f3a9c2e1b5d4a6f8e0c"  # not sk-…: only the engine redacts it
KEY_ENV = "SESSIOND_TEST_LLM_API_KEY"
FAST = Backoff(base=0.01, max_delay=0.05, retry_after_max=5.0)

EngineFactory = Callable[..., OpenAIEngine]


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    fake = FakeLLM().start()
    yield fake
    fake.stop()


def llm_settings(fake: FakeLLM, **overrides: Any) -> LLMSettings:
    s = LLMSettings(base_url=fake.base_url, model="test-model", api_key_env=KEY_ENV,
                    timeout_seconds=2.0, max_retries=3, max_concurrency=4)
    for k, v in overrides.items():
        setattr(s, k, v)
    return s


@pytest.fixture
def make_engine(fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> EngineFactory:
    """OpenAIEngine against the fake server; the key comes from the environment."""
    monkeypatch.setenv(KEY_ENV, API_KEY)

    def make(**overrides: Any) -> OpenAIEngine:
        return OpenAIEngine(llm_settings(fake_llm, **overrides), backoff=FAST)

    return make


@dataclass
class Watched:
    snapshot: task_pb2.Task
    events: list[task_pb2.TaskEvent]

    @property
    def last(self) -> task_pb2.TaskEvent:
        return self.events[-1]

    def of_kind(self, kind: int) -> list[task_pb2.TaskEvent]:
        return [e for e in self.events if e.kind == kind]


def say(running: Running, session_id: str, text: str,
        role: session_pb2.Role.ValueType = session_pb2.ROLE_USER) -> str:
    reply = running.sessions.AddMessage(session_pb2.AddMessageRequest(
        session_id=session_id, role=role,
        parts=[session_pb2.Part(text=session_pb2.TextPart(text=text))]))
    return str(reply.message.id)


def commit(running: Running, session_id: str) -> str:
    reply = running.sessions.Commit(session_pb2.CommitRequest(session_id=session_id))
    assert reply.archived and reply.task_id, reply
    return str(reply.task_id)


def watch(running: Running, task_id: str, timeout: float = 20) -> Watched:
    items = list(running.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id),
                                         timeout=timeout))
    assert items and items[0].WhichOneof("kind") == "snapshot"
    events = [i.event for i in items[1:] if i.WhichOneof("kind") == "event"]
    return Watched(items[0].snapshot, events)


def stored_task(running: Running, task_id: str) -> Task:
    task = running.loop.run(running.app.store.get_task(task_id))
    assert task is not None
    return task


def failure_reason(running: Running, task_id: str) -> str:
    """The machine-readable reason of a failed task, as a client sees it: the
    ErrorInfo detail of Task.error (checked against what the store keeps)."""
    from google.rpc import error_details_pb2
    from sessiond.v1 import task_pb2

    task = running.tasks.GetTask(task_pb2.GetTaskRequest(task_id=task_id))
    infos = []
    for d in task.error.details:
        info = error_details_pb2.ErrorInfo()
        if d.Unpack(info):
            infos.append(info)
    assert len(infos) == 1 and infos[0].domain == "sessiond.v1"
    error = stored_task(running, task_id).error
    assert error is not None and error.reason == infos[0].reason
    return str(infos[0].reason)
