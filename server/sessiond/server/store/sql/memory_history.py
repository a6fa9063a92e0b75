"""Memory change history: each change of a memory recorded in the transaction that
made it (Phase 2 merges, DeleteMemory, reverts), read back by session, archive or
memory; and archive reverts (the request and the revert itself)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sessiond.server.domain import transitions as tr
from sessiond.server.domain.commands import RequestKey
from sessiond.server.domain.errors import (
    ErrorCode,
    FailedPrecondition,
    NotFound,
    RevertConflict,
)
from sessiond.server.domain.history import (
    MAX_LISTED_CONFLICTS,
    TASK_TYPE_REVERT,
    ChangeOp,
    MemoryChange,
    MemoryImage,
    RevertPlan,
    RevertSummary,
    memory_entry,
    plan_revert,
)
from sessiond.server.domain.pages import Page, index_cursor, page_of
from sessiond.server.domain.recall import EntryVector
from sessiond.server.domain.values import (
    Identity,
    MemoryCategory,
    Stage,
    Task,
    TaskError,
    TaskEvent,
    TaskState,
    archive_uri,
)
from sessiond.server.store import codec
from sessiond.server.store.sql import recall, requests, sessions, tasks
from sessiond.server.store.sql import vectors as vectors_sql
from sessiond.server.store.sql.tx import Row, Tx

IMAGE_COLUMNS = ("memory_id", "account", "user_id", "agent", "category", "mkey", "content",
                 "source_session_id", "source_archive_uri", "source_message_ids",
                 "created_at", "updated_at")
CHANGE_COLUMNS = ("seq", "change_id", "account", "user_id", "agent", "actor_agent",
                  "memory_id", "category", "mkey", "op", "session_id", "archive_index",
                  "task_id", "before_image", "after_image", "created_at")
# The caller's changes: of its user's user-space memories and its agent's memories.
VISIBLE = "c.account=? AND c.user_id=? AND (c.agent='' OR c.agent=?)"
# Memories whose history one statement reads at most (bounded parameter lists).
BATCH = 200


def image_of(tx: Tx, row: Row) -> MemoryImage:
    """A `memories` row (IMAGE_COLUMNS) as an image."""
    return MemoryImage(
        memory_id=str(row["memory_id"]),
        owner=Identity(row["account"], row["user_id"], row["agent"]),
        category=MemoryCategory(row["category"]), key=str(row["mkey"]),
        content=str(row["content"]), source_session_id=str(row["source_session_id"]),
        source_archive_uri=str(row["source_archive_uri"]),
        source_message_ids=tuple(json.loads(row["source_message_ids"])),
        created_at=tx.d.rows.ts(row["created_at"]), updated_at=tx.d.rows.ts(row["updated_at"]))


def _encode(image: MemoryImage | None) -> str:
    if image is None:
        return ""
    return codec.dumps({"content": image.content,
                        "source_session_id": image.source_session_id,
                        "source_archive_uri": image.source_archive_uri,
                        "source_message_ids": list(image.source_message_ids),
                        "created_at": image.created_at.timestamp(),
                        "updated_at": image.updated_at.timestamp()})


def _decode(raw: str, memory_id: str, owner: Identity, category: MemoryCategory,
            key: str) -> MemoryImage | None:
    if not raw:
        return None
    d: dict[str, Any] = json.loads(raw)
    return MemoryImage(memory_id=memory_id, owner=owner, category=category, key=key,
                       content=d["content"], source_session_id=d["source_session_id"],
                       source_archive_uri=d["source_archive_uri"],
                       source_message_ids=tuple(d["source_message_ids"]),
                       created_at=datetime.fromtimestamp(d["created_at"], UTC),
                       updated_at=datetime.fromtimestamp(d["updated_at"], UTC))


def _change(row: Row, tx: Tx) -> MemoryChange:
    owner = Identity(row["account"], row["user_id"], row["agent"])
    category, key, mid = MemoryCategory(row["category"]), str(row["mkey"]), str(row["memory_id"])
    return MemoryChange(
        change_id=str(row["change_id"]), seq=int(row["seq"]), memory_id=mid, owner=owner,
        actor_agent=str(row["actor_agent"]), category=category, key=key,
        op=ChangeOp(row["op"]), created_at=tx.d.rows.ts(row["created_at"]),
        session_id=str(row["session_id"]), archive_index=int(row["archive_index"]),
        task_id=str(row["task_id"]),
        before=_decode(row["before_image"], mid, owner, category, key),
        after=_decode(row["after_image"], mid, owner, category, key))


async def record(tx: Tx, op: ChangeOp, actor_agent: str, now: datetime, *,
                 before: MemoryImage | None, after: MemoryImage | None,
                 session_id: str = "", archive_index: int = 0, task_id: str = "") -> None:
    """One change of a memory, in the caller's transaction."""
    image = after if after is not None else before
    assert image is not None
    await tx.execute(
        "INSERT INTO memory_changes (change_id, account, user_id, agent, actor_agent, "
        "memory_id, category, mkey, op, session_id, archive_index, task_id, before_image, "
        "after_image, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        f"chg_{uuid.uuid4().hex}", image.owner.account, image.owner.user, image.owner.agent,
        actor_agent, image.memory_id, image.category.value, image.key, op.value, session_id,
        archive_index, task_id, _encode(before), _encode(after), tx.d.ts(now))


