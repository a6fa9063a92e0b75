"""The storage contract of RetryTask (`Store.retry_task`) and of the automatic retry's
candidates, on every backend: a FAILED or CANCELLED task goes back to PENDING with its
finished stages and their tokens kept, its journal goes on, and archive order holds."""

from __future__ import annotations

import asyncio

import pytest
from sessiond.server.domain.commands import (
    ActiveCountsOutput,
    ExtractionResponse,
    IndexOutput,
    RelationsOutput,
    SummaryResponse,
)
from sessiond.server.domain.errors import (
    ErrorCode,
    FailedPrecondition,
    NotFound,
    RequestIdConflict,
)
from sessiond.server.domain.values import (
    ArchiveState,
    EventKind,
    Stage,
    TaskError,
    TaskState,
    TokenUsage,
)
from sessiond.server.store.base import Store

from tests.contract.conftest import Runner
from tests.contract.test_store_contract import (
    ID,
    OTHER_USER,
    at,
    claim,
    committed,
    rkey,
    run_pipeline,
)

OUTAGE = TaskError(ErrorCode.UNAVAILABLE, "the model server failed (HTTP 500)",
                   reason="LLM_UNAVAILABLE")


async def finish_after_summarize(store: Store, task_id: str, worker: str, t: float) -> None:
    """Complete every stage after summarize, then finalize."""
    await store.complete_stage(task_id, worker, Stage.EXTRACT, ExtractionResponse(()), at(t))
    await store.complete_stage(task_id, worker, Stage.RELATIONS, RelationsOutput(()), at(t))
    await store.complete_stage(task_id, worker, Stage.ACTIVE_COUNTS, ActiveCountsOutput(()),
                               at(t))
    await store.complete_stage(task_id, worker, Stage.INDEX, IndexOutput(()), at(t))
    await store.finalize_task(task_id, worker, at(t))


def test_retry_resumes_at_the_first_unfinished_stage(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1, n=2)
        await claim(store, "w1", 2)
        used = TokenUsage(prompt_tokens=100, completion_tokens=20)
        await store.complete_stage("t1", "w1", Stage.SUMMARIZE,
                                   SummaryResponse("overview one", "abstract one", used), at(3),
                                   next_stage=Stage.EXTRACT)
        await store.fail_task("t1", "w1", OUTAGE, at(4))
        failed = await store.get_task("t1")
        assert failed is not None and failed.state is TaskState.FAILED
        last = failed.last_seq

        task = await store.retry_task(ID, "t1", at(5))
        assert (task.state, task.stage, task.done_stage, task.retries) == \
            (TaskState.PENDING, Stage.EXTRACT, Stage.SUMMARIZE, 1)
        assert task.error is None and task.finished_at is None and task.lease_owner == ""
        assert task.token_usage == used and task.last_seq == last + 1
        ev = (await store.list_events("t1", last))[0]
        assert (ev.seq, ev.kind, ev.state, ev.attempt) == \
            (last + 1, EventKind.RETRIED, TaskState.PENDING, 1)
        assert "resumes at extract" in ev.message and "LLM_UNAVAILABLE" in ev.message
        arch = await store.get_archive(ID, "s1", 1)
        assert arch is not None and arch.state is ArchiveState.PENDING
        assert arch.overview == "overview one"  # the finished stage's output stays

        again = await claim(store, "w2", 6)
        assert again.task_id == "t1" and again.attempts == 2
        await finish_after_summarize(store, "t1", "w2", 7)
        done = await store.get_task("t1")
        assert done is not None and done.state is TaskState.COMPLETED
        assert done.result is not None and done.result.token_usage == used  # not twice
        events = await store.list_events("t1", 0)
        assert [e.seq for e in events] == list(range(1, done.last_seq + 1))
        kinds = [e.kind for e in events]
        assert kinds.count(EventKind.FAILED) == 1 and kinds[-1] is EventKind.COMPLETED
        assert kinds[kinds.index(EventKind.RETRIED) + 1] is EventKind.STARTED
        meta = await store.get_session(ID, "s1")
        assert meta is not None and meta.commit_count == 1 and meta.llm_token_usage == used
        arch = await store.get_archive(ID, "s1", 1)
        assert arch is not None and arch.state is ArchiveState.DONE

    run(body())


