"""The shared schema (`store/sql/schema.py`) on PostgreSQL.

`schema_version` holds one row per applied migration. `migrate` applies the missing
migrations in order, all in one transaction, under a transaction-scoped advisory lock,
so replicas that migrate at the same moment are safe: the first applies, the others
wait for it and then find nothing left to do. A database written by a newer sessiond
(a version this code does not know) is refused with `SCHEMA_TOO_NEW`.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from sessiond.server.domain.errors import FailedPrecondition, Unavailable
from sessiond.server.redact import redact_text
from sessiond.server.store.sql.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    TABLES,
    pending,
    statements,
)

TYPES = {"key": 'TEXT COLLATE "C"', "ts": "TIMESTAMPTZ", "int64": "BIGINT",
         "bool": "BOOLEAN", "false": "FALSE", "blob": "BYTEA",
         "serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
         "memory_columns": ",\n        tsv TSVECTOR GENERATED ALWAYS AS "
                           "(to_tsvector('simple'::regconfig, content)) STORED"}
EXTRA = {1: """
    CREATE INDEX tasks_open ON tasks (created_at, task_id) WHERE state IN ('pending', 'running');
    CREATE INDEX messages_live ON messages (skey, seq) WHERE archive_index IS NULL;
    CREATE INDEX memories_owner ON memories (account, user_id, memory_id);
    CREATE INDEX memories_tsv ON memories USING GIN (tsv);
    """, 13: """
    DROP INDEX recall_terms_lookup;
    CREATE INDEX recall_terms_lookup ON recall_terms (term, account, user_id, agent, eseq)
        INCLUDE (tf, length, kind, entry_id);
    """}

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
        for m in pending(found):
            if statements(m.render(TYPES, EXTRA)):  # (a SQLite-only migration has none)
                await conn.execute(m.render(TYPES, EXTRA))
            await conn.execute("INSERT INTO schema_version (version, description) VALUES ($1, $2)",
                               m.version, m.description)
    return found, SCHEMA_VERSION


async def migrate_url(url: str) -> tuple[int, int]:
    """Connect to `url` and migrate it (what `sessiond migrate` runs)."""
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
        raise Unavailable(redact_text(f"postgresql: cannot connect: {exc}")) from exc
    except (asyncpg.InvalidCatalogNameError,
            asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise FailedPrecondition(redact_text(f"postgresql refused the connection: {exc}"),
                                 reason="DATABASE_REJECTED") from exc
    try:
        return await migrate(conn)
    finally:
        await conn.close()


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "TABLES", "migrate", "migrate_url", "schema_version"]
