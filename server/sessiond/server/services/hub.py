"""In-process fan-out of journal events to the watchers of this process.

Publishing never blocks: each subscription keeps a bounded buffer; a subscriber that
falls behind is marked `lagged` and re-reads the journal from the store instead, so a
slow watcher never delays Phase 2 and never misses an event.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from sessiond.server.domain.values import TaskEvent

BUFFER = 256


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Subscription:
    def __init__(self, hub: EventHub, task_id: str) -> None:
        self._hub = hub
        self.task_id = task_id
        self._events: deque[TaskEvent] = deque()
        self._woken = False  # set by _push/poke, cleared when a wait returns
        # The waiting subscriber's future: resolved directly by _push/poke, so a wake-up
        # of N watchers is N callbacks, not a task and two hand-offs each (wait_for).
        self._waiter: asyncio.Future[bool] | None = None
        self.lagged = False

    def _push(self, ev: TaskEvent) -> None:
        if len(self._events) >= BUFFER:
            self.lagged = True
            self._events.clear()
        else:
            self._events.append(ev)
        self._wake()

    def poke(self) -> None:
        """Wake the subscriber without an event (e.g. a cross-process notification)."""
        self._wake()

    def _wake(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - a poll interval
        """True when woken (since the last wait returned), False on timeout."""
        if self._events or self.lagged or self._woken:
            self._woken = False
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._woken = False

    def drain(self) -> tuple[list[TaskEvent], bool]:
        """Buffered events and whether some were dropped (re-read the store then)."""
        evs = list(self._events)
        self._events.clear()
        lagged, self.lagged = self.lagged, False
        return evs, lagged

    def close(self) -> None:
        self._hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {}

    def subscribe(self, task_id: str) -> Subscription:
        sub = Subscription(self, task_id)
        self._subs.setdefault(task_id, set()).add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.task_id]

    def publish(self, events: Sequence[TaskEvent]) -> None:
        for ev in events:
            for sub in self._subs.get(ev.task_id, ()):
                sub._push(ev)

    def poke(self, task_id: str) -> None:
        for sub in self._subs.get(task_id, ()):
            sub.poke()

    def poke_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.poke()

