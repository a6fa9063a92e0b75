"""PostgreSQL's side of the SQL layer: `$n` placeholders, row locks, TIMESTAMPTZ,
a generated tsvector column for full-text search, an advisory lock for sweeps."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sessiond.server.store.sql.rows import RowMapper
from sessiond.server.store.sql.tx import Dialect, Row, Tx

SWEEP_LOCK_KEY = 0x5E55_10D0_0002


@functools.lru_cache(maxsize=512)
def numbered(sql: str) -> str:
    """`?` placeholders as `$1..$n` (the shared SQL has no `?` inside literals)."""
    parts = sql.split("?")
    return "".join(f"{p}${i}" for i, p in enumerate(parts[:-1], start=1)) + parts[-1]


def rowcount(status: str) -> int:
    """Rows affected, from a command status such as 'UPDATE 3' or 'INSERT 0 1'."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, IndexError):
        return 0


def _as_datetime(value: datetime | None) -> datetime | None:
    return value  # asyncpg returns TIMESTAMPTZ columns as aware datetimes


class PostgresDialect(Dialect):
    name = "postgresql"
    lock = " FOR UPDATE"
    rows = RowMapper(_as_datetime)

    def claim_lock(self, alias: str) -> str:
        # SKIP LOCKED: replicas claiming at once take different tasks. A locked row
        # that changed meanwhile is re-checked against the WHERE clause.
        return f" FOR UPDATE OF {alias} SKIP LOCKED"

    def ts(self, value: datetime | None) -> datetime | None:
        return value

    def epoch(self, value: Any) -> float:
        return float(value.timestamp())

    def cursor_time(self, epoch: float) -> datetime:
        """Out-of-range cursors clamp to the ends of time (a cursor is only compared
        with, so this orders like SQLite's float comparison)."""
        try:
            return datetime.fromtimestamp(epoch, UTC)
        except (OverflowError, ValueError, OSError):
            return (datetime.max if epoch > 0 else datetime.min).replace(tzinfo=UTC)

    async def index_memory(self, tx: Tx, memory_id: str, content: str, *, new: bool) -> None:
        """Nothing to do: `memories.tsv` is a generated column."""

    async def unindex_memory(self, tx: Tx, memory_id: str) -> None:
        """Nothing to do: the index row goes with the memory row."""

    def search(self, terms: Sequence[str], columns: str) -> tuple[str, list[Any]]:
        # Any term may match (like SQLite's OR query); each term goes through
        # plainto_tsquery, so no user text is parsed as tsquery syntax.
        query = " || ".join(["plainto_tsquery('simple'::regconfig, ?)"] * len(terms))
        return (f"SELECT {columns}, ts_rank(m.tsv, q.query) AS score FROM memories m, "
                f"(SELECT {query} AS query) AS q WHERE m.tsv @@ q.query", list(terms))

    async def sweep_lock(self, tx: Tx) -> bool:
        return bool(await tx.fetchval("SELECT pg_try_advisory_xact_lock(?)", SWEEP_LOCK_KEY))


DIALECT = PostgresDialect()


class PgTx(Tx):
    """A transaction on a pooled asyncpg connection (asyncpg is untyped)."""

    def __init__(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return rowcount(await self.conn.execute(numbered(sql), *args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self.conn.executemany(numbered(sql), rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        rows: list[Row] = await self.conn.fetch(numbered(sql), *args)
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = await self.conn.fetchrow(numbered(sql), *args)
        return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchval(numbered(sql), *args)
