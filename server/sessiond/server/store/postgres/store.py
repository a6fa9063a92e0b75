"""The PostgreSQL store: several sessiond replicas share one database.

Every operation is the shared SQL layer's (`store/sql/`, with `dialect.py`); this
module is how a transaction runs here and what PostgreSQL adds:

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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
from sessiond.server.domain import rules
from sessiond.server.domain.autocommit import BYTES_PER_TOKEN
from sessiond.server.domain.commands import RequestKey
from sessiond.server.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    SessiondError,
    Unavailable,
)
from sessiond.server.domain.values import Identity, Message
from sessiond.server.redact import redact_text
from sessiond.server.store import codec
from sessiond.server.store.base import RELAXED
from sessiond.server.store.postgres import migrations
from sessiond.server.store.postgres.dialect import DIALECT, PgTx
from sessiond.server.store.sql import messages, session_events
from sessiond.server.store.sql.store import Op, SqlStore
from sessiond.server.store.sql.tx import Announce, Tx

log = logging.getLogger(__name__)

T = TypeVar("T")
# asyncpg ships no type information: connections and records are dynamically typed.
Conn = Any

WORK_PAYLOAD = "work"
EVENT_PREFIX = "task:"
MAX_ATTEMPTS = 8
REQUEST_IDS_PKEY = "request_ids_pkey"
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


def _unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(redact_text(f"postgresql unavailable: {type(exc).__name__}: {exc}"
                                   .rstrip(": ")))


def _is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, _UNAVAILABLE_ERRORS) and not isinstance(exc, _BUG_ERRORS)


class PostgresStore(SqlStore):
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
            raise FailedPrecondition(redact_text(f"postgresql refused the connection: {exc}"),
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
        await self._read(lambda tx: tx.fetchval("SELECT 1"))

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

    async def _notify(self, c: Conn, ctx: Announce) -> None:
        payloads = [EVENT_PREFIX + tid for tid in dict.fromkeys(e.task_id for e in ctx.events)]
        payloads += [EVENT_PREFIX + key for key in sorted(ctx.pokes)]
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

    async def _write(self, op: Op[T], single_statement: bool = False) -> T:
        """Run `fn` in one read-write transaction; announce its events after commit.
        `single_statement`: `fn` runs exactly one statement, which PostgreSQL makes
        atomic by itself, so no BEGIN/COMMIT round trips are spent on it."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            pool = self._require_pool()
            try:
                async with pool.acquire(timeout=self.acquire_timeout) as conn:
                    tx = PgTx(conn, DIALECT, self.journal_cap)
                    if single_statement:
                        result = await op(tx)
                    else:
                        async with conn.transaction():
                            if RELAXED.get():
                                # Acknowledged before the WAL is flushed (store.base).
                                await conn.execute("SET LOCAL synchronous_commit TO OFF")
                            result = await op(tx)
                            await self._notify(conn, tx.announce)
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
            self._announce(tx.announce)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read(self, op: Op[T]) -> T:
        """Run a read. Reads are single statements or tolerate READ COMMITTED between
        statements; a read that lost its connection is tried once more."""
        for attempt in (1, 2):
            pool = self._require_pool()
            try:
                async with pool.acquire(timeout=self.acquire_timeout) as conn:
                    return await op(PgTx(conn, DIALECT, self.journal_cap))
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

    # ------------------------------------------------------------------ AddMessage
    async def add_message(self, identity: Identity, session_id: str, message: Message,
                          request: RequestKey | None = None,
                          now: datetime | None = None) -> Message:
        """Without a request id, AddMessage is one statement (a CTE), which PostgreSQL
        makes atomic by itself: no BEGIN/COMMIT round trips (measured in bench/). The
        statement changes nothing when the append would pass a count trigger of the
        session's auto-commit policy or a quota: then the full transaction runs (it
        commits, or says which quota)."""
        if request is not None:
            return await super().add_message(identity, session_id, message, request, now)
        skey = codec.session_key(identity, session_id)
        auto = self.auto_commit_default
        now = now or message.created_at
        ms = messages.epoch_ms(now)
        event = session_events.message_item(message, now)[4]

        async def op(tx: Tx) -> Message | None:
            assert isinstance(tx, PgTx)
            seq = await tx.conn.fetchval(
                _ADD_MESSAGE, skey, message.id, message.role.value,
                codec.encode_parts(message.parts), message.created_at,
                rules.message_bytes(message.parts), self.limits.live_messages_per_session,
                self.limits.live_bytes_per_session, now, ms, auto.idle_seconds,
                auto.max_messages, auto.max_tokens, codec.dumps(event), self.channel,
                EVENT_PREFIX + session_events.poke_key(skey))
            if seq is None:
                return None
            tx.announce.pokes.add(session_events.poke_key(skey))
            return dataclasses.replace(message, seq=int(seq))

        stored = await self._write(op, single_statement=True)
        if stored is None:
            return await super().add_message(identity, session_id, message, request, now)
        return stored


# messages.add as one statement, for an append that passes no quota and no count trigger
# of auto-commit; with its feed event and the NOTIFY of it (sent on commit).
_ADD_MESSAGE = (
    "WITH s AS (UPDATE sessions SET next_seq=next_seq+1, message_count=message_count+1, "
    "live_count=live_count+1, live_bytes=live_bytes+$6, updated_at=$9, "
    "event_seq=event_seq+1, last_append_ms=$10, "
    "idle_due_ms=CASE WHEN COALESCE(ac_idle, $11::bigint)>0 "
    "THEN $10::bigint+COALESCE(ac_idle, $11::bigint)*1000 END "
    "WHERE skey=$1 AND live_count<$7 AND live_bytes+$6<=$8 "
    "AND NOT ((COALESCE(ac_messages, $12::bigint)>0 "
    "AND live_count+1>=COALESCE(ac_messages, $12::bigint)) "
    "OR (COALESCE(ac_tokens, $13::bigint)>0 "
    f"AND (live_bytes+$6+{BYTES_PER_TOKEN - 1})/{BYTES_PER_TOKEN}"
    ">=COALESCE(ac_tokens, $13::bigint))) "
    "RETURNING next_seq-1 AS seq, event_seq), "
    "m AS (INSERT INTO messages (skey, seq, message_id, role, parts, created_at, size) "
    "SELECT $1::text, s.seq, $2::text, $3::text, $4::text, $5::timestamptz, $6::bigint FROM s "
    "RETURNING seq), "
    "e AS (INSERT INTO session_events (skey, seq, kind, time, task_id, ref_seq, payload) "
    "SELECT $1::text, s.event_seq, 'message_appended', $9::timestamptz, '', s.seq, $14::text "
    "FROM s) "
    "SELECT m.seq FROM m, LATERAL (SELECT pg_notify($15::text, $16::text)) AS n")


__all__ = ["PostgresStore"]
