"""SQLite access for asyncio: one writer thread with group commit, pooled readers.

Concurrent writes are coalesced: the writer takes every queued operation, runs each
inside its own SAVEPOINT of one `BEGIN IMMEDIATE` transaction and commits once, so
N concurrent calls cost one fsync. An operation that raises rolls back only its own
savepoint. Futures resolve after the COMMIT returned: acknowledged means durable.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from sessiond.server.domain.errors import Unavailable
from sessiond.server.store.sql.tx import Announce

T = TypeVar("T")

MAX_BATCH = 128


@dataclass
class _Op(Generic[T]):
    fn: Callable[[sqlite3.Connection, Announce], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    ctx: Announce = field(default_factory=Announce)


AfterCommit = Callable[[Announce], None]


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                           timeout=30.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SqliteDatabase:
    def __init__(self, path: Path, synchronous: str = "FULL", readers: int = 2) -> None:
        self.path = path
        self.synchronous = synchronous
        self._queue: queue.SimpleQueue[_Op[Any] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="sqlite-read")
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._after_commit: AfterCommit | None = None
        self._closed = False

    def start(self, after_commit: AfterCommit) -> None:
        self._after_commit = after_commit
        self._write_conn = connect(self.path, self.synchronous)
        self._writer = threading.Thread(target=self._run_writer, name="sqlite-writer",
                                        daemon=True)
        self._writer.start()

    def init_sync(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        """Run schema set-up on a private connection before start()."""
        conn = connect(self.path, self.synchronous)
        try:
            fn(conn)
        finally:
            conn.close()

    async def write(self, fn: Callable[[sqlite3.Connection, Announce], T]) -> T:
        if self._closed:
            raise Unavailable("store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Op(fn=fn, future=fut, loop=loop))
        return await fut

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise Unavailable("store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read_in_thread, fn)

    def _read_in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self.synchronous)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    def _run_writer(self) -> None:
        conn = self._write_conn
        assert conn is not None
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch: list[_Op[Any]] = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._apply(conn, batch)
            if stop:
                return

    def _apply(self, conn: sqlite3.Connection, batch: list[_Op[Any]]) -> None:
        outcomes: list[tuple[_Op[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = Unavailable(f"sqlite: cannot begin transaction: {exc}")
            for op in batch:
                op.loop.call_soon_threadsafe(_settle, op, None, err, None)
            return
        for op in batch:
            conn.execute("SAVEPOINT op")
            try:
                result = op.fn(conn, op.ctx)
            except BaseException as exc:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                op.ctx = Announce()
                outcomes.append((op, None, exc))
            else:
                conn.execute("RELEASE op")
                outcomes.append((op, result, None))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as commit_exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            err = Unavailable(f"sqlite: commit failed: {commit_exc}")
            for op, _, _ in outcomes:
                op.loop.call_soon_threadsafe(_settle, op, None, err, None)
            return
        # One wake-up of each event loop per batch, not one per operation.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op[Any], Any, BaseException | None]]]
        by_loop = {}
        for item in outcomes:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_settle_batch, items, self._after_commit)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._writer is not None:
            self._writer.join(timeout=30)
        if self._write_conn is not None:
            self._write_conn.close()
        self._readers.shutdown(wait=True)
        with self._lock:
            for c in self._reader_conns:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._reader_conns.clear()


def _settle_batch(items: list[tuple[_Op[Any], Any, BaseException | None]],
                  after_commit: AfterCommit | None) -> None:
    for op, result, exc in items:
        _settle(op, result, exc, after_commit)


def _settle(op: _Op[Any], result: Any, exc: BaseException | None,
            after_commit: AfterCommit | None) -> None:
    if exc is None and after_commit is not None:
        after_commit(op.ctx)
    if op.future.done():
        return
    if exc is not None:
        op.future.set_exception(exc)
    else:
        op.future.set_result(result)
