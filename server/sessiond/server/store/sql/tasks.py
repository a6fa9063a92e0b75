"""Tasks and their journals: applying a transition, reading, claiming, leases, and the
control transitions (cancel, fail). The decisions are `domain/transitions.py`'s."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sessiond.server.domain import transitions as tr
from sessiond.server.domain.commands import RequestKey
from sessiond.server.domain.errors import ErrorCode, FailedPrecondition, LeaseLost, NotFound
from sessiond.server.domain.pages import Page, page_of, read_task_cursor, task_cursor
from sessiond.server.domain.values import (
    TASK_TYPE_COMMIT,
    TASK_TYPE_REVERT,
    ArchiveState,
    CommitResult,
    Identity,
    MemoryCounts,
    NewEvent,
    Stage,
    Task,
    TaskError,
    TaskEvent,
    TaskState,
    TokenUsage,
)
from sessiond.server.store import codec
from sessiond.server.store.sql import requests, session_events
from sessiond.server.store.sql.tx import Tx

OPEN = (TaskState.PENDING.value, TaskState.RUNNING.value)
TERMINAL = (TaskState.COMPLETED.value, TaskState.CANCELLED.value, TaskState.FAILED.value)


def _columns(tx: Tx, changes: dict[str, object]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if isinstance(value, TokenUsage):
            out.update(tr.token_columns(value))
        elif isinstance(value, datetime) or (value is None and name.endswith("_at")):
            out[name] = tx.d.ts(value)
        elif isinstance(value, enum.Enum):
            out[name] = value.value
        elif isinstance(value, TaskError):
            out[name] = codec.encode_error(value)
        elif isinstance(value, CommitResult):
            out[name] = codec.encode_result(value)
        elif isinstance(value, MemoryCounts):
            out[name] = codec.encode_counts(value)
        else:
            out[name] = value
    return out


@dataclass
class Journal:
    """Journal writes held by `journal_batched`: event rows in order, and per task the
    row's changed columns (later changes win) and the first seq it keeps."""

    events: list[tuple[Any, ...]] = field(default_factory=list)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    trims: dict[str, int] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def journal_batched(tx: Tx) -> AsyncIterator[None]:
    """Journal events `apply`d inside are written at its end: one statement for the
    events and one UPDATE per task, instead of two statements per event (a Phase 2
    transaction appends a dozen events of one task). Nothing inside may read the
    journal or the task rows it changes from the store (they read as before it)."""
    if tx.journal is not None:  # already batching: the outer block writes
        yield
        return
    tx.journal = Journal()
    try:
        yield
        held, tx.journal = tx.journal, None
        await _write(tx, held)
    finally:
        tx.journal = None


async def _write(tx: Tx, j: Journal) -> None:
    if j.events:
        await tx.executemany(
            "INSERT INTO task_events (task_id, seq, kind, time, state, stage, message, "
            "attempt, result, error) VALUES (?,?,?,?,?,?,?,?,?,?)", j.events)
    for task_id, first_seq in j.trims.items():
        await tx.execute("DELETE FROM task_events WHERE task_id=? AND seq<?", task_id,
                         first_seq)
    for task_id, cols in j.rows.items():
        changed = await tx.execute(
            f"UPDATE tasks SET {', '.join(f'{c}=?' for c in cols)} WHERE task_id=?",
            *cols.values(), task_id)
        assert changed == 1


async def apply(tx: Tx, task: Task, t: tr.Transition, now: datetime) -> tuple[TaskEvent, Task]:
    """Append the transition's event to the journal of `task` (whose row this
    transaction holds) and update the row; the event and the task after it."""
    seq = task.last_seq + 1
    event, ev = _event(tx, task.task_id, seq, t, now)
    first_seq = task.first_seq
    trim = seq - first_seq + 1 > tx.journal_cap
    if trim:
        first_seq = seq - tx.journal_cap + 1
    cols = {"last_seq": seq, "first_seq": first_seq, "state": t.state.value,
            "stage": t.stage.value, "updated_at": tx.d.ts(now), **_columns(tx, dict(t.changes))}
    held: Journal | None = tx.journal
    if held is not None:
        held.events.append(event)
        held.rows.setdefault(task.task_id, {}).update(cols)
        if trim:
            held.trims[task.task_id] = first_seq
    else:
        await _write(tx, Journal([event], {task.task_id: cols},
                                 {task.task_id: first_seq} if trim else {}))
    # The row now reads as this (the changes are named after Task's fields).
    changes: dict[str, Any] = dict(t.changes)
    after = replace(task, last_seq=seq, first_seq=first_seq, state=t.state, stage=t.stage,
                    updated_at=now, **changes)
    await session_events.add(tx, codec.session_key(task.identity, task.session_id),
                             session_events.task_item(ev))
    if t.frees_work and not tx.announce.work:
        # Workers are woken only when there is something they may now claim (a later
        # archive of the session, or work an identity cap held back).
        tx.announce.work = await tx.fetchval(
            "SELECT 1 FROM tasks WHERE state=? LIMIT 1", TaskState.PENDING.value) is not None
    return ev, after


