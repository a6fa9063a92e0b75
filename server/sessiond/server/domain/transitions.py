"""The Phase 2 task state machine, as pure functions.

Each function takes the task as it is now and returns the `Transition` to apply:
the journal event to append and the task columns that change with it. The store
applies a transition in the same transaction as the writes it belongs to (see
`store/sql/tasks.py`); nothing here does I/O. `None` means "nothing to do".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from sessiond.server.domain.autocommit import CommitTrigger
from sessiond.server.domain.commands import (
    ActiveCountsOutput,
    ExtractionResponse,
    IndexOutput,
    RelationsOutput,
    StageOutput,
    SummaryResponse,
)
from sessiond.server.domain.errors import ErrorCode
from sessiond.server.domain.values import (
    PIPELINE,
    TASK_TYPE_REVERT,
    CommitResult,
    EventKind,
    MemoryCounts,
    RevertSummary,
    Stage,
    Task,
    TaskError,
    TaskState,
    TokenUsage,
    next_stage_after,
)

STAGE_ORDER = {s: i for i, s in enumerate(Stage)}


@dataclass(frozen=True, slots=True)
class Transition:
    """One journal event and the task columns it changes besides state and stage.

    `changes` maps column names to domain values (datetimes, enums, `TaskError`,
    `CommitResult`, `MemoryCounts`, `TokenUsage` for the two token columns)."""

    kind: EventKind
    state: TaskState
    stage: Stage
    message: str = ""
    attempt: int = 0
    result: CommitResult | None = None
    error: TaskError | None = None
    changes: Mapping[str, object] = field(default_factory=dict)

    @property
    def frees_work(self) -> bool:
        """Terminal: later tasks of the session may become runnable."""
        return self.state.terminal


def _ended(now: datetime, error: TaskError | None = None, **more: object) -> dict[str, object]:
    out: dict[str, object] = {"finished_at": now, "lease_owner": "", "lease_expires_at": None}
    if error is not None:
        out["error"] = error
    out.update(more)
    return out


def created(archive_index: int, messages: int,
            trigger: CommitTrigger = CommitTrigger.MANUAL) -> Transition:
    why = f" (auto-commit: {trigger.value})" if trigger.automatic else ""
    return Transition(EventKind.CREATED, TaskState.PENDING, Stage.QUEUED,
                      f"archive {archive_index} of {messages} messages{why}")


def claim(task: Task, worker_id: str, now: datetime, lease_until: datetime) -> Transition:
    attempt = task.attempts + 1
    resumed = task.done_stage is not Stage.QUEUED or task.attempts > 0
    msg = (f"resumed after {task.done_stage.value} (attempt {attempt})" if resumed
           else "revert started" if task.task_type == TASK_TYPE_REVERT else "Phase 2 started")
    return Transition(EventKind.STARTED, TaskState.RUNNING, task.stage, msg, attempt=attempt,
                      changes={"attempts": attempt, "lease_owner": worker_id,
                               "lease_expires_at": lease_until,
                               "started_at": task.started_at or now})


def first_stage(task: Task) -> Transition | None:
    """What a claim announces: the first stage not done (nothing when a cancel waits)."""
    if task.cancel_requested:
        return None
    if task.task_type == TASK_TYPE_REVERT:
        return stage_started(Stage.REVERT)
    return stage_started(next_stage_after(task.done_stage))


def stage_started(stage: Stage) -> Transition:
    return Transition(EventKind.STAGE_STARTED, TaskState.RUNNING, stage, f"{stage.value} started")


def already_done(task: Task, stage: Stage) -> bool:
    return STAGE_ORDER[task.done_stage] >= STAGE_ORDER[stage]


def unique(uris: tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys(uris))


def stage_completed(task: Task, stage: Stage, output: StageOutput,
                    memory_counts: MemoryCounts | None = None) -> Transition:
    """The stage's done mark and the token usage it adds (counted once, here)."""
    changes: dict[str, object] = {"done_stage": stage}
    if isinstance(output, SummaryResponse):
        changes["token_usage"] = task.token_usage + output.usage
        detail = f"overview of {len(output.overview)} chars"
    elif isinstance(output, ExtractionResponse):
        counts = memory_counts or MemoryCounts()
        changes["memory_counts"] = counts
        changes["token_usage"] = task.token_usage + output.usage
        detail = f"{counts.total} memories"
    elif isinstance(output, RelationsOutput):
        detail = f"{len(unique(output.uris))} relations"
    elif isinstance(output, ActiveCountsOutput):
        changes["active_count_updated"] = len(unique(output.uris))
        detail = f"{len(unique(output.uris))} active counts updated"
    else:
        assert isinstance(output, IndexOutput)
        n = output.total_entries or len(output.entries)
        vecs = f", {output.total_vectors} vectors ({output.model})" if output.model else ""
        detail = f"{n} entries indexed{vecs} (plus the archive's memories)"
    return Transition(EventKind.STAGE_COMPLETED, TaskState.RUNNING, stage,
                      f"{stage.value} done: {detail}", changes=changes)


def cross_boundary(task: Task, done: Stage, following: Stage, now: datetime) -> Transition:
    """After `done`: stop when a cancel was requested, else start `following`."""
    if task.cancel_requested:
        return cancelled(task, now, after=done)
    return stage_started(following)


def cancelled(task: Task, now: datetime, after: Stage | None = None) -> Transition:
    """A running task stops at a stage boundary (`after`: the stage just finished)."""
    stage = after if after is not None else task.stage
    if after is None and task.stage not in (task.done_stage, Stage.QUEUED):
        # Interrupted inside a stage (e.g. an engine call waiting to retry).
        text = f"cancelled by request during {task.stage.value}"
    else:
        text = f"cancelled by request after {(after or task.done_stage).value}"
    err = TaskError(ErrorCode.CANCELLED, text, reason="CANCELLED")
    return Transition(EventKind.CANCELLED, TaskState.CANCELLED, stage, err.message, error=err,
                      changes=_ended(now, err))


