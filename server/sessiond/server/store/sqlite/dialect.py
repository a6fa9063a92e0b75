"""SQLite's side of the SQL layer: epoch-second timestamps, an FTS5 index kept by
hand, no row locks (one writer thread serializes every write), and `SqliteTx`, which
runs the shared (async) transactions synchronously on the store's own threads."""

from __future__ import annotations

import sqlite3
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sessiond.server.store.sql.rows import RowMapper
from sessiond.server.store.sql.tx import Dialect, Row, Tx

T = TypeVar("T")


def _from_epoch(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class SqliteDialect(Dialect):
    name = "sqlite"
    rows = RowMapper(_from_epoch)

    def ts(self, value: datetime | None) -> float | None:
        return None if value is None else value.timestamp()

    def epoch(self, value: Any) -> float:
        return float(value)

    def cursor_time(self, epoch: float) -> float:
        return epoch

    # A memory's FTS5 row is found by its rowid, kept in memories_fts_keys (migration
    # 13): FTS5 cannot look up an UNINDEXED column, so a delete by memory_id read
    # every memory's row.
    async def index_memory(self, tx: Tx, memory_id: str, content: str, *, new: bool) -> None:
        if not new:
            await self.unindex_memory(tx, memory_id)
        await tx.execute("INSERT INTO memories_fts(content, memory_id) VALUES (?,?)",
                         content, memory_id)
        await tx.execute("INSERT INTO memories_fts_keys (memory_id, fts_rowid) "
                         "VALUES (?, last_insert_rowid()) ON CONFLICT (memory_id) DO UPDATE "
                         "SET fts_rowid=excluded.fts_rowid", memory_id)

    async def unindex_memory(self, tx: Tx, memory_id: str) -> None:
        await tx.execute("DELETE FROM memories_fts WHERE rowid=(SELECT fts_rowid FROM "
                         "memories_fts_keys WHERE memory_id=?)", memory_id)
        await tx.execute("DELETE FROM memories_fts_keys WHERE memory_id=?", memory_id)

    def search(self, terms: Sequence[str], columns: str) -> tuple[str, list[Any]]:
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        return (f"SELECT {columns}, -bm25(memories_fts) AS score FROM memories_fts "
                "JOIN memories m ON m.memory_id = memories_fts.memory_id "
                "WHERE memories_fts MATCH ?", [match])


    def recall_stats(self) -> str:
        # Kept by triggers on recall_entries (migration 11): a lookup of at most two
        # rows instead of a scan of every entry the identity sees.
        return ("SELECT COALESCE(SUM(n), 0) AS n, COALESCE(SUM(total), 0) AS total FROM "
                "recall_stats WHERE account=? AND user_id=? AND (agent='' OR agent=?)")


DIALECT = SqliteDialect()


class SqliteTx(Tx):
    """Statements run at once on the connection; nothing is ever awaited for real."""

    def __init__(self, conn: sqlite3.Connection, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return self.conn.execute(sql, args).rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self.conn.execute(sql, args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = self.conn.execute(sql, args).fetchone()
        return row


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a transaction coroutine that never suspends (SqliteTx awaits nothing
    real) to its result on the calling thread."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a SQLite transaction awaited something it cannot have")