def _event(tx: Tx, task_id: str, seq: int, t: tr.Transition, now: datetime
           ) -> tuple[tuple[Any, ...], TaskEvent]:
    """The transition's event as number `seq` of the task's journal: its row, and the
    event (announced after commit)."""
    message = codec.clean_text(t.message)
    row = (task_id, seq, t.kind.value, tx.d.ts(now), t.state.value, t.stage.value, message,
           t.attempt, codec.encode_result(t.result), codec.encode_error(t.error))
    ev = TaskEvent(task_id=task_id, seq=seq, kind=t.kind, time=now, state=t.state,
                   stage=t.stage, message=message, attempt=t.attempt, result=t.result,
                   error=t.error)
    tx.announce.events.append(ev)
    return row, ev


async def journal_first(tx: Tx, task: Task, t: tr.Transition, now: datetime) -> TaskEvent:
    """The first journal event of `task`, a row inserted with `t` applied already
    (state and stage, last_seq 1; `t` changes no other column): what `apply` writes
    besides updating the row, one statement fewer. The session feed item of the event
    (`session_events.task_item`) is the caller's to write."""
    assert task.last_seq == 1 and not t.changes and not t.frees_work
    row, ev = _event(tx, task.task_id, 1, t, now)
    if tx.journal is not None:
        tx.journal.events.append(row)
    else:
        await _write(tx, Journal([row]))
    return ev


async def get(tx: Tx, task_id: str, *, lock: bool = False) -> Task | None:
    row = await tx.fetchrow("SELECT * FROM tasks WHERE task_id=?" + (tx.d.lock if lock else ""),
                            task_id)
    return None if row is None else tx.d.rows.task(row)


async def require(tx: Tx, task_id: str, *, lock: bool = False) -> Task:
    task = await get(tx, task_id, lock=lock)
    if task is None:
        raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
    return task


async def leased(tx: Tx, task_id: str, worker_id: str) -> Task:
    """The task, locked, when `worker_id` still holds its lease; `LeaseLost` if not."""
    task = await require(tx, task_id, lock=True)
    if task.lease_owner != worker_id or task.state is not TaskState.RUNNING:
        raise LeaseLost(f"worker {worker_id} no longer holds task {task_id}")
    return task


async def last_event(tx: Tx, task_id: str) -> TaskEvent:
    row = await tx.fetchrow("SELECT * FROM task_events WHERE task_id=? ORDER BY seq DESC "
                            "LIMIT 1", task_id)
    assert row is not None
    return tx.d.rows.event(row)


async def list_page(tx: Tx, identity: Identity, session_id: str, state: TaskState | None,
                    task_type: str, page_size: int, page_token: str) -> Page[Task]:
    """Newest first (created_at, then task_id, descending)."""
    where = ["account=?", "user_id=?", "agent=?"]
    args: list[Any] = [identity.account, identity.user, identity.agent]
    for cond, value in (("session_id=?", session_id),
                        ("state=?", state.value if state is not None else ""),
                        ("task_type=?", task_type)):
        if value:
            where.append(cond)
            args.append(value)
    if page_token:
        cursor = read_task_cursor(page_token)
        if cursor is None:
            return Page([])  # a NaN cursor orders before nothing
        where.append("(created_at, task_id) < (?, ?)")
        args += [tx.d.cursor_time(cursor[0]), cursor[1]]
    rows = await tx.fetch(f"SELECT * FROM tasks WHERE {' AND '.join(where)} "
                          "ORDER BY created_at DESC, task_id DESC LIMIT ?", *args, page_size + 1)
    return page_of(rows, page_size,
                   lambda r: task_cursor(tx.d.epoch(r["created_at"]), r["task_id"]),
                   tx.d.rows.task)


async def list_events(tx: Tx, task_id: str, after_seq: int, limit: int) -> list[TaskEvent]:
    rows = await tx.fetch("SELECT * FROM task_events WHERE task_id=? AND seq>? ORDER BY seq "
                          "LIMIT ?", task_id, after_seq, limit)
    return [tx.d.rows.event(r) for r in rows]


