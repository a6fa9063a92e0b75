"""The PostgreSQL store: several sessiond replicas share one database.

Behaviour matches `SqliteStore` method for method (tests/contract proves both). What
PostgreSQL adds:

* Every method runs in one transaction on a pooled asyncpg connection (READ
  COMMITTED). Writes to a session take its row lock first (`SELECT ... FOR UPDATE`),
  so Phase 1 commits of one session are serialized across replicas; worker writes
  lock the task row and check the lease under that lock (`LeaseLost` otherwise).
  `claim_task` uses `FOR UPDATE SKIP LOCKED`, so replicas never claim the same task.
* Transactions that lose a deadlock or serialization race, or that collide on an
  idempotency key written concurrently, are retried from the start (the retry then
  replays the stored response).
* Cross-replica wake-ups: a transaction that appended journal events sends
  `pg_notify(channel, 'task:<task_id>')`, one that created or finished work sends
  `pg_notify(channel, 'work')`; both are delivered on commit. Every store keeps a
  dedicated LISTEN connection and turns notifications written by *other* processes
  into `_emit_remote_event(task_id)` / `_emit_work()` (its own writes are announced
  locally, after commit, exactly like SQLite). The LISTEN connection reconnects in
  the background; watchers and workers poll as a fallback meanwhile.
* Connection trouble (refused, reset, timed out, pool closed, server shutting down,
  too many connections) raises `Unavailable` quickly: connecting, acquiring a pooled
  connection and every statement are bounded by timeouts. The pool reconnects lazily,
  so the store recovers by itself when the database is back (`ping()` included).

Schema: `open()` checks the schema version. An empty database is migrated on the
spot when `auto_migrate` is true (the default, so `sessiond serve --store
postgresql://...` works out of the box); a database with an older schema must be
migrated explicitly (`sessiond migrate`, reason `SCHEMA_NOT_MIGRATED`) and one with a
newer schema is refused (`SCHEMA_TOO_NEW`).

Timestamps are TIMESTAMPTZ; JSON-shaped values use the shared `codec` text encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from sessiond.server.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    LeaseLost,
    NotFound,
    RequestIdConflict,
    SessiondError,
    Unavailable,
)
from sessiond.server.domain.values import (
    Archive,
    ArchiveState,
    CandidateMemory,
    CommitResult,
    EventKind,
    Identity,
    Memory,
    MemoryCategory,
    MemoryCounts,
    Message,
    NewEvent,
    SessionMeta,
    Stage,
    Task,
    TaskError,
    TaskEvent,
    TaskState,
    ToolPart,
    ToolStatus,
    UsageRecord,
    memory_owner,
    next_stage_after,
)
from sessiond.server.store import codec
from sessiond.server.store.base import (
    ActiveCountsOutput,
    CommitOutcome,
    CommitPlan,
    ExtractionOutput,
    RelationsOutput,
    RequestKey,
    StageOutput,
    Store,
    SummaryOutput,
    SweepResult,
    TaskPage,
)
from sessiond.server.store.postgres import migrations
from sessiond.server.store.rows import RowMapper

log = logging.getLogger(__name__)

T = TypeVar("T")
# asyncpg ships no type information: connections and records are dynamically typed.
Conn = Any
Row = Any

OPEN_STATES = [TaskState.PENDING.value, TaskState.RUNNING.value]
TERMINAL_STATES = [TaskState.COMPLETED.value, TaskState.CANCELLED.value,
                   TaskState.FAILED.value]
STAGE_ORDER = {s: i for i, s in enumerate(Stage)}

WORK_PAYLOAD = "work"
EVENT_PREFIX = "task:"
MAX_ATTEMPTS = 8
SWEEP_LOCK_KEY = 0x5E55_10D0_0002
REQUEST_IDS_PKEY = "request_ids_pkey"
MEMORY_COLS = ("memory_id, account, user_id, agent, category, mkey, content, "
               "source_session_id, source_archive_uri, source_message_ids, created_at, "
               "updated_at")

# Failures that mean "the database cannot serve us right now".
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError is an OSError too
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.OperatorInterventionError,  # admin/crash shutdown, statement cancelled
    asyncpg.ReadOnlySQLTransactionError,  # a standby during fail-over
)
# Programming errors that happen to subclass InterfaceError: never hide them.
_BUG_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.ClientConfigurationError,
)
# Failures of a read that a second attempt on a fresh connection may fix.
_RECONNECTABLE: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
)


@dataclass
class _Ctx:
    """What a write transaction announces once it committed."""

    events: list[TaskEvent] = field(default_factory=list)
    work: bool = False


def _rowcount(status: str) -> int:
    """Rows affected, from a command status such as 'UPDATE 3' or 'INSERT 0 1'."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, IndexError):
        return 0


def _unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(f"postgresql unavailable: {type(exc).__name__}: {exc}".rstrip(": "))


def _text(value: str) -> str:
    """PostgreSQL TEXT cannot hold NUL; free text (summaries, memory contents, event
    messages, uris) gets U+FFFD in its place. JSON-encoded columns are unaffected
    (the encoder escapes NUL)."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _token_time(epoch: float) -> datetime:
    """The created_at of a page token; out-of-range values clamp to the ends of time
    (a token is only compared with, so this orders like SQLite's float comparison)."""
    try:
        return datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, ValueError, OSError):
        return datetime.max.replace(tzinfo=UTC) if epoch > 0 else datetime.min.replace(tzinfo=UTC)


def _is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, _UNAVAILABLE_ERRORS) and not isinstance(exc, _BUG_ERRORS)


def _as_datetime(value: datetime | None) -> datetime | None:
    return value  # asyncpg returns TIMESTAMPTZ columns as aware datetimes


_ROWS = RowMapper(_as_datetime)


