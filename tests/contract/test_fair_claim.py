"""Fair Phase 2 claims (both backends): one identity's backlog does not starve
another's, a per-identity cap on running tasks, per-session archive order kept."""

from __future__ import annotations

from sessiond.server.domain.values import Identity
from sessiond.server.store.base import Store

from tests.contract.conftest import Runner
from tests.contract.test_store_contract import LEASE, at, committed, run_pipeline

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
