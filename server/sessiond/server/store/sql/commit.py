"""Phase 1 (one transaction: live messages and pending usage -> archive N+1, the
PENDING task and its CREATED event) and the archives it writes."""

from __future__ import annotations

from datetime import datetime

from sessiond.server.domain import rules, transitions
from sessiond.server.domain.autocommit import AutoCommitPolicy, CommitTrigger
from sessiond.server.domain.commands import CommitOutcome, CommitPlan, Phase2Inputs, RequestKey
from sessiond.server.domain.errors import Aborted, NotFound
from sessiond.server.domain.pages import Page, index_cursor, page_of
from sessiond.server.domain.values import (
    TASK_TYPE_COMMIT,
    Archive,
    ArchiveState,
    Identity,
    Message,
    Stage,
    UsageRecord,
)
from sessiond.server.store import codec
from sessiond.server.store.sql import requests, session_events, sessions, tasks
from sessiond.server.store.sql.tx import Row, Tx


async def _archive_row(tx: Tx, skey: str, index: int) -> Row | None:
    return await tx.fetchrow("SELECT * FROM archives WHERE skey=? AND idx=?", skey, index)


async def commit(tx: Tx, plan: CommitPlan, request: RequestKey | None) -> CommitOutcome:
    identity, sid, now, d = plan.identity, plan.session_id, plan.now, tx.d
    skey = codec.session_key(identity, sid)
    previous = await requests.replay(tx, request)
    if previous is not None:
        if not previous["archived"]:
            return CommitOutcome(archived=False)
        task = await tasks.require(tx, previous["task_id"])
        arow = await _archive_row(tx, skey, task.archive_index)
        if arow is None:
            raise NotFound("the archive of this request_id no longer exists",
                           reason="ARCHIVE_NOT_FOUND")
        return CommitOutcome(True, d.rows.archive(arow), task)
    # The session row lock serializes commits of this session across replicas.
    srow = await sessions.require(tx, identity, sid, lock=True)
    if plan.reject_if_running:
        busy = await tx.fetchval("SELECT task_id FROM tasks WHERE skey=? AND state IN (?,?) "
                                 "ORDER BY archive_index LIMIT 1", skey, *tasks.OPEN)
        if busy is not None:
            raise Aborted(f"Phase 2 of an earlier commit of session {sid!r} is still "
                          f"running (task {busy})", reason="COMMIT_IN_PROGRESS",
                          metadata={"task_id": busy})
    live = await tx.fetch("SELECT seq, message_id FROM messages WHERE skey=? AND "
                          "archive_index IS NULL ORDER BY seq", skey)
    to_archive = live[: max(0, len(live) - max(0, plan.keep_recent_count))]
    if not to_archive:
        await requests.remember(tx, request, {"archived": False}, now)
        return CommitOutcome(archived=False)
    index = int(srow["archive_count"]) + 1
    await tx.execute("UPDATE messages SET archive_index=? WHERE skey=? AND archive_index IS NULL "
                     "AND seq<=?", index, skey, to_archive[-1]["seq"])
    await tx.execute("UPDATE usage SET archive_index=? WHERE skey=? AND archive_index IS NULL",
                     index, skey)
    arow = await tx.fetchrow(
        "INSERT INTO archives (skey, idx, session_id, task_id, state, message_count, "
        "first_message_id, last_message_id, created_at) VALUES (?,?,?,?,?,?,?,?,?) RETURNING *",
        skey, index, sid, plan.task_id, ArchiveState.PENDING.value, len(to_archive),
        to_archive[0]["message_id"], to_archive[-1]["message_id"], d.ts(now))
    # An emptied live buffer also disarms the idle auto-commit (nothing left to commit).
    # The same statement numbers the commit's two feed events (accepted, the task's
    # CREATED): one session row update per commit, not three.
    last_event = await tx.fetchval(
        "UPDATE sessions SET archive_count=?, live_count=live_count-?, "
        "live_bytes=(SELECT COALESCE(SUM(size), 0) FROM messages WHERE skey=? "
        "AND archive_index IS NULL), updated_at=?, "
        "idle_due_ms=CASE WHEN live_count-?>0 THEN idle_due_ms END, event_seq=event_seq+2 "
        "WHERE skey=? RETURNING event_seq",
        index, len(to_archive), skey, d.ts(now), len(to_archive), skey)
    # The task is inserted as its CREATED event leaves it (no UPDATE after the INSERT).
    created = transitions.created(index, len(to_archive), plan.trigger)
    trow = await tx.fetchrow(
        "INSERT INTO tasks (task_id, skey, account, user_id, agent, session_id, archive_index, "
        "task_type, state, stage, done_stage, created_at, updated_at, trace_context, "
        "commit_trigger, last_seq, first_seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,1,1) "
        "RETURNING *",
        plan.task_id, skey, identity.account, identity.user, identity.agent, sid, index,
        TASK_TYPE_COMMIT, created.state.value, created.stage.value, Stage.QUEUED.value,
        d.ts(now), d.ts(now), plan.trace_context, plan.trigger.value)
    assert arow is not None and trow is not None and last_event is not None
    task = d.rows.task(trow)
    ev = await tasks.journal_first(tx, task, created, now)
    await session_events.insert(tx, skey, int(last_event) - 1, [
        session_events.commit_item(plan.task_id, index, len(to_archive), plan.trigger, now),
        session_events.task_item(ev)])
    await requests.remember(tx, request, {"archived": True, "task_id": plan.task_id}, now)
    tx.announce.work = True
    return CommitOutcome(True, d.rows.archive(arow), task)


