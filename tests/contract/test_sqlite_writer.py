"""The SQLite writer's fair queue (store/sqlite/db.py), on a real database file: calls
before background writes but never starving them, background keys round-robin, and
no write left waiting (a failing listener, a closed store)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sessiond.server.domain.errors import Unavailable
from sessiond.server.store.base import background_writes
from sessiond.server.store.sql.tx import Announce
from sessiond.server.store.sqlite.db import SqliteDatabase


def _schema(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY, who TEXT)")


def _open(tmp_path: Path, after_commit: Callable[[Announce], None] = lambda _a: None,
          ) -> SqliteDatabase:
    db = SqliteDatabase(tmp_path / "w.sqlite3", synchronous="OFF")
    db.init_sync(_schema)
    db.start(after_commit)
    return db


def _insert(who: str, hold: float = 0.0) -> Callable[[sqlite3.Connection, Announce], int]:
    def fn(conn: sqlite3.Connection, _ctx: Announce) -> int:
        if hold:
            time.sleep(hold)  # a write that keeps the writer busy for a while
        cur = conn.execute("INSERT INTO log (who) VALUES (?)", (who,))
        return int(cur.lastrowid or 0)
    return fn


def test_a_steady_stream_of_calls_does_not_starve_background_writes(tmp_path: Path) -> None:
    """More call writes than fit in one batch, re-queued as fast as they complete: a
    strict calls-first queue never gave the background write its turn."""
    db = _open(tmp_path)

    async def body() -> float:
        stop = asyncio.Event()

        async def caller(i: int) -> None:
            while not stop.is_set():
                await db.write(_insert(f"call{i}", hold=0.004))

        callers = [asyncio.create_task(caller(i)) for i in range(16)]
        await asyncio.sleep(0.1)  # the stream is running
        t0 = time.monotonic()
        with background_writes("tenant-a"):
            await asyncio.wait_for(db.write(_insert("phase2")), 5.0)
        waited = time.monotonic() - t0
        stop.set()
        await asyncio.gather(*callers)
        return waited

    try:
        waited = asyncio.run(body())
    finally:
        db.close()
    # At most FOREGROUND_BURST call writes (4 ms each) go first, plus one batch.
    assert waited < 1.0, f"background write waited {waited:.2f}s behind calls"


def test_background_keys_take_turns_and_calls_go_first(tmp_path: Path) -> None:
    db = _open(tmp_path)

    async def body() -> list[str]:
        order: list[str] = []

        async def write(who: str, key: str) -> None:
            if key:
                with background_writes(key):
                    await db.write(_insert(who, hold=0.03))
            else:
                await db.write(_insert(who, hold=0.03))
            order.append(who)

        # A blocker holds the writer while the rest queues up in this order.
        blocker = asyncio.create_task(write("blocker", ""))
        await asyncio.sleep(0.01)
        jobs = [asyncio.create_task(write(f"a{i}", "A")) for i in range(3)]
        jobs += [asyncio.create_task(write("b0", "B"))]
        jobs += [asyncio.create_task(write("call", ""))]
        await asyncio.gather(blocker, *jobs)
        return order

    try:
        order = asyncio.run(body())
    finally:
        db.close()
    # Each write holds the writer past BATCH_BUDGET, so each is its own batch.
    assert order == ["blocker", "call", "a0", "b0", "a1", "a2"], order


def test_a_call_or_another_identity_does_not_wait_out_a_background_batch(
        tmp_path: Path) -> None:
    """Short background writes of identity A would fill a batch up to its time budget;
    a call's write and identity B's write queued meanwhile commit right after they ran:
    no more of A's queued writes run in their transaction."""
    db = _open(tmp_path)
    path = tmp_path / "w.sqlite3"
    ran: list[str] = []
    late: list[tuple[str, str]] = []  # (A write, an urgent write run before it, uncommitted)

    def op(who: str) -> Callable[[sqlite3.Connection, Announce], int]:
        def fn(conn: sqlite3.Connection, _ctx: Announce) -> int:
            if who == "a0":
                time.sleep(0.03)  # the others queue up meanwhile
            if who.startswith("a"):
                seen = sqlite3.connect(str(path))  # what is committed so far
                try:
                    committed = {r[0] for r in seen.execute("SELECT who FROM log")}
                finally:
                    seen.close()
                late.extend((who, u) for u in ("call", "b0")
                            if u in ran and u not in committed)
            ran.append(who)
            conn.execute("INSERT INTO log (who) VALUES (?)", (who,))
            return len(ran)
        return fn

    async def body() -> None:
        async def write(who: str, key: str) -> None:
            if key:
                with background_writes(key):
                    await db.write(op(who))
            else:
                await db.write(op(who))

        first = asyncio.create_task(write("a0", "A"))
        await asyncio.sleep(0.01)
        jobs = [asyncio.create_task(write(f"a{i}", "A")) for i in range(1, 40)]
        jobs += [asyncio.create_task(write("b0", "B")), asyncio.create_task(write("call", ""))]
        await asyncio.gather(first, *jobs)

    try:
        asyncio.run(body())
    finally:
        db.close()
    assert "call" in ran and "b0" in ran
    # Without the rule A's queued writes (each well under the budget) kept joining the
    # transaction of the call's and B's writes, which waited for all of them.
    assert late == [], late[:5]


