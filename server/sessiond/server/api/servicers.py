"""Thin gRPC servicers: convert the request, call the domain, convert the result."""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message as ProtoMessage
from sessiond.server.api import converters as cv
from sessiond.server.api.errors import stream, unary
from sessiond.server.api.identity import identity_of
from sessiond.server.domain.pages import MAX_TOKEN_CHARS, bad_token, check_token
from sessiond.server.domain.values import SessionMeta, Task, TaskEvent
from sessiond.server.services.commit import CommitService
from sessiond.server.services.history import HistoryService
from sessiond.server.services.memories import MemoryManager
from sessiond.server.services.recall import RecallService
from sessiond.server.services.session_watch import SessionWatcher
from sessiond.server.services.sessions import SessionManager
from sessiond.server.services.tasks import Heartbeat, TaskManager
from sessiond.v1 import (
    memory_pb2,
    memory_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

Ctx = grpc.aio.ServicerContext[Any, Any]


def fingerprint(request: ProtoMessage) -> bytes:
    """The request without its request_id, serialized deterministically (only
    computed when the request carries a request_id)."""
    if not getattr(request, "request_id", ""):
        return b""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return copy.SerializeToString(deterministic=True)


def encode_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode() if value else ""


def decode_token(token: str) -> str:
    if not token:
        return ""
    if len(token) > 2 * MAX_TOKEN_CHARS:
        raise bad_token(token)
    try:
        value = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise bad_token(token) from exc
    return check_token(value)


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, sessions: SessionManager, commits: CommitService,
                 watcher: SessionWatcher, history: HistoryService | None = None) -> None:
        self.sessions = sessions
        self.commits = commits
        self.watcher = watcher
        self.history = history or HistoryService(sessions.store, sessions.limits)

    @unary
    async def CreateSession(self, request: session_pb2.CreateSessionRequest, context: Ctx
                            ) -> session_pb2.Session:
        meta = await self.sessions.create(identity_of(context), request.session_id,
                                          request.request_id, fingerprint(request))
        return cv.session_out(meta)

    @unary
    async def GetSession(self, request: session_pb2.GetSessionRequest, context: Ctx
                         ) -> session_pb2.Session:
        return cv.session_out(await self.sessions.get(identity_of(context), request.session_id,
                                                      request.auto_create))

    @unary
    async def ListSessions(self, request: session_pb2.ListSessionsRequest, context: Ctx
                           ) -> session_pb2.ListSessionsResponse:
        page = await self.sessions.list_sessions(identity_of(context), request.page_size,
                                                 decode_token(request.page_token))
        return session_pb2.ListSessionsResponse(sessions=[cv.session_out(m) for m in page.items],
                                                next_page_token=encode_token(page.next_token))

    @unary
    async def DeleteSession(self, request: session_pb2.DeleteSessionRequest, context: Ctx
                            ) -> session_pb2.DeleteSessionResponse:
        await self.sessions.delete(identity_of(context), request.session_id)
        return session_pb2.DeleteSessionResponse(session_id=request.session_id)

    @unary
    async def AddMessage(self, request: session_pb2.AddMessageRequest, context: Ctx
                         ) -> session_pb2.AddMessageResponse:
        added = await self.sessions.add_message(
            identity_of(context), request.session_id, cv.role_in(request.role),
            cv.parts_in(list(request.parts)), request.request_id, fingerprint(request),
            request.client_message_id, cv.created_at_in(request))
        return cv.add_message_reply(added)

    @unary
    async def AddMessages(self, request: session_pb2.AddMessagesRequest, context: Ctx
                          ) -> session_pb2.AddMessagesResponse:
        added = await self.sessions.add_messages(
            identity_of(context), request.session_id, cv.new_messages_in(list(request.messages)),
            request.request_id, fingerprint(request))
        return session_pb2.AddMessagesResponse(results=[cv.added_out(a) for a in added])

    @unary
    async def UpdateToolPart(self, request: session_pb2.UpdateToolPartRequest, context: Ctx
                             ) -> session_pb2.Message:
        msg = await self.sessions.update_tool_part(
            identity_of(context), request.session_id, request.message_id, request.tool_id,
            request.output, cv.tool_status_in(request.status))
        return cv.message_out(msg)

    @unary
    async def RecordUsage(self, request: session_pb2.RecordUsageRequest, context: Ctx
                          ) -> session_pb2.RecordUsageResponse:
        pending = await self.sessions.record_usage(
            identity_of(context), request.session_id, list(request.context_uris),
            cv.skill_in(request), request.request_id, fingerprint(request))
        return session_pb2.RecordUsageResponse(session_id=request.session_id,
                                               pending_usage_count=pending)

    @unary
    async def Commit(self, request: session_pb2.CommitRequest, context: Ctx
                     ) -> session_pb2.CommitReply:
        out = await self.commits.commit(identity_of(context), request.session_id,
                                        request.keep_recent_count, request.reject_if_running,
                                        request.request_id, fingerprint(request))
        reply = session_pb2.CommitReply(session_id=request.session_id,
                                        status=session_pb2.COMMIT_STATUS_ACCEPTED,
                                        archived=out.archived)
        if out.archived and out.task is not None and out.archive is not None:
            reply.task_id = out.task.task_id
            reply.archive_uri = out.archive.uri
        return reply

    @unary
    async def GetSessionContext(self, request: session_pb2.GetSessionContextRequest,
                                context: Ctx) -> session_pb2.SessionContext:
        view = await self.sessions.context(identity_of(context), request.session_id,
                                           request.max_messages, request.max_chars)
        return session_pb2.SessionContext(
            session_id=view.session_id, latest_archive_overview=view.latest_archive_overview,
            latest_archive_uri=view.latest_archive_uri,
            current_messages=[cv.message_out(m) for m in view.current_messages])

    @unary
    async def ListArchives(self, request: session_pb2.ListArchivesRequest, context: Ctx
                           ) -> session_pb2.ListArchivesResponse:
        page = await self.sessions.list_archives(identity_of(context), request.session_id,
                                                 request.page_size,
                                                 decode_token(request.page_token))
        return session_pb2.ListArchivesResponse(archives=[cv.archive_out(a) for a in page.items],
                                                next_page_token=encode_token(page.next_token))

    @unary
    async def GetArchive(self, request: session_pb2.GetArchiveRequest, context: Ctx
                         ) -> session_pb2.Archive:
        arch, messages, token = await self.sessions.get_archive(
            identity_of(context), request.session_id, request.index, request.page_size,
            decode_token(request.page_token))
        reply = cv.archive_out(arch, messages)
        reply.next_page_token = encode_token(token)
        return reply

    @unary
    async def RevertArchive(self, request: session_pb2.RevertArchiveRequest, context: Ctx
                            ) -> task_pb2.Task:
        return cv.task_out(await self.history.revert(
            identity_of(context), request.session_id, request.index, request.force,
            request.request_id, fingerprint(request)))

    @unary
    async def GetSessionUsage(self, request: session_pb2.GetSessionUsageRequest, context: Ctx
                              ) -> session_pb2.SessionUsage:
        view = await self.history.usage(identity_of(context), request.session_id,
                                        request.archive_index, request.page_size,
                                        decode_token(request.page_token))
        return session_pb2.SessionUsage(
            session_id=view.session_id, archive_index=view.archive_index,
            uris=[session_pb2.UsedUri(uri=u.uri, active_count=u.active_count)
                  for u in view.uris], next_page_token=encode_token(view.next_token))

    @unary
    async def UpdateSessionConfig(self, request: session_pb2.UpdateSessionConfigRequest,
                                  context: Ctx) -> session_pb2.Session:
        return cv.session_out(await self.sessions.update_config(
            identity_of(context), request.session_id, cv.config_in(request)))

    @stream
    async def WatchSession(self, request: session_pb2.WatchSessionRequest, context: Ctx
                           ) -> AsyncIterator[session_pb2.WatchSessionResponse]:
        async for item in self.watcher.watch(identity_of(context), request.session_id,
                                             request.after_seq):
            if isinstance(item, SessionMeta):
                yield session_pb2.WatchSessionResponse(snapshot=cv.session_out(item))
            elif isinstance(item, Heartbeat):
                yield session_pb2.WatchSessionResponse(heartbeat=task_pb2.Heartbeat(
                    time=cv.ts(item.time), last_seq=item.last_seq))
            else:
                yield session_pb2.WatchSessionResponse(event=cv.session_event_out(item))