def test_retry_refuses_wrong_states_and_other_identities(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        for state in ("PENDING", "RUNNING"):
            with pytest.raises(FailedPrecondition) as exc:
                await store.retry_task(ID, "t1", at(2))
            assert exc.value.reason == "TASK_NOT_RETRYABLE"
            assert exc.value.metadata["state"] == state
            if state == "PENDING":
                await claim(store, "w", 2)
        await run_pipeline(store, "t1", "w", 3)
        with pytest.raises(FailedPrecondition) as exc:
            await store.retry_task(ID, "t1", at(4))
        assert exc.value.metadata["state"] == "COMPLETED"
        await committed(store, "s1", "t2", 5)
        await store.fail_task("t2", None, OUTAGE, at(6))
        with pytest.raises(NotFound):
            await store.retry_task(OTHER_USER, "t2", at(7))
        with pytest.raises(NotFound):
            await store.retry_task(ID, "nope", at(7))
        t2 = await store.get_task("t2")
        assert t2 is not None and t2.state is TaskState.FAILED and t2.retries == 0
        # a task cancelled by deleting its session has no archive left to run
        await committed(store, "s2", "t3", 8)
        await store.delete_session(ID, "s2", at(9))
        with pytest.raises(FailedPrecondition) as exc:
            await store.retry_task(ID, "t3", at(10))
        assert exc.value.reason == "ARCHIVE_GONE"

    run(body())


def test_retry_of_a_cancelled_task_and_request_ids(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        cancelled = await store.request_cancel("t1", at(2))
        assert cancelled.state is TaskState.CANCELLED and cancelled.cancel_requested
        key = rkey("RetryTask", "r-1")
        task = await store.retry_task(ID, "t1", at(3), key)
        assert task.state is TaskState.PENDING and not task.cancel_requested
        assert task.stage is Stage.SUMMARIZE and task.retries == 1
        replay = await store.retry_task(ID, "t1", at(4), key)
        assert replay.last_seq == task.last_seq and replay.retries == 1
        with pytest.raises(RequestIdConflict):
            await store.retry_task(ID, "t1", at(4), rkey("RetryTask", "r-1", b"other"))
        # the replay also answers once the retry has moved on
        await claim(store, "w", 5)
        again = await store.retry_task(ID, "t1", at(6), key)
        assert again.state is TaskState.RUNNING and again.retries == 1
        await run_pipeline(store, "t1", "w", 7)
        done = await store.get_task("t1")
        assert done is not None and done.state is TaskState.COMPLETED

    run(body())


def test_retried_archive_runs_before_later_archives_not_started(store: Store,
                                                                 run: Runner) -> None:
    async def body() -> None:
        for i in (1, 2, 3):
            await committed(store, "s1", f"t{i}", i)
        assert (await claim(store, "w", 4)).task_id == "t1"
        await store.fail_task("t1", "w", OUTAGE, at(5))
        assert (await claim(store, "w", 6)).task_id == "t2"  # a failure does not block
        await store.retry_task(ID, "t1", at(7))
        # t2 is running: the retried t1 waits for it, t3 waits for t1
        assert await store.claim_task("w", at(8), at(8 + 30)) is None
        await run_pipeline(store, "t2", "w", 9)
        assert (await claim(store, "w", 10)).task_id == "t1"
        assert await store.claim_task("w", at(11), at(11 + 30)) is None
        await run_pipeline(store, "t1", "w", 12)
        assert (await claim(store, "w", 13)).task_id == "t3"

    run(body())


def test_auto_retry_candidates(store: Store, run: Runner) -> None:
    codes = (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED)
    async def ids(max_retries: int) -> list[str]:
        return [t.task_id for t in await store.auto_retry_candidates(codes, max_retries)]

    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        await committed(store, "s2", "t2", 2)
        await committed(store, "s3", "t3", 3)
        await committed(store, "s4", "t4", 4)
        await store.fail_task("t2", None, OUTAGE, at(5))
        await store.fail_task("t1", None, TaskError(ErrorCode.DEADLINE_EXCEEDED, "slow",
                                                    reason="LLM_TIMEOUT"), at(6))
        await store.fail_task("t3", None, TaskError(ErrorCode.FAILED_PRECONDITION, "bad key",
                                                    reason="LLM_AUTH"), at(7))
        await store.fail_task("t4", None, OUTAGE, at(8))
        await store.delete_session(ID, "s4", at(9))  # archive gone: nothing to retry
        assert await ids(2) == ["t2", "t1"]
        assert await store.auto_retry_candidates((), 2) == []
        await store.retry_task(ID, "t2", at(10), automatic=True)
        assert await ids(2) == ["t1"]
        ev = (await store.list_events("t2", 0))[-1]
        assert ev.kind is EventKind.RETRIED and ev.message.startswith("automatic retry 1")
        await claim(store, "w", 11)
        await store.fail_task("t2", "w", OUTAGE, at(12))
        assert await ids(2) == ["t1", "t2"]
        assert await ids(1) == ["t1"]

    run(body())


def test_concurrent_retries_retry_once(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        await store.fail_task("t1", None, OUTAGE, at(2))
        outcomes = await asyncio.gather(*(store.retry_task(ID, "t1", at(3), automatic=True)
                                          for _ in range(6)), return_exceptions=True)
        ok = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, FailedPrecondition)]
        assert len(ok) == 1 and len(refused) == 5, outcomes
        events = await store.list_events("t1", 0)
        assert [e.kind for e in events].count(EventKind.RETRIED) == 1

    run(body())
