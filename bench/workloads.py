"""Client-side workloads (grpc.aio). Every loop here is bounded by a count and a clock.

The same functions drive sessiond and the floor: the floor ignores session ids and
answers with canned replies, so a figure and its baseline run the very same client code.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from sessiond.v1 import session_pb2, session_pb2_grpc, task_pb2, task_pb2_grpc

RPC_TIMEOUT = 30.0
WATCH_TIMEOUT = 120.0
TERMINAL_KINDS = frozenset({task_pb2.TASK_EVENT_KIND_COMPLETED, task_pb2.TASK_EVENT_KIND_FAILED,
                            task_pb2.TASK_EVENT_KIND_CANCELLED})
PAYLOAD_BYTES = 500

_WORDS = ("agent tool call result context memory session archive user assistant search "
          "file read write plan step error retry summary token model reply prompt query "
          "index vector cache budget latency deploy config branch commit review test log").split()


def make_text(seed: int, size: int = PAYLOAD_BYTES) -> str:
    """Deterministic pseudo-English text of exactly `size` ASCII bytes."""
    rng = random.Random(seed)
    words: list[str] = []
    n = 0
    while n < size:
        w = rng.choice(_WORDS)
        words.append(w)
        n += len(w) + 1
    text = " ".join(words)
    return (text + "." * size)[:size]


def add_request(session_id: str, seed: int) -> session_pb2.AddMessageRequest:
    role = session_pb2.ROLE_USER if seed % 2 == 0 else session_pb2.ROLE_ASSISTANT
    return session_pb2.AddMessageRequest(session_id=session_id, role=role, parts=[
        session_pb2.Part(text=session_pb2.TextPart(text=make_text(seed)))])


@dataclass
class Stubs:
    channel: grpc.aio.Channel
    sessions: session_pb2_grpc.SessionServiceAsyncStub  # annotation only (see connect)
    tasks: task_pb2_grpc.TaskServiceAsyncStub

    @classmethod
    def connect(cls, target: str, own_connection: bool = False) -> Stubs:
        """`own_connection`: not shared with other channels of this process to the same
        target (grpc shares subchannels by default), so a server of several processes
        on one port may get each such channel on a different process."""
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        ch = grpc.aio.insecure_channel(target, options=options)
        # The generated stubs are typed as their *AsyncStub variants (which exist for the
        # type checker only) when built on an aio channel.
        return cls(ch, session_pb2_grpc.SessionServiceStub(ch), task_pb2_grpc.TaskServiceStub(ch))

    async def ready(self, wait_s: float = 15.0) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), wait_s)

    async def close(self) -> None:
        await self.channel.close()


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds
    count: int = 0  # completions inside the measured window
    errors: int = 0
    elapsed: float = 0.0
    first_error: str = ""

    @property
    def throughput(self) -> float:
        return self.count / self.elapsed if self.elapsed > 0 else float("nan")

    def merge(self, other: LoadResult) -> None:
        self.latencies += other.latencies
        self.count += other.count
        self.errors += other.errors
        self.elapsed = max(self.elapsed, other.elapsed)
        self.first_error = self.first_error or other.first_error


def _err(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


async def closed_loop(make_call: Callable[[int], Callable[[], Awaitable[Any]]],
                      concurrency: int, duration: float, warmup: float = 0.2,
                      max_calls_per_worker: int = 1_000_000) -> LoadResult:
    """`concurrency` workers call back to back for warmup + duration seconds. Counted:
    calls that both start and finish inside the measured window."""
    res = LoadResult()
    t_start = time.perf_counter()
    win_start = t_start + warmup
    win_end = win_start + duration

    async def worker(i: int) -> None:
        call = make_call(i)
        for _ in range(max_calls_per_worker):
            t0 = time.perf_counter()
            if t0 >= win_end:
                return
            try:
                await call()
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                res.errors += 1
                res.first_error = res.first_error or _err(exc)
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            if t0 >= win_start and t1 <= win_end:
                res.latencies.append(t1 - t0)
                res.count += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    res.elapsed = duration
    return res


def add_message_caller(stubs: Stubs, session_ids: Sequence[str], variants: int = 16
                       ) -> Callable[[int], Callable[[], Awaitable[Any]]]:
    """Worker i appends ~500-byte text messages to its own session."""
    def make(i: int) -> Callable[[], Awaitable[Any]]:
        sid = session_ids[i % len(session_ids)]
        reqs = [add_request(sid, i * 1000 + v) for v in range(variants)]
        n = 0

        def call() -> Awaitable[Any]:
            nonlocal n
            n += 1
            return stubs.sessions.AddMessage(reqs[n % variants], timeout=RPC_TIMEOUT)

        return call

    return make


async def run_bounded(jobs: Sequence[Callable[[], Awaitable[Any]]], concurrency: int,
                      wait_s: float = 600.0) -> list[Any]:
    """Run every job with at most `concurrency` in flight; results in job order."""
    results: list[Any] = [None] * len(jobs)
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < len(jobs):
            i = next_i
            next_i += 1
            results[i] = await jobs[i]()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), wait_s)
    return results


async def create_sessions(stubs: Stubs, session_ids: Sequence[str], concurrency: int = 32
                          ) -> float:
    """CreateSession for each id (an existing id is fine). Returns seconds taken."""
    async def one(sid: str) -> None:
        try:
            await stubs.sessions.CreateSession(
                session_pb2.CreateSessionRequest(session_id=sid), timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    t0 = time.perf_counter()
    await run_bounded([functools.partial(one, sid) for sid in session_ids], concurrency)
    return time.perf_counter() - t0


async def populate(stubs: Stubs, session_ids: Sequence[str], per_session: int,
                   concurrency: int = 16, seed: int = 0) -> float:
    """Append `per_session` ~500-byte messages to each session (in order within a session,
    sessions in parallel). Returns seconds taken."""
    async def fill(j: int, sid: str) -> None:
        for k in range(per_session):
            await stubs.sessions.AddMessage(add_request(sid, seed + j * 7919 + k),
                                            timeout=RPC_TIMEOUT)

    t0 = time.perf_counter()
    await run_bounded([functools.partial(fill, j, s) for j, s in enumerate(session_ids)],
                      concurrency)
    return time.perf_counter() - t0


@dataclass
class WatchOutcome:
    terminal_kind: task_pb2.TaskEventKind.ValueType = task_pb2.TASK_EVENT_KIND_UNSPECIFIED
    events: int = 0
    t_end: float = 0.0  # perf_counter when the terminal event arrived


async def watch_to_end(stubs: Stubs, task_id: str, after_seq: int = 0,
                       wait_s: float = WATCH_TIMEOUT) -> WatchOutcome:
    """Follow WatchTask until the terminal event (or the stream ends / times out)."""
    out = WatchOutcome()
    call = stubs.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id, after_seq=after_seq),
                                 timeout=wait_s)
    try:
        async for item in call:
            if item.WhichOneof("kind") != "event":
                continue
            out.events += 1
            if item.event.kind in TERMINAL_KINDS:
                out.t_end = time.perf_counter()
                out.terminal_kind = item.event.kind
                break
    finally:
        if not call.done():
            call.cancel()
    return out


@dataclass
class CommitSamples:
    phase1: list[float] = field(default_factory=list)  # Commit RPC latency, seconds
    e2e: list[float] = field(default_factory=list)  # accepted reply -> terminal event
    completed: int = 0
    failed: int = 0
    elapsed: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)
    done_at: list[float] = field(default_factory=list)  # perf_counter of each completion
    steady_rate: float = float("nan")  # completions/s while every session was still busy


async def commit_and_watch(stubs: Stubs, session_id: str, keep_recent: int, out: CommitSamples,
                           record_e2e: bool = True) -> None:
    t0 = time.perf_counter()
    reply = await stubs.sessions.Commit(session_pb2.CommitRequest(
        session_id=session_id, keep_recent_count=keep_recent), timeout=RPC_TIMEOUT)
    t1 = time.perf_counter()
    out.phase1.append(t1 - t0)
    if not reply.task_id:
        out.failed += 1
        out.kinds["NOT_ARCHIVED"] = out.kinds.get("NOT_ARCHIVED", 0) + 1
        return
    w = await watch_to_end(stubs, reply.task_id)
    name = task_pb2.TaskEventKind.Name(w.terminal_kind) if w.terminal_kind else "NO_TERMINAL"
    out.kinds[name] = out.kinds.get(name, 0) + 1
    if w.terminal_kind == task_pb2.TASK_EVENT_KIND_COMPLETED:
        out.completed += 1
        out.done_at.append(w.t_end)
        if record_e2e:
            out.e2e.append(w.t_end - t1)
    else:
        out.failed += 1


async def sequential_commits(stubs: Stubs, session_ids: Sequence[str],
                             time_budget: float = 300.0) -> CommitSamples:
    """One Commit at a time; each waits for its Phase 2 to end before the next, so
    Phase 1 is timed on an otherwise idle server."""
    out = CommitSamples()
    t0 = time.perf_counter()
    for sid in session_ids:
        if time.perf_counter() - t0 > time_budget:
            break
        await commit_and_watch(stubs, sid, 0, out)
    out.elapsed = time.perf_counter() - t0
    return out


async def concurrent_commits(stubs: Stubs, session_ids: Sequence[str], rounds: int,
                             per_commit: int, time_budget: float = 300.0) -> CommitSamples:
    """Each session commits `rounds` times, `per_commit` messages each (the session was
    populated with rounds * per_commit messages; keep_recent_count leaves the rest
    live), waiting for each commit's terminal event before the next."""
    out = CommitSamples()
    t0 = time.perf_counter()
    deadline = t0 + time_budget
    finished: list[float] = []

    async def one_session(sid: str) -> None:
        live = rounds * per_commit
        try:
            for _ in range(rounds):
                if time.perf_counter() > deadline:
                    return
                live -= per_commit
                await commit_and_watch(stubs, sid, live, out)
        finally:
            finished.append(time.perf_counter())

    await asyncio.gather(*(one_session(s) for s in session_ids))
    out.elapsed = time.perf_counter() - t0
    # Steady state: up to the moment the first session ran out of work, all of them
    # were committing; the tail after it runs at falling concurrency.
    t_first = min(finished, default=t0)
    if t_first > t0:
        out.steady_rate = sum(1 for t in out.done_at if t <= t_first) / (t_first - t0)
    return out


async def stream_latency(stubs: Stubs, task_id: str, samples: int,
                         time_budget: float = 60.0) -> list[float]:
    """Open WatchTask and read to the terminal event, one after another."""
    lat: list[float] = []
    t_stop = time.perf_counter() + time_budget
    for _ in range(samples):
        if time.perf_counter() > t_stop:
            break
        t0 = time.perf_counter()
        w = await watch_to_end(stubs, task_id)
        if w.terminal_kind:
            lat.append(w.t_end - t0)
    return lat