async def memory_image(tx: Tx, memory_id: str, *, lock: bool = False) -> MemoryImage | None:
    row = await tx.fetchrow(f"SELECT {', '.join(IMAGE_COLUMNS)} FROM memories WHERE memory_id=?"
                            + (tx.d.lock if lock else ""), memory_id)
    return None if row is None else image_of(tx, row)


async def list_page(tx: Tx, identity: Identity, session_id: str, archive_index: int,
                    memory_id: str, page_size: int, page_token: str) -> Page[MemoryChange]:
    """The caller's memory changes, oldest first, optionally of one session (the
    caller's), one of its archives, or one memory."""
    sql = f"SELECT {', '.join('c.' + x for x in CHANGE_COLUMNS)} FROM memory_changes c " \
          f"WHERE {VISIBLE} AND c.seq>?"
    args: list[object] = [identity.account, identity.user, identity.agent,
                          index_cursor(page_token)]
    if session_id:
        sql += " AND c.actor_agent=? AND c.session_id=?"
        args += [identity.agent, session_id]
        if archive_index:
            sql += " AND c.archive_index=?"
            args.append(archive_index)
    if memory_id:
        sql += " AND c.memory_id=?"
        args.append(memory_id)
    rows = await tx.fetch(sql + " ORDER BY c.seq LIMIT ?", *args, page_size + 1)
    return page_of(rows, page_size, lambda r: str(r["seq"]), lambda r: _change(r, tx))


async def _archive_changes(tx: Tx, identity: Identity, session_id: str, index: int,
                           commit_task_id: str) -> list[MemoryChange]:
    """The archive's Phase 2 changes (of its own commit task: a session deleted and
    made again under the same id has other tasks)."""
    rows = await tx.fetch(
        f"SELECT {', '.join(CHANGE_COLUMNS)} FROM memory_changes WHERE account=? AND user_id=? "
        "AND actor_agent=? AND session_id=? AND archive_index=? AND task_id=? AND op IN (?,?) "
        "ORDER BY seq", identity.account, identity.user, identity.agent, session_id, index,
        commit_task_id, ChangeOp.CREATED.value, ChangeOp.UPDATED.value)
    return [_change(r, tx) for r in rows]


async def _archive(tx: Tx, identity: Identity, session_id: str, index: int) -> Row:
    row = await tx.fetchrow("SELECT idx, task_id, created_at FROM archives WHERE skey=? "
                            "AND idx=?", codec.session_key(identity, session_id), index)
    if row is None:
        uri = archive_uri(session_id, index)
        raise NotFound(f"archive {index} of session {session_id!r} not found",
                       reason="ARCHIVE_NOT_FOUND", metadata={"archive_uri": uri})
    return row


async def _later_changes(tx: Tx, memory_ids: Sequence[str], after_seq: int
                         ) -> list[MemoryChange]:
    out: list[MemoryChange] = []
    for start in range(0, len(memory_ids), BATCH):
        chunk = memory_ids[start:start + BATCH]
        rows = await tx.fetch(
            f"SELECT {', '.join(CHANGE_COLUMNS)} FROM memory_changes WHERE seq>? AND "
            f"memory_id IN ({','.join('?' * len(chunk))}) ORDER BY seq", after_seq, *chunk)
        out += [_change(r, tx) for r in rows]
    return sorted(out, key=lambda c: c.seq)


async def plan(tx: Tx, identity: Identity, session_id: str, index: int, *,
               lock: bool = False) -> RevertPlan:
    """What reverting the archive would do, and the later changes it conflicts with.
    With `lock`, the memories are locked first (in memory id order), so no change of
    them can commit between this plan and the revert's writes."""
    arow = await _archive(tx, identity, session_id, index)
    own = await _archive_changes(tx, identity, session_id, index, str(arow["task_id"]))
    ids = sorted({c.memory_id for c in own})
    if lock:
        for mid in ids:
            await tx.fetchrow("SELECT memory_id FROM memories WHERE memory_id=?" + tx.d.lock,
                              mid)
    first = min((c.seq for c in own), default=0)
    return plan_revert(own, await _later_changes(tx, ids, first) if ids else [])


