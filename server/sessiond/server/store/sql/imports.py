"""Imports (`sessiond import-openviking`): sessions, archives with their state and
task, memories by key. Each is written at most once, so an import run twice writes
nothing the second time."""

from __future__ import annotations

import uuid
from datetime import datetime

from sessiond.server.domain import rules, transitions
from sessiond.server.domain.errors import ErrorCode
from sessiond.server.domain.imports import (
    ArchiveImport,
    ImportedArchive,
    ImportedMemory,
    ImportedSession,
    ImportedState,
)
from sessiond.server.domain.limits import Limits
from sessiond.server.domain.values import (
    TASK_TYPE_COMMIT,
    ArchiveState,
    Stage,
    TaskError,
    TaskState,
)
from sessiond.server.store import codec
from sessiond.server.store.sql import memories, sessions, tasks
from sessiond.server.store.sql.tx import Tx


async def session(tx: Tx, s: ImportedSession, limits: Limits) -> bool:
    """Create the session with the source's metadata; False when the identity has it
    already (then nothing changes). `QuotaExceeded` past sessions_per_identity."""
    new = await sessions.insert(tx, s.identity, s.session_id, s.created_at, limits)
    if new is None:
        return False
    await tx.execute(
        "UPDATE sessions SET updated_at=?, memory_counts=?, prompt_tokens=?, "
        "completion_tokens=?, last_commit_at=? WHERE skey=?",
        tx.d.ts(max(s.updated_at, s.created_at)), codec.encode_counts(s.memories_extracted),
        s.llm_token_usage.prompt_tokens, s.llm_token_usage.completion_tokens,
        tx.d.ts(s.last_commit_at) if s.last_commit_at else None,
        codec.session_key(s.identity, s.session_id))
    return True


async def archive(tx: Tx, a: ImportedArchive, now: datetime) -> ArchiveImport:
    """Archive `a.index` of the session with its messages and a task in the state the
    source had; nothing when the session has that index already. Messages whose
    client id the session holds already are left out (counted as duplicates)."""
    skey = codec.session_key(a.identity, a.session_id)
    await sessions.require(tx, a.identity, a.session_id, lock=True)
    if await tx.fetchval("SELECT 1 FROM archives WHERE skey=? AND idx=?", skey, a.index):
        return ArchiveImport(created=False)
    cids = [m.client_message_id for m in a.messages if m.client_message_id]
    known: set[str] = set()
    for start in range(0, len(cids), 500):
        chunk = cids[start:start + 500]
        rows = await tx.fetch("SELECT client_message_id FROM messages WHERE skey=? AND "
                              f"client_message_id IN ({','.join('?' * len(chunk))})",
                              skey, *chunk)
        known.update(str(r[0]) for r in rows)
    fresh, seen = [], set(known)
    for m in a.messages:
        if m.client_message_id and m.client_message_id in seen:
            continue
        seen.add(m.client_message_id)
        fresh.append(m)
    duplicates = len(a.messages) - len(fresh)
    if not fresh:
        return ArchiveImport(created=False, duplicates=duplicates)
    n, done = len(fresh), a.state is ImportedState.DONE
    first = await tx.fetchval(
        "UPDATE sessions SET next_seq=next_seq+?, message_count=message_count+?, "
        "archive_count=CASE WHEN archive_count<? THEN ? ELSE archive_count END, "
        "commit_count=commit_count+?, updated_at=? WHERE skey=? RETURNING next_seq-?",
        n, n, a.index, a.index, 1 if done else 0, tx.d.ts(now), skey, n)
    if done and a.completed_at is not None:
        await tx.execute("UPDATE sessions SET last_commit_at=? WHERE skey=? AND "
                         "(last_commit_at IS NULL OR last_commit_at<?)",
                         tx.d.ts(a.completed_at), skey, tx.d.ts(a.completed_at))
    await tx.executemany(
        "INSERT INTO messages (skey, seq, message_id, role, parts, created_at, size, "
        "client_message_id, archive_index) VALUES (?,?,?,?,?,?,?,?,?)",
        [(skey, int(first) + i, m.id, m.role.value, codec.encode_parts(m.parts),
          tx.d.ts(m.created_at), rules.message_bytes(m.parts), m.client_message_id or None,
          a.index) for i, m in enumerate(fresh)])
    state = ArchiveState.DONE if done else ArchiveState.PENDING
    await tx.execute(
        "INSERT INTO archives (skey, idx, session_id, task_id, state, overview, abstract, "
        "message_count, first_message_id, last_message_id, created_at, completed_at) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        skey, a.index, a.session_id, a.task_id, state.value,
        codec.clean_text(a.overview) if done else "",
        codec.clean_text(a.abstract) if done else "", n, fresh[0].id, fresh[-1].id,
        tx.d.ts(a.created_at),
        tx.d.ts(a.completed_at or now) if done else None)
    trow = await tx.fetchrow(
        "INSERT INTO tasks (task_id, skey, account, user_id, agent, session_id, archive_index, "
        "task_type, state, stage, done_stage, created_at, updated_at) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING *",
        a.task_id, skey, a.identity.account, a.identity.user, a.identity.agent,
        a.session_id, a.index, TASK_TYPE_COMMIT, TaskState.PENDING.value,
        Stage.QUEUED.value, Stage.QUEUED.value, tx.d.ts(now), tx.d.ts(now))
    assert trow is not None
    _, task = await tasks.apply(tx, tx.d.rows.task(trow),
                                transitions.created(a.index, n), now)
    if done:
        await tasks.apply(tx, task, transitions.imported_completed(task, now), now)
    elif a.state is ImportedState.FAILED:
        error = a.error or TaskError(ErrorCode.INTERNAL,
                                     "Phase 2 had failed in the source",
                                     reason="IMPORTED_FAILED")
        failed = transitions.failed(task, error, now)
        assert failed is not None
        await tasks.apply(tx, task, failed, now)
    else:
        tx.announce.work = True
    return ArchiveImport(created=True, duplicates=duplicates)


async def memory(tx: Tx, m: ImportedMemory) -> bool:
    """Insert the memory unless its owner has one of that category and key."""
    content = codec.clean_text(m.content)
    memory_id = await tx.fetchval(
        f"INSERT INTO memories ({', '.join(memories.COLUMNS)}) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT (account, user_id, agent, category, mkey) DO NOTHING RETURNING memory_id",
        f"mem_{uuid.uuid4().hex}", m.owner.account, m.owner.user, m.owner.agent,
        m.category.value, codec.clean_text(m.key), content, m.source_session_id,
        codec.clean_text(m.source_uri), codec.dumps([]), tx.d.ts(m.created_at),
        tx.d.ts(m.updated_at))
    if memory_id is None:
        return False
    await tx.d.index_memory(tx, str(memory_id), content, new=True)
    return True
