"""Helpers for API tests: request builders and engines with controllable timing.

The engines wrap the real offline engine; they only add a gate (to hold Phase 2 at a
known point) or a failure, so the pipeline, store and journal under test are real.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
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
from sessiond.v1 import session_pb2, session_pb2_grpc, task_pb2, task_pb2_grpc


def text_part(t: str) -> session_pb2.Part:
    return session_pb2.Part(text=session_pb2.TextPart(text=t))


def add(stub: session_pb2_grpc.SessionServiceStub, sid: str, t: str,
        role: session_pb2.Role.ValueType = session_pb2.ROLE_USER,
        metadata: tuple[tuple[str, str], ...] = ()) -> session_pb2.Message:
    return stub.AddMessage(session_pb2.AddMessageRequest(session_id=sid, role=role,
                                                         parts=[text_part(t)]),
                           metadata=metadata).message


def watch_all(tasks: task_pb2_grpc.TaskServiceStub, task_id: str, after_seq: int = 0,
              timeout: float = 20) -> list[task_pb2.WatchTaskResponse]:
    return list(tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id, after_seq=after_seq),
                                timeout=timeout))


def events(items: list[task_pb2.WatchTaskResponse]) -> list[task_pb2.TaskEvent]:
    return [i.event for i in items if i.WhichOneof("kind") == "event"]


def wait_task(tasks: task_pb2_grpc.TaskServiceStub, task_id: str,
              timeout: float = 20) -> task_pb2.Task:
    watch_all(tasks, task_id, timeout=timeout)
    return tasks.GetTask(task_pb2.GetTaskRequest(task_id=task_id))


def code_of(call: grpc.RpcError) -> grpc.StatusCode:
    return call.code()


class GatedEngine(OfflineEngine):
    """Offline engine that blocks `summarize` until `release()` is called."""

    name = "gated-offline"

    def __init__(self) -> None:
        self._gate = threading.Event()
        self.entered = threading.Event()
        self.previous_overviews: list[str] = []

    def release(self) -> None:
        self._gate.set()

    async def summarize(self, request: SummaryRequest,
                        report: RetryReporter = no_report) -> SummaryResponse:
        self.previous_overviews.append(request.previous_overview)
        self.entered.set()
        while not self._gate.is_set():  # noqa: ASYNC110 - a threading gate
            await asyncio.sleep(0.01)
        return await super().summarize(request, report)


class FailingEngine(OfflineEngine):
    """Offline engine whose extraction fails with a message that leaks a secret."""

    name = "failing-offline"

    async def extract(self, request: ExtractionRequest,
                      report: RetryReporter = no_report) -> ExtractionResponse:
        raise EngineError("upstream said 401 for key sk-live-abcdef1234567890 with "
                          "Authorization: Bearer abc.def.ghi " + "x" * 2000,
                          reason="LLM_AUTH")
