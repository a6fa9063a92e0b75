"""A fair gate for Phase 2's CPU: K slots, granted to the identity that used least.

Every CPU-bound unit of Phase 2 work (an offline engine call, building an archive's
index entries, one store write or large read) runs while it holds one of the gate's
`slots`. Waiting units are granted in weighted fair queueing order (as a CFS run
queue does): each identity has a virtual time that grows by the seconds its units held
a slot; a free slot goes to the waiting identity with the lowest virtual time (FIFO
within one identity). An identity that becomes active again (nothing held, nothing
waiting before) starts at `max(its own, lowest active - sleeper_credit)`: a light
tenant runs ahead of a heavy one's backlog, but it cannot bank idle time without limit.

Long units are sliced. Work run through `FairGate.run` (in one of the gate's threads)
calls `checkpoint()` every few milliseconds; once the unit has held its slot for
`slice_seconds` and a lower virtual time waits, the slot is handed over there and the
thread blocks until the gate grants it again. So what waits for a slot waits for at
most one slice per slot, not for a whole engine call of another identity.

Domain-free: keys are strings, no store or gRPC here. The binding of the current
task's gate and key travels in a context variable (`bound`), so code deep in a stage
(the offline engine) asks for `run_cpu` / `checkpoint` without being handed the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

# Seconds a unit may hold a slot before a checkpoint hands it to a lower virtual time.
SLICE_SECONDS = 0.004
# How far behind the lowest active virtual time a returning identity may start.
SLEEPER_CREDIT = 0.05
# Threads of the gate's own pool: a thread blocked at a checkpoint keeps its worker,
# so the pool is larger than the Phase 2 tasks that can run at once (a unit gets its
# slot only once its thread runs: a full pool delays, never deadlocks).
POOL_THREADS = 64


@dataclass(eq=False)
class _Waiter:
    key: str
    seq: int
    wake: Callable[[], None]
    granted: bool = False


@dataclass(eq=False)
class Grant:
    """A held slot: whose it is and since when it is charged."""

    key: str
    since: float
    gate: FairGate
    released: bool = False


@dataclass
class _Identity:
    vtime: float = 0.0
    active: int = 0  # units of it holding or waiting for a slot
    waiting: list[_Waiter] = field(default_factory=list)


class FairGate:
    """K slots granted in weighted fair queueing order by identity key."""

    def __init__(self, slots: int = 1, *, slice_seconds: float = SLICE_SECONDS,
                 sleeper_credit: float = SLEEPER_CREDIT,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self.slots = slots
        self.slice_seconds = slice_seconds
        self.sleeper_credit = sleeper_credit
        self.clock = clock
        self._lock = threading.Lock()
        self._free = slots
        self._ids: dict[str, _Identity] = {}
        self._seq = itertools.count()
        self._floor = 0.0  # the lowest active virtual time last seen
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ state
    def vtime(self, key: str) -> float:
        with self._lock:
            ident = self._ids.get(key)
            return ident.vtime if ident is not None else 0.0

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(i.waiting) for i in self._ids.values())

    def _activate(self, key: str) -> _Identity:
        ident = self._ids.setdefault(key, _Identity())
        if ident.active == 0:
            active = [i.vtime for i in self._ids.values() if i.active]
            if active:
                self._floor = max(self._floor, min(active))
            ident.vtime = max(ident.vtime, self._floor - self.sleeper_credit)
        ident.active += 1
        return ident

    def _deactivate(self, key: str) -> None:
        ident = self._ids[key]
        ident.active -= 1
        if ident.active == 0 and not ident.waiting:
            self._floor = max(self._floor, min(
                (i.vtime for i in self._ids.values() if i.active), default=ident.vtime))

    def _best_waiter(self) -> _Waiter | None:
        best: _Waiter | None = None
        best_at = (0.0, 0)
        for ident in self._ids.values():
            if ident.waiting:
                w = ident.waiting[0]
                at = (ident.vtime, w.seq)
                if best is None or at < best_at:
                    best, best_at = w, at
        return best

    def _grant_waiting(self) -> list[_Waiter]:
        """Give free slots to the best waiters (under the lock); returns whom to wake."""
        woken: list[_Waiter] = []
        while self._free > 0 and (w := self._best_waiter()) is not None:
            self._ids[w.key].waiting.pop(0)
            w.granted = True
            self._free -= 1
            woken.append(w)
        return woken

    def _charge(self, grant: Grant, now: float) -> None:
        self._ids[grant.key].vtime += max(now - grant.since, 0.0)
        grant.since = now

    # --------------------------------------------------------------- acquiring
    def _enqueue(self, key: str, wake: Callable[[], None]) -> tuple[_Waiter | None, bool]:
        """Take a slot now (True) or queue a waiter (under the lock)."""
        ident = self._activate(key)
        if self._free > 0 and self._best_waiter() is None:
            self._free -= 1
            return None, True
        w = _Waiter(key, next(self._seq), wake)
        ident.waiting.append(w)
        return w, False

    async def acquire(self, key: str) -> Grant:
        """Wait for a slot for `key` (from the event loop)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not fut.done():
                fut.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(settle)

        with self._lock:
            waiter, _ = self._enqueue(key, wake)
        if waiter is not None:
            try:
                await fut
            except BaseException:
                with self._lock:
                    if not waiter.granted:
                        self._ids[key].waiting.remove(waiter)
                        self._deactivate(key)
                        woken: list[_Waiter] = []
                    else:  # granted as it was cancelled: give the slot back
                        self._free += 1
                        self._deactivate(key)
                        woken = self._grant_waiting()
                for w in woken:
                    w.wake()
                raise
        return Grant(key, self.clock(), self)

    def acquire_blocking(self, key: str) -> Grant:
        """Wait for a slot for `key` from a thread that is not the event loop's."""
        event = threading.Event()
        with self._lock:
            waiter, _ = self._enqueue(key, event.set)
        if waiter is not None:
            event.wait()
        return Grant(key, self.clock(), self)

    def release(self, grant: Grant) -> None:
        """Give `grant`'s slot back (from any thread), charging its holder."""
        if grant.released:
            return
        grant.released = True
        with self._lock:
            self._charge(grant, self.clock())
            self._free += 1
            self._deactivate(grant.key)
            woken = self._grant_waiting()
        for w in woken:
            w.wake()

    def yield_if_due(self, grant: Grant) -> bool:
        """At a checkpoint of `grant`'s holder (a gate thread): once its slice is spent
        and a lower virtual time waits, hand the slot over and block until granted
        again. Returns whether it yielded."""
        now = self.clock()
        if now - grant.since < self.slice_seconds:
            return False
        event = threading.Event()
        with self._lock:
            self._charge(grant, now)
            best = self._best_waiter()
            if best is None or self._ids[best.key].vtime >= self._ids[grant.key].vtime:
                return False
            # Queue behind it (it keeps the identity active: no sleeper credit).
            w = _Waiter(grant.key, next(self._seq), event.set)
            self._ids[grant.key].waiting.append(w)
            self._free += 1
            woken = self._grant_waiting()
        for x in woken:
            x.wake()
        event.wait()
        grant.since = self.clock()
        return True

    # ------------------------------------------------------------------ running
    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[Grant]:
        """Hold a slot for `key` while the body runs (an awaited unit: a store write)."""
        grant = await self.acquire(key)
        token = _HELD.set(True)
        try:
            yield grant
        finally:
            _HELD.reset(token)
            self.release(grant)

    async def run(self, key: str, fn: Callable[[], T]) -> T:
        """Run `fn` in one of the gate's threads holding a slot for `key`; `fn`'s
        `checkpoint()` calls hand the slot over when due. The thread releases the slot
        itself when `fn` returns, so a cancelled caller never frees a slot still used."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=POOL_THREADS,
                                            thread_name_prefix="phase2-cpu")
        ctx = copy_context()

        def in_thread() -> T:
            grant = self.acquire_blocking(key)
            try:
                return ctx.run(_with_grant, grant, fn)
            finally:
                self.release(grant)

        return await asyncio.get_running_loop().run_in_executor(self._pool, in_thread)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def _with_grant(grant: Grant, fn: Callable[[], T]) -> T:
    token = _GRANT.set(grant)
    try:
        return fn()
    finally:
        _GRANT.reset(token)


# The gate and key of the Phase 2 task this context runs for (see `bind`).
_BOUND: ContextVar[tuple[FairGate, str] | None] = ContextVar("sessiond_phase2_gate",
                                                            default=None)
# The slot a gate thread holds (set in `FairGate.run`'s thread).
_GRANT: ContextVar[Grant | None] = ContextVar("sessiond_phase2_grant", default=None)
# Whether this context holds a slot through `hold` already (nested units pass through).
_HELD: ContextVar[bool] = ContextVar("sessiond_phase2_held", default=False)


@contextlib.contextmanager
def bind(gate: FairGate | None, key: str) -> Iterator[None]:
    """Phase 2 work in this context (a task's run) goes through `gate` as `key`."""
    token = _BOUND.set((gate, key) if gate is not None else None)
    try:
        yield
    finally:
        _BOUND.reset(token)


async def run_cpu(fn: Callable[[], T]) -> T:
    """Run CPU-bound `fn` off the event loop: through the bound gate (holding a slot,
    sliced at its checkpoints), or in a plain thread when no gate is bound."""
    bound = _BOUND.get()
    if bound is None or _HELD.get():
        return await asyncio.to_thread(fn)
    gate, key = bound
    return await gate.run(key, fn)


@contextlib.asynccontextmanager
async def held() -> AsyncIterator[None]:
    """Hold a slot of the bound gate while the body runs (no gate bound, or a slot
    held already: the body just runs)."""
    bound = _BOUND.get()
    if bound is None or _HELD.get():
        yield
        return
    gate, key = bound
    async with gate.hold(key):
        yield


def checkpoint() -> None:
    """Called by CPU-bound Phase 2 code every few milliseconds of work: hands the slot
    over when its slice is spent and another identity is due. A no-op outside a gate
    thread."""
    grant = _GRANT.get()
    if grant is not None:
        grant.gate.yield_if_due(grant)