def test_a_failing_commit_listener_leaves_no_write_waiting(tmp_path: Path) -> None:
    calls = 0

    def after_commit(_announce: Announce) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("listener bug")

    db = _open(tmp_path, after_commit)

    async def body() -> list[int]:
        return await asyncio.wait_for(
            asyncio.gather(*(db.write(_insert(f"w{i}")) for i in range(20))), 5.0)

    try:
        ids = asyncio.run(body())
    finally:
        db.close()
    assert sorted(ids) == list(range(1, 21)) and calls == 20


def test_writes_after_close_fail_unavailable(tmp_path: Path) -> None:
    db = _open(tmp_path)

    async def body() -> None:
        await db.write(_insert("before"))
        db.close()
        with pytest.raises(Unavailable):
            await db.write(_insert("after"))

    asyncio.run(body())


def test_burst_counts_only_calls_taken_while_background_waits() -> None:
    """Calls taken while no background write waited do not use up the burst: a
    background write arriving later still queues behind a call that came first."""
    from sessiond.server.store.sqlite.db import FOREGROUND_BURST, _FairQueue, _Op

    loop = asyncio.new_event_loop()
    try:
        def op(key: str = "") -> _Op[int]:
            return _Op(fn=lambda _c, _a: 0, future=loop.create_future(), loop=loop, key=key)

        q = _FairQueue()
        for _ in range(FOREGROUND_BURST * 3):  # a long stream of calls, nothing else
            q.put(op())
            assert q.pop() is not None
        first_call, background = op(), op("tenant")
        q.put(first_call)
        q.put(background)
        assert q.pop() is first_call
        assert q.pop() is background
        # While background writes wait, at most FOREGROUND_BURST calls go first.
        calls = [op() for _ in range(FOREGROUND_BURST + 2)]
        waiting = op("tenant")
        q.put(waiting)
        for c in calls:
            q.put(c)
        order = [q.pop() for _ in range(len(calls) + 1)]
        assert order.index(waiting) == FOREGROUND_BURST
    finally:
        loop.close()


def test_relaxed_writes_skip_the_flush_and_are_flushed_soon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With synchronous=FULL a call's write is on disk (the log fsynced) before it is
    acknowledged; a relaxed write (Phase 2's) is acknowledged without the fsync and
    flushed once the writer idles, within RELAXED_FLUSH_SECONDS; a later durable
    write flushes the earlier relaxed ones with it."""
    import os

    from sessiond.server.store import base

    wal = f"{tmp_path / 'w.sqlite3'}-wal"
    synced: list[float] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(wal):
            synced.append(time.monotonic())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    db = SqliteDatabase(tmp_path / "w.sqlite3", synchronous="FULL")
    db.init_sync(_schema)
    db.start(lambda _a: None)

    async def body() -> None:
        await db.write(_insert("call"))
        assert len(synced) == 1  # flushed before the call was acknowledged
        with base.relaxed_commits():
            t0 = time.monotonic()
            await db.write(_insert("phase2"))
            assert len(synced) == 1  # acknowledged without waiting for the disk
        await asyncio.sleep(base.RELAXED_FLUSH_SECONDS + 0.3)
        assert len(synced) == 2  # the idle writer flushed it
        assert synced[1] - t0 < base.RELAXED_FLUSH_SECONDS + 0.2
        await asyncio.sleep(0.3)
        assert len(synced) == 2  # nothing left to flush: no more fsyncs
        with base.relaxed_commits():
            await db.write(_insert("phase2 again"))
        await db.write(_insert("call again"))
        assert len(synced) == 3  # the call's flush covered the relaxed write too
        await asyncio.sleep(base.RELAXED_FLUSH_SECONDS + 0.3)
        assert len(synced) == 3

    try:
        asyncio.run(body())
    finally:
        db.close()
    conn = sqlite3.connect(tmp_path / "w.sqlite3")
    try:
        rows = [r[0] for r in conn.execute("SELECT who FROM log ORDER BY id")]
    finally:
        conn.close()
    assert rows == ["call", "phase2", "phase2 again", "call again"]

