"""SQLite schema, versioned. Migrations run in order at open; a file written by a newer
sessiond (unknown version) is refused."""

from __future__ import annotations

import sqlite3

from sessiond.server.domain.errors import FailedPrecondition

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE sessions (
        skey TEXT PRIMARY KEY,
        account TEXT NOT NULL, user_id TEXT NOT NULL, agent TEXT NOT NULL,
        session_id TEXT NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL,
        message_count INTEGER NOT NULL DEFAULT 0,
        live_count INTEGER NOT NULL DEFAULT 0,
        archive_count INTEGER NOT NULL DEFAULT 0,
        commit_count INTEGER NOT NULL DEFAULT 0,
        memory_counts TEXT NOT NULL DEFAULT '{}',
        last_commit_at REAL,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        next_seq INTEGER NOT NULL DEFAULT 1
    );
    CREATE UNIQUE INDEX sessions_owner ON sessions(account, user_id, agent, session_id);
    CREATE TABLE messages (
        skey TEXT NOT NULL REFERENCES sessions(skey) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        message_id TEXT NOT NULL,
        role TEXT NOT NULL,
        parts TEXT NOT NULL,
        created_at REAL NOT NULL,
        archive_index INTEGER,
        PRIMARY KEY (skey, seq)
    );
    CREATE UNIQUE INDEX messages_id ON messages(skey, message_id);
    CREATE INDEX messages_archive ON messages(skey, archive_index, seq);
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        skey TEXT NOT NULL REFERENCES sessions(skey) ON DELETE CASCADE,
        context_uris TEXT NOT NULL,
        skill TEXT,
        created_at REAL NOT NULL,
        archive_index INTEGER
    );
    CREATE INDEX usage_archive ON usage(skey, archive_index);
    CREATE TABLE archives (
        skey TEXT NOT NULL REFERENCES sessions(skey) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        session_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        state TEXT NOT NULL,
        overview TEXT NOT NULL DEFAULT '',
        abstract TEXT NOT NULL DEFAULT '',
        message_count INTEGER NOT NULL,
        first_message_id TEXT NOT NULL DEFAULT '',
        last_message_id TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        completed_at REAL,
        PRIMARY KEY (skey, idx)
    );
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        skey TEXT NOT NULL,
        account TEXT NOT NULL, user_id TEXT NOT NULL, agent TEXT NOT NULL,
        session_id TEXT NOT NULL,
        archive_index INTEGER NOT NULL,
        task_type TEXT NOT NULL,
        state TEXT NOT NULL,
        stage TEXT NOT NULL,
        done_stage TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_seq INTEGER NOT NULL DEFAULT 0,
        first_seq INTEGER NOT NULL DEFAULT 1,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        memory_counts TEXT NOT NULL DEFAULT '{}',
        active_count_updated INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT NOT NULL DEFAULT '',
        lease_expires_at REAL
    );
    CREATE INDEX tasks_open ON tasks(state, created_at);
    CREATE INDEX tasks_session ON tasks(skey, archive_index);
    CREATE INDEX tasks_owner ON tasks(account, user_id, agent, created_at);
    CREATE INDEX tasks_finished ON tasks(state, finished_at);
    CREATE TABLE task_events (
        task_id TEXT NOT NULL REFERENCES tasks(task_id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        time REAL NOT NULL,
        state TEXT NOT NULL,
        stage TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        attempt INTEGER NOT NULL DEFAULT 0,
        result TEXT,
        error TEXT,
        PRIMARY KEY (task_id, seq)
    );
    CREATE TABLE memories (
        memory_id TEXT PRIMARY KEY,
        account TEXT NOT NULL, user_id TEXT NOT NULL, agent TEXT NOT NULL,
        category TEXT NOT NULL,
        mkey TEXT NOT NULL,
        content TEXT NOT NULL,
        source_session_id TEXT NOT NULL,
        source_archive_uri TEXT NOT NULL,
        source_message_ids TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX memories_key ON memories(account, user_id, agent, category, mkey);
    CREATE VIRTUAL TABLE memories_fts USING fts5(content, memory_id UNINDEXED,
                                                 tokenize = 'unicode61');
    CREATE TABLE relations (
        skey TEXT NOT NULL REFERENCES sessions(skey) ON DELETE CASCADE,
        uri TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (skey, uri)
    );
    CREATE TABLE active_counts (
        uri TEXT PRIMARY KEY,
        active_count INTEGER NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE request_ids (
        account TEXT NOT NULL, user_id TEXT NOT NULL, agent TEXT NOT NULL,
        method TEXT NOT NULL, request_id TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        response TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (account, user_id, agent, method, request_id)
    );
    CREATE INDEX request_ids_age ON request_ids(created_at);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the file to SCHEMA_VERSION; return the version found before."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    found = int(row[0]) if row else 0
    if found > SCHEMA_VERSION:
        raise FailedPrecondition(
            f"database schema version {found} is newer than this sessiond knows "
            f"({SCHEMA_VERSION}); upgrade sessiond", reason="SCHEMA_TOO_NEW")
    for version in range(found + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(MIGRATIONS[version - 1]):
                conn.execute(stmt)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version(version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";\n") if s.strip()]
