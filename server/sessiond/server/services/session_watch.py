"""WatchSession: a session's event feed, live and resumable by number, like WatchTask.

The feed is durable (`store/sql/session_events.py`); this process's writes and other
replicas' NOTIFYs wake the watchers of a session through the EventHub (key
`session_events.poke_key`), and a watcher re-reads the store from the last number it
sent, so a wake-up that was missed only delays an event by the poll interval. Open
streams count in the same `watch_streams_per_identity` quota as WatchTask's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from sessiond.server.domain import rules
from sessiond.server.domain.autocommit import SessionEvent
from sessiond.server.domain.errors import FieldViolation, InvalidArgument, OutOfRange
from sessiond.server.domain.values import Identity, SessionMeta
from sessiond.server.observability import metrics
from sessiond.server.services.sessions import SessionManager
from sessiond.server.services.tasks import Heartbeat, TaskManager, shutting_down
from sessiond.server.store import codec
from sessiond.server.store.sql.session_events import poke_key

SessionWatchItem = SessionMeta | SessionEvent | Heartbeat


class SessionWatcher:
    def __init__(self, sessions: SessionManager, tasks: TaskManager) -> None:
        self.sessions = sessions
        self.tasks = tasks  # the shared watch quota, hub, poll pace and shutdown

    async def watch(self, identity: Identity, session_id: str, after_seq: int
                    ) -> AsyncIterator[SessionWatchItem]:
        """Snapshot (the session, with its last_event_seq), then every event with
        seq > after_seq in order, heartbeats while idle, until the client goes away
        or the server shuts down (`Unavailable`, `TaskManager.closing`). Raises before yielding
        anything when the session is unknown or after_seq is not a position of its
        feed; NOT_FOUND mid-stream when the session is deleted."""
        rules.check_session_id(session_id)
        if after_seq < 0:
            raise InvalidArgument("after_seq must not be negative", violations=[
                FieldViolation("after_seq", "must be >= 0")])
        tm, store = self.tasks, self.sessions.store
        tm.acquire_watch(identity)
        sub = tm.hub.subscribe(poke_key(codec.session_key(identity, session_id)))
        metrics.WATCHERS.inc()
        try:
            meta = await self.sessions.get(identity, session_id)
            if after_seq > meta.last_event_seq:
                raise OutOfRange(f"after_seq {after_seq} is beyond the feed of session "
                                 f"{session_id!r} (last seq {meta.last_event_seq})",
                                 reason="SEQ_IN_FUTURE",
                                 metadata={"last_seq": str(meta.last_event_seq)})
            first = await store.session_events_first_seq(identity, session_id)
            if first and after_seq < first - 1:
                raise OutOfRange(f"events after seq {after_seq} of session {session_id!r} "
                                 f"are no longer kept (oldest kept: {first})",
                                 reason="SEQ_COMPACTED", metadata={"first_seq": str(first)})
            yield meta
            last, last_sent, need_read = after_seq, time.monotonic(), True
            while True:
                if need_read:
                    while True:
                        batch = await store.list_session_events(identity, session_id, last)
                        for ev in batch:
                            if ev.seq != last + 1:
                                raise OutOfRange(f"event {last + 1} of session {session_id!r} "
                                                 "is no longer kept", reason="SEQ_COMPACTED")
                            yield ev
                            last, last_sent = ev.seq, time.monotonic()
                        if len(batch) < 1000:
                            break
                    need_read = False
                if tm.closing:
                    raise shutting_down()
                woke = await sub.wait(tm.poll_seconds)
                if tm.closing:
                    raise shutting_down()
                sub.drain()
                need_read = True
                if not woke and time.monotonic() - last_sent >= tm.heartbeat_seconds:
                    # Idle: say so, and notice a deleted session (its feed is gone).
                    await self.sessions.get(identity, session_id)
                    yield Heartbeat(rules.utcnow(), last)
                    last_sent = time.monotonic()
        finally:
            metrics.WATCHERS.dec()
            sub.close()
            tm.release_watch(identity)
