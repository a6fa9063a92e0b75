"""The storage contract of auto-commit and the session feed on every backend: count
triggers in the append's transaction, the idle trigger's claim (two stores racing on
one database commit once), a session's own policy versus the default, and the feed's
numbering, task events and trimming."""

from __future__ import annotations

import asyncio

from sessiond.server.domain.autocommit import (
    AutoCommitPolicy,
    CommitTrigger,
    SessionEventKind,
)
from sessiond.server.domain.values import EventKind
from sessiond.server.store.base import Store

from tests.contract.conftest import Runner, StoreFactory
from tests.contract.test_store_contract import ID, at, msg, plan


def test_count_trigger_commits_in_the_append(store: Store, run: Runner) -> None:
    async def body() -> None:
        await store.create_session(ID, "s1", at(0))
        await store.update_session_config(ID, "s1", AutoCommitPolicy(max_messages=3,
                                                                      keep_recent_count=1),
                                          at(0))
        await store.add_message(ID, "s1", msg("a", 1))
        await store.add_messages(ID, "s1", [msg("b", 2)])
        assert await store.list_archives(ID, "s1", 10, "") is not None
        assert (await store.list_archives(ID, "s1", 10, "")).items == []
        await store.add_message(ID, "s1", msg("c", 3))
        (arch,) = (await store.list_archives(ID, "s1", 10, "")).items
        assert arch.message_count == 2
        task = await store.get_task(arch.task_id)
        assert task is not None and task.trigger is CommitTrigger.MESSAGES
        assert [m.text() for m in await store.list_live_messages(ID, "s1")] == ["c"]
        # a session without a policy follows the store's default
        store.auto_commit_default = AutoCommitPolicy(max_tokens=2)
        await store.create_session(ID, "s2", at(0))
        await store.add_message(ID, "s2", msg("12345678", 4))  # 8 bytes: 2 tokens
        (arch2,) = (await store.list_archives(ID, "s2", 10, "")).items
        t2 = await store.get_task(arch2.task_id)
        assert t2 is not None and t2.trigger is CommitTrigger.TOKENS
        meta = await store.get_session(ID, "s2")
        assert meta is not None and meta.auto_commit is None and meta.auto_commit_inherited

    run(body())


def test_idle_commit_fires_once_and_is_re_armed_by_appends(store: Store, run: Runner) -> None:
    async def body() -> None:
        await store.create_session(ID, "s1", at(0))
        await store.update_session_config(ID, "s1", AutoCommitPolicy(idle_seconds=10), at(0))
        await store.add_message(ID, "s1", msg("a", 1))
        assert await store.idle_due_sessions(at(5)) == []
        await store.add_message(ID, "s1", msg("b", 8))  # re-armed: due at 18
        assert await store.idle_due_sessions(at(12)) == []
        assert await store.idle_commit(ID, "s1", at(12)) is None
        assert await store.idle_due_sessions(at(18)) == [(ID, "s1")]
        first, second = await asyncio.gather(store.idle_commit(ID, "s1", at(18)),
                                             store.idle_commit(ID, "s1", at(18)))
        fired = [o for o in (first, second) if o is not None]
        assert len(fired) == 1 and fired[0].archived and fired[0].task is not None
        assert fired[0].task.trigger is CommitTrigger.IDLE
        assert await store.idle_due_sessions(at(100)) == []
        # a manual commit that empties the buffer disarms the trigger
        await store.add_message(ID, "s1", msg("c", 20))
        await store.commit(plan("s1", "task_manual", 21))
        assert await store.idle_due_sessions(at(100)) == []
        # one that keeps messages live does not: the idle commit takes the rest
        await store.add_message(ID, "s1", msg("d", 40))
        await store.add_message(ID, "s1", msg("e", 41))
        await store.commit(plan("s1", "task_manual_2", 42, keep=1))
        assert await store.idle_due_sessions(at(51)) == [(ID, "s1")]
        out = await store.idle_commit(ID, "s1", at(51))
        assert out is not None and out.archive is not None and out.archive.message_count == 1
        # nothing live beyond keep_recent_count: disarmed without a commit
        await store.update_session_config(ID, "s1", AutoCommitPolicy(idle_seconds=10,
                                                                      keep_recent_count=1),
                                          at(60))
        await store.add_message(ID, "s1", msg("f", 61))
        assert await store.idle_commit(ID, "s1", at(71)) is None
        assert await store.idle_due_sessions(at(100)) == []

    run(body())


