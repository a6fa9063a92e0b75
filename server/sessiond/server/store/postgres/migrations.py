"""PostgreSQL schema, versioned.

`schema_version` holds one row per applied migration. `migrate` applies the missing
migrations in order, all in one transaction, under a transaction-scoped advisory lock,
so replicas that migrate at the same moment are safe: the first applies, the others
wait for it and then find nothing left to do. A database written by a newer sessiond
(a version this code does not know) is refused with `SCHEMA_TOO_NEW`.

Identifier columns that are paged or ordered on use `COLLATE "C"`, so ordering is by
code point, the same as SQLite, whatever the database's default collation is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
from sessiond.server.domain.errors import FailedPrecondition, Unavailable


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", """
    CREATE TABLE sessions (
        skey TEXT COLLATE "C" PRIMARY KEY,
        account TEXT COLLATE "C" NOT NULL,
        user_id TEXT COLLATE "C" NOT NULL,
        agent TEXT COLLATE "C" NOT NULL,
        session_id TEXT COLLATE "C" NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        message_count BIGINT NOT NULL DEFAULT 0,
        live_count BIGINT NOT NULL DEFAULT 0,
        archive_count INTEGER NOT NULL DEFAULT 0,
        commit_count INTEGER NOT NULL DEFAULT 0,
        memory_counts TEXT NOT NULL DEFAULT '{}',
        last_commit_at TIMESTAMPTZ,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        next_seq BIGINT NOT NULL DEFAULT 1
    );
    CREATE UNIQUE INDEX sessions_owner ON sessions (account, user_id, agent, session_id);

    CREATE TABLE messages (
        skey TEXT COLLATE "C" NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        message_id TEXT COLLATE "C" NOT NULL,
        role TEXT NOT NULL,
        parts TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        archive_index INTEGER,
        PRIMARY KEY (skey, seq)
    );
    CREATE UNIQUE INDEX messages_id ON messages (skey, message_id);
    CREATE INDEX messages_archive ON messages (skey, archive_index, seq);
    CREATE INDEX messages_live ON messages (skey, seq) WHERE archive_index IS NULL;

    CREATE TABLE usage (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        skey TEXT COLLATE "C" NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
        context_uris TEXT NOT NULL,
        skill TEXT,
        created_at TIMESTAMPTZ NOT NULL,
        archive_index INTEGER
    );
    CREATE INDEX usage_archive ON usage (skey, archive_index);

    CREATE TABLE archives (
        skey TEXT COLLATE "C" NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        session_id TEXT COLLATE "C" NOT NULL,
        task_id TEXT COLLATE "C" NOT NULL,
        state TEXT NOT NULL,
        overview TEXT NOT NULL DEFAULT '',
        abstract TEXT NOT NULL DEFAULT '',
        message_count INTEGER NOT NULL,
        first_message_id TEXT NOT NULL DEFAULT '',
        last_message_id TEXT NOT NULL DEFAULT '',
        created_at TIMESTAMPTZ NOT NULL,
        completed_at TIMESTAMPTZ,
        PRIMARY KEY (skey, idx)
    );

    CREATE TABLE tasks (
        task_id TEXT COLLATE "C" PRIMARY KEY,
        skey TEXT COLLATE "C" NOT NULL,
        account TEXT COLLATE "C" NOT NULL,
        user_id TEXT COLLATE "C" NOT NULL,
        agent TEXT COLLATE "C" NOT NULL,
        session_id TEXT COLLATE "C" NOT NULL,
        archive_index INTEGER NOT NULL,
        task_type TEXT NOT NULL,
        state TEXT NOT NULL,
        stage TEXT NOT NULL,
        done_stage TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        started_at TIMESTAMPTZ,
        finished_at TIMESTAMPTZ,
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_seq BIGINT NOT NULL DEFAULT 0,
        first_seq BIGINT NOT NULL DEFAULT 1,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        memory_counts TEXT NOT NULL DEFAULT '{}',
        active_count_updated INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT NOT NULL DEFAULT '',
        lease_expires_at TIMESTAMPTZ
    );
    CREATE INDEX tasks_open ON tasks (created_at, task_id)
        WHERE state IN ('pending', 'running');
    CREATE INDEX tasks_session ON tasks (skey, archive_index);
    CREATE INDEX tasks_owner ON tasks (account, user_id, agent, created_at);
    CREATE INDEX tasks_finished ON tasks (state, finished_at);

    CREATE TABLE task_events (
        task_id TEXT COLLATE "C" NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        time TIMESTAMPTZ NOT NULL,
        state TEXT NOT NULL,
        stage TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        attempt INTEGER NOT NULL DEFAULT 0,
        result TEXT,
        error TEXT,
        PRIMARY KEY (task_id, seq)
    );

    CREATE TABLE memories (
        memory_id TEXT COLLATE "C" PRIMARY KEY,
        account TEXT COLLATE "C" NOT NULL,
        user_id TEXT COLLATE "C" NOT NULL,
        agent TEXT COLLATE "C" NOT NULL,
        category TEXT NOT NULL,
        mkey TEXT COLLATE "C" NOT NULL,
        content TEXT NOT NULL,
        source_session_id TEXT NOT NULL,
        source_archive_uri TEXT NOT NULL,
        source_message_ids TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        tsv TSVECTOR GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, content)) STORED
    );
    CREATE UNIQUE INDEX memories_key ON memories (account, user_id, agent, category, mkey);
    CREATE INDEX memories_owner ON memories (account, user_id, memory_id);
    CREATE INDEX memories_tsv ON memories USING GIN (tsv);

    CREATE TABLE relations (
        skey TEXT COLLATE "C" NOT NULL REFERENCES sessions (skey) ON DELETE CASCADE,
        uri TEXT COLLATE "C" NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (skey, uri)
    );

    CREATE TABLE active_counts (
        uri TEXT COLLATE "C" PRIMARY KEY,
        active_count BIGINT NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL
    );

    CREATE TABLE request_ids (
        account TEXT COLLATE "C" NOT NULL,
        user_id TEXT COLLATE "C" NOT NULL,
        agent TEXT COLLATE "C" NOT NULL,
        method TEXT COLLATE "C" NOT NULL,
        request_id TEXT COLLATE "C" NOT NULL,
        fingerprint TEXT NOT NULL,
        response TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        CONSTRAINT request_ids_pkey PRIMARY KEY (account, user_id, agent, method, request_id)
    );
    CREATE INDEX request_ids_age ON request_ids (created_at);
    """),
)

SCHEMA_VERSION = len(MIGRATIONS)

# The tables the migrations create (besides schema_version); used to tell an empty
# database from one holding an unversioned sessiond schema, and by tests to truncate.
TABLES: tuple[str, ...] = ("sessions", "messages", "usage", "archives", "tasks", "task_events",
                           "memories", "relations", "active_counts", "request_ids")

# Key of the transaction-scoped advisory lock that serializes migrations.
MIGRATION_LOCK_KEY = 0x5E55_10D0_0001

CONNECT_TIMEOUT = 10.0

_CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def _check_known(found: int) -> None:
    if found > SCHEMA_VERSION:
        raise FailedPrecondition(
            f"database schema version {found} is newer than this sessiond knows "
            f"({SCHEMA_VERSION}); upgrade sessiond", reason="SCHEMA_TOO_NEW",
            metadata={"found": str(found), "supported": str(SCHEMA_VERSION)})


async def schema_version(conn: Any) -> int | None:
    """The applied schema version; None when `schema_version` does not exist."""
    exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
    if not exists:
        return None
    found = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
    return int(found)


async def has_sessiond_tables(conn: Any) -> bool:
    """True when any table a migration creates exists (an unversioned schema)."""
    found = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM unnest($1::text[]) AS t(name) "
        "WHERE to_regclass(t.name) IS NOT NULL)", list(TABLES))
    return bool(found)


async def migrate(conn: Any) -> tuple[int, int]:
    """Apply the missing migrations on `conn`; return (version before, version after)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(_CREATE_VERSION_TABLE)
        found = int(await conn.fetchval(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version"))
        _check_known(found)
        if found == 0 and await has_sessiond_tables(conn):
            raise FailedPrecondition(
                "the database holds sessiond tables but no schema_version; refusing to "
                "migrate an unknown schema", reason="SCHEMA_NOT_MIGRATED")
        for m in MIGRATIONS[found:]:
            await conn.execute(m.sql)
            await conn.execute("INSERT INTO schema_version (version, description) VALUES ($1, $2)",
                               m.version, m.description)
    return found, SCHEMA_VERSION


async def migrate_url(url: str) -> tuple[int, int]:
    """Connect to `url` and migrate it (what `sessiond migrate` runs)."""
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
        raise Unavailable(f"postgresql: cannot connect: {exc}") from exc
    except (asyncpg.InvalidCatalogNameError,
            asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise FailedPrecondition(f"postgresql refused the connection: {exc}",
                                 reason="DATABASE_REJECTED") from exc
    try:
        return await migrate(conn)
    finally:
        await conn.close()


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "TABLES", "Migration", "migrate", "migrate_url",
           "schema_version"]
