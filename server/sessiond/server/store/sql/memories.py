"""Memories: merge extracted candidates by key, list, read, search, delete."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime

from sessiond.server.domain.history import ChangeOp
from sessiond.server.domain.pages import Page, page_of
from sessiond.server.domain.values import (
    CandidateMemory,
    Identity,
    Memory,
    MemoryCategory,
    MemoryCounts,
    Task,
    memory_owner,
)
from sessiond.server.store import codec
from sessiond.server.store.sql import memory_history as history
from sessiond.server.store.sql import recall
from sessiond.server.store.sql.tx import Tx

COLUMNS = ("memory_id", "account", "user_id", "agent", "category", "mkey", "content",
           "source_session_id", "source_archive_uri", "source_message_ids", "created_at",
           "updated_at")
# The caller's memories: user space of its user, agent space of its agent.
VISIBLE = "m.account=? AND m.user_id=? AND (m.agent='' OR m.agent=?)"


def columns(alias: str = "m") -> str:
    return ", ".join(f"{alias}.{c}" for c in COLUMNS)


def _visible(identity: Identity) -> tuple[str, str, str]:
    return identity.account, identity.user, identity.agent


async def upsert(tx: Tx, task: Task, candidates: Sequence[CandidateMemory],
                 now: datetime) -> MemoryCounts:
    """Merge candidates into their owners' memories (first candidate of a key wins);
    per-category counts of the candidates applied."""
    first: dict[tuple[str, str], CandidateMemory] = {}
    for cand in candidates:
        first.setdefault((cand.category.value, codec.clean_text(cand.key)), cand)
    per: dict[str, int] = {}
    select = (f"SELECT {', '.join(COLUMNS)} FROM memories WHERE account=? "
              "AND user_id=? AND agent=? AND category=? AND mkey=?" + tx.d.lock)
    # Each change goes into the history in this transaction (memory_history.py).
    where = (task.session_id, task.archive_index, task.task_id)
    # Sorted by key: concurrent extractions touching the same memories lock them in one
    # order (no deadlock); counts do not depend on the order.
    for (category, key), cand in sorted(first.items()):
        owner = memory_owner(task.identity, cand.category)
        ident = (owner.account, owner.user, owner.agent, category, key)
        content = codec.clean_text(cand.content)
        row = await tx.fetchrow(select, *ident)
        if row is None:
            memory_id = await tx.fetchval(
                f"INSERT INTO memories ({', '.join(COLUMNS)}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (account, user_id, agent, category, mkey) DO NOTHING "
                "RETURNING memory_id",
                f"mem_{uuid.uuid4().hex}", *ident, content, task.session_id, task.archive_uri,
                codec.dumps(list(cand.source_message_ids)), tx.d.ts(now), tx.d.ts(now))
            if memory_id is not None:
                await tx.d.index_memory(tx, memory_id, content, new=True)
                after = await history.memory_image(tx, memory_id)
                await history.record(tx, ChangeOp.CREATED, task.identity.agent, now,
                                     before=None, after=after, session_id=where[0],
                                     archive_index=where[1], task_id=where[2])
            else:  # a concurrent extraction inserted it first
                row = await tx.fetchrow(select, *ident)
        if row is not None:
            merged = codec.merge_content(cand.category, row["content"], content)
            ids = list(dict.fromkeys([*json.loads(row["source_message_ids"]),
                                      *cand.source_message_ids]))
            await tx.execute(
                "UPDATE memories SET content=?, source_session_id=?, source_archive_uri=?, "
                "source_message_ids=?, updated_at=? WHERE memory_id=?",
                merged, task.session_id, task.archive_uri, codec.dumps(ids), tx.d.ts(now),
                row["memory_id"])
            await tx.d.index_memory(tx, row["memory_id"], merged, new=False)
            await history.record(tx, ChangeOp.UPDATED, task.identity.agent, now,
                                 before=history.image_of(tx, row),
                                 after=await history.memory_image(tx, row["memory_id"]),
                                 session_id=where[0], archive_index=where[1],
                                 task_id=where[2])
        per[category] = per.get(category, 0) + 1
    return MemoryCounts.from_dict(per)


async def list_page(tx: Tx, identity: Identity, category: MemoryCategory | None,
                    page_size: int, page_token: str) -> Page[Memory]:
    sql = f"SELECT {columns()} FROM memories m WHERE {VISIBLE} AND m.memory_id>?"
    args: list[object] = [*_visible(identity), page_token]
    if category is not None:
        sql += " AND m.category=?"
        args.append(category.value)
    rows = await tx.fetch(sql + " ORDER BY m.memory_id LIMIT ?", *args, page_size + 1)
    return page_of(rows, page_size, lambda r: str(r["memory_id"]), tx.d.rows.memory)


async def get(tx: Tx, identity: Identity, memory_id: str) -> Memory | None:
    row = await tx.fetchrow(f"SELECT {columns()} FROM memories m WHERE {VISIBLE} "
                            "AND m.memory_id=?", *_visible(identity), memory_id)
    return None if row is None else tx.d.rows.memory(row)


async def search(tx: Tx, identity: Identity, query: str, category: MemoryCategory | None,
                 limit: int) -> list[tuple[Memory, float]]:
    terms = codec.search_terms(query)
    if not terms:
        return []
    sql, args = tx.d.search(terms, columns())
    sql += f" AND {VISIBLE}"
    args += _visible(identity)
    if category is not None:
        sql += " AND m.category=?"
        args.append(category.value)
    rows = await tx.fetch(sql + " ORDER BY score DESC, m.memory_id LIMIT ?", *args, limit)
    return [(tx.d.rows.memory(r), float(r["score"])) for r in rows]


async def delete(tx: Tx, identity: Identity, memory_id: str, now: datetime) -> bool:
    row = await tx.fetchrow(f"SELECT {columns()} FROM memories m WHERE {VISIBLE} "
                            "AND m.memory_id=?" + tx.d.lock, *_visible(identity), memory_id)
    if row is None:
        return False
    await tx.execute("DELETE FROM memories WHERE memory_id=?", memory_id)
    await tx.d.unindex_memory(tx, memory_id)
    await recall.delete_memory_entries(tx, [memory_id])
    await history.record(tx, ChangeOp.DELETED, identity.agent, now,
                         before=history.image_of(tx, row), after=None)
    return True