def test_two_stores_race_for_an_idle_commit(make_store: StoreFactory, backend: str,
                                            run: Runner) -> None:
    """On PostgreSQL two stores (two replicas) share the database; on SQLite one
    store races itself (one process owns the file)."""
    a = make_store()
    b = make_store() if backend == "postgres" else a

    async def body() -> None:
        for i in range(10):
            await a.create_session(ID, f"s{i}", at(0))
            await a.update_session_config(ID, f"s{i}", AutoCommitPolicy(idle_seconds=1),
                                          at(0))
            await b.add_message(ID, f"s{i}", msg("x", 1))
        due = await a.idle_due_sessions(at(5))
        assert len(due) == 10
        outs = await asyncio.gather(*(s.idle_commit(ident, sid, at(5))
                                      for ident, sid in due for s in (a, b)))
        assert sum(1 for o in outs if o is not None and o.archived) == 10
        for i in range(10):
            assert len((await b.list_archives(ID, f"s{i}", 10, "")).items) == 1

    run(body())


def test_feed_numbers_messages_commits_task_events_and_config(make_store: StoreFactory,
                                                              run: Runner) -> None:
    store = make_store(journal_cap=100)

    async def body() -> None:
        await store.create_session(ID, "s1", at(0))
        await store.add_message(ID, "s1", msg("a", 1))
        await store.add_messages(ID, "s1", [msg("b", 2), msg("c", 2)])
        out = await store.commit(plan("s1", "task_1", 3))
        assert out.task is not None
        await store.update_session_config(ID, "s1", AutoCommitPolicy(max_tokens=90_000), at(4))
        evs = await store.list_session_events(ID, "s1", 0)
        assert [e.seq for e in evs] == [1, 2, 3, 4, 5, 6]
        assert [e.kind for e in evs] == [SessionEventKind.MESSAGE_APPENDED] * 3 + [
            SessionEventKind.COMMIT_ACCEPTED, SessionEventKind.TASK_EVENT,
            SessionEventKind.CONFIG_CHANGED]
        assert [e.message_seq for e in evs[:3]] == [1, 2, 3]
        assert (evs[3].task_id, evs[3].archive_index, evs[3].archived_messages,
                evs[3].trigger) == ("task_1", 1, 3, CommitTrigger.MANUAL)
        ev = evs[4].task_event
        assert ev is not None and ev.kind is EventKind.CREATED and ev.task_id == "task_1"
        assert evs[5].auto_commit == AutoCommitPolicy(max_tokens=90_000)
        assert [e.seq for e in await store.list_session_events(ID, "s1", 4)] == [5, 6]
        meta = await store.get_session(ID, "s1")
        assert meta is not None and meta.last_event_seq == 6
        # the feed keeps its newest journal_cap events
        for i in range(150):
            await store.add_message(ID, "s1", msg(f"m{i}", 5))
        first = await store.session_events_first_seq(ID, "s1")
        assert 156 - 100 - 64 <= first - 1 <= 156 - 100
        kept = await store.list_session_events(ID, "s1", first - 1)
        assert kept[-1].seq == 156 and len(kept) == 156 - first + 1
        # a deleted session's feed is gone with it
        await store.delete_session(ID, "s1", at(9))
        assert await store.list_session_events(ID, "s1", 0) == []

    run(body())