class PostgresStore(Store):
    def __init__(self, dsn: str, *, min_size: int = 2, max_size: int = 10,
                 channel: str = "sessiond_events", journal_cap: int = 10_000,
                 auto_migrate: bool = True, connect_timeout: float = 5.0,
                 command_timeout: float = 15.0, acquire_timeout: float = 10.0,
                 listen_check_seconds: float = 10.0) -> None:
        """`dsn`: a postgresql:// URL. The pool holds `min_size`..`max_size`
        connections, plus one dedicated LISTEN connection on `channel`. Journals keep
        at most `journal_cap` events per task. With `auto_migrate` (default) `open()`
        creates the schema in an empty database; otherwise, and for any older schema,
        `sessiond migrate` must run first. Connecting is bounded by `connect_timeout`,
        waiting for a pooled connection by `acquire_timeout`, every statement by
        `command_timeout` (seconds); beyond them calls raise `Unavailable`. The LISTEN
        connection is probed every `listen_check_seconds`."""
        super().__init__()
        if max_size < 1 or min_size < 0 or min_size > max_size:
            raise ValueError(f"invalid pool bounds min_size={min_size} max_size={max_size}")
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.channel = channel
        self.journal_cap = journal_cap
        self.auto_migrate = auto_migrate
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.acquire_timeout = acquire_timeout
        self.listen_check_seconds = listen_check_seconds
        self._pool: Any = None
        self._closed = False
        # Backend pids of this store's pooled connections: notifications they sent
        # were already announced locally.
        self._own_pids: set[int] = set()
        self._listen_task: asyncio.Task[None] | None = None
        self._listen_conn: Any = None
        self._listening = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    def _server_settings(self) -> dict[str, str]:
        return {"application_name": "sessiond",
                # A stuck client must not hold row locks forever.
                "idle_in_transaction_session_timeout": "60000"}

    async def open(self) -> None:
        """Create the pool, check (or, on an empty database with `auto_migrate`,
        create) the schema and start listening for other replicas' notifications."""
        self._closed = False
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=self.min_size, max_size=self.max_size,
                timeout=self.connect_timeout, command_timeout=self.command_timeout,
                init=self._init_connection, reset=self._reset_connection,
                server_settings=self._server_settings())
        except SessiondError:
            raise
        except (asyncpg.InvalidCatalogNameError,
                asyncpg.InvalidAuthorizationSpecificationError) as exc:
            raise FailedPrecondition(f"postgresql refused the connection: {exc}",
                                     reason="DATABASE_REJECTED") from exc
        except BaseException as exc:
            if _is_unavailable(exc):
                raise _unavailable(exc) from exc
            raise
        try:
            await self._check_schema()
        except BaseException:
            await self._close_pool()
            raise
        self._listening = asyncio.Event()
        self._listen_task = asyncio.get_running_loop().create_task(
            self._listen_loop(), name="sessiond-pg-listen")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), self.connect_timeout)

    async def _check_schema(self) -> None:
        try:
            async with self._pool.acquire(timeout=self.acquire_timeout) as conn:
                version = await migrations.schema_version(conn)
                if version is None:
                    if self.auto_migrate and not await migrations.has_sessiond_tables(conn):
                        await migrations.migrate(conn)
                        return
                    raise FailedPrecondition(
                        "the database has no sessiond schema; run `sessiond migrate`",
                        reason="SCHEMA_NOT_MIGRATED")
                if version > migrations.SCHEMA_VERSION:
                    raise FailedPrecondition(
                        f"database schema version {version} is newer than this sessiond "
                        f"knows ({migrations.SCHEMA_VERSION}); upgrade sessiond",
                        reason="SCHEMA_TOO_NEW")
                if version < migrations.SCHEMA_VERSION:
                    raise FailedPrecondition(
                        f"database schema version {version} is older than "
                        f"{migrations.SCHEMA_VERSION}; run `sessiond migrate`",
                        reason="SCHEMA_NOT_MIGRATED")
        except SessiondError:
            raise
        except BaseException as exc:
            if _is_unavailable(exc):
                raise _unavailable(exc) from exc
            raise

    async def close(self) -> None:
        self._closed = True
        task, self._listen_task = self._listen_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), 10.0)
        except Exception:
            pool.terminate()

    async def ping(self) -> None:
        async def op(c: Conn) -> None:
            await c.fetchval("SELECT 1")

        await self._read(op)

    async def _init_connection(self, conn: Conn) -> None:
        pid = int(conn.get_server_pid())
        self._own_pids.add(pid)
        conn.add_termination_listener(lambda _c: self._own_pids.discard(pid))

    @staticmethod
    async def _reset_connection(conn: Conn) -> None:
        """No session state to reset: transactions are always closed by the pool and
        advisory locks are transaction-scoped. Saves a round trip per release."""

    # ------------------------------------------------------------------ notifications
    async def _listen_loop(self) -> None:
        delay = 0.2
        connected_before = False
        while not self._closed:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout,
                                             command_timeout=self.command_timeout,
                                             server_settings=self._server_settings())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("LISTEN connection failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                await conn.add_listener(self.channel, self._on_notification)
                self._listen_conn = conn
                self._listening.set()
                delay = 0.2
                if connected_before:
                    # Notifications sent while we were away are gone: look for work.
                    self._emit_work()
                connected_before = True
                while not lost.is_set() and not self._closed:
                    try:
                        await asyncio.wait_for(lost.wait(), self.listen_check_seconds)
                    except TimeoutError:
                        # Detects half-open connections the kernel has not noticed.
                        await conn.fetchval("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("LISTEN connection lost: %s", exc)
            finally:
                self._listening.clear()
                self._listen_conn = None
                if not conn.is_closed():
                    conn.terminate()
            if not self._closed:
                await asyncio.sleep(delay)

    def _on_notification(self, _conn: Conn, pid: int, _channel: str, payload: str) -> None:
        if pid in self._own_pids:
            return  # written by this store: already announced after its commit
        if payload == WORK_PAYLOAD:
            self._emit_work()
        elif payload.startswith(EVENT_PREFIX):
            self._emit_remote_event(payload[len(EVENT_PREFIX):])

    async def _notify(self, c: Conn, ctx: _Ctx) -> None:
        payloads = [EVENT_PREFIX + tid for tid in dict.fromkeys(e.task_id for e in ctx.events)]
        if ctx.work:
            payloads.append(WORK_PAYLOAD)
        if payloads:
            await c.execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                            self.channel, payloads)

    # ------------------------------------------------------------------ transactions
    def _require_pool(self) -> Any:
        if self._pool is None or self._closed:
            raise Unavailable("store is closed")
        return self._pool

    async def _write(self, fn: Callable[[Conn, _Ctx], Awaitable[T]],
                     single_statement: bool = False) -> T:
        """Run `fn` in one read-write transaction; announce its events after commit.
        `single_statement`: `fn` runs exactly one statement, which PostgreSQL makes
        atomic by itself, so no BEGIN/COMMIT round trips are spent on it."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            pool = self._require_pool()
            ctx = _Ctx()
            try:
                async with pool.acquire(timeout=self.acquire_timeout) as conn:
                    if single_statement:
                        result = await fn(conn, ctx)
                    else:
                        async with conn.transaction():
                            result = await fn(conn, ctx)
                            await self._notify(conn, ctx)
            except SessiondError:
                raise
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError,
                    asyncpg.InvalidCachedStatementError) as exc:
                # InvalidCachedStatementError: another replica migrated the schema;
                # asyncpg dropped the stale prepared statement, a retry re-prepares.
                if attempt == MAX_ATTEMPTS:
                    raise Aborted(f"concurrent modification, retry: {exc}",
                                  reason="CONCURRENT_MODIFICATION") from exc
                await asyncio.sleep(random.uniform(0, 0.005 * attempt))
                continue
            except asyncpg.UniqueViolationError as exc:
                # Two calls with one request_id raced: the retry replays the winner.
                if exc.constraint_name == REQUEST_IDS_PKEY and attempt < MAX_ATTEMPTS:
                    continue
                raise AlreadyExists(f"already exists ({exc.constraint_name})") from exc
            except BaseException as exc:
                if _is_unavailable(exc):
                    raise _unavailable(exc) from exc
                raise
            self._emit_events(ctx.events)
            if ctx.work:
                self._emit_work()
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run a read. Reads are single statements or tolerate READ COMMITTED between
        statements; a read that lost its connection is tried once more."""
        for attempt in (1, 2):
            pool = self._require_pool()
            try:
                async with pool.acquire(timeout=self.acquire_timeout) as conn:
                    return await fn(conn)
            except SessiondError:
                raise
            except BaseException as exc:
                if not _is_unavailable(exc):
                    raise
                if attempt == 1 and isinstance(exc, _RECONNECTABLE) \
                        and not isinstance(exc, TimeoutError):
                    continue
                raise _unavailable(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ row mapping
    _meta = staticmethod(_ROWS.meta)
    _message = staticmethod(_ROWS.message)
    _archive = staticmethod(_ROWS.archive)
    _task = staticmethod(_ROWS.task)
    _event = staticmethod(_ROWS.event)
    _memory = staticmethod(_ROWS.memory)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    async def _session_row(c: Conn, identity: Identity, session_id: str, *,
                           lock: bool = False) -> Row | None:
        sql = "SELECT * FROM sessions WHERE skey=$1"
        if lock:
            sql += " FOR UPDATE"
        return await c.fetchrow(sql, codec.session_key(identity, session_id))

    @classmethod
    async def _require_session(cls, c: Conn, identity: Identity, session_id: str, *,
                               lock: bool = False) -> Row:
        row = await cls._session_row(c, identity, session_id, lock=lock)
        if row is None:
            raise NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND",
                           metadata={"session_id": session_id})
        return row

    @staticmethod
    async def _replay(c: Conn, request: RequestKey | None) -> Any | None:
        """The stored response of a replayed request, or None for a new one."""
        if request is None:
            return None
        ident = request.identity
        row = await c.fetchrow(
            "SELECT fingerprint, response FROM request_ids WHERE account=$1 AND user_id=$2 "
            "AND agent=$3 AND method=$4 AND request_id=$5",
            ident.account, ident.user, ident.agent, request.method, request.request_id)
        if row is None:
            return None
        if row["fingerprint"] != request.fingerprint:
            raise RequestIdConflict(
                f"request_id {request.request_id!r} was already used for a different "
                f"{request.method} request", metadata={"request_id": request.request_id})
        return json.loads(row["response"])

    @staticmethod
    async def _remember(c: Conn, request: RequestKey | None, response: Any,
                        now: datetime) -> None:
        if request is None:
            return
        ident = request.identity
        await c.execute(
            "INSERT INTO request_ids (account, user_id, agent, method, request_id, fingerprint, "
            "response, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
            ident.account, ident.user, ident.agent, request.method, request.request_id,
            request.fingerprint, codec.dumps(response), now)

    async def _append_event(self, c: Conn, ctx: _Ctx, task_row: Row, kind: EventKind,
                            state: TaskState, stage: Stage, now: datetime, *,
                            message: str = "", attempt: int = 0,
                            result: CommitResult | None = None,
                            error: TaskError | None = None,
                            sets: dict[str, Any] | None = None) -> tuple[TaskEvent, Row]:
        """Append one journal event to a task whose row this transaction has locked,
        update the task row (plus `sets`) and return the event and the new row."""
        seq = int(task_row["last_seq"]) + 1
        task_id = task_row["task_id"]
        await c.execute(
            "INSERT INTO task_events (task_id, seq, kind, time, state, stage, message, attempt, "
            "result, error) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
            task_id, seq, kind.value, now, state.value, stage.value, _text(message), attempt,
            codec.encode_result(result), codec.encode_error(error))
        first_seq = int(task_row["first_seq"])
        if seq - first_seq + 1 > self.journal_cap:
            first_seq = seq - self.journal_cap + 1
            await c.execute("DELETE FROM task_events WHERE task_id=$1 AND seq<$2",
                            task_id, first_seq)
        cols: dict[str, Any] = {"last_seq": seq, "first_seq": first_seq, "state": state.value,
                                "stage": stage.value, "updated_at": now, **(sets or {})}
        assign = ", ".join(f"{name}=${i}" for i, name in enumerate(cols, start=2))
        new_row = await c.fetchrow(f"UPDATE tasks SET {assign} WHERE task_id=$1 RETURNING *",
                                   task_id, *cols.values())
        ev = TaskEvent(task_id=task_id, seq=seq, kind=kind, time=now, state=state, stage=stage,
                       message=_text(message), attempt=attempt, result=result, error=error)
        ctx.events.append(ev)
        return ev, new_row

    @staticmethod
    async def _task_row(c: Conn, task_id: str, *, lock: bool = False) -> Row:
        sql = "SELECT * FROM tasks WHERE task_id=$1"
        if lock:
            sql += " FOR UPDATE"
        row = await c.fetchrow(sql, task_id)
        if row is None:
            raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
        return row

    @classmethod
    async def _leased_task(cls, c: Conn, task_id: str, worker_id: str) -> Row:
        row = await cls._task_row(c, task_id, lock=True)
        if row["lease_owner"] != worker_id or row["state"] != TaskState.RUNNING.value:
            raise LeaseLost(f"worker {worker_id} no longer holds task {task_id}")
        return row

    @staticmethod
    async def _archive_row(c: Conn, skey: str, index: int) -> Row | None:
        return await c.fetchrow("SELECT * FROM archives WHERE skey=$1 AND idx=$2", skey, index)

    # ------------------------------------------------------------------ sessions
    async def create_session(self, identity: Identity, session_id: str, now: datetime,
                             request: RequestKey | None = None) -> SessionMeta:
        async def replayed(c: Conn, replay: Any) -> SessionMeta:
            row = await self._session_row(c, identity, replay["session_id"])
            if row is None:
                raise NotFound(f"session {replay['session_id']!r} was deleted",
                               reason="SESSION_NOT_FOUND")
            return self._meta(row)

        async def op(c: Conn, ctx: _Ctx) -> SessionMeta:
            replay = await self._replay(c, request)
            if replay is not None:
                return await replayed(c, replay)
            row = await self._insert_session(c, identity, session_id, now)
            if row is None:
                # Taken; possibly by a concurrent call with this very request_id.
                replay = await self._replay(c, request)
                if replay is not None:
                    return await replayed(c, replay)
                raise AlreadyExists(f"session {session_id!r} already exists",
                                    reason="SESSION_EXISTS", metadata={"session_id": session_id})
            await self._remember(c, request, {"session_id": session_id}, now)
            return self._meta(row)

        return await self._write(op)

    @staticmethod
    async def _insert_session(c: Conn, identity: Identity, session_id: str,
                              now: datetime) -> Row | None:
        """Insert the session; the new row, or None when it exists already."""
        return await c.fetchrow(
            "INSERT INTO sessions (skey, account, user_id, agent, session_id, created_at, "
            "updated_at) VALUES ($1,$2,$3,$4,$5,$6,$6) ON CONFLICT DO NOTHING RETURNING *",
            codec.session_key(identity, session_id), identity.account, identity.user,
            identity.agent, session_id, now)

    async def get_session(self, identity: Identity, session_id: str) -> SessionMeta | None:
        async def op(c: Conn) -> SessionMeta | None:
            row = await self._session_row(c, identity, session_id)
            return None if row is None else self._meta(row)

        return await self._read(op)

    async def ensure_session(self, identity: Identity, session_id: str,
                             now: datetime) -> SessionMeta:
        async def op(c: Conn, ctx: _Ctx) -> SessionMeta:
            row = await self._insert_session(c, identity, session_id, now)
            if row is None:
                row = await self._require_session(c, identity, session_id)
            return self._meta(row)

        return await self._write(op)

    async def list_sessions(self, identity: Identity, page_size: int,
                            after_session_id: str) -> list[SessionMeta]:
        async def op(c: Conn) -> list[SessionMeta]:
            rows = await c.fetch(
                "SELECT * FROM sessions WHERE account=$1 AND user_id=$2 AND agent=$3 AND "
                "session_id>$4 ORDER BY session_id LIMIT $5",
                identity.account, identity.user, identity.agent, after_session_id, page_size)
            return [self._meta(r) for r in rows]

        return await self._read(op)

    async def delete_session(self, identity: Identity, session_id: str, now: datetime) -> bool:
        open_sql = ("SELECT * FROM tasks WHERE skey=$1 AND state = ANY($2::text[]) "
                    "ORDER BY task_id FOR UPDATE")

        async def op(c: Conn, ctx: _Ctx) -> bool:
            skey = codec.session_key(identity, session_id)
            # Lock order is task rows, then the session row (like the worker's finalize).
            await c.fetch(open_sql, skey, OPEN_STATES)
            if await self._session_row(c, identity, session_id, lock=True) is None:
                return False
            err = TaskError(code=1, message="session deleted", reason="SESSION_DELETED")
            for row in await c.fetch(open_sql, skey, OPEN_STATES):
                await self._append_event(
                    c, ctx, row, EventKind.CANCELLED, TaskState.CANCELLED, Stage(row["stage"]),
                    now, message="session deleted", error=err,
                    sets={"finished_at": now, "error": codec.encode_error(err),
                          "lease_owner": "", "lease_expires_at": None})
            await c.execute("DELETE FROM sessions WHERE skey=$1", skey)
            ctx.work = True
            return True

        return await self._write(op)

    # ------------------------------------------------------------------ messages
    async def add_message(self, identity: Identity, session_id: str, message: Message,
                          request: RequestKey | None = None) -> Message:
        if request is None:
            return await self._append_message(identity, session_id, message)

        async def op(c: Conn, ctx: _Ctx) -> Message:
            skey = codec.session_key(identity, session_id)
            replay = await self._replay(c, request)
            if replay is not None:
                row = await c.fetchrow("SELECT * FROM messages WHERE skey=$1 AND message_id=$2",
                                       skey, replay["message_id"])
                if row is None:
                    raise NotFound("the message of this request_id no longer exists",
                                   reason="MESSAGE_NOT_FOUND")
                return self._message(row)
            seq = await c.fetchval(
                "UPDATE sessions SET next_seq=next_seq+1, message_count=message_count+1, "
                "live_count=live_count+1, updated_at=$2 WHERE skey=$1 RETURNING next_seq-1",
                skey, message.created_at)
            if seq is None:
                raise NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND",
                               metadata={"session_id": session_id})
            await c.execute(
                "INSERT INTO messages (skey, seq, message_id, role, parts, created_at) "
                "VALUES ($1,$2,$3,$4,$5,$6)",
                skey, seq, message.id, message.role.value, codec.encode_parts(message.parts),
                message.created_at)
            await self._remember(c, request, {"message_id": message.id}, message.created_at)
            return Message(id=message.id, role=message.role, parts=message.parts,
                           created_at=message.created_at, seq=int(seq))

        return await self._write(op)

    async def _append_message(self, identity: Identity, session_id: str,
                              message: Message) -> Message:
        """AddMessage without a request id: one atomic statement, one round trip."""
        skey = codec.session_key(identity, session_id)

        async def op(c: Conn, ctx: _Ctx) -> Message:
            seq = await c.fetchval(
                "WITH s AS (UPDATE sessions SET next_seq=next_seq+1, "
                "message_count=message_count+1, live_count=live_count+1, updated_at=$6 "
                "WHERE skey=$1 RETURNING next_seq-1 AS seq) "
                "INSERT INTO messages (skey, seq, message_id, role, parts, created_at) "
                "SELECT $1::text, s.seq, $2::text, $3::text, $4::text, $5::timestamptz FROM s "
                "RETURNING seq",
                skey, message.id, message.role.value, codec.encode_parts(message.parts),
                message.created_at, message.created_at)
            if seq is None:
                raise NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND",
                               metadata={"session_id": session_id})
            return Message(id=message.id, role=message.role, parts=message.parts,
                           created_at=message.created_at, seq=int(seq))

        return await self._write(op, single_statement=True)

    async def update_tool_part(self, identity: Identity, session_id: str, message_id: str,
                               tool_id: str, output: str, status: ToolStatus,
                               now: datetime) -> Message:
        async def op(c: Conn, ctx: _Ctx) -> Message:
            skey = codec.session_key(identity, session_id)
            # The session row lock serializes this with commits and other tool updates.
            await self._require_session(c, identity, session_id, lock=True)
            row = await c.fetchrow("SELECT * FROM messages WHERE skey=$1 AND message_id=$2",
                                   skey, message_id)
            if row is None:
                raise NotFound(f"message {message_id!r} not found in session {session_id!r}",
                               reason="MESSAGE_NOT_FOUND")
            if row["archive_index"] is not None:
                raise FailedPrecondition(
                    f"message {message_id!r} was archived by commit {row['archive_index']}; "
                    "archived messages are immutable", reason="MESSAGE_ARCHIVED")
            msg = self._message(row)
            parts = list(msg.parts)
            for i, p in enumerate(parts):
                if isinstance(p, ToolPart) and p.tool_id == tool_id:
                    parts[i] = ToolPart(**{**_tool_fields(p), "output": output, "status": status})
                    break
            else:
                raise NotFound(f"tool part {tool_id!r} not found in message {message_id!r}",
                               reason="TOOL_PART_NOT_FOUND")
            await c.execute("UPDATE messages SET parts=$3 WHERE skey=$1 AND message_id=$2",
                            skey, message_id, codec.encode_parts(parts))
            await c.execute("UPDATE sessions SET updated_at=$2 WHERE skey=$1", skey, now)
            return Message(id=msg.id, role=msg.role, parts=tuple(parts),
                           created_at=msg.created_at, seq=msg.seq)

        return await self._write(op)

    async def list_live_messages(self, identity: Identity, session_id: str,
                                 newest: int = 0) -> list[Message]:
        async def op(c: Conn) -> list[Message]:
            skey = codec.session_key(identity, session_id)
            if newest > 0:
                rows = await c.fetch(
                    "SELECT * FROM (SELECT * FROM messages WHERE skey=$1 AND archive_index IS "
                    "NULL ORDER BY seq DESC LIMIT $2) AS m ORDER BY seq", skey, newest)
            else:
                rows = await c.fetch("SELECT * FROM messages WHERE skey=$1 AND archive_index "
                                     "IS NULL ORDER BY seq", skey)
            if not rows:  # messages imply their session; only an empty answer asks
                await self._require_session(c, identity, session_id)
            return [self._message(r) for r in rows]

        return await self._read(op)

    async def record_usage(self, identity: Identity, session_id: str, usage: UsageRecord,
                           request: RequestKey | None = None) -> int:
        async def op(c: Conn, ctx: _Ctx) -> int:
            skey = codec.session_key(identity, session_id)
            replay = await self._replay(c, request)
            if replay is None:
                found = await c.fetchval(
                    "UPDATE sessions SET updated_at=$2 WHERE skey=$1 RETURNING 1",
                    skey, usage.created_at)
                if found is None:
                    raise NotFound(f"session {session_id!r} not found",
                                   reason="SESSION_NOT_FOUND", metadata={"session_id": session_id})
                contexts, skill = codec.encode_usage(usage)
                await c.execute("INSERT INTO usage (skey, context_uris, skill, created_at) "
                                "VALUES ($1,$2,$3,$4)", skey, contexts, skill, usage.created_at)
                await self._remember(c, request, {}, usage.created_at)
            count = await c.fetchval("SELECT COUNT(*) FROM usage WHERE skey=$1 AND "
                                     "archive_index IS NULL", skey)
            return int(count)

        return await self._write(op)

    # ------------------------------------------------------------------ commit
    async def commit(self, plan: CommitPlan, request: RequestKey | None = None) -> CommitOutcome:
        async def op(c: Conn, ctx: _Ctx) -> CommitOutcome:
            identity, sid, now = plan.identity, plan.session_id, plan.now
            skey = codec.session_key(identity, sid)
            replay = await self._replay(c, request)
            if replay is not None:
                if not replay["archived"]:
                    return CommitOutcome(archived=False)
                trow = await self._task_row(c, replay["task_id"])
                arow = await self._archive_row(c, skey, trow["archive_index"])
                if arow is None:
                    raise NotFound("the archive of this request_id no longer exists",
                                   reason="ARCHIVE_NOT_FOUND")
                return CommitOutcome(True, self._archive(arow), self._task(trow))
            # Serializes commits of this session across replicas.
            srow = await self._require_session(c, identity, sid, lock=True)
            if plan.reject_if_running:
                busy = await c.fetchval(
                    "SELECT task_id FROM tasks WHERE skey=$1 AND state = ANY($2::text[]) "
                    "ORDER BY archive_index LIMIT 1", skey, OPEN_STATES)
                if busy is not None:
                    raise Aborted(f"Phase 2 of an earlier commit of session {sid!r} is still "
                                  f"running (task {busy})", reason="COMMIT_IN_PROGRESS",
                                  metadata={"task_id": busy})
            live = await c.fetch("SELECT seq, message_id FROM messages WHERE skey=$1 AND "
                                 "archive_index IS NULL ORDER BY seq", skey)
            keep = max(0, plan.keep_recent_count)
            to_archive = live[: max(0, len(live) - keep)]
            if not to_archive:
                await self._remember(c, request, {"archived": False}, now)
                return CommitOutcome(archived=False)
            index = int(srow["archive_count"]) + 1
            last_seq = to_archive[-1]["seq"]
            await c.execute("UPDATE messages SET archive_index=$2 WHERE skey=$1 AND "
                            "archive_index IS NULL AND seq<=$3", skey, index, last_seq)
            await c.execute("UPDATE usage SET archive_index=$2 WHERE skey=$1 AND "
                            "archive_index IS NULL", skey, index)
            arow = await c.fetchrow(
                "INSERT INTO archives (skey, idx, session_id, task_id, state, message_count, "
                "first_message_id, last_message_id, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,"
                "$8,$9) RETURNING *",
                skey, index, sid, plan.task_id, ArchiveState.PENDING.value, len(to_archive),
                to_archive[0]["message_id"], to_archive[-1]["message_id"], now)
            await c.execute("UPDATE sessions SET archive_count=$2, live_count=live_count-$3, "
                            "updated_at=$4 WHERE skey=$1", skey, index, len(to_archive), now)
            trow = await c.fetchrow(
                "INSERT INTO tasks (task_id, skey, account, user_id, agent, session_id, "
                "archive_index, task_type, state, stage, done_stage, created_at, updated_at) "
                "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$10,$11,$11) RETURNING *",
                plan.task_id, skey, identity.account, identity.user, identity.agent, sid, index,
                "session_commit", TaskState.PENDING.value, Stage.QUEUED.value, now)
            _, trow = await self._append_event(
                c, ctx, trow, EventKind.CREATED, TaskState.PENDING, Stage.QUEUED, now,
                message=f"archive {index} of {len(to_archive)} messages")
            await self._remember(c, request, {"archived": True, "task_id": plan.task_id}, now)
            ctx.work = True
            return CommitOutcome(True, self._archive(arow), self._task(trow))

        return await self._write(op)

    # ------------------------------------------------------------------ archives
    async def list_archives(self, identity: Identity, session_id: str, page_size: int,
                            after_index: int) -> list[Archive]:
        async def op(c: Conn) -> list[Archive]:
            rows = await c.fetch(
                "SELECT * FROM archives WHERE skey=$1 AND idx>$2 ORDER BY idx LIMIT $3",
                codec.session_key(identity, session_id), after_index, page_size)
            if not rows:
                await self._require_session(c, identity, session_id)
            return [self._archive(r) for r in rows]

        return await self._read(op)

    async def get_archive(self, identity: Identity, session_id: str,
                          index: int) -> Archive | None:
        async def op(c: Conn) -> Archive | None:
            row = await self._archive_row(c, codec.session_key(identity, session_id), index)
            return None if row is None else self._archive(row)

        return await self._read(op)

    async def archive_messages(self, identity: Identity, session_id: str,
                               index: int) -> list[Message]:
        async def op(c: Conn) -> list[Message]:
            rows = await c.fetch("SELECT * FROM messages WHERE skey=$1 AND archive_index=$2 "
                                 "ORDER BY seq", codec.session_key(identity, session_id), index)
            return [self._message(r) for r in rows]

        return await self._read(op)

    async def archive_usage(self, identity: Identity, session_id: str,
                            index: int) -> list[UsageRecord]:
        async def op(c: Conn) -> list[UsageRecord]:
            rows = await c.fetch("SELECT * FROM usage WHERE skey=$1 AND archive_index=$2 "
                                 "ORDER BY id", codec.session_key(identity, session_id), index)
            return [codec.decode_usage(r["context_uris"], r["skill"], r["created_at"])
                    for r in rows]

        return await self._read(op)

    async def latest_done_archive(self, identity: Identity, session_id: str,
                                  before_index: int | None = None) -> Archive | None:
        async def op(c: Conn) -> Archive | None:
            bound = before_index if before_index is not None else 2**62
            row = await c.fetchrow(
                "SELECT * FROM archives WHERE skey=$1 AND state=$2 AND idx<$3::bigint "
                "ORDER BY idx DESC LIMIT 1",
                codec.session_key(identity, session_id), ArchiveState.DONE.value, bound)
            return None if row is None else self._archive(row)

        return await self._read(op)

    # ------------------------------------------------------------------ tasks: reading
    async def get_task(self, task_id: str) -> Task | None:
        async def op(c: Conn) -> Task | None:
            row = await c.fetchrow("SELECT * FROM tasks WHERE task_id=$1", task_id)
            return None if row is None else self._task(row)

        return await self._read(op)

    async def list_tasks(self, identity: Identity, session_id: str, state: TaskState | None,
                         task_type: str, page_size: int, page_token: str) -> TaskPage:
        where = ["account=$1", "user_id=$2", "agent=$3"]
        args: list[Any] = [identity.account, identity.user, identity.agent]

        def add(cond: str, *values: Any) -> None:
            names = [f"${len(args) + i + 1}" for i in range(len(values))]
            where.append(cond.format(*names))
            args.extend(values)

        if session_id:
            add("session_id={}", session_id)
        if state is not None:
            add("state={}", state.value)
        if task_type:
            add("task_type={}", task_type)
        if page_token:
            created, tid = codec.decode_task_token(page_token)
            if math.isnan(created):
                return TaskPage([], "")  # compares with nothing (as in SQLite)
            add("(created_at, task_id) < ({}, {})", _token_time(created), tid)
        sql = (f"SELECT * FROM tasks WHERE {' AND '.join(where)} "
               f"ORDER BY created_at DESC, task_id DESC LIMIT ${len(args) + 1}")

        async def op(c: Conn) -> TaskPage:
            rows = await c.fetch(sql, *args, page_size + 1)
            tasks = [self._task(r) for r in rows[:page_size]]
            token = ""
            if len(rows) > page_size:
                last = rows[page_size - 1]
                token = codec.encode_task_token(last["created_at"].timestamp(), last["task_id"])
            return TaskPage(tasks, token)

        return await self._read(op)

    async def list_events(self, task_id: str, after_seq: int,
                          limit: int = 1000) -> list[TaskEvent]:
        async def op(c: Conn) -> list[TaskEvent]:
            rows = await c.fetch("SELECT * FROM task_events WHERE task_id=$1 AND seq>$2 "
                                 "ORDER BY seq LIMIT $3", task_id, after_seq, limit)
            return [self._event(r) for r in rows]

        return await self._read(op)

    # ------------------------------------------------------------------ tasks: control
    async def request_cancel(self, task_id: str, now: datetime) -> Task:
        async def op(c: Conn, ctx: _Ctx) -> Task:
            row = await self._task_row(c, task_id, lock=True)
            state = TaskState(row["state"])
            if state is TaskState.PENDING:
                err = TaskError(code=1, message="cancelled before Phase 2 started",
                                reason="CANCELLED")
                _, row = await self._append_event(
                    c, ctx, row, EventKind.CANCELLED, TaskState.CANCELLED, Stage(row["stage"]),
                    now, message="cancelled by request", error=err,
                    sets={"finished_at": now, "error": codec.encode_error(err),
                          "cancel_requested": True})
                ctx.work = True
            elif state is TaskState.RUNNING and not row["cancel_requested"]:
                _, row = await self._append_event(
                    c, ctx, row, EventKind.CANCEL_REQUESTED, TaskState.RUNNING,
                    Stage(row["stage"]), now,
                    message="cancel requested; stopping at the next stage boundary",
                    sets={"cancel_requested": True})
            return self._task(row)

        return await self._write(op)

    # ------------------------------------------------------------------ tasks: worker side
    async def claim_task(self, worker_id: str, now: datetime,
                         lease_until: datetime, announce: bool = False) -> Task | None:
        async def op(c: Conn, ctx: _Ctx) -> Task | None:
            # SKIP LOCKED: replicas claiming at once take different tasks. A locked row
            # that changed meanwhile is re-checked against the WHERE clause.
            row = await c.fetchrow(
                "SELECT t.* FROM tasks t WHERE t.state = ANY($1::text[]) "
                "AND (t.lease_expires_at IS NULL OR t.lease_expires_at<$2) "
                "AND NOT EXISTS (SELECT 1 FROM tasks p WHERE p.skey=t.skey "
                "  AND p.archive_index<t.archive_index AND p.state = ANY($1::text[])) "
                "ORDER BY t.created_at, t.task_id LIMIT 1 FOR UPDATE OF t SKIP LOCKED",
                OPEN_STATES, now)
            if row is None:
                return None
            attempt = int(row["attempts"]) + 1
            resumed = row["done_stage"] != Stage.QUEUED.value or row["attempts"] > 0
            msg = (f"resumed after {row['done_stage']} (attempt {attempt})" if resumed
                   else "Phase 2 started")
            _, row = await self._append_event(
                c, ctx, row, EventKind.STARTED, TaskState.RUNNING, Stage(row["stage"]), now,
                message=msg, attempt=attempt,
                sets={"attempts": attempt, "lease_owner": worker_id,
                      "lease_expires_at": lease_until,
                      "started_at": row["started_at"] if row["started_at"] is not None else now})
            if announce and not row["cancel_requested"]:
                first = next_stage_after(Stage(row["done_stage"]))
                _, row = await self._append_event(c, ctx, row, EventKind.STAGE_STARTED,
                                                  TaskState.RUNNING, first, now,
                                                  message=f"{first.value} started")
            return self._task(row)

        return await self._write(op)

    async def renew_lease(self, task_id: str, worker_id: str, lease_until: datetime) -> bool:
        async def op(c: Conn, ctx: _Ctx) -> bool:
            status = await c.execute(
                "UPDATE tasks SET lease_expires_at=$2 WHERE task_id=$1 AND lease_owner=$3 "
                "AND state=$4", task_id, lease_until, worker_id, TaskState.RUNNING.value)
            return _rowcount(status) == 1

        return await self._write(op)

    async def release_all_leases(self) -> int:
        async def op(c: Conn, ctx: _Ctx) -> int:
            status = await c.execute(
                "UPDATE tasks SET lease_owner='', lease_expires_at=NULL "
                "WHERE state = ANY($1::text[]) AND lease_owner<>''", OPEN_STATES)
            count = _rowcount(status)
            ctx.work = count > 0
            return count

        return await self._write(op)

    async def append_event(self, task_id: str, worker_id: str, event: NewEvent, stage: Stage,
                           now: datetime) -> TaskEvent:
        async def op(c: Conn, ctx: _Ctx) -> TaskEvent:
            row = await self._leased_task(c, task_id, worker_id)
            ev, _ = await self._append_event(c, ctx, row, event.kind, TaskState.RUNNING, stage,
                                             now, message=event.message, attempt=event.attempt)
            return ev

        return await self._write(op)

    async def _last_event(self, c: Conn, task_id: str) -> TaskEvent:
        row = await c.fetchrow("SELECT * FROM task_events WHERE task_id=$1 "
                               "ORDER BY seq DESC LIMIT 1", task_id)
        return self._event(row)

    async def complete_stage(self, task_id: str, worker_id: str, stage: Stage,
                             output: StageOutput, now: datetime,
                             next_stage: Stage | None = None) -> TaskEvent:
        async def op(c: Conn, ctx: _Ctx) -> TaskEvent:
            row = await self._leased_task(c, task_id, worker_id)
            if STAGE_ORDER[Stage(row["done_stage"])] >= STAGE_ORDER[stage]:
                return await self._last_event(c, task_id)
            task = self._task(row)
            skey = row["skey"]
            sets: dict[str, Any] = {"done_stage": stage.value}
            detail = ""
            if isinstance(output, SummaryOutput):
                await c.execute("UPDATE archives SET overview=$3, abstract=$4 WHERE skey=$1 "
                                "AND idx=$2", skey, task.archive_index, _text(output.overview),
                                _text(output.abstract))
                sets["prompt_tokens"] = row["prompt_tokens"] + output.usage.prompt_tokens
                sets["completion_tokens"] = (row["completion_tokens"]
                                             + output.usage.completion_tokens)
                detail = f"overview of {len(output.overview)} chars"
            elif isinstance(output, ExtractionOutput):
                counts = await self._store_memories(c, task, output.candidates, now)
                sets["memory_counts"] = codec.encode_counts(counts)
                sets["prompt_tokens"] = row["prompt_tokens"] + output.usage.prompt_tokens
                sets["completion_tokens"] = (row["completion_tokens"]
                                             + output.usage.completion_tokens)
                detail = f"{counts.total} memories"
            elif isinstance(output, RelationsOutput):
                uris = sorted({_text(u) for u in output.uris})
                await c.execute(
                    "INSERT INTO relations (skey, uri, created_at) SELECT $1, u, $3 "
                    "FROM unnest($2::text[]) AS u ON CONFLICT DO NOTHING", skey, uris, now)
                detail = f"{len(uris)} relations"
            elif isinstance(output, ActiveCountsOutput):
                uris = list(dict.fromkeys(_text(u) for u in output.uris))
                # Sorted: concurrent tasks bumping the same uris lock them in one order.
                await c.execute(
                    "INSERT INTO active_counts (uri, active_count, updated_at) "
                    "SELECT u, 1, $2 FROM unnest($1::text[]) AS u ORDER BY u "
                    "ON CONFLICT (uri) DO UPDATE SET "
                    "active_count=active_counts.active_count+1, updated_at=EXCLUDED.updated_at",
                    sorted(uris), now)
                sets["active_count_updated"] = len(uris)
                detail = f"{len(uris)} active counts updated"
            ev, after = await self._append_event(
                c, ctx, row, EventKind.STAGE_COMPLETED, TaskState.RUNNING, stage, now,
                message=f"{stage.value} done: {detail}", sets=sets)
            if next_stage is None:
                return ev
            if row["cancel_requested"]:
                err = TaskError(code=1, message=f"cancelled by request after {stage.value}",
                                reason="CANCELLED")
                ctx.work = True
                cancelled, _ = await self._append_event(
                    c, ctx, after, EventKind.CANCELLED, TaskState.CANCELLED, stage, now,
                    message=err.message, error=err,
                    sets={"error": codec.encode_error(err), "finished_at": now,
                          "lease_owner": "", "lease_expires_at": None})
                return cancelled
            started, _ = await self._append_event(c, ctx, after, EventKind.STAGE_STARTED,
                                                  TaskState.RUNNING, next_stage, now,
                                                  message=f"{next_stage.value} started")
            return started

        return await self._write(op)

    async def _store_memories(self, c: Conn, task: Task,
                              candidates: Sequence[CandidateMemory],
                              now: datetime) -> MemoryCounts:
        first: dict[tuple[str, str], CandidateMemory] = {}
        for cand in candidates:
            first.setdefault((cand.category.value, _text(cand.key)), cand)
        per: dict[str, int] = {}
        # Sorted by key: concurrent extractions touching the same memories lock them in
        # one order (no deadlock); counts do not depend on the order.
        for (category, key), cand in sorted(first.items()):
            owner = memory_owner(task.identity, cand.category)
            select = ("SELECT memory_id, content, source_message_ids FROM memories "
                      "WHERE account=$1 AND user_id=$2 AND agent=$3 AND category=$4 AND mkey=$5 "
                      "FOR UPDATE")
            ident = (owner.account, owner.user, owner.agent, category, key)
            row = await c.fetchrow(select, *ident)
            if row is None:
                inserted = await c.fetchval(
                    "INSERT INTO memories (memory_id, account, user_id, agent, category, mkey, "
                    "content, source_session_id, source_archive_uri, source_message_ids, "
                    "created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$11) "
                    "ON CONFLICT (account, user_id, agent, category, mkey) DO NOTHING "
                    "RETURNING memory_id",
                    f"mem_{uuid.uuid4().hex}", *ident, _text(cand.content), task.session_id,
                    task.archive_uri, codec.dumps(list(cand.source_message_ids)), now)
                if inserted is None:  # a concurrent extraction inserted it first
                    row = await c.fetchrow(select, *ident)
            if row is not None:
                content = codec.merge_content(cand.category, row["content"],
                                              _text(cand.content))
                ids = list(dict.fromkeys([*json.loads(row["source_message_ids"]),
                                          *cand.source_message_ids]))
                await c.execute(
                    "UPDATE memories SET content=$2, source_session_id=$3, source_archive_uri=$4, "
                    "source_message_ids=$5, updated_at=$6 WHERE memory_id=$1",
                    row["memory_id"], content, task.session_id, task.archive_uri,
                    codec.dumps(ids), now)
            per[category] = per.get(category, 0) + 1
        return MemoryCounts.from_dict(per)

    async def finalize_task(self, task_id: str, worker_id: str, now: datetime) -> TaskEvent:
        async def op(c: Conn, ctx: _Ctx) -> TaskEvent:
            row = await self._leased_task(c, task_id, worker_id)
            task = self._task(row)
            skey = row["skey"]
            status = await c.execute(
                "UPDATE archives SET state=$3, completed_at=$4 WHERE skey=$1 AND idx=$2 "
                "AND state=$5", skey, task.archive_index, ArchiveState.DONE.value, now,
                ArchiveState.PENDING.value)
            if _rowcount(status) != 1:
                raise FailedPrecondition(f"archive {task.archive_uri} is missing or already done",
                                         reason="ARCHIVE_NOT_PENDING")
            counts = codec.decode_counts(row["memory_counts"])
            srow = await c.fetchrow("SELECT memory_counts FROM sessions WHERE skey=$1 FOR UPDATE",
                                    skey)
            if srow is not None:
                total = codec.decode_counts(srow["memory_counts"]) + counts
                await c.execute(
                    "UPDATE sessions SET commit_count=commit_count+1, last_commit_at=$2, "
                    "memory_counts=$3, prompt_tokens=prompt_tokens+$4, "
                    "completion_tokens=completion_tokens+$5, updated_at=$2 WHERE skey=$1",
                    skey, now, codec.encode_counts(total), task.token_usage.prompt_tokens,
                    task.token_usage.completion_tokens)
            result = CommitResult(archive_uri=task.archive_uri, memories_extracted=counts,
                                  active_count_updated=row["active_count_updated"],
                                  token_usage=task.token_usage)
            ctx.work = True
            ev, _ = await self._append_event(
                c, ctx, row, EventKind.COMPLETED, TaskState.COMPLETED, Stage.FINALIZE, now,
                message="Phase 2 completed", result=result,
                sets={"done_stage": Stage.FINALIZE.value, "result": codec.encode_result(result),
                      "finished_at": now, "lease_owner": "", "lease_expires_at": None})
            return ev

        return await self._write(op)

    async def fail_task(self, task_id: str, worker_id: str | None, error: TaskError,
                        now: datetime) -> TaskEvent:
        async def op(c: Conn, ctx: _Ctx) -> TaskEvent:
            row = (await self._leased_task(c, task_id, worker_id) if worker_id is not None
                   else await self._task_row(c, task_id, lock=True))
            if TaskState(row["state"]).terminal:
                return await self._last_event(c, task_id)
            ctx.work = True
            ev, _ = await self._append_event(
                c, ctx, row, EventKind.FAILED, TaskState.FAILED, Stage(row["stage"]), now,
                message=error.message, error=error,
                sets={"error": codec.encode_error(error), "finished_at": now,
                      "lease_owner": "", "lease_expires_at": None})
            return ev

        return await self._write(op)

    async def cancel_task(self, task_id: str, worker_id: str, now: datetime) -> TaskEvent:
        async def op(c: Conn, ctx: _Ctx) -> TaskEvent:
            row = await self._leased_task(c, task_id, worker_id)
            err = TaskError(code=1, message=f"cancelled by request after {row['done_stage']}",
                            reason="CANCELLED")
            ctx.work = True
            ev, _ = await self._append_event(
                c, ctx, row, EventKind.CANCELLED, TaskState.CANCELLED, Stage(row["stage"]), now,
                message=err.message, error=err,
                sets={"error": codec.encode_error(err), "finished_at": now,
                      "lease_owner": "", "lease_expires_at": None})
            return ev

        return await self._write(op)

    # ------------------------------------------------------------------ Phase 2 reads
    async def task_memory_counts(self, task_id: str) -> MemoryCounts:
        async def op(c: Conn) -> MemoryCounts:
            return codec.decode_counts((await self._task_row(c, task_id))["memory_counts"])

        return await self._read(op)

    async def active_count(self, uri: str) -> int:
        async def op(c: Conn) -> int:
            value = await c.fetchval("SELECT active_count FROM active_counts WHERE uri=$1",
                                     _text(uri))
            return 0 if value is None else int(value)

        return await self._read(op)

    async def session_relations(self, identity: Identity, session_id: str) -> list[str]:
        async def op(c: Conn) -> list[str]:
            rows = await c.fetch("SELECT uri FROM relations WHERE skey=$1 ORDER BY uri",
                                 codec.session_key(identity, session_id))
            return [str(r["uri"]) for r in rows]

        return await self._read(op)

    # ------------------------------------------------------------------ memories
    _VISIBLE = "account=$1 AND user_id=$2 AND (agent='' OR agent=$3)"

    async def list_memories(self, identity: Identity, category: MemoryCategory | None,
                            page_size: int, after_memory_id: str) -> list[Memory]:
        args: list[Any] = [identity.account, identity.user, identity.agent, after_memory_id]
        sql = f"SELECT {MEMORY_COLS} FROM memories WHERE {self._VISIBLE} AND memory_id>$4"
        if category is not None:
            args.append(category.value)
            sql += f" AND category=${len(args)}"
        args.append(page_size)
        sql += f" ORDER BY memory_id LIMIT ${len(args)}"

        async def op(c: Conn) -> list[Memory]:
            return [self._memory(r) for r in await c.fetch(sql, *args)]

        return await self._read(op)

    async def get_memory(self, identity: Identity, memory_id: str) -> Memory | None:
        async def op(c: Conn) -> Memory | None:
            row = await c.fetchrow(
                f"SELECT {MEMORY_COLS} FROM memories WHERE {self._VISIBLE} AND memory_id=$4",
                identity.account, identity.user, identity.agent, memory_id)
            return None if row is None else self._memory(row)

        return await self._read(op)

    async def search_memories(self, identity: Identity, query: str,
                              category: MemoryCategory | None,
                              limit: int) -> list[tuple[Memory, float]]:
        terms = codec.search_terms(query)
        if not terms:
            return []
        args: list[Any] = [identity.account, identity.user, identity.agent]
        # Any term may match (like the SQLite adapter's OR query); each term goes
        # through plainto_tsquery, so no user text is parsed as tsquery syntax.
        parts = []
        for term in terms:
            args.append(term)
            parts.append(f"plainto_tsquery('simple'::regconfig, ${len(args)})")
        sql = (f"SELECT {MEMORY_COLS}, ts_rank(m.tsv, q.query) AS rank FROM memories m, "
               f"(SELECT {' || '.join(parts)} AS query) AS q "
               f"WHERE m.tsv @@ q.query AND m.account=$1 AND m.user_id=$2 "
               f"AND (m.agent='' OR m.agent=$3)")
        if category is not None:
            args.append(category.value)
            sql += f" AND m.category=${len(args)}"
        args.append(limit)
        sql += f" ORDER BY rank DESC, m.memory_id LIMIT ${len(args)}"

        async def op(c: Conn) -> list[tuple[Memory, float]]:
            rows = await c.fetch(sql, *args)
            return [(self._memory(r), float(r["rank"])) for r in rows]

        return await self._read(op)

    async def delete_memory(self, identity: Identity, memory_id: str) -> bool:
        async def op(c: Conn, ctx: _Ctx) -> bool:
            status = await c.execute(
                f"DELETE FROM memories WHERE {self._VISIBLE} AND memory_id=$4",
                identity.account, identity.user, identity.agent, memory_id)
            return _rowcount(status) == 1

        return await self._write(op)

    # ------------------------------------------------------------------ retention
    async def sweep(self, now: datetime, completed_before: datetime, failed_before: datetime,
                    max_tasks: int, request_ids_before: datetime) -> SweepResult:
        async def op(c: Conn, ctx: _Ctx) -> SweepResult:
            # One sweeper at a time across replicas; the others have nothing to add.
            if not await c.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK_KEY):
                return SweepResult(tasks_removed=0, request_ids_removed=0)
            removed = _rowcount(await c.execute(
                "DELETE FROM tasks WHERE (state IN ($1, $2) AND finished_at<$3) OR "
                "(state=$4 AND finished_at<$5)",
                TaskState.COMPLETED.value, TaskState.CANCELLED.value, completed_before,
                TaskState.FAILED.value, failed_before))
            total = int(await c.fetchval("SELECT COUNT(*) FROM tasks"))
            if total > max_tasks:
                removed += _rowcount(await c.execute(
                    "DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM tasks "
                    "WHERE state = ANY($1::text[]) ORDER BY finished_at, task_id LIMIT $2)",
                    TERMINAL_STATES, total - max_tasks))
            rids = _rowcount(await c.execute("DELETE FROM request_ids WHERE created_at<$1",
                                             request_ids_before))
            return SweepResult(tasks_removed=removed, request_ids_removed=rids)

        return await self._write(op)


def _tool_fields(p: ToolPart) -> dict[str, Any]:
    return {f: getattr(p, f) for f in ToolPart.__dataclass_fields__}


__all__ = ["PostgresStore"]
