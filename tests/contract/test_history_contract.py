"""The memory change history and archive reverts in the storage contract, on every
backend: changes recorded with their images, identity scope across agents (user-space
memories are shared), the revert's conflict check in the request and again in the
task's transaction, force, replay, and the per-session order of revert tasks."""

from __future__ import annotations

import pytest
from sessiond.server.domain.errors import FailedPrecondition, NotFound, RevertConflict
from sessiond.server.domain.history import TASK_TYPE_REVERT, ChangeOp
from sessiond.server.domain.values import (
    Identity,
    MemoryCategory,
    Stage,
    TaskState,
)
from sessiond.server.store.base import Store

from tests.contract.conftest import Runner
from tests.contract.test_store_contract import ID, at, cand, claim, committed, rkey, run_pipeline

CODER = Identity("acme", "alice", "coder")  # the same user's other agent
PROFILE = MemoryCategory.PROFILE


async def archive(store: Store, sid: str, task_id: str, t: float, content: str,
                  identity: Identity = ID) -> None:
    await committed(store, sid, task_id, t, identity=identity)
    task = await claim(store, "w", t)
    assert task.task_id == task_id
    await run_pipeline(store, task_id, "w", t,
                       candidates=[cand(PROFILE, "profile", content),
                                   cand(MemoryCategory.CASES, f"case-{task_id}",
                                        f"case of {task_id}")])


async def run_revert(store: Store, t: float) -> TaskState:
    task = await store.claim_task("w", at(t), at(t + 30), announce=True)
    assert task is not None
    assert task.task_type == TASK_TYPE_REVERT and task.stage is Stage.REVERT
    ev = await store.apply_revert(task.task_id, "w", {}, "", at(t))
    return ev.state


def test_changes_are_recorded_with_images_and_scoped(store: Store, run: Runner) -> None:
    async def body() -> None:
        await archive(store, "a", "t1", 1, "name: Ada")
        await archive(store, "b", "t2", 2, "location: Oslo", identity=CODER)
        mine = await store.list_memory_changes(ID, "", 0, "", 100, "")
        # alice/assistant sees the shared profile's two changes and its own case only
        assert [(c.op, c.category, c.session_id) for c in mine.items] == [
            (ChangeOp.CREATED, MemoryCategory.CASES, "a"), (ChangeOp.CREATED, PROFILE, "a"),
            (ChangeOp.UPDATED, PROFILE, "b")]
        upd = next(c for c in mine.items if c.op is ChangeOp.UPDATED)
        assert upd.before is not None and upd.before.content == "name: Ada"
        assert upd.after is not None and upd.after.content == "name: Ada\nlocation: Oslo"
        assert upd.actor_agent == "coder" and upd.owner.agent == ""
        # the session filter is the caller's own session ("b" of alice/assistant: none)
        assert (await store.list_memory_changes(ID, "b", 0, "", 100, "")).items == []
        assert len((await store.list_memory_changes(CODER, "b", 0, "", 100, "")).items) == 2
        # another user sees nothing
        other = Identity("acme", "bob", "assistant")
        assert (await store.list_memory_changes(other, "", 0, "", 100, "")).items == []
        # pages by seq
        first = await store.list_memory_changes(ID, "", 0, "", 2, "")
        assert len(first.items) == 2 and first.next_token
        rest = await store.list_memory_changes(ID, "", 0, "", 2, first.next_token)
        assert [c.seq for c in first.items + rest.items] == sorted(c.seq for c in mine.items)
        # DeleteMemory is recorded
        case = next(c.memory_id for c in mine.items if c.category is MemoryCategory.CASES)
        assert await store.delete_memory(ID, case, at(3))
        gone = await store.list_memory_changes(ID, "", 0, case, 100, "")
        assert [c.op for c in gone.items] == [ChangeOp.CREATED, ChangeOp.DELETED]
        assert gone.items[1].before is not None and gone.items[1].after is None

    run(body())


