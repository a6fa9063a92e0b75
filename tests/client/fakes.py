"""Helpers for the client tests: watch responses, a gated Phase 2 engine, polling."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TypeAlias

from sessiond.server.phase2.engines.base import (
    EngineError,
    ExtractionRequest,
    ExtractionResponse,
    RetryReporter,
    SummaryRequest,
    SummaryResponse,
    no_report,
)
from sessiond.server.phase2.engines.offline import OfflineEngine
from sessiond.v1 import session_pb2, session_pb2_grpc, task_pb2

Kind: TypeAlias = task_pb2.TaskEventKind.ValueType
State: TypeAlias = task_pb2.TaskState.ValueType

TERMINAL: dict[Kind, State] = {task_pb2.TASK_EVENT_KIND_COMPLETED: task_pb2.TASK_STATE_COMPLETED,
            task_pb2.TASK_EVENT_KIND_FAILED: task_pb2.TASK_STATE_FAILED,
            task_pb2.TASK_EVENT_KIND_CANCELLED: task_pb2.TASK_STATE_CANCELLED}


def event(seq: int, kind: Kind = task_pb2.TASK_EVENT_KIND_STAGE_STARTED,
          task_id: str = "t1") -> task_pb2.WatchTaskResponse:
    state = TERMINAL.get(kind, task_pb2.TASK_STATE_RUNNING)
    ev = task_pb2.TaskEvent(task_id=task_id, seq=seq, kind=kind, state=state,
                            stage=f"stage{seq}", message=f"event {seq}")
    if kind == task_pb2.TASK_EVENT_KIND_FAILED:
        ev.error.code = 13
        ev.error.message = "summarizer exploded"
    return task_pb2.WatchTaskResponse(event=ev)


def snapshot(last_seq: int, state: State = task_pb2.TASK_STATE_RUNNING,
             task_id: str = "t1") -> task_pb2.WatchTaskResponse:
    return task_pb2.WatchTaskResponse(snapshot=task_pb2.Task(
        task_id=task_id, task_type="session_commit", state=state, last_seq=last_seq))


def heartbeat(last_seq: int) -> task_pb2.WatchTaskResponse:
    return task_pb2.WatchTaskResponse(heartbeat=task_pb2.Heartbeat(last_seq=last_seq))


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


class GatedEngine:
    """The offline engine, but `summarize` waits for `gate` (and fails if asked)."""

    name = "gated"

    def __init__(self, *, fail: bool = False) -> None:
        self.inner = OfflineEngine()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail = fail

    async def summarize(self, request: SummaryRequest,
                        report: RetryReporter = no_report) -> SummaryResponse:
        self.entered.set()
        # The gate is opened from other threads and loops, hence a threading.Event polled.
        while not self.gate.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self.fail:
            raise EngineError("summarizer exploded", reason="TEST_FAILURE")
        return await self.inner.summarize(request, report)

    async def extract(self, request: ExtractionRequest,
                      report: RetryReporter = no_report) -> ExtractionResponse:
        return await self.inner.extract(request, report)

    async def aclose(self) -> None:
        return None


def add_text(sessions: session_pb2_grpc.SessionServiceStub, session_id: str, text: str
             ) -> None:
    sessions.AddMessage(session_pb2.AddMessageRequest(
        session_id=session_id, role=session_pb2.ROLE_USER,
        parts=[session_pb2.Part(text=session_pb2.TextPart(text=text))]))


def start_commit(sessions: session_pb2_grpc.SessionServiceStub, session_id: str = "s1") -> str:
    """Create a session with a few messages and commit it; returns the task id."""
    sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=session_id))
    for i in range(3):
        add_text(sessions, session_id, f"My name is Alice. I prefer tea {i}.")
    reply = sessions.Commit(session_pb2.CommitRequest(session_id=session_id))
    assert reply.task_id
    return reply.task_id