async def auto_commit(tx: Tx, identity: Identity, session_id: str, policy: AutoCommitPolicy,
                      trigger: CommitTrigger, now: datetime) -> CommitOutcome:
    """An auto-commit: an ordinary Phase 1 (the same transaction as `commit`), made
    by the server, keeping the policy's newest `keep_recent_count` messages live."""
    plan = CommitPlan(identity=identity, session_id=session_id,
                      keep_recent_count=policy.keep_recent_count, reject_if_running=False,
                      task_id=rules.new_task_id(), now=now, trigger=trigger)
    return await commit(tx, plan, None)


async def list_page(tx: Tx, identity: Identity, session_id: str, page_size: int,
                    page_token: str) -> Page[Archive]:
    rows = await tx.fetch("SELECT * FROM archives WHERE skey=? AND idx>? ORDER BY idx LIMIT ?",
                          codec.session_key(identity, session_id), index_cursor(page_token),
                          page_size + 1)
    if not rows:
        await sessions.require(tx, identity, session_id)
    return page_of(rows, page_size, lambda r: str(r["idx"]), tx.d.rows.archive)


async def get(tx: Tx, identity: Identity, session_id: str, index: int) -> Archive | None:
    row = await _archive_row(tx, codec.session_key(identity, session_id), index)
    return None if row is None else tx.d.rows.archive(row)


async def messages(tx: Tx, identity: Identity, session_id: str, index: int) -> list[Message]:
    rows = await tx.fetch("SELECT * FROM messages WHERE skey=? AND archive_index=? ORDER BY seq",
                          codec.session_key(identity, session_id), index)
    return [tx.d.rows.message(r) for r in rows]


async def message_page(tx: Tx, identity: Identity, session_id: str, index: int,
                       after_seq: int, limit: int, max_chars: int) -> tuple[list[Message], bool]:
    """The archive's messages after `after_seq`, oldest first: at most `limit` (0: no
    count limit) and, after the first, only while their stored size stays within
    `max_chars`; and whether more follow. Sizes are read first, so a page never
    loads more than it returns."""
    skey = codec.session_key(identity, session_id)
    sql = ("SELECT seq, length(parts) AS n FROM messages WHERE skey=? AND archive_index=? "
           "AND seq>? ORDER BY seq")
    args: list[object] = [skey, index, after_seq]
    if limit:
        sql += " LIMIT ?"
        args.append(limit + 1)
    sizes = await tx.fetch(sql, *args)
    take = total = 0
    for r in sizes:
        n = int(r["n"])
        if (limit and take == limit) or (take and total + n > max_chars):
            break
        take, total = take + 1, total + n
    if not take:
        return [], False
    rows = await tx.fetch("SELECT * FROM messages WHERE skey=? AND archive_index=? AND seq>? "
                          "AND seq<=? ORDER BY seq", skey, index, after_seq,
                          sizes[take - 1]["seq"])
    return [tx.d.rows.message(r) for r in rows], take < len(sizes)


async def usage(tx: Tx, identity: Identity, session_id: str, index: int) -> list[UsageRecord]:
    rows = await tx.fetch("SELECT * FROM usage WHERE skey=? AND archive_index=? ORDER BY id",
                          codec.session_key(identity, session_id), index)
    return [tx.d.rows.usage(r) for r in rows]


async def latest_done(tx: Tx, identity: Identity, session_id: str,
                      before_index: int | None) -> Archive | None:
    sql = "SELECT * FROM archives WHERE skey=? AND state=?"
    args: list[object] = [codec.session_key(identity, session_id), ArchiveState.DONE.value]
    if before_index is not None:
        sql += " AND idx<?"
        args.append(before_index)
    row = await tx.fetchrow(sql + " ORDER BY idx DESC LIMIT 1", *args)
    return None if row is None else tx.d.rows.archive(row)


async def phase2_inputs(tx: Tx, identity: Identity, session_id: str,
                        index: int) -> Phase2Inputs:
    previous = await latest_done(tx, identity, session_id, index)
    return Phase2Inputs(await messages(tx, identity, session_id, index),
                        await usage(tx, identity, session_id, index),
                        previous.overview if previous is not None else "")
