"""The worker's Phase 2 writes: a stage's output, its done mark and its journal
events in one transaction; finalize exactly once; the reads stages need."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sessiond.server.domain import transitions as tr
from sessiond.server.domain.commands import (
    ActiveCountsOutput,
    ExtractionResponse,
    IndexOutput,
    RelationsOutput,
    StageOutput,
    SummaryResponse,
)
from sessiond.server.domain.errors import FailedPrecondition
from sessiond.server.domain.values import (
    ArchiveState,
    CandidateMemory,
    Identity,
    MemoryCounts,
    Stage,
    Task,
    TaskEvent,
)
from sessiond.server.store import codec
from sessiond.server.store.sql import memories, recall, session_events, tasks
from sessiond.server.store.sql.tx import Tx


async def complete(tx: Tx, task_id: str, worker_id: str, stage: Stage, output: StageOutput,
                   now: datetime, next_stage: Stage | None) -> TaskEvent:
    return await complete_many(tx, task_id, worker_id, [(stage, output)], now, next_stage,
                               finalize_after=False)


async def complete_many(tx: Tx, task_id: str, worker_id: str,
                        outputs: Sequence[tuple[Stage, StageOutput]], now: datetime,
                        next_stage: Stage | None, finalize_after: bool) -> TaskEvent:
    """Several consecutive stages' writes and events in one transaction, as if each
    had been completed on its own (`complete`), then, with `finalize_after`, the task
    finalized. Stops at a boundary where a cancel ends the task."""
    async with session_events.batched(tx), tasks.journal_batched(tx):
        return await _complete_many(tx, task_id, worker_id, outputs, now, next_stage,
                                    finalize_after)


async def _complete_many(tx: Tx, task_id: str, worker_id: str,
                         outputs: Sequence[tuple[Stage, StageOutput]], now: datetime,
                         next_stage: Stage | None, finalize_after: bool) -> TaskEvent:
    task = await tasks.leased(tx, task_id, worker_id)
    ev: TaskEvent | None = None
    for i, (stage, output) in enumerate(outputs):
        following = outputs[i + 1][0] if i + 1 < len(outputs) else next_stage
        if tr.already_done(task, stage):
            continue
        ev, task = await _complete(tx, task, stage, output, now, following)
        if task.state.terminal:
            return ev
    if finalize_after:
        return await _finalize(tx, task, now)
    return ev if ev is not None else await tasks.last_event(tx, task_id)


async def _complete(tx: Tx, task: Task, stage: Stage, output: StageOutput, now: datetime,
                    next_stage: Stage | None) -> tuple[TaskEvent, Task]:
    skey, d = codec.session_key(task.identity, task.session_id), tx.d
    counts: MemoryCounts | None = None
    if isinstance(output, SummaryResponse):
        await tx.execute("UPDATE archives SET overview=?, abstract=? WHERE skey=? AND idx=?",
                         codec.clean_text(output.overview), codec.clean_text(output.abstract),
                         skey, task.archive_index)
    elif isinstance(output, ExtractionResponse):
        counts = await memories.upsert(tx, task, output.candidates, now) + output.earlier
    elif isinstance(output, RelationsOutput):
        await tx.executemany(
            "INSERT INTO relations (skey, uri, created_at) VALUES (?,?,?) ON CONFLICT DO NOTHING",
            [(skey, u, d.ts(now)) for u in sorted({codec.clean_text(u) for u in output.uris})])
    elif isinstance(output, ActiveCountsOutput):
        # Sorted: concurrent tasks bumping the same uris lock them in one order.
        await tx.executemany(
            "INSERT INTO active_counts (uri, active_count, updated_at) VALUES (?,1,?) "
            "ON CONFLICT (uri) DO UPDATE SET active_count=active_counts.active_count+1, "
            "updated_at=excluded.updated_at",
            [(u, d.ts(now)) for u in sorted({codec.clean_text(u) for u in output.uris})])
    elif isinstance(output, IndexOutput):
        await recall.index_archive(tx, task, output.entries, output.vectors, output.model)
    ev, task = await tasks.apply(tx, task, tr.stage_completed(task, stage, output, counts), now)
    if next_stage is not None:
        ev, task = await tasks.apply(tx, task, tr.cross_boundary(task, stage, next_stage, now),
                                     now)
    return ev, task


async def upsert_memories(tx: Tx, task_id: str, worker_id: str,
                          candidates: Sequence[CandidateMemory], now: datetime) -> MemoryCounts:
    """A batch of the extract stage's memories, before the stage completes (nothing
    when the stage is already done)."""
    task = await tasks.leased(tx, task_id, worker_id)
    if tr.already_done(task, Stage.EXTRACT):
        return MemoryCounts()
    return await memories.upsert(tx, task, candidates, now)


async def finalize(tx: Tx, task_id: str, worker_id: str, now: datetime) -> TaskEvent:
    return await _finalize(tx, await tasks.leased(tx, task_id, worker_id), now)


async def _finalize(tx: Tx, task: Task, now: datetime) -> TaskEvent:
    skey, d = codec.session_key(task.identity, task.session_id), tx.d
    changed = await tx.execute(
        "UPDATE archives SET state=?, completed_at=? WHERE skey=? AND idx=? AND state=?",
        ArchiveState.DONE.value, d.ts(now), skey, task.archive_index, ArchiveState.PENDING.value)
    if changed != 1:
        raise FailedPrecondition(f"archive {task.archive_uri} is missing or already done",
                                 reason="ARCHIVE_NOT_PENDING")
    srow = await tx.fetchrow("SELECT memory_counts FROM sessions WHERE skey=?" + d.lock, skey)
    if srow is not None:
        total = codec.decode_counts(srow["memory_counts"]) + task.memory_counts
        await tx.execute(
            "UPDATE sessions SET commit_count=commit_count+1, last_commit_at=?, memory_counts=?, "
            "prompt_tokens=prompt_tokens+?, completion_tokens=completion_tokens+?, updated_at=? "
            "WHERE skey=?", d.ts(now), codec.encode_counts(total),
            task.token_usage.prompt_tokens, task.token_usage.completion_tokens, d.ts(now), skey)
    return (await tasks.apply(tx, task, tr.finalized(task, now), now))[0]


async def memory_counts(tx: Tx, task_id: str) -> MemoryCounts:
    return (await tasks.require(tx, task_id)).memory_counts


async def active_count(tx: Tx, uri: str) -> int:
    value = await tx.fetchval("SELECT active_count FROM active_counts WHERE uri=?",
                              codec.clean_text(uri))
    return 0 if value is None else int(value)


async def relations(tx: Tx, identity: Identity, session_id: str) -> list[str]:
    rows = await tx.fetch("SELECT uri FROM relations WHERE skey=? ORDER BY uri",
                          codec.session_key(identity, session_id))
    return [str(r["uri"]) for r in rows]
