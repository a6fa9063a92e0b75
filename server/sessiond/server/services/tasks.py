"""The domain operations behind TaskService: read, list, cancel and watch tasks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from sessiond.server import failpoints
from sessiond.server.domain import rules
from sessiond.server.domain.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from sessiond.server.domain.limits import DEFAULT_LIMITS, Limits, clip_echo, watches_exceeded
from sessiond.server.domain.pages import Page
from sessiond.server.domain.values import Identity, Task, TaskEvent, TaskState
from sessiond.server.observability import metrics
from sessiond.server.services.hub import EventHub
from sessiond.server.services.sessions import request_key
from sessiond.server.store.base import Store


def shutting_down() -> Unavailable:
    """How an open watch ends when the server shuts down (a watch that reached its
    terminal event just before ends OK)."""
    return Unavailable("server is shutting down; resume the watch with after_seq",
                       reason="SHUTTING_DOWN")


@dataclass(frozen=True, slots=True)
class Heartbeat:
    time: datetime
    last_seq: int


WatchItem = Task | TaskEvent | Heartbeat


class TaskManager:
    def __init__(self, store: Store, hub: EventHub, *, heartbeat_seconds: float = 5.0,
                 poll_seconds: float = 1.0, limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.limits = limits
        self.hub = hub
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self._closing = asyncio.Event()
        self._watching: dict[Identity, int] = {}

    def close_watches(self) -> None:
        """Ask every open watch to end (graceful shutdown)."""
        self._closing.set()
        self.hub.poke_all()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    async def get(self, identity: Identity, task_id: str) -> Task:
        task = await self.store.get_task(task_id) if task_id else None
        if task is None or task.identity != identity:
            shown = clip_echo(task_id)
            raise NotFound(f"task {shown!r} not found", reason="TASK_NOT_FOUND",
                           metadata={"task_id": shown})
        return task

    async def list_tasks(self, identity: Identity, session_id: str, state: TaskState | None,
                   task_type: str, page_size: int, page_token: str) -> Page[Task]:
        if session_id:
            rules.check_session_id(session_id)
        return await self.store.list_tasks(identity, session_id, state, task_type,
                                           rules.page_size(page_size, self.limits), page_token)

    async def cancel(self, identity: Identity, task_id: str) -> Task:
        await self.get(identity, task_id)
        return await self.store.request_cancel(task_id, rules.utcnow())

    async def retry(self, identity: Identity, task_id: str, request_id: str = "",
                    fingerprint: bytes = b"") -> Task:
        """A FAILED or CANCELLED task runs again from its first unfinished stage."""
        if not task_id:
            raise InvalidArgument("task_id is required", violations=[
                FieldViolation("task_id", "must not be empty")])
        req = request_key(identity, "RetryTask", request_id, fingerprint, self.limits)
        failpoints.hit("retry.before_write")
        task = await self.store.retry_task(identity, task_id, rules.utcnow(), req)
        failpoints.hit("retry.after_write")
        return task

    async def watch(self, identity: Identity, task_id: str, after_seq: int
                    ) -> AsyncIterator[WatchItem]:
        """Snapshot, then every event with seq > after_seq in order, heartbeats while
        idle; returns after a terminal event that is the newest of the journal (one
        followed by RETRIED, from a retry, does not end the stream); `Unavailable`
        when the server shuts down first. Raises before
        yielding anything when the task is unknown or after_seq is not a position of
        its journal."""
        if after_seq < 0:
            raise InvalidArgument("after_seq must not be negative", violations=[
                FieldViolation("after_seq", "must be >= 0")])
        self.acquire_watch(identity)
        sub = self.hub.subscribe(task_id)
        metrics.WATCHERS.inc()
        try:
            task = await self.get(identity, task_id)
            if after_seq > task.last_seq:
                raise OutOfRange(f"after_seq {after_seq} is beyond the journal of task "
                                 f"{task_id} (last seq {task.last_seq})", reason="SEQ_IN_FUTURE",
                                 metadata={"last_seq": str(task.last_seq)})
            if after_seq < task.first_seq - 1:
                raise OutOfRange(f"events after seq {after_seq} of task {task_id} are no longer "
                                 f"kept (oldest kept: {task.first_seq})", reason="SEQ_COMPACTED",
                                 metadata={"first_seq": str(task.first_seq)})
            yield task
            last = after_seq
            # A terminal event older than the snapshot's newest was followed by a retry.
            newest = task.last_seq
            if task.state.terminal and last >= task.last_seq:
                return
            need_read = True
            last_sent = time.monotonic()
            while True:
                if need_read:
                    batch = await self.store.list_events(task_id, last)
                    for i, ev in enumerate(batch):
                        if ev.seq != last + 1:
                            raise OutOfRange(f"event {last + 1} of task {task_id} is no longer "
                                             "kept", reason="SEQ_COMPACTED")
                        yield ev
                        last = ev.seq
                        last_sent = time.monotonic()
                        if ev.kind.terminal and i == len(batch) - 1 and ev.seq >= newest:
                            return
                    need_read = False
                if self._closing.is_set():
                    raise shutting_down()
                woke = await sub.wait(self.poll_seconds)
                if self._closing.is_set():
                    raise shutting_down()
                if not woke:
                    need_read = True  # polling fallback: a missed wake-up only delays
                    if time.monotonic() - last_sent >= self.heartbeat_seconds:
                        yield Heartbeat(rules.utcnow(), last)
                        last_sent = time.monotonic()
                    continue
                events, lagged = sub.drain()
                fresh = [e for e in events if e.seq > last]
                if lagged or not fresh or fresh[0].seq != last + 1:
                    need_read = True
                    continue
                for i, ev in enumerate(fresh):
                    if ev.seq != last + 1:
                        need_read = True
                        break
                    yield ev
                    last = ev.seq
                    last_sent = time.monotonic()
                    if ev.kind.terminal and i == len(fresh) - 1 and ev.seq >= newest:
                        return
        finally:
            metrics.WATCHERS.dec()
            sub.close()
            self.release_watch(identity)

    def acquire_watch(self, identity: Identity) -> None:
        """Count one more open watch stream (WatchTask or WatchSession) of `identity`;
        RESOURCE_EXHAUSTED beyond `watch_streams_per_identity`."""
        open_now = self._watching.get(identity, 0)
        if open_now >= self.limits.watch_streams_per_identity:
            raise watches_exceeded(self.limits)
        self._watching[identity] = open_now + 1

    def release_watch(self, identity: Identity) -> None:
        left = self._watching.get(identity, 1) - 1
        if left:
            self._watching[identity] = left
        else:
            self._watching.pop(identity, None)
