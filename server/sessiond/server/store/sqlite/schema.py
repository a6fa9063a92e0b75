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
    """, 11: """
    CREATE TABLE messages_clustered (
        skey TEXT NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        message_id TEXT NOT NULL,
        role TEXT NOT NULL,
        parts TEXT NOT NULL,
        created_at REAL NOT NULL,
        archive_index INTEGER,
        size INTEGER NOT NULL DEFAULT 0,
        client_message_id TEXT,
        PRIMARY KEY (skey, seq)
    ) WITHOUT ROWID;
    INSERT INTO messages_clustered (skey, seq, message_id, role, parts, created_at,
                                    archive_index, size, client_message_id)
        SELECT skey, seq, message_id, role, parts, created_at, archive_index, size,
               client_message_id FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_clustered RENAME TO messages;
    CREATE UNIQUE INDEX messages_id ON messages (skey, message_id);
    CREATE INDEX messages_archive ON messages (skey, archive_index, seq);
    CREATE UNIQUE INDEX messages_client_id ON messages (skey, client_message_id);
    CREATE TABLE recall_stats (
        account TEXT NOT NULL, user_id TEXT NOT NULL, agent TEXT NOT NULL,
        n INTEGER NOT NULL, total INTEGER NOT NULL,
        PRIMARY KEY (account, user_id, agent)
    ) WITHOUT ROWID;
    INSERT INTO recall_stats (account, user_id, agent, n, total)
        SELECT account, user_id, agent, COUNT(*), SUM(length) FROM recall_entries
        GROUP BY account, user_id, agent;
    CREATE TRIGGER recall_stats_insert AFTER INSERT ON recall_entries BEGIN
        INSERT INTO recall_stats (account, user_id, agent, n, total)
        VALUES (NEW.account, NEW.user_id, NEW.agent, 1, NEW.length)
        ON CONFLICT (account, user_id, agent)
        DO UPDATE SET n = n + 1, total = total + excluded.total; END;
    CREATE TRIGGER recall_stats_delete AFTER DELETE ON recall_entries BEGIN
        UPDATE recall_stats SET n = n - 1, total = total - OLD.length
        WHERE account = OLD.account AND user_id = OLD.user_id AND agent = OLD.agent; END;
    CREATE TRIGGER recall_stats_update BEFORE UPDATE OF account, user_id, agent, length
        ON recall_entries BEGIN
        SELECT RAISE(ABORT, 'recall entries are replaced, never updated'); END;
    """, 12: """
    CREATE TABLE recall_terms_clustered (
        entry_id TEXT NOT NULL REFERENCES recall_entries (entry_id) ON DELETE CASCADE,
        account TEXT NOT NULL, user_id TEXT NOT NULL, agent TEXT NOT NULL,
        term TEXT NOT NULL,
        tf INTEGER NOT NULL,
        kind TEXT NOT NULL,
        length INTEGER NOT NULL,
        PRIMARY KEY (term, account, user_id, agent, entry_id)
    ) WITHOUT ROWID;
    INSERT INTO recall_terms_clustered (entry_id, account, user_id, agent, term, tf, kind,
                                        length)
        SELECT entry_id, account, user_id, agent, term, tf, kind, length FROM recall_terms;
    DROP TABLE recall_terms;
    ALTER TABLE recall_terms_clustered RENAME TO recall_terms;
    CREATE INDEX recall_terms_entry ON recall_terms (entry_id);
    """, 13: """
    CREATE TABLE recall_terms_appended (
        entry_id TEXT NOT NULL REFERENCES recall_entries (entry_id) ON DELETE CASCADE,
        account TEXT NOT NULL, user_id TEXT NOT NULL, agent TEXT NOT NULL,
        term TEXT NOT NULL,
        tf INTEGER NOT NULL,
        kind TEXT NOT NULL,
        length INTEGER NOT NULL,
        eseq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (term, account, user_id, agent, eseq, entry_id)
    ) WITHOUT ROWID;
    INSERT INTO recall_terms_appended (entry_id, account, user_id, agent, term, tf, kind,
                                       length, eseq)
        SELECT entry_id, account, user_id, agent, term, tf, kind, length, eseq
        FROM recall_terms;
    DROP TABLE recall_terms;
    ALTER TABLE recall_terms_appended RENAME TO recall_terms;
    CREATE INDEX recall_terms_entry ON recall_terms (entry_id);
    DELETE FROM memories_fts WHERE rowid NOT IN (SELECT MAX(rowid) FROM memories_fts
                                                 GROUP BY memory_id);
    CREATE TABLE memories_fts_keys (
        memory_id TEXT PRIMARY KEY,
        fts_rowid INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO memories_fts_keys (memory_id, fts_rowid)
        SELECT memory_id, rowid FROM memories_fts;
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