async def reverted(tx: Tx, identity: Identity, session_id: str, index: int) -> str | None:
    """The revert task of the archive that is pending, running or completed, or
    "reverted" when the history records a completed revert (its task swept since);
    None when the archive was not reverted. Tasks and records older than the archive
    belong to an archive with this index of a session deleted before this one was
    made, not to this one."""
    skey = codec.session_key(identity, session_id)
    made = (await _archive(tx, identity, session_id, index))["created_at"]
    task_id = await tx.fetchval(
        "SELECT task_id FROM tasks WHERE skey=? AND archive_index=? AND task_type=? "
        "AND state IN (?,?,?) AND created_at>=? ORDER BY created_at LIMIT 1", skey, index,
        TASK_TYPE_REVERT, TaskState.PENDING.value, TaskState.RUNNING.value,
        TaskState.COMPLETED.value, made)
    if task_id is not None:
        return str(task_id)
    done = await tx.fetchval(
        "SELECT task_id FROM memory_changes WHERE account=? AND user_id=? AND actor_agent=? "
        "AND session_id=? AND archive_index=? AND op=? AND created_at>=? LIMIT 1",
        identity.account, identity.user, identity.agent, session_id, index,
        ChangeOp.REVERTED.value, made)
    return None if done is None else str(done) or "reverted"


def conflict_error(uri: str, conflicts: Sequence[MemoryChange]) -> RevertConflict:
    shown = conflicts[:MAX_LISTED_CONFLICTS]
    return RevertConflict(
        f"reverting {uri} would undo {len(conflicts)} later change(s) of the same memories; "
        "pass force to revert anyway",
        conflicts=[(c.change_id, f"memory {c.memory_id}: {c.describe()}") for c in shown],
        more=len(conflicts) - len(shown), metadata={"archive_uri": uri,
                                                    "conflicts": str(len(conflicts))})


async def request(tx: Tx, identity: Identity, session_id: str, index: int, force: bool,
                  task_id: str, now: datetime, req: RequestKey | None) -> Task:
    """RevertArchive: check and queue the revert of an archive as an archive_revert
    task. A replayed request returns its task as it is now."""
    previous = await requests.replay(tx, req)
    if previous is not None:
        return await tasks.require(tx, previous["task_id"])
    skey = codec.session_key(identity, session_id)
    await sessions.require(tx, identity, session_id, lock=True)
    arow = await _archive(tx, identity, session_id, index)
    uri = archive_uri(session_id, index)
    commit_task = await tasks.get(tx, str(arow["task_id"]))
    if commit_task is not None and not commit_task.state.terminal:
        raise FailedPrecondition(
            f"Phase 2 of {uri} has not finished (task {commit_task.task_id} is "
            f"{commit_task.state.value.upper()}); revert it after the task ends",
            reason="ARCHIVE_NOT_SETTLED", metadata={"task_id": commit_task.task_id})
    done = await reverted(tx, identity, session_id, index)
    if done is not None:
        raise FailedPrecondition(f"{uri} is already reverted (or its revert is queued)",
                                 reason="ALREADY_REVERTED",
                                 metadata={"archive_uri": uri, "task_id": done})
    p = await plan(tx, identity, session_id, index)
    if p.conflicts and not force:
        raise conflict_error(uri, p.conflicts)
    trow = await tx.fetchrow(
        "INSERT INTO tasks (task_id, skey, account, user_id, agent, session_id, archive_index, "
        "task_type, state, stage, done_stage, created_at, updated_at, revert_force) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING *",
        task_id, skey, identity.account, identity.user, identity.agent, session_id, index,
        TASK_TYPE_REVERT, TaskState.PENDING.value, Stage.QUEUED.value, Stage.QUEUED.value,
        tx.d.ts(now), tx.d.ts(now), force)
    assert trow is not None
    _, task = await tasks.apply(tx, tx.d.rows.task(trow),
                                tr.revert_created(index, len(p.steps), len(p.conflicts), force),
                                now)
    await requests.remember(tx, req, {"task_id": task_id}, now)
    tx.announce.work = True
    return task


async def _write_image(tx: Tx, target: MemoryImage, exists: bool) -> bool:
    """Make the memory row `target`; False when it was gone and its key is taken."""
    d = tx.d
    ids = codec.dumps(list(target.source_message_ids))
    if exists:
        await tx.execute(
            "UPDATE memories SET content=?, source_session_id=?, source_archive_uri=?, "
            "source_message_ids=?, updated_at=? WHERE memory_id=?", target.content,
            target.source_session_id, target.source_archive_uri, ids,
            d.ts(target.updated_at), target.memory_id)
    else:
        o = target.owner
        made = await tx.fetchval(
            f"INSERT INTO memories ({', '.join(IMAGE_COLUMNS)}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (account, user_id, agent, category, mkey) DO NOTHING "
            "RETURNING memory_id", target.memory_id, o.account, o.user, o.agent,
            target.category.value, target.key, target.content, target.source_session_id,
            target.source_archive_uri, ids, d.ts(target.created_at), d.ts(target.updated_at))
        if made is None:
            return False
    await d.index_memory(tx, target.memory_id, target.content, new=not exists)
    await recall.delete_memory_entries(tx, [target.memory_id])
    await recall.insert_entries(tx, [memory_entry(target)])
    return True