async def request_cancel(tx: Tx, task_id: str, now: datetime) -> Task:
    task = await require(tx, task_id, lock=True)
    t = tr.request_cancel(task, now)
    if t is not None:
        _, task = await apply(tx, task, t, now)
    return task


async def claim(tx: Tx, worker_id: str, now: datetime, lease_until: datetime,
                announce: bool, max_running_per_identity: int = 0) -> Task | None:
    return (await claim_next(tx, worker_id, now, lease_until, announce,
                             max_running_per_identity))[0]


async def claim_next(tx: Tx, worker_id: str, now: datetime, lease_until: datetime,
                     announce: bool, max_running_per_identity: int = 0
                     ) -> tuple[Task | None, bool]:
    """The claimed task (None: nothing runnable) and whether another task was
    runnable besides it (so a worker with room claims again, and otherwise waits to
    be woken). Fair claim: among runnable tasks (per-session archive order kept), those of the
    identity with the fewest tasks running under a live lease come first, then the
    oldest; an identity already running `max_running_per_identity` (0: no cap) gets
    none. So one identity's backlog cannot starve another's. A task is runnable only
    when every lower-index task of its session is finished and no other task of its
    session runs (a retried task waits for a later archive that is running)."""
    cap = " AND COALESCE(b.n, 0)<?" if max_running_per_identity > 0 else ""
    args: list[Any] = [TaskState.RUNNING.value, tx.d.ts(now), *OPEN, tx.d.ts(now), *OPEN,
                       TaskState.RUNNING.value]
    if cap:
        args.append(max_running_per_identity)
    row = await tx.fetchrow(
        "WITH busy AS (SELECT account, user_id, agent, COUNT(*) AS n FROM tasks "
        "  WHERE state=? AND lease_expires_at>=? GROUP BY account, user_id, agent) "
        "SELECT t.* FROM tasks t LEFT JOIN busy b ON b.account=t.account "
        "  AND b.user_id=t.user_id AND b.agent=t.agent "
        "WHERE t.state IN (?,?) "
        "AND (t.lease_expires_at IS NULL OR t.lease_expires_at<?) "
        "AND NOT EXISTS (SELECT 1 FROM tasks p WHERE p.skey=t.skey "
        "  AND p.archive_index<t.archive_index AND p.state IN (?,?)) "
        # A retried task waits for a later archive of its session that is running.
        "AND NOT EXISTS (SELECT 1 FROM tasks r WHERE r.skey=t.skey "
        "  AND r.task_id<>t.task_id AND r.state=?)" + cap +
        " ORDER BY COALESCE(b.n, 0), t.created_at, t.task_id LIMIT 1" + tx.d.claim_lock("t"),
        *args)
    if row is None:
        return None, False
    task = tx.d.rows.task(row)
    async with session_events.batched(tx), journal_batched(tx):
        _, task = await apply(tx, task, tr.claim(task, worker_id, now, lease_until), now)
        first = tr.first_stage(task) if announce else None
        if first is not None:
            _, task = await apply(tx, task, first, now)
    # Only the claimed row is locked (SKIP LOCKED claimers must not miss the others);
    # "more" is a hint from any other pending task.
    more = await tx.fetchval("SELECT 1 FROM tasks WHERE state=? AND task_id<>? LIMIT 1",
                             TaskState.PENDING.value, task.task_id)
    return task, more is not None


async def queue_stats(tx: Tx) -> tuple[int, datetime | None]:
    """How many tasks wait to start (PENDING), and when the oldest of them was made."""
    row = await tx.fetchrow("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM tasks "
                            "WHERE state=?", TaskState.PENDING.value)
    if row is None or not row["n"]:
        return 0, None
    return int(row["n"]), tx.d.rows.ts(row["oldest"])


async def renew_lease(tx: Tx, task_id: str, worker_id: str, lease_until: datetime) -> bool:
    changed = await tx.execute(
        "UPDATE tasks SET lease_expires_at=? WHERE task_id=? AND lease_owner=? AND state=?",
        tx.d.ts(lease_until), task_id, worker_id, TaskState.RUNNING.value)
    return changed == 1


async def release_all_leases(tx: Tx) -> int:
    changed = await tx.execute("UPDATE tasks SET lease_owner='', lease_expires_at=NULL "
                               "WHERE state IN (?,?) AND lease_owner<>''", *OPEN)
    tx.announce.work = changed > 0
    return changed


async def append_event(tx: Tx, task_id: str, worker_id: str, event: NewEvent, stage: Stage,
                       now: datetime) -> TaskEvent:
    task = await leased(tx, task_id, worker_id)
    t = tr.Transition(event.kind, TaskState.RUNNING, stage, event.message, event.attempt)
    return (await apply(tx, task, t, now))[0]


