"""Migration 5 (live bytes quota) on a SQLite file written at schema version 3: the
live buffer's size is backfilled, so the quota holds for data stored before it."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sessiond.server.domain.errors import QuotaExceeded
from sessiond.server.domain.limits import Limits
from sessiond.server.domain.values import Identity, Message, Role, TextPart
from sessiond.server.store import codec
from sessiond.server.store.sql.schema import MIGRATIONS, SCHEMA_VERSION, statements
from sessiond.server.store.sqlite.schema import EXTRA, TYPES
from sessiond.server.store.sqlite.store import SqliteStore

ID = Identity("acme", "alice", "assistant")


def old_file(path: Path) -> None:
    """A store file at version 3 holding one session with two live messages."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for m in MIGRATIONS:
        if m.version <= 3:
            for stmt in statements(m.render(TYPES, EXTRA)):
                conn.execute(stmt)
    conn.execute("INSERT INTO schema_version(version) VALUES (3)")
    skey = codec.session_key(ID, "old")
    conn.execute("INSERT INTO sessions (skey, account, user_id, agent, session_id, created_at, "
                 "updated_at, next_seq, message_count, live_count) VALUES (?,?,?,?,?,0,0,3,2,2)",
                 (skey, ID.account, ID.user, ID.agent, "old"))
    for seq in (1, 2):
        conn.execute("INSERT INTO messages (skey, seq, message_id, role, parts, created_at) "
                     "VALUES (?,?,?,?,?,0)", (skey, seq, f"m{seq}", "user",
                                              codec.encode_parts([TextPart("x" * 400)])))
    conn.close()


def test_migration_backfills_live_bytes(tmp_path: Path) -> None:
    assert SCHEMA_VERSION >= 5
    tmp_path.mkdir(exist_ok=True)
    old_file(tmp_path / "sessiond.sqlite3")

    async def body() -> None:
        store = SqliteStore(tmp_path, synchronous="NORMAL")
        await store.open()
        try:
            store.limits = Limits(live_bytes_per_session=1000, message_bytes=300)
            live = await store.list_live_messages(ID, "old")
            assert [m.id for m in live] == ["m1", "m2"]
            with pytest.raises(QuotaExceeded):  # 2 x ~420 stored + 200 > 1000
                await store.add_message(ID, "old", Message(
                    id="m3", role=Role.USER, parts=(TextPart("y" * 200),),
                    created_at=datetime.now(UTC)))
        finally:
            await store.close()
        conn = sqlite3.connect(tmp_path / "sessiond.sqlite3")
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT live_bytes FROM sessions").fetchone()[0] > 800
        conn.close()

    asyncio.run(body())
