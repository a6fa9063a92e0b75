"""The embedded default store: one SQLite file in WAL mode, group-committed writes
(see db.py). Every operation is the shared SQL layer's (`store/sql/`)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path

from sessiond.server.domain.errors import FailedPrecondition
from sessiond.server.store.sql.store import Op, SqlStore, T
from sessiond.server.store.sql.tx import Announce
from sessiond.server.store.sqlite.db import SqliteDatabase
from sessiond.server.store.sqlite.dialect import DIALECT, SqliteTx, run_sync
from sessiond.server.store.sqlite.schema import migrate


class SqliteStore(SqlStore):
    def __init__(self, data_dir: Path, *, synchronous: str = "FULL",
                 journal_cap: int = 10_000, exclusive: bool = True) -> None:
        """`exclusive=False` is for short administrative writes next to a running
        server (`sessiond keys`): no data-directory lock, no Phase 2 work."""
        super().__init__()
        self.exclusive = exclusive
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / "sessiond.sqlite3"
        self.journal_cap = journal_cap
        self._db = SqliteDatabase(self.path, synchronous=synchronous)
        self._lock_fd: int | None = None

    @property
    def single_process(self) -> bool:
        return True

    async def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.exclusive:
            self._lock_data_dir()
        self._db.init_sync(migrate)
        self._db.start(self._announce)

    def _lock_data_dir(self) -> None:
        """One process per data directory: a second one would release the first
        one's Phase 2 leases at start. The lock dies with the process."""
        fd = os.open(self.data_dir / "sessiond.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise FailedPrecondition(
                f"data directory {self.data_dir} is in use by another sessiond process; "
                "use PostgreSQL to run several processes", reason="DATA_DIR_LOCKED") from exc
        self._lock_fd = fd

    async def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def ping(self) -> None:
        await self._db.read(lambda c: c.execute("SELECT 1").fetchone())

    async def _write(self, op: Op[T]) -> T:
        def run(conn: sqlite3.Connection, announce: Announce) -> T:
            return run_sync(op(SqliteTx(conn, DIALECT, self.journal_cap, announce)))

        return await self._db.write(run)

    async def _read(self, op: Op[T]) -> T:
        return await self._db.read(
            lambda conn: run_sync(op(SqliteTx(conn, DIALECT, self.journal_cap))))
