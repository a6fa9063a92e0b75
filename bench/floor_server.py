"""The floor: a grpc.aio server with no-op SessionService/TaskService servicers.

It is what a sessiond request would cost if the service did no work at all: same
runtime (Python, grpc.aio, default asyncio loop), same generated stubs and the same
`server_options(settings)` as sessiond, but every method returns a reply built once
at start-up. AddMessage returns a canned message about as large as the real reply
(~500-byte text part); Commit returns a canned accepted reply; WatchTask streams a
snapshot plus 10 canned events, the last one terminal.

Fan-out mode (used as the baseline of the 1,000-watcher test): WatchTask on a task id
starting with "hold-" sends the snapshot and then waits; CancelTask on that id stamps
the current time into one terminal event and releases every waiting stream with it.

Usage: python bench/floor_server.py --address 127.0.0.1:0
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sessiond.server.api.server import server_options
from sessiond.server.config import Settings
from sessiond.v1 import session_pb2, session_pb2_grpc, task_pb2, task_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]
HOLD_PREFIX = "hold-"
HOLD_MAX_SECONDS = 300.0
TEXT = ("The quick brown fox jumps over the lazy dog while the agent reads the logs. " * 7)[:500]


def _now_ts() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def _canned_message() -> session_pb2.Message:
    return session_pb2.Message(
        id="msg_00000000000000000000000000000000", role=session_pb2.ROLE_USER,
        parts=[session_pb2.Part(text=session_pb2.TextPart(text=TEXT))],
        created_at=_now_ts(), seq=1)


def _canned_session() -> session_pb2.Session:
    now = _now_ts()
    return session_pb2.Session(session_id="floor", created_at=now, updated_at=now,
                               message_count=1, live_message_count=1)


def _canned_task(task_id: str = "task_floor") -> task_pb2.Task:
    now = _now_ts()
    return task_pb2.Task(task_id=task_id, task_type="session_commit", session_id="floor",
                         archive_uri="sessiond://floor/archives/1",
                         state=task_pb2.TASK_STATE_PENDING, stage="queued", created_at=now,
                         updated_at=now, last_seq=1)


def _canned_events() -> list[task_pb2.WatchTaskResponse]:
    kinds = [task_pb2.TASK_EVENT_KIND_CREATED, task_pb2.TASK_EVENT_KIND_STARTED]
    kinds += [task_pb2.TASK_EVENT_KIND_STAGE_STARTED, task_pb2.TASK_EVENT_KIND_STAGE_COMPLETED] * 4
    kinds[-1] = task_pb2.TASK_EVENT_KIND_COMPLETED
    out = []
    now = _now_ts()
    for i, kind in enumerate(kinds[:10], start=1):
        state = (task_pb2.TASK_STATE_COMPLETED if kind == task_pb2.TASK_EVENT_KIND_COMPLETED
                 else task_pb2.TASK_STATE_RUNNING)
        out.append(task_pb2.WatchTaskResponse(event=task_pb2.TaskEvent(
            task_id="task_floor", seq=i, kind=kind, time=now, state=state, stage="summarize",
            message="floor event")))
    return out


class FloorSessions(session_pb2_grpc.SessionServiceServicer):
    def __init__(self) -> None:
        self.session = _canned_session()
        self.add_reply = session_pb2.AddMessageResponse(message=_canned_message())
        self.commit_reply = session_pb2.CommitReply(
            session_id="floor", status=session_pb2.COMMIT_STATUS_ACCEPTED, task_id="task_floor",
            archive_uri="sessiond://floor/archives/1", archived=True)

    async def CreateSession(self, request: session_pb2.CreateSessionRequest, context: Ctx
                            ) -> session_pb2.Session:
        return self.session

    async def GetSession(self, request: session_pb2.GetSessionRequest, context: Ctx
                         ) -> session_pb2.Session:
        return self.session

    async def ListSessions(self, request: session_pb2.ListSessionsRequest, context: Ctx
                           ) -> session_pb2.ListSessionsResponse:
        return session_pb2.ListSessionsResponse()

    async def DeleteSession(self, request: session_pb2.DeleteSessionRequest, context: Ctx
                            ) -> session_pb2.DeleteSessionResponse:
        return session_pb2.DeleteSessionResponse(session_id="floor")

    async def AddMessage(self, request: session_pb2.AddMessageRequest, context: Ctx
                         ) -> session_pb2.AddMessageResponse:
        return self.add_reply

    async def AddMessages(self, request: session_pb2.AddMessagesRequest, context: Ctx
                          ) -> session_pb2.AddMessagesResponse:
        return session_pb2.AddMessagesResponse(results=[
            session_pb2.AddedMessage(message=self.add_reply.message) for _ in request.messages])

    async def UpdateToolPart(self, request: session_pb2.UpdateToolPartRequest, context: Ctx
                             ) -> session_pb2.Message:
        return self.add_reply.message

    async def RecordUsage(self, request: session_pb2.RecordUsageRequest, context: Ctx
                          ) -> session_pb2.RecordUsageResponse:
        return session_pb2.RecordUsageResponse(session_id="floor", pending_usage_count=1)

    async def Commit(self, request: session_pb2.CommitRequest, context: Ctx
                     ) -> session_pb2.CommitReply:
        return self.commit_reply

    async def GetSessionContext(self, request: session_pb2.GetSessionContextRequest,
                                context: Ctx) -> session_pb2.SessionContext:
        return session_pb2.SessionContext(session_id="floor")

    async def ListArchives(self, request: session_pb2.ListArchivesRequest, context: Ctx
                           ) -> session_pb2.ListArchivesResponse:
        return session_pb2.ListArchivesResponse()

    async def GetArchive(self, request: session_pb2.GetArchiveRequest, context: Ctx
                         ) -> session_pb2.Archive:
        return session_pb2.Archive(session_id="floor", index=1)

    async def RevertArchive(self, request: session_pb2.RevertArchiveRequest, context: Ctx
                            ) -> task_pb2.Task:
        return task_pb2.Task(task_id="task_floor_revert", task_type="archive_revert",
                             session_id=request.session_id, state=task_pb2.TASK_STATE_PENDING)

    async def GetSessionUsage(self, request: session_pb2.GetSessionUsageRequest, context: Ctx
                              ) -> session_pb2.SessionUsage:
        return session_pb2.SessionUsage(session_id=request.session_id)

    async def UpdateSessionConfig(self, request: session_pb2.UpdateSessionConfigRequest,
                                  context: Ctx) -> session_pb2.Session:
        return session_pb2.Session(session_id="floor")

    async def WatchSession(self, request: session_pb2.WatchSessionRequest, context: Ctx
                           ) -> AsyncIterator[session_pb2.WatchSessionResponse]:
        yield session_pb2.WatchSessionResponse(snapshot=session_pb2.Session(session_id="floor"))


class FloorTasks(task_pb2_grpc.TaskServiceServicer):
    def __init__(self) -> None:
        self.task = _canned_task()
        self.snapshot = task_pb2.WatchTaskResponse(snapshot=self.task)
        self.events = _canned_events()
        self._holds: dict[str, asyncio.Future[task_pb2.WatchTaskResponse]] = {}

    def _hold(self, task_id: str) -> asyncio.Future[task_pb2.WatchTaskResponse]:
        fut = self._holds.get(task_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._holds[task_id] = fut
        return fut

    async def GetTask(self, request: task_pb2.GetTaskRequest, context: Ctx) -> task_pb2.Task:
        return self.task

    async def ListTasks(self, request: task_pb2.ListTasksRequest, context: Ctx
                        ) -> task_pb2.ListTasksResponse:
        return task_pb2.ListTasksResponse(tasks=[self.task])

    async def WatchTask(self, request: task_pb2.WatchTaskRequest, context: Ctx
                        ) -> AsyncIterator[task_pb2.WatchTaskResponse]:
        yield self.snapshot
        if request.task_id.startswith(HOLD_PREFIX):
            try:
                ev = await asyncio.wait_for(asyncio.shield(self._hold(request.task_id)),
                                            HOLD_MAX_SECONDS)
            except TimeoutError:
                return
            yield ev
            return
        for ev in self.events:
            yield ev

    async def RetryTask(self, request: task_pb2.RetryTaskRequest, context: Ctx
                        ) -> task_pb2.Task:
        return self.task

    async def CancelTask(self, request: task_pb2.CancelTaskRequest, context: Ctx
                         ) -> task_pb2.Task:
        if request.task_id.startswith(HOLD_PREFIX):
            fut = self._hold(request.task_id)
            if not fut.done():
                fut.set_result(task_pb2.WatchTaskResponse(event=task_pb2.TaskEvent(
                    task_id=request.task_id, seq=2, kind=task_pb2.TASK_EVENT_KIND_CANCELLED,
                    time=_now_ts(), state=task_pb2.TASK_STATE_CANCELLED, stage="queued",
                    message="cancelled by request")))
            self._holds.pop(request.task_id, None)
        return self.task


async def serve(address: str) -> None:
    server = grpc.aio.server(options=server_options(Settings()))
    session_pb2_grpc.add_SessionServiceServicer_to_server(FloorSessions(), server)
    task_pb2_grpc.add_TaskServiceServicer_to_server(FloorTasks(), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    print(f"floor serving on {address.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1:0")
    asyncio.run(serve(p.parse_args().address))


if __name__ == "__main__":
    main()