async def fail(tx: Tx, task_id: str, worker_id: str | None, error: TaskError,
               now: datetime) -> TaskEvent:
    task = (await leased(tx, task_id, worker_id) if worker_id is not None
            else await require(tx, task_id, lock=True))
    t = tr.failed(task, error, now)
    if t is None:
        return await last_event(tx, task_id)
    return (await apply(tx, task, t, now))[0]


async def cancel(tx: Tx, task_id: str, worker_id: str, now: datetime) -> TaskEvent:
    task = await leased(tx, task_id, worker_id)
    return (await apply(tx, task, tr.cancelled(task, now), now))[0]


async def retry(tx: Tx, identity: Identity, task_id: str, now: datetime,
                request: RequestKey | None, *, automatic: bool = False) -> Task:
    """Put a FAILED or CANCELLED session_commit task back to PENDING (a RETRIED event);
    its archive must still be there and PENDING. A replayed request returns the task
    as it is now."""
    previous = await requests.replay(tx, request)
    task = await get(tx, task_id, lock=previous is None)
    if task is None or task.identity != identity:
        raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND",
                       metadata={"task_id": task_id})
    if previous is not None:
        return task
    if task.task_type != TASK_TYPE_COMMIT:
        raise FailedPrecondition(f"task {task_id} is a {task.task_type} task; only "
                                 f"{TASK_TYPE_COMMIT} tasks can be retried",
                                 reason="TASK_NOT_RETRYABLE", metadata={"task_id": task_id})
    t = tr.retried(task, now, automatic=automatic)
    if t is None:
        raise FailedPrecondition(
            f"task {task_id} is {task.state.value.upper()}; only FAILED or CANCELLED tasks "
            "can be retried", reason="TASK_NOT_RETRYABLE",
            metadata={"task_id": task_id, "state": task.state.value.upper()})
    archive = await tx.fetchval("SELECT state FROM archives WHERE skey=? AND idx=?",
                                codec.session_key(task.identity, task.session_id),
                                task.archive_index)
    if archive is None:
        raise FailedPrecondition(f"the archive of task {task_id} no longer exists (session "
                                 "deleted)", reason="ARCHIVE_GONE",
                                 metadata={"task_id": task_id})
    if archive != ArchiveState.PENDING.value:
        raise FailedPrecondition(f"the archive of task {task_id} is {archive}, not pending",
                                 reason="ARCHIVE_NOT_PENDING", metadata={"task_id": task_id})
    # A revert of this archive (made after its commit task, so not one of an archive
    # of a deleted session of the same id).
    revert = await tx.fetchval("SELECT task_id FROM tasks WHERE skey=? AND archive_index=? "
                               "AND task_type=? AND state IN (?,?,?) AND created_at>=? LIMIT 1",
                               codec.session_key(task.identity, task.session_id),
                               task.archive_index, TASK_TYPE_REVERT, *OPEN,
                               TaskState.COMPLETED.value, tx.d.ts(task.created_at))
    if revert is not None:
        raise FailedPrecondition(f"the archive of task {task_id} was reverted (task {revert}); "
                                 "its Phase 2 does not run again", reason="ARCHIVE_REVERTED",
                                 metadata={"task_id": task_id, "revert_task_id": str(revert)})
    _, task = await apply(tx, task, t, now)
    await requests.remember(tx, request, {"task_id": task_id}, now)
    tx.announce.work = True
    return task


async def failed_below(tx: Tx, codes: tuple[ErrorCode, ...], max_retries: int,
                       limit: int) -> list[Task]:
    """FAILED tasks with one of `codes`, fewer than `max_retries` retries and their
    archive still PENDING; oldest failure first."""
    if not codes:
        return []
    # Errors are stored as {"code":...,...} (codec.encode_error): match the prefix.
    like = " OR ".join("t.error LIKE ?" for _ in codes)
    rows = await tx.fetch(
        f"SELECT t.* FROM tasks t WHERE t.state=? AND t.task_type=? AND t.retries<? "
        f"AND ({like}) "
        "AND EXISTS (SELECT 1 FROM archives a WHERE a.skey=t.skey "
        "  AND a.idx=t.archive_index AND a.state=?) "
        "ORDER BY t.finished_at, t.task_id LIMIT ?",
        TaskState.FAILED.value, TASK_TYPE_COMMIT, max_retries,
        *(codec.dumps({"code": c.value})[:-1] + ",%" for c in codes),
        ArchiveState.PENDING.value, limit)
    return [tx.d.rows.task(r) for r in rows]
