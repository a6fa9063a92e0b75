"""A fair gate for Phase 2's CPU: K slots, granted to the identity that used least.

Every CPU-bound unit of Phase 2 work (an offline engine call, building an archive's
index entries, one store write or large read) runs while it holds one of the gate's
`slots`. Waiting units are granted in weighted fair queueing order (as a CFS run
queue does): each identity has a virtual time that grows by the seconds its units held
a slot; a free slot goes to the waiting identity with the lowest virtual time (FIFO
within one identity). An identity that becomes active again (nothing held, nothing
waiting before) starts at `max(its own, lowest active - sleeper_credit)`: a light
tenant runs ahead of a heavy one's backlog, but it cannot bank idle time without limit.

Long units are sliced. Work run through `run_cpu` (in one of the gate's threads)
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
import sys
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
# Seconds a task keeps its slot parked between two of its units (a store write, then
# the next engine slice) while no lower virtual time waits: a light task then runs
# through its few units without queueing behind a heavy identity at each of them.
# A parked slot is taken over at once by a waiter with a lower virtual time.
PARK_SECONDS = 0.003
# The interpreter's switch interval while a gate runs: a gate thread in pure-Python
# work keeps the GIL this long at most while the event loop or the store's writer
# thread waits for it (CPython's default, 5 ms, is paid at each of their many GIL
# re-acquisitions: a call of another tenant slows down by tens of milliseconds).
SWITCH_SECONDS = 0.001
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


@dataclass(eq=False)
class Seat:
    """One task's place at the gate (see `bind`): the slot it holds for its current
    unit, or keeps parked between two units."""

    gate: FairGate
    key: str
    grant: Grant | None = None
    depth: int = 0  # units of this task in progress (nested ones pass through)
    parked: bool = False
    parks: int = 0  # times parked (a timer expires only the parking it was set for)
    ending: bool = False  # the task is done: the last unit's end releases the slot


@dataclass
class _Identity:
    vtime: float = 0.0
    active: int = 0  # units of it holding or waiting for a slot
    waiting: list[_Waiter] = field(default_factory=list)


class FairGate:
    """K slots granted in weighted fair queueing order by identity key."""

    def __init__(self, slots: int = 1, *, slice_seconds: float = SLICE_SECONDS,
                 sleeper_credit: float = SLEEPER_CREDIT,
                 park_seconds: float = PARK_SECONDS, threads: int = POOL_THREADS,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self.slots = slots
        self.slice_seconds = slice_seconds
        self.sleeper_credit = sleeper_credit
        self.park_seconds = park_seconds
        self.threads = threads
        self.clock = clock
        self._lock = threading.Lock()
        self._parked: list[Seat] = []
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

    def _revoke_parked(self, vtime: float) -> None:
        """Free the slot parked by the highest virtual time above `vtime`, if any
        (under the lock)."""
        above = [st for st in self._parked if self._ids[st.key].vtime > vtime]
        if not above:
            return
        seat = max(above, key=lambda st: self._ids[st.key].vtime)
        self._drop_parked(seat)

    def _drop_parked(self, seat: Seat) -> None:
        """Release a parked seat's slot (under the lock; nobody is woken here)."""
        grant = seat.grant
        assert grant is not None and seat.parked
        self._parked.remove(seat)
        seat.parked, seat.grant = False, None
        grant.released = True
        self._charge(grant, self.clock())
        self._free += 1
        self._deactivate(grant.key)

    def _charge(self, grant: Grant, now: float) -> None:
        self._ids[grant.key].vtime += max(now - grant.since, 0.0)
        grant.since = now

    # --------------------------------------------------------------- acquiring
    def _enqueue(self, key: str, wake: Callable[[], None]) -> tuple[_Waiter | None,
                                                                    list[_Waiter]]:
        """Take a slot now (no waiter) or queue a waiter (under the lock); a slot
        parked by a higher virtual time is freed for it. Returns whom to wake (the
        new waiter may be among them)."""
        ident = self._activate(key)
        if self._free == 0:
            self._revoke_parked(ident.vtime)
        if self._free > 0 and self._best_waiter() is None:
            self._free -= 1
            return None, []
        w = _Waiter(key, next(self._seq), wake)
        ident.waiting.append(w)
        return w, self._grant_waiting()

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
            waiter, woken = self._enqueue(key, wake)
        for w in woken:
            w.wake()
        if waiter is not None:
            try:
                await fut
            except BaseException:
                with self._lock:
                    if not waiter.granted:
                        self._ids[key].waiting.remove(waiter)
                        self._deactivate(key)
                        again: list[_Waiter] = []
                    else:  # granted as it was cancelled: give the slot back
                        self._free += 1
                        self._deactivate(key)
                        again = self._grant_waiting()
                for w in again:
                    w.wake()
                raise
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

    # ------------------------------------------------------------------- seats
    async def take(self, seat: Seat) -> None:
        """Begin a unit of `seat`'s task: take back its parked slot, or wait for one."""
        if seat.depth:
            seat.depth += 1
            return
        with self._lock:
            if seat.parked:
                self._parked.remove(seat)
                seat.parked = False
                seat.depth = 1
                return
        seat.grant = await self.acquire(seat.key)
        seat.depth = 1

    def leave(self, seat: Seat) -> None:
        """End a unit of `seat`'s task (on the event loop): its slot goes to a lower
        virtual time that waits, or is parked for `park_seconds`."""
        seat.depth -= 1
        if seat.depth or seat.grant is None:
            return
        grant = seat.grant
        with self._lock:
            self._charge(grant, self.clock())
            best = self._best_waiter()
            keep = not seat.ending and self.park_seconds > 0 and (
                best is None or self._ids[best.key].vtime >= self._ids[seat.key].vtime)
            if keep:
                seat.parked = True
                seat.parks += 1
                self._parked.append(seat)
        if keep:
            asyncio.get_running_loop().call_later(self.park_seconds, self._expire, seat,
                                                  seat.parks)
            return
        seat.grant = None
        self.release(grant)

    def _expire(self, seat: Seat, parking: int) -> None:
        with self._lock:
            if not (seat.parked and seat.parks == parking):
                return  # taken back or taken over meanwhile
            self._drop_parked(seat)
            woken = self._grant_waiting()
        for w in woken:
            w.wake()

    def end(self, seat: Seat) -> None:
        """`seat`'s task is done: a parked slot is released now, one still in use
        when its unit ends."""
        seat.ending = True
        if seat.depth == 0 and seat.grant is not None:
            with self._lock:
                if not seat.parked:
                    return
                self._drop_parked(seat)
                woken = self._grant_waiting()
            for w in woken:
                w.wake()

    async def run_seated(self, seat: Seat, fn: Callable[[], T]) -> T:
        """`run` for a unit of `seat`'s task: the slot is the seat's (taken back when
        parked); a cancelled caller leaves the unit only once the thread is done."""
        await self.take(seat)
        grant = seat.grant
        assert grant is not None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads,
                                            thread_name_prefix="phase2-cpu")
        ctx = copy_context()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, lambda: ctx.run(_with_grant, grant, fn))
        try:
            result = await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(lambda _: self.leave(seat))
            raise
        except BaseException:
            self.leave(seat)
            raise
        self.leave(seat)
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def shorten_switch_interval(seconds: float = SWITCH_SECONDS) -> None:
    """Make the interpreter hand the GIL over at least every `seconds` (never longer
    than it already does)."""
    if sys.getswitchinterval() > seconds:
        sys.setswitchinterval(seconds)