class TaskServicer(task_pb2_grpc.TaskServiceServicer):
    # Many watchers of one task receive the same events: convert each event once.
    EVENT_CACHE = 4096

    def __init__(self, tasks: TaskManager) -> None:
        self.tasks = tasks
        self._events: OrderedDict[tuple[str, int], task_pb2.WatchTaskResponse] = OrderedDict()

    def _event_response(self, event: TaskEvent) -> task_pb2.WatchTaskResponse:
        key = (event.task_id, event.seq)
        resp = self._events.get(key)
        if resp is None:
            resp = task_pb2.WatchTaskResponse(event=cv.event_out(event))
            self._events[key] = resp
            if len(self._events) > self.EVENT_CACHE:
                self._events.popitem(last=False)
        return resp

    @unary
    async def GetTask(self, request: task_pb2.GetTaskRequest, context: Ctx) -> task_pb2.Task:
        return cv.task_out(await self.tasks.get(identity_of(context), request.task_id))

    @unary
    async def ListTasks(self, request: task_pb2.ListTasksRequest, context: Ctx
                        ) -> task_pb2.ListTasksResponse:
        page = await self.tasks.list_tasks(identity_of(context), request.session_id,
                                     cv.state_in(request.state), request.task_type,
                                     request.page_size, decode_token(request.page_token))
        return task_pb2.ListTasksResponse(tasks=[cv.task_out(t) for t in page.items],
                                          next_page_token=encode_token(page.next_token))

    @stream
    async def WatchTask(self, request: task_pb2.WatchTaskRequest, context: Ctx
                        ) -> AsyncIterator[task_pb2.WatchTaskResponse]:
        async for item in self.tasks.watch(identity_of(context), request.task_id,
                                           request.after_seq):
            if isinstance(item, Task):
                yield task_pb2.WatchTaskResponse(snapshot=cv.task_out(item))
            elif isinstance(item, Heartbeat):
                yield task_pb2.WatchTaskResponse(heartbeat=task_pb2.Heartbeat(
                    time=cv.ts(item.time), last_seq=item.last_seq))
            else:
                yield self._event_response(item)

    @unary
    async def CancelTask(self, request: task_pb2.CancelTaskRequest, context: Ctx
                         ) -> task_pb2.Task:
        return cv.task_out(await self.tasks.cancel(identity_of(context), request.task_id))

    @unary
    async def RetryTask(self, request: task_pb2.RetryTaskRequest, context: Ctx
                        ) -> task_pb2.Task:
        return cv.task_out(await self.tasks.retry(identity_of(context), request.task_id,
                                                  request.request_id, fingerprint(request)))


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(self, memories: MemoryManager, recall: RecallService,
                 history: HistoryService | None = None) -> None:
        self.memories = memories
        self.recall_service = recall
        self.history = history or HistoryService(memories.store, memories.limits)

    @unary
    async def ListMemories(self, request: memory_pb2.ListMemoriesRequest, context: Ctx
                           ) -> memory_pb2.ListMemoriesResponse:
        page = await self.memories.list_memories(identity_of(context),
                                                 cv.category_in(request.category),
                                                 request.page_size,
                                                 decode_token(request.page_token))
        return memory_pb2.ListMemoriesResponse(memories=[cv.memory_out(m) for m in page.items],
                                               next_page_token=encode_token(page.next_token))

    @unary
    async def GetMemory(self, request: memory_pb2.GetMemoryRequest, context: Ctx
                        ) -> memory_pb2.Memory:
        return cv.memory_out(await self.memories.get(identity_of(context), request.memory_id))

    @unary
    async def SearchMemories(self, request: memory_pb2.SearchMemoriesRequest, context: Ctx
                             ) -> memory_pb2.SearchMemoriesResponse:
        hits = await self.memories.search(identity_of(context), request.query,
                                          cv.category_in(request.category), request.limit)
        return memory_pb2.SearchMemoriesResponse(results=[
            memory_pb2.ScoredMemory(memory=cv.memory_out(m), score=s) for m, s in hits])

    @unary
    async def DeleteMemory(self, request: memory_pb2.DeleteMemoryRequest, context: Ctx
                           ) -> memory_pb2.DeleteMemoryResponse:
        await self.memories.delete(identity_of(context), request.memory_id)
        return memory_pb2.DeleteMemoryResponse(memory_id=request.memory_id)

    @unary
    async def Recall(self, request: memory_pb2.RecallRequest, context: Ctx
                     ) -> memory_pb2.RecallResponse:
        result = await self.recall_service.recall(
            identity_of(context), request.query, request.session_id, request.max_chars,
            request.max_items, cv.recall_kinds_in(request.kinds),
            cv.ts_in(request.since) if request.HasField("since") else None,
            cv.ts_in(request.until) if request.HasField("until") else None)
        return cv.recall_out(result)

    @unary
    async def ListMemoryChanges(self, request: memory_pb2.ListMemoryChangesRequest,
                                context: Ctx) -> memory_pb2.ListMemoryChangesResponse:
        page = await self.history.list_changes(
            identity_of(context), request.session_id, request.archive_index,
            request.memory_id, request.page_size, decode_token(request.page_token))
        return memory_pb2.ListMemoryChangesResponse(
            changes=[cv.change_out(c) for c in page.items],
            next_page_token=encode_token(page.next_token))
