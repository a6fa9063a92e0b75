"""Migration 13 on a SQLite file written at schema version 12: postings keyed by
(term, owner, entry) are rebuilt keyed by (term, owner, eseq, entry), and memories'
full-text rows get their key table; what was indexed before is found, ranked, updated
and deleted like what is indexed after."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from sessiond.server.domain import terms
from sessiond.server.domain.recall import RecallKind, RecallQuery, entry_id, message_entry
from sessiond.server.domain.values import Identity, Message, Role, TextPart
from sessiond.server.store import codec
from sessiond.server.store.sql.schema import MIGRATIONS, SCHEMA_VERSION, statements
from sessiond.server.store.sqlite.schema import EXTRA, TYPES
from sessiond.server.store.sqlite.store import SqliteStore

ID = Identity("acme", "alice", "assistant")
OLD_TEXT = "user: the golden retriever Biscuit swims in the lake"
MEMORY = "entities: Biscuit is a golden retriever puppy"


def old_file(path: Path) -> tuple[str, str]:
    """A store at version 12 with one indexed episode and one memory (its FTS row and
    its retrieval entry); returns (episode entry id, memory id)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for m in MIGRATIONS:
        if m.version <= 12:
            for stmt in statements(m.render(TYPES, EXTRA)):
                conn.execute(stmt)
    conn.execute("INSERT INTO schema_version(version) VALUES (12)")
    skey = codec.session_key(ID, "old")
    conn.execute("INSERT INTO sessions (skey, account, user_id, agent, session_id, created_at, "
                 "updated_at) VALUES (?,?,?,?,?,0,0)", (skey, ID.account, ID.user, ID.agent,
                                                        "old"))
    ep = entry_id(RecallKind.MESSAGE, skey, "m1")
    mem_entry = entry_id(RecallKind.MEMORY, "mem_old", "1")
    for eid, kind, text, mid in ((ep, "message", OLD_TEXT, ""),
                                 (mem_entry, "memory", MEMORY, "mem_old")):
        tf, length = terms.term_frequencies(text)
        conn.execute("INSERT INTO recall_entries (entry_id, account, user_id, agent, kind, "
                     "skey, session_id, archive_index, position, message_ids, memory_id, time, "
                     "text, length) VALUES (?,?,?,?,?,?,?,1,1,'[\"m1\"]',?,1,?,?)",
                     (eid, ID.account, ID.user, ID.agent if kind == "message" else "", kind,
                      skey if kind == "message" else None, "old", mid, text, length))
        conn.executemany("INSERT INTO recall_terms (entry_id, account, user_id, agent, term, "
                         "tf, kind, length) VALUES (?,?,?,?,?,?,?,?)",
                         [(eid, ID.account, ID.user, ID.agent if kind == "message" else "",
                           t, c, kind, length) for t, c in sorted(tf.items())])
    conn.execute("INSERT INTO memories (memory_id, account, user_id, agent, category, mkey, "
                 "content, source_session_id, source_archive_uri, source_message_ids, "
                 "created_at, updated_at) VALUES ('mem_old',?,?,'','entities','biscuit',?,"
                 "'old','viking://x','[\"m1\"]',1,1)",
                 (ID.account, ID.user, MEMORY.removeprefix("entities: ")))
    conn.execute("INSERT INTO memories_fts(content, memory_id) VALUES (?, 'mem_old')",
                 (MEMORY.removeprefix("entities: "),))
    conn.close()
    return ep, "mem_old"


def test_migration_keeps_postings_and_memory_search(tmp_path: Path) -> None:
    assert SCHEMA_VERSION >= 13
    episode, memory = old_file(tmp_path / "sessiond.sqlite3")

    async def body() -> None:
        store = SqliteStore(tmp_path, synchronous="NORMAL")
        await store.open()
        try:
            query = RecallQuery(tuple(terms.query_terms("golden retriever lake")))
            before = [(h.entry.entry_id, h.score) for h in await store.recall(ID, query)]
            assert [e for e, _ in before] == [episode, entry_id(RecallKind.MEMORY, memory, "1")]
            # an entry indexed after the migration ranks among the migrated ones by BM25
            skey = codec.session_key(ID, "old")
            new = message_entry(ID, skey, "old", 2, Message(
                id="m2", role=Role.USER, parts=(TextPart("a golden lake, golden lake"),),
                created_at=datetime.now(UTC), seq=2))
            assert new is not None and await store.index_entries([new]) == 1
            after = await store.recall(ID, query)
            assert {h.entry.entry_id for h in after} == {episode, new.entry_id,
                                                          entry_id(RecallKind.MEMORY, memory,
                                                                   "1")}
            hits = await store.search_memories(ID, "retriever", None, 10)
            assert [m.memory_id for m, _ in hits] == [memory]
            assert await store.delete_memory(ID, memory)
            assert await store.search_memories(ID, "retriever", None, 10) == []
            left = await store.recall(ID, query)
            assert {h.entry.entry_id for h in left} == {new.entry_id, episode}
        finally:
            await store.close()
        conn = sqlite3.connect(tmp_path / "sessiond.sqlite3")
        try:
            assert conn.execute("SELECT version FROM schema_version").fetchone() == (
                SCHEMA_VERSION,)
            assert conn.execute("SELECT COUNT(*) FROM memories_fts").fetchone() == (0,)
            assert conn.execute("SELECT COUNT(*) FROM memories_fts_keys").fetchone() == (0,)
            posted = {r[0] for r in conn.execute("SELECT DISTINCT entry_id FROM recall_terms")}
            assert posted == {episode, new.entry_id}
        finally:
            conn.close()

    asyncio.run(body())
