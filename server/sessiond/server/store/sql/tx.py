"""The transaction interface the SQL layer is written against, and the dialect hooks.

Statements use `?` placeholders; a backend translates them if its driver wants
another style. A `Tx` is one open transaction: reads see its own writes, and on
PostgreSQL `Dialect.lock` suffixes make a SELECT lock the rows it reads (SQLite
serializes every write transaction, so there they are empty).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from sessiond.server.domain.values import TaskEvent

if TYPE_CHECKING:
    from sessiond.server.store.sql.rows import RowMapper


class Row(Protocol):
    def __getitem__(self, key: str | int, /) -> Any: ...


@dataclass
class Announce:
    """What a write transaction announces once it committed (never before)."""

    events: list[TaskEvent] = field(default_factory=list)
    work: bool = False
    # Wake-up keys of session feeds that got events (`session_events.poke_key`).
    pokes: set[str] = field(default_factory=set)


class Dialect(abc.ABC):
    """What differs between SQL backends, and nothing else."""

    name: str
    # Appended to a SELECT whose rows the transaction goes on to change.
    lock: str = ""
    rows: RowMapper

    def claim_lock(self, alias: str) -> str:
        """Appended to the claim query: lock the row found, skip rows others hold."""
        return ""

    @abc.abstractmethod
    def ts(self, value: datetime | None) -> Any:
        """A datetime as the timestamp column stores it."""

    @abc.abstractmethod
    def epoch(self, value: Any) -> float:
        """A timestamp column's value as epoch seconds (page cursors)."""

    @abc.abstractmethod
    def cursor_time(self, epoch: float) -> Any:
        """Epoch seconds of a page cursor as a value to compare a timestamp column with."""

    @abc.abstractmethod
    async def index_memory(self, tx: Tx, memory_id: str, content: str, *, new: bool) -> None:
        """Keep the full-text index in step with a memory's content."""

    @abc.abstractmethod
    async def unindex_memory(self, tx: Tx, memory_id: str) -> None: ...

    @abc.abstractmethod
    def search(self, terms: Sequence[str], columns: str) -> tuple[str, list[Any]]:
        """`SELECT <columns>, <score> AS score FROM memories m ... WHERE <m matches any
        of terms>` (higher score is better) and its arguments; the caller appends
        more conditions, the order and the limit."""

    async def sweep_lock(self, tx: Tx) -> bool:
        """False when another process is sweeping right now (it will do the work)."""
        return True

    def recall_stats(self) -> str:
        """`SELECT <entries> AS n, <their total length> AS total` over the retrieval
        entries an identity sees, with ? for account, user and agent (BM25's N and
        average length). The default counts the entries (one index range scan)."""
        return ("SELECT COUNT(*) AS n, COALESCE(SUM(length), 0) AS total FROM "
                "recall_entries WHERE account=? AND user_id=? AND (agent='' OR agent=?)")


class Tx(abc.ABC):
    """One open transaction."""

    def __init__(self, dialect: Dialect, journal_cap: int,
                 announce: Announce | None = None) -> None:
        self.d = dialect
        self.journal_cap = journal_cap
        self.announce = announce if announce is not None else Announce()
        # While set (session_events.batched): the task journal events this transaction
        # appends, by session key, written to the session feeds together at its end.
        self.feed: dict[str, list[Any]] | None = None
        # While set (tasks.journal_batched): the journal rows and task row changes this
        # transaction makes, written together at its end (tasks.Journal).
        self.journal: Any = None

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    @abc.abstractmethod
    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]
