"""Memory change history, RevertArchive and GetSessionUsage over a real server, on
both backends: what Phase 2 changed (created / updated, with before and after), the
ListMemoryChanges filters and pages, a revert without conflict (content back, recall
no longer finds the fact), with a conflict (FAILED_PRECONDITION listing the later
changes) and with force, idempotency, bad input, identity scope."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sessiond.server.phase2.engines.base import (
    RetryReporter,
    SummaryRequest,
    SummaryResponse,
    no_report,
)
from sessiond.server.phase2.engines.offline import OfflineEngine
from sessiond.server.store.postgres.store import PostgresStore
from sessiond.v1 import memory_pb2, session_pb2, task_pb2

from tests.api.helpers import GatedEngine, add, events, wait_task, watch_all
from tests.conftest import Running, ServerFactory
from tests.pg import temporary_database

M, S, K = memory_pb2, session_pb2, task_pb2
C = grpc.StatusCode
Start = Callable[..., Running]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def start(request: pytest.FixtureRequest, server_factory: ServerFactory,
          tmp_path: Path) -> Iterator[Start]:
    if request.param == "sqlite":
        yield lambda **kw: server_factory(data_dir=tmp_path / "data", **kw)
        return
    with temporary_database("sessiond_history") as url:
        yield lambda **kw: server_factory(
            store=PostgresStore(url, min_size=1, max_size=4), data_dir=tmp_path / "data",
            **kw)


def commit(r: Running, sid: str, *texts: str, md: tuple[tuple[str, str], ...] = ()
           ) -> K.Task:
    for t in texts:
        add(r.sessions, sid, t, metadata=md)
    task_id = r.sessions.Commit(S.CommitRequest(session_id=sid), metadata=md).task_id
    for _ in r.tasks.WatchTask(K.WatchTaskRequest(task_id=task_id), metadata=md, timeout=30):
        pass
    task = r.tasks.GetTask(K.GetTaskRequest(task_id=task_id), metadata=md)
    assert task.state == K.TASK_STATE_COMPLETED, task
    return task


def changes(r: Running, md: tuple[tuple[str, str], ...] = (), **filters: Any
            ) -> list[M.MemoryChange]:
    return list(r.memories.ListMemoryChanges(M.ListMemoryChangesRequest(
        page_size=1000, **filters), metadata=md).changes)


def revert(r: Running, sid: str, index: int, force: bool = False,
           md: tuple[tuple[str, str], ...] = (), request_id: str = "") -> K.Task:
    task = r.sessions.RevertArchive(S.RevertArchiveRequest(
        session_id=sid, index=index, force=force, request_id=request_id), metadata=md)
    assert task.task_type == "archive_revert"
    return task


def finished(r: Running, task_id: str) -> K.Task:
    return wait_task(r.tasks, task_id, timeout=30)


def failure(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def details(err: grpc.RpcError
            ) -> tuple[str, list[error_details_pb2.PreconditionFailure.Violation]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    reason, violations = "", []
    for d in status.details:
        info, pre = error_details_pb2.ErrorInfo(), error_details_pb2.PreconditionFailure()
        if d.Unpack(info):
            reason = info.reason
        elif d.Unpack(pre):
            violations = list(pre.violations)
    return reason, violations


def profile(r: Running) -> M.Memory | None:
    found = [m for m in r.memories.ListMemories(M.ListMemoriesRequest(
        category=M.MEMORY_CATEGORY_PROFILE)).memories]
    return found[0] if found else None


def memory_hits(r: Running, query: str) -> list[str]:
    items = r.memories.Recall(M.RecallRequest(query=query, kinds=[M.RECALL_KIND_MEMORY])).items
    return [i.text for i in items]


def test_history_records_phase2_changes_and_pages(start: Start) -> None:
    r = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s"))
    t1 = commit(r, "s", "My name is Ada.", "I prefer green tea in the morning.")
    t2 = commit(r, "s", "I live in Zanzibar.", "I prefer the vim editor.")
    first = changes(r, session_id="s", archive_index=1)
    assert sorted((c.op, c.category) for c in first) == sorted([
        (M.MEMORY_CHANGE_OP_CREATED, M.MEMORY_CATEGORY_PROFILE),
        (M.MEMORY_CHANGE_OP_CREATED, M.MEMORY_CATEGORY_PREFERENCES)])
    assert all(c.task_id == t1.task_id and not c.HasField("before") and c.after.content
               and c.archive_uri == t1.archive_uri for c in first)
    second = changes(r, session_id="s", archive_index=2)
    updated = [c for c in second if c.op == M.MEMORY_CHANGE_OP_UPDATED]
    assert len(updated) == 1 and updated[0].category == M.MEMORY_CATEGORY_PROFILE
    assert updated[0].before.content == "name: Ada"
    assert updated[0].after.content == "name: Ada\nlocation: Zanzibar"
    assert updated[0].task_id == t2.task_id
    assert [c.op for c in second].count(M.MEMORY_CHANGE_OP_CREATED) == 1
    # by memory: the profile's two changes, in order
    pid = updated[0].memory_id
    assert [c.op for c in changes(r, memory_id=pid)] == [M.MEMORY_CHANGE_OP_CREATED,
                                                       M.MEMORY_CHANGE_OP_UPDATED]
    # the whole session, oldest first, one page at a time
    every = changes(r, session_id="s")
    assert len(every) == 4 and [c.seq for c in every] == sorted(c.seq for c in every)
    paged: list[M.MemoryChange] = []
    token = ""
    while True:
        page = r.memories.ListMemoryChanges(M.ListMemoryChangesRequest(
            session_id="s", page_size=1, page_token=token))
        assert len(page.changes) <= 1
        paged += page.changes
        token = page.next_page_token
        if not token:
            break
    assert [c.change_id for c in paged] == [c.change_id for c in every]
    # DeleteMemory is recorded too (no session, no archive)
    tea = next(c.memory_id for c in first if c.category == M.MEMORY_CATEGORY_PREFERENCES)
    r.memories.DeleteMemory(M.DeleteMemoryRequest(memory_id=tea))
    gone = changes(r, memory_id=tea)
    assert [c.op for c in gone] == [M.MEMORY_CHANGE_OP_CREATED, M.MEMORY_CHANGE_OP_DELETED]
    assert gone[1].session_id == "" and gone[1].before.content and not gone[1].HasField("after")
    assert len(changes(r)) == 5  # no filter: every change of the caller


def test_revert_without_conflict_restores_and_unindexes(start: Start) -> None:
    r = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s"))
    commit(r, "s", "My name is Ada.", "I prefer green tea in the morning.")
    commit(r, "s", "I live in Zanzibar.", "I prefer the vim editor.")
    assert any("Zanzibar" in t for t in memory_hits(r, "Zanzibar"))
    assert any("vim" in t for t in memory_hits(r, "vim editor"))
    task = revert(r, "s", 2)
    assert task.state == K.TASK_STATE_PENDING and task.archive_uri.endswith("000002")
    items = watch_all(r.tasks, task.task_id)
    kinds = [e.kind for e in events(items)]
    assert kinds == [K.TASK_EVENT_KIND_CREATED, K.TASK_EVENT_KIND_STARTED,
                     K.TASK_EVENT_KIND_STAGE_STARTED, K.TASK_EVENT_KIND_STAGE_COMPLETED,
                     K.TASK_EVENT_KIND_COMPLETED]
    done = finished(r, task.task_id)
    assert done.state == K.TASK_STATE_COMPLETED and done.stage == "revert"
    assert (done.result.revert.deleted, done.result.revert.restored) == (1, 1)
    p = profile(r)
    assert p is not None and p.content == "name: Ada"
    assert memory_hits(r, "Zanzibar") == [] and memory_hits(r, "vim editor") == []
    assert not r.memories.SearchMemories(M.SearchMemoriesRequest(query="vim")).results
    # the archive and its messages stay
    arch = r.sessions.GetArchive(S.GetArchiveRequest(session_id="s", index=2))
    assert len(arch.messages) == 2
    # the revert is history too
    rev = [c for c in changes(r, session_id="s", archive_index=2)
           if c.op == M.MEMORY_CHANGE_OP_REVERTED]
    assert len(rev) == 2 and all(c.task_id == task.task_id for c in rev)
    assert {c.HasField("after") for c in rev} == {True, False}
    # a second revert is refused; replaying the first request is not a second revert
    err = failure(lambda: revert(r, "s", 2))
    assert err.code() == C.FAILED_PRECONDITION and details(err)[0] == "ALREADY_REVERTED"
    # archive 1 next: archive 2's changes were reverted, so they are no conflict
    t1 = finished(r, revert(r, "s", 1).task_id)
    assert t1.state == K.TASK_STATE_COMPLETED and t1.result.revert.deleted == 2
    assert profile(r) is None and memory_hits(r, "Ada") == []


def test_revert_conflict_lists_later_changes_and_force_overrides(start: Start) -> None:
    r = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s"))
    commit(r, "s", "My name is Ada.", "I prefer green tea in the morning.")
    commit(r, "s", "I live in Zanzibar.")
    tea = next(c.memory_id for c in changes(r, session_id="s", archive_index=1)
               if c.category == M.MEMORY_CATEGORY_PREFERENCES)
    r.memories.DeleteMemory(M.DeleteMemoryRequest(memory_id=tea))
    later = {c.change_id for c in changes(r) if c.archive_index != 1}
    assert len(later) == 2  # archive 2's profile update, the user's delete
    err = failure(lambda: revert(r, "s", 1))
    assert err.code() == C.FAILED_PRECONDITION
    reason, violations = details(err)
    assert reason == "REVERT_CONFLICT"
    assert {v.subject for v in violations} == later
    assert all(v.type == "MEMORY_CHANGED_LATER" for v in violations)
    assert any("DeleteMemory" in v.description for v in violations)
    assert any("000002" in v.description for v in violations)
    assert len(err.details() or "") <= 600
    # nothing was queued
    assert not r.tasks.ListTasks(K.ListTasksRequest(task_type="archive_revert")).tasks
    forced = finished(r, revert(r, "s", 1, force=True, request_id="rv-1").task_id)
    assert forced.state == K.TASK_STATE_COMPLETED
    assert forced.result.revert.conflicts_overridden == 2
    assert forced.result.revert.deleted == 1  # the profile (tea was already gone)
    assert profile(r) is None
    # replaying the request returns the same task, no second revert
    again = revert(r, "s", 1, force=True, request_id="rv-1")
    assert again.task_id == forced.task_id


def test_revert_rejects_bad_input_and_other_identities(start: Start) -> None:
    r = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s"))
    commit(r, "s", "My name is Ada.")
    other = (("x-sessiond-user", "bob"),)
    cases: list[tuple[Callable[[], object], C]] = [
        (lambda: revert(r, "", 1), C.INVALID_ARGUMENT),
        (lambda: revert(r, "s", 0), C.INVALID_ARGUMENT),
        (lambda: revert(r, "s", -1), C.INVALID_ARGUMENT),
        (lambda: revert(r, "s", 2**40), C.INVALID_ARGUMENT),
        (lambda: revert(r, "nope", 1), C.NOT_FOUND),
        (lambda: revert(r, "s", 7), C.NOT_FOUND),
        (lambda: revert(r, "s", 1, md=other), C.NOT_FOUND),
        (lambda: changes(r, archive_index=1), C.INVALID_ARGUMENT),
        (lambda: changes(r, session_id="s", archive_index=-1), C.INVALID_ARGUMENT),
        (lambda: r.memories.ListMemoryChanges(M.ListMemoryChangesRequest(page_size=-1)),
         C.INVALID_ARGUMENT),
        (lambda: r.memories.ListMemoryChanges(M.ListMemoryChangesRequest(page_token="x!")),
         C.INVALID_ARGUMENT),
        (lambda: r.sessions.GetSessionUsage(S.GetSessionUsageRequest(session_id="nope")),
         C.NOT_FOUND),
        (lambda: r.sessions.GetSessionUsage(S.GetSessionUsageRequest(session_id="s",
                                                                     archive_index=9)),
         C.NOT_FOUND),
        (lambda: r.sessions.GetSessionUsage(S.GetSessionUsageRequest(session_id="s"),
                                            metadata=other), C.NOT_FOUND),
    ]
    for call, code in cases:
        assert failure(call).code() == code
    # another identity sees none of the history
    assert changes(r, md=other) == [] and changes(r, md=other, session_id="s") == []
    assert len(changes(r)) == 1


class HoldSecond(OfflineEngine):
    """Offline engine that holds the summary of archive 2 until released."""

    name = "hold-second"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

    async def summarize(self, request: SummaryRequest,
                        report: RetryReporter = no_report) -> SummaryResponse:
        if request.archive_index == 2:
            self.entered.set()
            while not self.gate.is_set():  # noqa: ASYNC110 - a threading gate
                await asyncio.sleep(0.01)
        return await super().summarize(request, report)


def test_revert_task_rechecks_conflicts_before_it_writes(start: Start) -> None:
    """Queued while a later archive's Phase 2 runs (no conflict yet); that Phase 2
    then changes the same memory, so the revert task ends FAILED_PRECONDITION
    (REVERT_CONFLICT) and changes nothing."""
    engine = HoldSecond()
    r = start(engine=engine)
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s"))
    commit(r, "s", "My name is Ada.")
    add(r.sessions, "s", "I live in Zanzibar.")
    second = r.sessions.Commit(S.CommitRequest(session_id="s")).task_id
    assert engine.entered.wait(10)
    queued = revert(r, "s", 1)  # archive 2 has written nothing yet: no conflict
    assert queued.state == K.TASK_STATE_PENDING
    engine.gate.set()
    assert finished(r, second).state == K.TASK_STATE_COMPLETED
    failed = finished(r, queued.task_id)
    assert failed.state == K.TASK_STATE_FAILED and failed.error.code == 9
    assert "later change" in failed.error.message
    p = profile(r)
    assert p is not None and p.content == "name: Ada\nlocation: Zanzibar"
    assert not [c for c in changes(r) if c.op == M.MEMORY_CHANGE_OP_REVERTED]
    # a failed revert does not count as one: with force it goes through
    assert finished(r, revert(r, "s", 1, force=True).task_id).state == \
        K.TASK_STATE_COMPLETED
    assert profile(r) is None


def test_revert_waits_for_phase2_to_end(server_factory: ServerFactory, tmp_path: Path
                                        ) -> None:
    engine = GatedEngine()
    r = server_factory(engine=engine, data_dir=tmp_path / "gated")
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s"))
    add(r.sessions, "s", "My name is Ada.")
    task_id = r.sessions.Commit(S.CommitRequest(session_id="s")).task_id
    assert engine.entered.wait(10)
    err = failure(lambda: revert(r, "s", 1))
    assert err.code() == C.FAILED_PRECONDITION and details(err)[0] == "ARCHIVE_NOT_SETTLED"
    engine.release()
    finished(r, task_id)
    assert finished(r, revert(r, "s", 1).task_id).state == K.TASK_STATE_COMPLETED
    # a cancelled Phase 2 may be reverted; its archive's Phase 2 then never runs again
    engine2 = GatedEngine()
    r2 = server_factory(engine=engine2, data_dir=tmp_path / "gated2")
    r2.sessions.CreateSession(S.CreateSessionRequest(session_id="c"))
    add(r2.sessions, "c", "My name is Bea.")
    cancelled = r2.sessions.Commit(S.CommitRequest(session_id="c")).task_id
    assert engine2.entered.wait(10)
    r2.tasks.CancelTask(K.CancelTaskRequest(task_id=cancelled))
    assert finished(r2, cancelled).state == K.TASK_STATE_CANCELLED
    done = finished(r2, revert(r2, "c", 1).task_id)
    assert done.state == K.TASK_STATE_COMPLETED and done.result.revert.deleted == 0
    err = failure(lambda: r2.tasks.RetryTask(K.RetryTaskRequest(task_id=cancelled)))
    assert err.code() == C.FAILED_PRECONDITION and details(err)[0] == "ARCHIVE_REVERTED"


def test_session_usage_lists_uris_and_active_counts(start: Start) -> None:
    r = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s"))
    r.sessions.RecordUsage(S.RecordUsageRequest(
        session_id="s", context_uris=["viking://resources/a", "viking://resources/b"]))
    commit(r, "s", "hello there")
    r.sessions.RecordUsage(S.RecordUsageRequest(session_id="s",
                                                context_uris=["viking://resources/a"]))
    commit(r, "s", "and again")
    whole = r.sessions.GetSessionUsage(S.GetSessionUsageRequest(session_id="s"))
    assert [(u.uri, u.active_count) for u in whole.uris] == [
        ("viking://resources/a", 2), ("viking://resources/b", 1)]
    second = r.sessions.GetSessionUsage(S.GetSessionUsageRequest(session_id="s",
                                                                 archive_index=2))
    assert [u.uri for u in second.uris] == ["viking://resources/a"]
    page = r.sessions.GetSessionUsage(S.GetSessionUsageRequest(session_id="s", page_size=1))
    assert len(page.uris) == 1 and page.next_page_token
    rest = r.sessions.GetSessionUsage(S.GetSessionUsageRequest(
        session_id="s", page_size=1, page_token=page.next_page_token))
    assert [u.uri for u in rest.uris] == ["viking://resources/b"] and not rest.next_page_token


def test_revert_keeps_vectors_in_step(server_factory: ServerFactory, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With an embedder, the restored memory gets the vector of its restored text and
    the deleted one loses its vector: every entry has exactly its vector again."""
    from sessiond.server.domain.values import Identity
    from sessiond.server.embedders.openai import OpenAIEmbedder

    from tests.embedders.fake_embeddings import FakeEmbeddings
    from tests.embedders.test_openai_embedder import FAST, KEY, KEY_ENV, settings

    fake = FakeEmbeddings().start()
    try:
        monkeypatch.setenv(KEY_ENV, KEY)
        embedder = OpenAIEmbedder(settings(fake), backoff=FAST)
        r = server_factory(embedder=embedder, data_dir=tmp_path / "emb")
        store, ident = r.app.store, Identity()

        def counts() -> tuple[int, int]:
            return (r.loop.run(store.recall_entry_count(ident)),
                    r.loop.run(store.vector_count(ident, embedder.model)))

        r.sessions.CreateSession(S.CreateSessionRequest(session_id="s"))
        commit(r, "s", "My name is Ada.")
        before = counts()
        commit(r, "s", "I live in Zanzibar.", "I prefer the vim editor.")
        assert counts()[0] == counts()[1] > before[0]
        calls = len(fake.received)
        done = finished(r, revert(r, "s", 2).task_id)
        assert done.state == K.TASK_STATE_COMPLETED
        assert len(fake.received) == calls + 1  # the restored profile was embedded
        entries, vectors = counts()
        assert entries == vectors  # no entry without its vector, no stray vector
        # (the dense ranking returns the nearest memory; none holds the fact any more)
        assert not [t for t in memory_hits(r, "Zanzibar") if "Zanzibar" in t]
    finally:
        fake.stop()
