"""Fair Phase 2 (both backends): claims where one identity's backlog does not starve
another's, a per-identity cap on running tasks, per-session archive order kept; the
extract stage's memories in batches (a large archive never holds the writer long)."""

from __future__ import annotations

import pytest
from sessiond.server.domain.commands import ExtractionResponse, SummaryResponse
from sessiond.server.domain.errors import LeaseLost
from sessiond.server.domain.values import Identity, MemoryCategory, MemoryCounts, Stage, TokenUsage
from sessiond.server.store.base import Store

from tests.contract.conftest import Runner
from tests.contract.test_store_contract import LEASE, at, cand, committed, run_pipeline

A = Identity("tenant-a", "u", "agent")
B = Identity("tenant-b", "u", "agent")


async def _claim(store: Store, worker: str, t: float, cap: int = 0) -> str | None:
    task = await store.claim_task(worker, at(t), at(t + LEASE),
                                  max_running_per_identity=cap)
    return None if task is None else task.task_id


def test_claims_alternate_between_identities(store: Store, run: Runner) -> None:
    async def body() -> None:
        for i in range(5):  # A's backlog, all older than B's work
            await committed(store, f"a{i}", f"ta{i}", i, identity=A)
        await committed(store, "a0", "ta0-2", 6, identity=A)  # a0's second archive
        await committed(store, "b0", "tb0", 10, identity=B)
        await committed(store, "b1", "tb1", 11, identity=B)
        order = [await _claim(store, f"w{i}", 20) for i in range(4)]
        # oldest first, but an identity with fewer running tasks goes before
        assert order == ["ta0", "tb0", "ta1", "tb1"]
        rest = [await _claim(store, "w", 21) for _ in range(4)]
        assert rest == ["ta2", "ta3", "ta4", None]  # ta0-2 waits for ta0 (same session)
        await run_pipeline(store, "ta0", "w0", 22)
        assert await _claim(store, "w", 23) == "ta0-2"

    run(body())


def test_cap_on_running_tasks_per_identity(store: Store, run: Runner) -> None:
    async def body() -> None:
        for i in range(4):
            await committed(store, f"a{i}", f"ta{i}", i, identity=A)
        await committed(store, "b0", "tb0", 10, identity=B)
        got = [await _claim(store, f"w{i}", 20, cap=2) for i in range(4)]
        assert got == ["ta0", "tb0", "ta1", None]  # A runs 2: the rest of A waits
        await run_pipeline(store, "ta0", "w0", 21)
        assert await _claim(store, "w", 22, cap=2) == "ta2"
        assert await _claim(store, "w", 23, cap=2) is None
        # A task whose lease expired no longer counts as running: it is claimable
        # again, and it does not hold a slot of its identity.
        late = 22 + LEASE + 1
        assert await _claim(store, "w", late, cap=2) == "ta1"
        assert await _claim(store, "w", late, cap=2) == "tb0"
        assert await _claim(store, "w", late, cap=2) == "ta2"
        assert await _claim(store, "w", late, cap=2) is None
        # without a cap, the rest of A's backlog runs
        assert await _claim(store, "w", late) == "ta3"

    run(body())


def test_extract_memories_in_batches(store: Store, run: Runner) -> None:
    """The extract stage's memories written in batches of their own before the stage
    completes: counts add up, a batch written again changes nothing, the lease holds."""

    async def body() -> None:
        await committed(store, "s1", "t1", 1, identity=A)
        await store.claim_task("w", at(2), at(2 + LEASE))
        await store.complete_stage("t1", "w", Stage.SUMMARIZE,
                                   SummaryResponse("ov", "abs", TokenUsage()), at(3))
        batch = [cand(MemoryCategory.CASES, f"k{i}", f"case {i}") for i in range(3)]
        assert await store.upsert_memories("t1", "w", batch, at(4)) == MemoryCounts(cases=3)
        assert await store.upsert_memories("t1", "w", batch, at(4)) == MemoryCounts(cases=3)
        assert len((await store.list_memories(A, None, 100, "")).items) == 3  # not 6
        with pytest.raises(LeaseLost):
            await store.upsert_memories("t1", "other", batch, at(4))
        last = ExtractionResponse((cand(MemoryCategory.PROFILE, "profile", "Name: A"),),
                                  TokenUsage(1, 1), earlier=MemoryCounts(cases=3))
        await store.complete_stage("t1", "w", Stage.EXTRACT, last, at(5))
        assert await store.task_memory_counts("t1") == MemoryCounts(profile=1, cases=3)
        # once the stage is done, a late batch writes nothing
        late = [cand(MemoryCategory.CASES, "late", "late case")]
        assert await store.upsert_memories("t1", "w", late, at(6)) == MemoryCounts()
        assert len((await store.list_memories(A, None, 100, "")).items) == 4

    run(body())