def request_cancel(task: Task, now: datetime) -> Transition | None:
    """PENDING: cancelled at once. RUNNING: flagged; the worker stops at the next
    boundary. Terminal or already flagged: nothing."""
    if task.state is TaskState.PENDING:
        err = TaskError(ErrorCode.CANCELLED, "cancelled before Phase 2 started",
                        reason="CANCELLED")
        return Transition(EventKind.CANCELLED, TaskState.CANCELLED, task.stage,
                          "cancelled by request", error=err,
                          changes=_ended(now, err, cancel_requested=True))
    if task.state is TaskState.RUNNING and not task.cancel_requested:
        return Transition(EventKind.CANCEL_REQUESTED, TaskState.RUNNING, task.stage,
                          "cancel requested; stopping at the next stage boundary",
                          changes={"cancel_requested": True})
    return None


def session_deleted(task: Task, now: datetime) -> Transition:
    err = TaskError(ErrorCode.CANCELLED, "session deleted", reason="SESSION_DELETED")
    return Transition(EventKind.CANCELLED, TaskState.CANCELLED, task.stage, "session deleted",
                      error=err, changes=_ended(now, err))


def failed(task: Task, error: TaskError, now: datetime) -> Transition | None:
    if task.state.terminal:
        return None
    return Transition(EventKind.FAILED, TaskState.FAILED, task.stage, error.message,
                      error=error, changes=_ended(now, error))


def finalized(task: Task, now: datetime) -> Transition:
    result = CommitResult(archive_uri=task.archive_uri, memories_extracted=task.memory_counts,
                          active_count_updated=task.active_count_updated,
                          token_usage=task.token_usage)
    return Transition(EventKind.COMPLETED, TaskState.COMPLETED, Stage.FINALIZE,
                      "Phase 2 completed", result=result,
                      changes=_ended(now, done_stage=Stage.FINALIZE, result=result))


def revert_created(archive_index: int, memories: int, conflicts: int,
                   force: bool) -> Transition:
    extra = f"; force: {conflicts} conflicting later changes overridden" if force and conflicts \
        else ""
    return Transition(EventKind.CREATED, TaskState.PENDING, Stage.QUEUED,
                      f"revert of archive {archive_index}: {memories} memories{extra}")


def revert_done(summary: RevertSummary) -> Transition:
    return Transition(EventKind.STAGE_COMPLETED, TaskState.RUNNING, Stage.REVERT,
                      f"revert done: {summary.describe()}",
                      changes={"done_stage": Stage.REVERT})


def revert_finalized(task: Task, summary: RevertSummary, now: datetime) -> Transition:
    result = CommitResult(archive_uri=task.archive_uri, revert=summary)
    return Transition(EventKind.COMPLETED, TaskState.COMPLETED, Stage.REVERT,
                      f"archive reverted: {summary.describe()}", result=result,
                      changes=_ended(now, result=result))


def imported_completed(task: Task, now: datetime) -> Transition:
    """An imported archive whose Phase 2 had finished in the source system: the task
    ends COMPLETED with every stage done (nothing runs again)."""
    result = CommitResult(archive_uri=task.archive_uri)
    return Transition(EventKind.COMPLETED, TaskState.COMPLETED, Stage.FINALIZE,
                      "imported: Phase 2 had completed in the source", result=result,
                      changes=_ended(now, done_stage=Stage.FINALIZE, result=result))


def retried(task: Task, now: datetime, *, automatic: bool = False) -> Transition | None:
    """A FAILED or CANCELLED task goes back to PENDING as a new attempt of the same
    task: finished stages (and their token usage) are kept, the first stage not done
    runs next, the error and the cancel flag are cleared. Any other state: None."""
    if task.state not in (TaskState.FAILED, TaskState.CANCELLED):
        return None
    n = task.retries + 1
    resume = next_stage_after(task.done_stage)
    why = task.error.reason or task.error.code.value if task.error else task.state.value
    who = "automatic retry" if automatic else "retry"
    msg = (f"{who} {n} after {task.state.value} ({why}); resumes at {resume.value}"
           + (f", {task.done_stage.value} and earlier kept"
              if task.done_stage is not Stage.QUEUED else ""))
    return Transition(EventKind.RETRIED, TaskState.PENDING, resume, msg, attempt=n,
                      changes={"retries": n, "error": None, "finished_at": None,
                               "cancel_requested": False, "lease_owner": "",
                               "lease_expires_at": None})


# Task errors the automatic retry takes as passing (an outage, a timeout).
AUTO_RETRY_CODES: tuple[ErrorCode, ...] = (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED)


def auto_retry_delay(retries: int, base_seconds: float, max_seconds: float) -> float:
    """Seconds after a failure before automatic retry number `retries` + 1:
    base, 2 x base, 4 x base, ... capped at max_seconds."""
    return min(max_seconds, base_seconds * (2.0 ** min(retries, 32)))


def auto_retry_due(task: Task, now: datetime, max_retries: int, base_seconds: float,
                   max_seconds: float) -> bool:
    """A FAILED task with a passing error, retries left and its backoff elapsed."""
    if (task.state is not TaskState.FAILED or task.error is None
            or task.error.code not in AUTO_RETRY_CODES or task.retries >= max_retries):
        return False
    failed_at = task.finished_at or task.updated_at
    delay = auto_retry_delay(task.retries, base_seconds, max_seconds)
    return (now - failed_at).total_seconds() >= delay


def token_columns(usage: TokenUsage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


__all__ = ["PIPELINE", "STAGE_ORDER", "Transition"]