def _with_grant(grant: Grant, fn: Callable[[], T]) -> T:
    token = _GRANT.set(grant)
    try:
        return fn()
    finally:
        _GRANT.reset(token)


# The seat of the Phase 2 task this context runs for (see `bind`).
_BOUND: ContextVar[Seat | None] = ContextVar("sessiond_phase2_seat", default=None)
# The slot a gate thread holds (set in `FairGate.run`'s thread).
_GRANT: ContextVar[Grant | None] = ContextVar("sessiond_phase2_grant", default=None)
# Whether this context holds a slot through `hold` already (nested units pass through).
_HELD: ContextVar[bool] = ContextVar("sessiond_phase2_held", default=False)


@contextlib.contextmanager
def bind(gate: FairGate | None, key: str) -> Iterator[None]:
    """Phase 2 work in this context (one task's run) goes through `gate` as `key`,
    from one seat: the task's units hold a slot each, parked in between."""
    seat = Seat(gate, key) if gate is not None else None
    token = _BOUND.set(seat)
    try:
        yield
    finally:
        _BOUND.reset(token)
        if seat is not None:
            seat.gate.end(seat)


async def run_cpu(fn: Callable[[], T]) -> T:
    """Run CPU-bound `fn` off the event loop: through the bound gate (holding a slot,
    sliced at its checkpoints), or in a plain thread when no gate is bound."""
    seat = _BOUND.get()
    if seat is None or _HELD.get():
        return await asyncio.to_thread(fn)
    return await seat.gate.run_seated(seat, fn)


@contextlib.asynccontextmanager
async def held() -> AsyncIterator[None]:
    """Hold a slot of the bound gate while the body runs (no gate bound, or a slot
    held already: the body just runs)."""
    seat = _BOUND.get()
    if seat is None or _HELD.get():
        yield
        return
    await seat.gate.take(seat)
    token = _HELD.set(True)
    try:
        yield
    finally:
        _HELD.reset(token)
        seat.gate.leave(seat)


def checkpoint() -> None:
    """Called by CPU-bound Phase 2 code every few milliseconds of work: hands the slot
    over when its slice is spent and another identity is due. A no-op outside a gate
    thread."""
    grant = _GRANT.get()
    if grant is not None:
        grant.gate.yield_if_due(grant)