def test_revert_conflicts_across_agents_and_force(store: Store, run: Runner) -> None:
    async def body() -> None:
        await archive(store, "a", "t1", 1, "name: Ada")
        await archive(store, "b", "t2", 2, "location: Oslo", identity=CODER)
        with pytest.raises(RevertConflict) as info:
            await store.request_revert(ID, "a", 1, False, "r1", at(3))
        assert len(info.value.conflicts) == 1 and "sessions/b/" in info.value.conflicts[0][1]
        with pytest.raises(NotFound):
            await store.request_revert(ID, "a", 9, False, "r1", at(3))
        with pytest.raises(NotFound):
            await store.request_revert(ID, "b", 1, False, "r1", at(3))  # CODER's session
        key = rkey("RevertArchive", "rq-1")
        task = await store.request_revert(ID, "a", 1, True, "r1", at(3), key)
        assert task.state is TaskState.PENDING and task.revert_force
        again = await store.request_revert(ID, "a", 1, True, "r-other", at(4), key)
        assert again.task_id == "r1"
        with pytest.raises(FailedPrecondition) as dup:
            await store.request_revert(ID, "a", 1, True, "r2", at(4))
        assert dup.value.reason == "ALREADY_REVERTED"
        assert await run_revert(store, 5) is TaskState.COMPLETED
        done = await store.get_task("r1")
        assert done is not None and done.result is not None and done.result.revert is not None
        assert (done.result.revert.deleted, done.result.revert.conflicts_overridden) == (2, 1)
        assert [m.category for m in (await store.list_memories(CODER, None, 100, "")).items] \
            == [MemoryCategory.CASES]  # the shared profile is gone, coder's case stays

    run(body())


def test_revert_task_rechecks_under_lock_and_changes_nothing(store: Store,
                                                             run: Runner) -> None:
    async def body() -> None:
        await archive(store, "a", "t1", 1, "name: Ada")
        await store.request_revert(ID, "a", 1, False, "r1", at(2))
        profile = next(m for m in (await store.list_memories(ID, PROFILE, 10, "")).items)
        assert await store.delete_memory(ID, profile.memory_id, at(3))  # a later change
        assert await run_revert(store, 4) is TaskState.FAILED
        failed = await store.get_task("r1")
        assert failed is not None and failed.error is not None
        assert failed.error.reason == "REVERT_CONFLICT"
        changes = (await store.list_memory_changes(ID, "a", 1, "", 100, "")).items
        assert ChangeOp.REVERTED not in {c.op for c in changes}
        assert len((await store.list_memories(ID, None, 10, "")).items) == 1  # the case
        # a failed revert is not a revert: with force, the case goes; the profile,
        # deleted since, stays deleted (the archive created it)
        await store.request_revert(ID, "a", 1, True, "r2", at(5))
        assert await run_revert(store, 6) is TaskState.COMPLETED
        assert (await store.list_memories(ID, None, 10, "")).items == []

    run(body())


def test_revert_tasks_keep_the_session_order(store: Store, run: Runner) -> None:
    async def body() -> None:
        await archive(store, "a", "t1", 1, "name: Ada")
        await committed(store, "a", "t2", 2)  # archive 2's Phase 2 is PENDING
        await store.request_revert(ID, "a", 1, False, "r1", at(3))
        first = await claim(store, "w", 4)
        assert first.task_id == "r1"  # archive 2 waits for the revert of archive 1
        assert await store.claim_task("w2", at(4), at(30)) is None
        await store.apply_revert("r1", "w", {}, "", at(5))
        assert (await claim(store, "w", 6)).task_id == "t2"

    run(body())


def test_a_session_made_again_has_its_own_archives(store: Store, run: Runner) -> None:
    """Deleted and made again under the same id, archive 1 is a new archive: its
    revert is neither refused as done nor given the old archive's changes."""
    async def body() -> None:
        await archive(store, "a", "t1", 1, "name: Ada")
        await store.request_revert(ID, "a", 1, False, "r1", at(2))
        assert await run_revert(store, 3) is TaskState.COMPLETED
        assert await store.delete_session(ID, "a", at(4))
        await store.create_session(ID, "a", at(5))
        await archive(store, "a", "t2", 6, "name: Bea")
        await store.request_revert(ID, "a", 1, False, "r2", at(7))
        assert await run_revert(store, 8) is TaskState.COMPLETED
        done = await store.get_task("r2")
        assert done is not None and done.result is not None and done.result.revert is not None
        assert done.result.revert.deleted == 2 and done.result.revert.unchanged == 0
        assert (await store.list_memories(ID, None, 10, "")).items == []

    run(body())
