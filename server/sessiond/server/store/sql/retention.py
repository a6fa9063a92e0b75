"""Retention: remove old terminal tasks (and their journals) and idempotency keys.
Archives and memories are never removed."""

from __future__ import annotations

from datetime import datetime

from sessiond.server.domain.commands import SweepResult
from sessiond.server.domain.values import TaskState
from sessiond.server.store.sql.tasks import TERMINAL
from sessiond.server.store.sql.tx import Tx


async def sweep(tx: Tx, completed_before: datetime, failed_before: datetime, max_tasks: int,
                request_ids_before: datetime) -> SweepResult:
    if not await tx.d.sweep_lock(tx):  # another replica is sweeping
        return SweepResult(tasks_removed=0, request_ids_removed=0)
    d = tx.d
    removed = await tx.execute(
        "DELETE FROM tasks WHERE (state IN (?,?) AND finished_at<?) OR "
        "(state=? AND finished_at<?)", TaskState.COMPLETED.value, TaskState.CANCELLED.value,
        d.ts(completed_before), TaskState.FAILED.value, d.ts(failed_before))
    total = int(await tx.fetchval("SELECT COUNT(*) FROM tasks"))
    if total > max_tasks:
        removed += await tx.execute(
            "DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM tasks WHERE state IN "
            "(?,?,?) ORDER BY finished_at, task_id LIMIT ?)", *TERMINAL, total - max_tasks)
    rids = await tx.execute("DELETE FROM request_ids WHERE created_at<?",
                            d.ts(request_ids_before))
    return SweepResult(tasks_removed=removed, request_ids_removed=rids)