async def apply(tx: Tx, task_id: str, worker_id: str,
                vectors: Mapping[str, tuple[str, tuple[float, ...]]], model: str,
                now: datetime) -> TaskEvent:
    """The revert task's one write: restore every before-image of its archive, record
    each as a `reverted` change, keep the retrieval index in step (`vectors`: memory
    id -> (entry text, vector) embedded beforehand), and complete the task; or fail
    it FAILED_PRECONDITION when a conflicting change appeared and force is off."""
    task = await tasks.leased(tx, task_id, worker_id)
    if task.task_type != TASK_TYPE_REVERT:
        raise FailedPrecondition(f"task {task_id} is not an {TASK_TYPE_REVERT} task")
    ident, uri = task.identity, task.archive_uri
    p = await plan(tx, ident, task.session_id, task.archive_index, lock=True)
    if p.conflicts and not task.revert_force:
        err = conflict_error(uri, p.conflicts)
        listed = "; ".join(f"{c.change_id} ({c.describe()})"
                           for c in p.conflicts[:MAX_LISTED_CONFLICTS])
        failed = tr.failed(task, TaskError(ErrorCode.FAILED_PRECONDITION,
                                           f"{err.message}: {listed}"[:512],
                                           reason=err.reason), now)
        assert failed is not None
        return (await tasks.apply(tx, task, failed, now))[0]
    counts = {"deleted": 0, "restored": 0, "recreated": 0, "unchanged": 0}
    new_vectors: list[EntryVector] = []
    for step in p.steps:
        current = await memory_image(tx, step.memory_id, lock=True)
        target = step.target
        if target is None:
            if current is None:
                counts["unchanged"] += 1
                continue
            await tx.execute("DELETE FROM memories WHERE memory_id=?", step.memory_id)
            await tx.d.unindex_memory(tx, step.memory_id)
            await recall.delete_memory_entries(tx, [step.memory_id])
            counts["deleted"] += 1
        elif target.same_as(current):
            counts["unchanged"] += 1
            continue
        else:
            if not await _write_image(tx, target, exists=current is not None):
                counts["unchanged"] += 1  # gone, and another memory holds its key now
                continue
            counts["restored" if current is not None else "recreated"] += 1
            vec = vectors.get(step.memory_id)
            entry = memory_entry(target)
            if vec is not None and model and vec[0] == entry.text:
                new_vectors.append(EntryVector(entry, vec[1]))
        await record(tx, ChangeOp.REVERTED, ident.agent, now, before=current, after=target,
                     session_id=task.session_id, archive_index=task.archive_index,
                     task_id=task.task_id)
    if new_vectors:
        await vectors_sql.insert(tx, model, new_vectors)
    summary = RevertSummary(**counts, conflicts_overridden=len(p.conflicts))
    _, task = await tasks.apply(tx, task, tr.revert_done(summary), now)
    return (await tasks.apply(tx, task, tr.revert_finalized(task, summary, now), now))[0]


async def revert_targets(tx: Tx, task: Task) -> list[MemoryImage]:
    """The images a revert task will write (what the worker embeds beforehand)."""
    p = await plan(tx, task.identity, task.session_id, task.archive_index)
    return [s.target for s in p.steps if s.target is not None]


async def session_uris(tx: Tx, identity: Identity, session_id: str, after: str,
                       limit: int) -> list[tuple[str, int]]:
    """The uris the session's completed relations stages recorded, with their active
    counts (server-wide, as the active_counts stage keeps them)."""
    rows = await tx.fetch(
        "SELECT r.uri, COALESCE(a.active_count, 0) AS n FROM relations r LEFT JOIN "
        "active_counts a ON a.uri = r.uri WHERE r.skey=? AND r.uri>? ORDER BY r.uri LIMIT ?",
        codec.session_key(identity, session_id), after, limit)
    return [(str(r["uri"]), int(r["n"])) for r in rows]


async def active_counts(tx: Tx, uris: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for start in range(0, len(uris), BATCH):
        chunk = uris[start:start + BATCH]
        for r in await tx.fetch("SELECT uri, active_count FROM active_counts WHERE uri IN "
                                f"({','.join('?' * len(chunk))})", *chunk):
            out[str(r["uri"])] = int(r["active_count"])
    return out
