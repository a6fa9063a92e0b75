"""Resumable task watches: `watch_task` (sync) and `aio_watch_task` (asyncio).

`TaskService.WatchTask` sends a snapshot, then every journal event with
seq > after_seq, heartbeats while idle, and ends OK after the terminal event. A
stream can break before that: the server restarts (UNAVAILABLE), a proxy resets the
HTTP/2 stream (INTERNAL "RST_STREAM"), something between cancels it (CANCELLED that
we did not ask for), or the server ends the stream without the terminal event. The
iterators here re-attach with `after_seq` = the last event they delivered, so the
caller sees every event exactly once and in order.

Resume policy (tenacity): exponential backoff with full jitter between attempts,
at most `ResumePolicy.max_attempts` consecutive failed attempts, and the count starts
over whenever the stream makes progress: a new event, or a heartbeat (the stream
stayed up through an idle period). A snapshot alone is not progress, so a server
that accepts watches and drops them at once still exhausts the budget.

Other errors are final and raised at once as the grpc.RpcError the call gave
(NOT_FOUND, OUT_OF_RANGE, PERMISSION_DENIED, INVALID_ARGUMENT, DEADLINE_EXCEEDED,
INTERNAL without RST_STREAM, ...). Giving up raises `WatchInterrupted` (resume
yourself at its `last_seq`); the overall `timeout` running out raises `WatchTimeout`.

By default only TaskEvents are yielded. `include_snapshots=True` also yields the
Task snapshot that starts every (re-)attached stream, `include_heartbeats=True`
the Heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Literal, NoReturn, TypeVar, cast, overload

import grpc
import tenacity
from sessiond.client.errors import WatchInterrupted, WatchTimeout
from sessiond.v1 import task_pb2, task_pb2_grpc

__all__ = [
    "RESUMABLE_CODES",
    "TERMINAL_EVENT_KINDS",
    "TERMINAL_STATES",
    "AioTaskWatch",
    "ResumePolicy",
    "TaskWatch",
    "WatchItem",
    "aio_watch_task",
    "is_terminal",
    "watch_task",
]

log = logging.getLogger("sessiond.client")

WatchItem = task_pb2.TaskEvent | task_pb2.Task | task_pb2.Heartbeat
Metadata = Sequence[tuple[str, str]]
T_co = TypeVar("T_co", covariant=True)

TERMINAL_EVENT_KINDS: frozenset[int] = frozenset({
    task_pb2.TASK_EVENT_KIND_COMPLETED,
    task_pb2.TASK_EVENT_KIND_FAILED,
    task_pb2.TASK_EVENT_KIND_CANCELLED,
})
TERMINAL_STATES: frozenset[int] = frozenset({
    task_pb2.TASK_STATE_COMPLETED,
    task_pb2.TASK_STATE_FAILED,
    task_pb2.TASK_STATE_CANCELLED,
})
# Always resumed. So are INTERNAL with "RST_STREAM" in the details and CANCELLED
# (which this client never causes on a call it is reading), see `_Progress.resumable`.
RESUMABLE_CODES: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})


def is_terminal(state: int) -> bool:
    """True for COMPLETED, FAILED and CANCELLED."""
    return state in TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class ResumePolicy:
    """How a broken watch is re-attached.

    Before attempt n+1 after n consecutive failures the iterator sleeps a random
    time in [0, min(max_backoff, initial_backoff * multiplier**(n-1))] ("full
    jitter"). After `max_attempts` consecutive failed attempts it gives up. A new
    event or a heartbeat resets the count. The defaults ride out a server restart of ~20 s."""

    max_attempts: int = 10
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def wait_strategy(self) -> tenacity.wait.wait_base:
        return tenacity.wait_random_exponential(multiplier=self.initial_backoff,
                                                max=self.max_backoff, exp_base=self.multiplier)


DEFAULT_RESUME_POLICY = ResumePolicy()


class _StreamEnded(Exception):
    """The server closed the stream OK before the terminal event: re-attach."""


class _JournalGap(Exception):
    """An event arrived out of order (a gap): re-attach from the last good one."""


def _is_deadline(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED


class _Progress:
    """What sync and aio watches share: position, classification, retry policy."""

    def __init__(self, task_id: str, after_seq: int, include_snapshots: bool,
                 include_heartbeats: bool, metadata: Metadata | None, timeout: float | None,
                 policy: ResumePolicy) -> None:
        if after_seq < 0:
            raise ValueError("after_seq must be >= 0")
        self.task_id = task_id
        self.last_seq = after_seq
        self.include_snapshots = include_snapshots
        self.include_heartbeats = include_heartbeats
        self.metadata: tuple[tuple[str, str], ...] | None = (
            tuple(metadata) if metadata is not None else None)
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.policy = policy
        self.snapshot: task_pb2.Task | None = None
        self.terminal_event: task_pb2.TaskEvent | None = None
        self.done = False
        self.attaches = 0

    # -- the request of one attempt -----------------------------------------------------
    def request(self) -> task_pb2.WatchTaskRequest:
        self.attaches += 1
        return task_pb2.WatchTaskRequest(task_id=self.task_id, after_seq=self.last_seq)

    def call_timeout(self) -> float | None:
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self.timed_out()
        return remaining

    def timed_out(self) -> WatchTimeout:
        return WatchTimeout(f"watch of task {self.task_id} timed out after seq {self.last_seq}",
                            task_id=self.task_id, last_seq=self.last_seq, attempts=self.attaches)

    # -- one response -------------------------------------------------------------------
    def accept(self, resp: task_pb2.WatchTaskResponse) -> tuple[WatchItem | None, bool]:
        """The item to hand to the caller (or None) and whether the stream made
        progress (a new event, or a heartbeat: alive past its snapshot)."""
        kind = resp.WhichOneof("kind")
        if kind == "event":
            ev = resp.event
            if ev.seq <= self.last_seq:
                return None, False  # already delivered
            if ev.seq != self.last_seq + 1:
                raise _JournalGap(f"task {self.task_id}: expected event {self.last_seq + 1}, "
                                  f"got {ev.seq}")
            self.last_seq = ev.seq
            # A terminal event older than the snapshot's newest was followed by a
            # retry (RETRIED): the journal goes on.
            if ev.kind in TERMINAL_EVENT_KINDS and (
                    self.snapshot is None or self.snapshot.last_seq <= ev.seq):
                self.terminal_event = ev
                self.done = True
            return ev, True
        if kind == "snapshot":
            self.snapshot = resp.snapshot
            if is_terminal(resp.snapshot.state) and resp.snapshot.last_seq <= self.last_seq:
                self.done = True  # nothing after our position will ever come
            return (resp.snapshot if self.include_snapshots else None), False
        if kind == "heartbeat":
            # The stream outlived an idle period: it works, even without new events.
            return (resp.heartbeat if self.include_heartbeats else None), True
        return None, False  # a kind newer than this client

    def stream_ended(self) -> _StreamEnded:
        return _StreamEnded(f"watch of task {self.task_id} ended after seq {self.last_seq} "
                            "without a terminal event")

    # -- errors -------------------------------------------------------------------------
    def resumable(self, exc: BaseException) -> bool:
        if isinstance(exc, _StreamEnded | _JournalGap):
            return True
        if not isinstance(exc, grpc.RpcError):
            return False
        code = exc.code()
        if code in RESUMABLE_CODES:
            return True
        if code is grpc.StatusCode.INTERNAL:
            return "RST_STREAM" in (exc.details() or "")
        # This client never cancels a call it is still reading, so CANCELLED came from
        # the server or something in between.
        return code is grpc.StatusCode.CANCELLED

    def raise_translated(self, exc: grpc.RpcError) -> NoReturn:
        """Re-raise `exc`, except that DEADLINE_EXCEEDED of a call that carried our
        overall deadline becomes WatchTimeout."""
        if self.deadline is not None and _is_deadline(exc):
            raise self.timed_out() from exc
        raise exc

    @staticmethod
    def reset_after_progress(retry_state: tenacity.RetryCallState) -> None:
        """The stream made progress: the failure streak is over, start counting again."""
        retry_state.attempt_number = 1

    def gave_up(self, exc: tenacity.RetryError) -> WatchInterrupted:
        attempts = exc.last_attempt.attempt_number
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return self.timed_out()
        last = exc.last_attempt.exception()
        return WatchInterrupted(
            f"watch of task {self.task_id} broke {attempts} times in a row "
            f"(last: {_describe(last)}); resume with after_seq={self.last_seq}",
            task_id=self.task_id, last_seq=self.last_seq, attempts=attempts)

    # -- tenacity plumbing --------------------------------------------------------------
    def _stop(self, retry_state: tenacity.RetryCallState) -> bool:
        if retry_state.attempt_number >= self.policy.max_attempts:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _wait(self, base: tenacity.wait.wait_base, retry_state: tenacity.RetryCallState
              ) -> float:
        pause = float(base(retry_state))
        if self.deadline is not None:
            pause = min(pause, max(0.0, self.deadline - time.monotonic()))
        return pause

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        sleep = retry_state.next_action.sleep if retry_state.next_action is not None else 0.0
        log.info("watch of task %s broke (%s); re-attaching after seq %d in %.2fs "
                 "(attempt %d of %d)", self.task_id, _describe(exc), self.last_seq, sleep,
                 retry_state.attempt_number + 1, self.policy.max_attempts)

    def retrying(self) -> tenacity.Retrying:
        base = self.policy.wait_strategy()
        return tenacity.Retrying(
            sleep=time.sleep, stop=self._stop, wait=lambda rs: self._wait(base, rs),
            retry=tenacity.retry_if_exception(self.resumable),
            before_sleep=self._before_sleep, reraise=False)

    def aio_retrying(self) -> tenacity.AsyncRetrying:
        base = self.policy.wait_strategy()
        return tenacity.AsyncRetrying(
            sleep=asyncio.sleep, stop=self._stop, wait=lambda rs: self._wait(base, rs),
            retry=tenacity.retry_if_exception(self.resumable),
            before_sleep=self._before_sleep, reraise=False)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)


def _sync_stub(target: task_pb2_grpc.TaskServiceStub | grpc.Channel
               ) -> task_pb2_grpc.TaskServiceStub:
    if isinstance(target, grpc.Channel):
        return task_pb2_grpc.TaskServiceStub(target)
    return target


def _aio_stub(target: task_pb2_grpc.TaskServiceAsyncStub | grpc.aio.Channel
              ) -> task_pb2_grpc.TaskServiceAsyncStub:
    if isinstance(target, grpc.aio.Channel):
        return task_pb2_grpc.TaskServiceStub(target)
    return target


class _WatchState(Generic[T_co]):
    """Read-only views of a watch's position (shared by TaskWatch and AioTaskWatch)."""

    _p: _Progress

    @property
    def task_id(self) -> str:
        return self._p.task_id

    @property
    def last_seq(self) -> int:
        """Seq of the last event delivered (or the starting `after_seq`)."""
        return self._p.last_seq

    @property
    def snapshot(self) -> task_pb2.Task | None:
        """The Task snapshot of the latest (re-)attached stream."""
        return self._p.snapshot

    @property
    def terminal_event(self) -> task_pb2.TaskEvent | None:
        """The COMPLETED/FAILED/CANCELLED event, once delivered."""
        return self._p.terminal_event

    @property
    def done(self) -> bool:
        """True once the task's end has been observed (the iterator then stops)."""
        return self._p.done

    @property
    def resumes(self) -> int:
        """How many times the watch re-attached after a broken stream."""
        return max(0, self._p.attaches - 1)


class TaskWatch(_WatchState[T_co], Iterator[T_co]):
    """A sync, resuming iterator over one task's watch. Close it (or use `with`) when
    you stop early; that cancels the underlying call."""

    def __init__(self, stub: task_pb2_grpc.TaskServiceStub, progress: _Progress) -> None:
        self._stub = stub
        self._p = progress
        self._gen = self._run()

    def __iter__(self) -> TaskWatch[T_co]:
        return self

    def __next__(self) -> T_co:
        return cast(T_co, next(self._gen))

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> TaskWatch[T_co]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _run(self) -> Generator[WatchItem, None, None]:
        p = self._p
        try:
            for attempt in p.retrying():
                with attempt:
                    request = p.request()
                    call = self._stub.WatchTask(request, timeout=p.call_timeout(),
                                                metadata=p.metadata)
                    try:
                        for resp in call:
                            item, progressed = p.accept(resp)
                            if progressed:
                                p.reset_after_progress(attempt.retry_state)
                            if item is not None:
                                try:
                                    yield item
                                except GeneratorExit:
                                    return
                            if p.done:
                                return
                        if p.done:
                            return
                        raise p.stream_ended()
                    except grpc.RpcError as exc:
                        p.raise_translated(exc)
                    finally:
                        call.cancel()  # no-op unless we leave early
        except tenacity.RetryError as exc:
            raise p.gave_up(exc) from exc.last_attempt.exception()


class AioTaskWatch(_WatchState[T_co], AsyncIterator[T_co]):
    """The asyncio twin of TaskWatch. Use it on the loop that owns the channel;
    `aclose()` (or `async with`) cancels the underlying call when you stop early."""

    def __init__(self, stub: task_pb2_grpc.TaskServiceAsyncStub, progress: _Progress) -> None:
        self._stub = stub
        self._p = progress
        self._gen = self._run()

    def __aiter__(self) -> AioTaskWatch[T_co]:
        return self

    async def __anext__(self) -> T_co:
        return cast(T_co, await self._gen.__anext__())

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> AioTaskWatch[T_co]:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[WatchItem, None]:
        p = self._p
        try:
            async for attempt in p.aio_retrying():
                with attempt:
                    request = p.request()
                    call = self._stub.WatchTask(request, timeout=p.call_timeout(),
                                                metadata=p.metadata)
                    try:
                        async for resp in call:
                            item, progressed = p.accept(resp)
                            if progressed:
                                p.reset_after_progress(attempt.retry_state)
                            if item is not None:
                                try:
                                    yield item
                                except GeneratorExit:
                                    return
                            if p.done:
                                return
                        if p.done:
                            return
                        raise p.stream_ended()
                    except grpc.RpcError as exc:
                        p.raise_translated(exc)
                    finally:
                        call.cancel()  # no-op unless we leave early
        except tenacity.RetryError as exc:
            raise p.gave_up(exc) from exc.last_attempt.exception()


@overload
def watch_task(target: task_pb2_grpc.TaskServiceStub | grpc.Channel, task_id: str, *,
               after_seq: int = 0, include_snapshots: Literal[False] = False,
               include_heartbeats: Literal[False] = False, metadata: Metadata | None = None,
               timeout: float | None = None, resume: ResumePolicy | None = None
               ) -> TaskWatch[task_pb2.TaskEvent]: ...
@overload
def watch_task(target: task_pb2_grpc.TaskServiceStub | grpc.Channel, task_id: str, *,
               after_seq: int = 0, include_snapshots: bool = False,
               include_heartbeats: bool = False, metadata: Metadata | None = None,
               timeout: float | None = None, resume: ResumePolicy | None = None
               ) -> TaskWatch[WatchItem]: ...
def watch_task(target: task_pb2_grpc.TaskServiceStub | grpc.Channel, task_id: str, *,
               after_seq: int = 0, include_snapshots: bool = False,
               include_heartbeats: bool = False, metadata: Metadata | None = None,
               timeout: float | None = None, resume: ResumePolicy | None = None
               ) -> TaskWatch[WatchItem]:
    """Iterate the events of task `task_id` after `after_seq`, re-attaching across
    broken streams; stops after the terminal event.

    `target` is a TaskServiceStub or a channel. `metadata` is sent on every attempt
    (e.g. identity keys when the channel does not add them). `timeout` bounds the whole
    watch, re-attaches and backoff included (then WatchTimeout)."""
    progress = _Progress(task_id, after_seq, include_snapshots, include_heartbeats, metadata,
                         timeout, resume or DEFAULT_RESUME_POLICY)
    return TaskWatch(_sync_stub(target), progress)


@overload
def aio_watch_task(target: task_pb2_grpc.TaskServiceAsyncStub | grpc.aio.Channel,
                   task_id: str, *, after_seq: int = 0,
                   include_snapshots: Literal[False] = False,
                   include_heartbeats: Literal[False] = False,
                   metadata: Metadata | None = None, timeout: float | None = None,
                   resume: ResumePolicy | None = None) -> AioTaskWatch[task_pb2.TaskEvent]: ...
@overload
def aio_watch_task(target: task_pb2_grpc.TaskServiceAsyncStub | grpc.aio.Channel,
                   task_id: str, *, after_seq: int = 0, include_snapshots: bool = False,
                   include_heartbeats: bool = False, metadata: Metadata | None = None,
                   timeout: float | None = None, resume: ResumePolicy | None = None
                   ) -> AioTaskWatch[WatchItem]: ...
def aio_watch_task(target: task_pb2_grpc.TaskServiceAsyncStub | grpc.aio.Channel,
                   task_id: str, *, after_seq: int = 0, include_snapshots: bool = False,
                   include_heartbeats: bool = False, metadata: Metadata | None = None,
                   timeout: float | None = None, resume: ResumePolicy | None = None
                   ) -> AioTaskWatch[WatchItem]:
    """The asyncio twin of `watch_task`: `async for event in aio_watch_task(...)`."""
    progress = _Progress(task_id, after_seq, include_snapshots, include_heartbeats, metadata,
                         timeout, resume or DEFAULT_RESUME_POLICY)
    return AioTaskWatch(_aio_stub(target), progress)
