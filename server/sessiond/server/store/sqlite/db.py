"""SQLite access for asyncio: one writer thread with group commit, pooled readers.

Concurrent writes are coalesced: the writer takes the queued operations, runs each
inside its own SAVEPOINT of one `BEGIN IMMEDIATE` transaction and commits once, so
N concurrent calls cost one fsync. An operation that raises rolls back only its own
savepoint. Futures resolve after the COMMIT returned: acknowledged means durable.

Fair order: writes made for a call (foreground) go before background writes (those
made under `store.base.background_writes(key)`: Phase 2, per identity), and background
writes take turns round-robin by key, so one identity's Phase 2 backlog neither delays
RPCs nor another identity's Phase 2 by more than one operation per identity. The
priority is bounded: after `FOREGROUND_BURST` foreground operations in a row while
background ones wait, the next background turn comes, so a steady stream of calls
cannot starve Phase 2. A transaction is committed once it has run for `BATCH_BUDGET`
seconds, so what waits behind a long batch waits for at most that (plus one operation).
Every queued operation is settled: one that the writer can no longer run (closed store,
writer failure) fails with `Unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from sessiond.server.domain.errors import Unavailable
from sessiond.server.store.base import RELAXED, RELAXED_FLUSH_SECONDS, WRITE_KEY
from sessiond.server.store.sql.tx import Announce

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_BATCH = 128
# Seconds of work after which the writer commits what it ran and looks at the queue.
BATCH_BUDGET = 0.02
# Foreground operations taken in a row before a waiting background one gets its turn.
FOREGROUND_BURST = 8


@dataclass
class _Op(Generic[T]):
    fn: Callable[[sqlite3.Connection, Announce], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    ctx: Announce = field(default_factory=Announce)
    key: str = ""
    relaxed: bool = False  # may commit without waiting for the disk (store.base.RELAXED)


class _FairQueue:
    """Foreground operations first (FIFO, at most `FOREGROUND_BURST` in a row while
    background ones wait), then background ones round-robin by key."""

    def __init__(self) -> None:
        self.fg: deque[_Op[Any]] = deque()
        self.bg: OrderedDict[str, deque[_Op[Any]]] = OrderedDict()
        self._size = 0
        self._fg_run = 0  # foreground pops since the last background one

    def __len__(self) -> int:
        return self._size

    def put(self, op: _Op[Any]) -> None:
        if not op.key:
            self.fg.append(op)
        else:
            self.bg.setdefault(op.key, deque()).append(op)
        self._size += 1

    def next_is_foreground(self) -> bool:
        """Whether `pop` would return a foreground operation now."""
        return bool(self.fg) and (not self.bg or self._fg_run < FOREGROUND_BURST)

    def pop(self) -> _Op[Any] | None:
        if self.next_is_foreground():
            # Only foreground operations taken while background ones wait count
            # towards the burst; with none waiting, arrival order is kept.
            self._fg_run = self._fg_run + 1 if self.bg else 0
            self._size -= 1
            return self.fg.popleft()
        if not self.bg:
            return None
        self._fg_run = 0
        self._size -= 1
        key, ops = next(iter(self.bg.items()))
        op = ops.popleft()
        del self.bg[key]
        if ops:
            self.bg[key] = ops  # to the back: the other keys go first
        return op


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
        self._failed = ""  # why the writer thread stopped, when it did
        # When the oldest commit not yet flushed to disk was made (relaxed batches).
        self._unsynced_since: float | None = None
        self._explicit_sync = False

    def start(self, after_commit: AfterCommit) -> None:
        self._after_commit = after_commit
        # synchronous=FULL is kept by the writer itself: its connection commits with
        # NORMAL and it fsyncs the log after each batch that must be durable, so that
        # batches of relaxed writes alone can skip the fsync (a pragma cannot change
        # inside a transaction, and a batch's make-up is known only at its end).
        self._explicit_sync = self.synchronous.upper() == "FULL"
        self._write_conn = connect(self.path,
                                   "NORMAL" if self._explicit_sync else self.synchronous)
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
        if self._closed or self._failed:
            raise Unavailable(self._failed or "store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Op(fn=fn, future=fut, loop=loop, key=WRITE_KEY.get(),
                            relaxed=RELAXED.get()))
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
        pending = _FairQueue()
        try:
            self._write_loop(conn, pending)
        except BaseException as exc:  # never leave a caller waiting on a dead writer
            log.exception("the SQLite writer stopped")
            self._failed = f"sqlite writer stopped: {type(exc).__name__}"
            self._fail_all(pending, Unavailable(self._failed))

    def _fail_all(self, pending: _FairQueue, err: Unavailable) -> None:
        """Settle with `err` every operation in `pending` and still on the queue."""
        while True:
            while (op := pending.pop()) is not None:
                op.loop.call_soon_threadsafe(_settle, op, None, err, None)
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return
            if nxt is not None:
                pending.put(nxt)

    def _write_loop(self, conn: sqlite3.Connection, pending: _FairQueue) -> None:
        stop = False
        while not stop or len(pending):
            if not len(pending) and not stop:
                try:
                    first = self._queue.get(timeout=self._flush_wait())
                except queue.Empty:
                    try:
                        self._flush_wal()  # idle with relaxed commits not on disk yet
                    except OSError as exc:
                        log.warning("flushing the SQLite log failed: %s", exc)
                    continue
                if first is None:
                    stop = True
                    continue
                pending.put(first)
            stop = self._drain(pending) or stop
            self._apply(conn, pending)
        if self._unsynced_since is not None:
            try:
                self._flush_wal()
            except OSError as exc:
                log.warning("flushing the SQLite log at close failed: %s", exc)

    def _flush_wait(self) -> float | None:
        """How long the idle writer may wait before relaxed commits must be flushed."""
        if self._unsynced_since is None:
            return None
        return max(RELAXED_FLUSH_SECONDS - (time.monotonic() - self._unsynced_since), 0.0)

    def _flush_wal(self) -> None:
        """fsync the write-ahead log: every commit so far is then on disk."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            self._unsynced_since = None  # checkpointed (and synced) meanwhile
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._unsynced_since = None

    def _drain(self, pending: _FairQueue) -> bool:
        """Move what was queued meanwhile into `pending`; True when close() asked to stop."""
        while True:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return False
            if nxt is None:
                return True
            pending.put(nxt)

    def _apply(self, conn: sqlite3.Connection, pending: _FairQueue) -> None:
        """One transaction: operations from `pending` in fair order until the batch is
        full, its time budget is spent, or nothing is left; then COMMIT."""
        outcomes: list[tuple[_Op[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = Unavailable(f"sqlite: cannot begin transaction: {exc}")
            while (op := pending.pop()) is not None:
                op.loop.call_soon_threadsafe(_settle, op, None, err, None)
            return
        started = time.monotonic()
        # The batch's first background key, and whether an operation that someone is
        # waiting on more urgently ran in it: a call's write, or another identity's
        # Phase 2 write than the one the batch was opened for. Such a batch is not
        # extended with more background work: it commits as soon as the calls queued
        # behind it have run, so neither waits for the rest of another identity's
        # batch budget.
        owner: str | None = None
        urgent = False
        while len(outcomes) < MAX_BATCH and time.monotonic() - started < BATCH_BUDGET:
            if outcomes:
                self._drain_keep_stop(pending)
                if urgent and not pending.next_is_foreground():
                    break
            op = pending.pop()
            if op is None:
                break
            if not op.key or (owner is not None and op.key != owner):
                urgent = True
            elif owner is None:
                owner = op.key
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
        if self._explicit_sync:
            # A batch of relaxed operations only is not flushed now (it is atomic and
            # consistent without; see store.base.RELAXED), unless relaxed commits have
            # waited RELAXED_FLUSH_SECONDS already. A flush makes every commit so far
            # durable, the earlier relaxed ones with it.
            now = time.monotonic()
            if (all(op.relaxed for op, _, _ in outcomes)
                    and (self._unsynced_since is None
                         or now - self._unsynced_since < RELAXED_FLUSH_SECONDS)):
                if self._unsynced_since is None:
                    self._unsynced_since = now
            else:
                try:
                    self._flush_wal()
                except OSError as sync_exc:
                    err = Unavailable(f"sqlite: flushing the log failed: {sync_exc}")
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

    def _drain_keep_stop(self, pending: _FairQueue) -> None:
        """Like `_drain` inside a transaction: a stop request goes back on the queue."""
        if self._drain(pending):
            self._queue.put(None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._writer is not None:
            self._writer.join(timeout=30)
            if not self._writer.is_alive():
                # Whatever reached the queue after the stop request fails, not hangs.
                self._fail_all(_FairQueue(), Unavailable("store is closed"))
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
        try:
            after_commit(op.ctx)
        except Exception:  # a listener's failure must not leave the caller waiting
            log.exception("announcing a committed write failed")
    if op.future.done():
        return
    if exc is not None:
        op.future.set_exception(exc)
    else:
        op.future.set_result(result)
