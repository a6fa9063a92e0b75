"""The shared schema (`store/sql/schema.py`) on SQLite. Migrations run in order at
open; a file written by a newer sessiond (unknown version) is refused."""

from __future__ import annotations

import sqlite3

from sessiond.server.domain.errors import FailedPrecondition
from sessiond.server.store.sql.schema import SCHEMA_VERSION, pending, statements

TYPES = {"key": "TEXT", "ts": "REAL", "int64": "INTEGER", "bool": "INTEGER", "false": "0",
         "serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "memory_columns": ""}
EXTRA = {1: """
    CREATE INDEX tasks_open ON tasks (state, created_at);
    CREATE VIRTUAL TABLE memories_fts USING fts5(content, memory_id UNINDEXED,
                                                 tokenize = 'unicode61');
    """}


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the file to SCHEMA_VERSION; return the version found before."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    found = int(row[0]) if row else 0
    if found > SCHEMA_VERSION:
        raise FailedPrecondition(
            f"database schema version {found} is newer than this sessiond knows "
            f"({SCHEMA_VERSION}); upgrade sessiond", reason="SCHEMA_TOO_NEW")
    for m in pending(found):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in statements(m.render(TYPES, EXTRA)):
                conn.execute(stmt)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version(version) VALUES (?)", (m.version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found
