"""The storage contract of imports (`import_session`, `import_archive`,
`import_memory`) on every backend: each is written at most once, archives carry the
imported state in their task, and what was imported is searchable and claimable."""

from __future__ import annotations

import dataclasses

import pytest
from sessiond.server.domain import limits as dl
from sessiond.server.domain.errors import ErrorCode, NotFound, QuotaExceeded
from sessiond.server.domain.imports import (
    ImportedArchive,
    ImportedMemory,
    ImportedSession,
    ImportedState,
)
from sessiond.server.domain.values import (
    ArchiveState,
    EventKind,
    Identity,
    MemoryCategory,
    MemoryCounts,
    Stage,
    TaskError,
    TaskState,
    TokenUsage,
    memory_owner,
)
from sessiond.server.store.base import Store

from tests.contract.conftest import Runner
from tests.contract.test_store_contract import ID, OTHER_USER, at, msg


def session(sid: str = "ov1", identity: Identity = ID) -> ImportedSession:
    return ImportedSession(identity=identity, session_id=sid, created_at=at(0),
                           updated_at=at(5), memories_extracted=MemoryCounts(profile=2),
                           llm_token_usage=TokenUsage(7, 3), last_commit_at=at(4))


def archive(index: int, state: ImportedState, *cids: str, sid: str = "ov1",
            task: str = "") -> ImportedArchive:
    messages = tuple(dataclasses.replace(msg(f"{sid} archived {c}", 1), client_message_id=c)
                     for c in cids)
    err = TaskError(ErrorCode.INTERNAL, "OpenViking Phase 2 failed at x: boom",
                    reason="IMPORTED_FAILED") if state is ImportedState.FAILED else None
    return ImportedArchive(identity=ID, session_id=sid, index=index, state=state,
                           messages=messages, task_id=task or f"task_imp_{sid}_{index}",
                           created_at=at(1), overview=f"overview {index}",
                           abstract=f"abstract {index}", completed_at=at(3), error=err)


def test_import_session_once_with_its_metadata(store: Store, run: Runner) -> None:
    assert run(store.import_session(session()))
    assert not run(store.import_session(dataclasses.replace(session(), updated_at=at(50))))
    meta = run(store.get_session(ID, "ov1"))
    assert meta is not None and meta.created_at == at(0) and meta.updated_at == at(5)
    assert meta.memories_extracted.profile == 2 and meta.llm_token_usage == TokenUsage(7, 3)
    assert meta.last_commit_at == at(4)
    assert run(store.get_session(OTHER_USER, "ov1")) is None
    store.limits = dataclasses.replace(dl.DEFAULT_LIMITS, sessions_per_identity=1)
    with pytest.raises(QuotaExceeded):
        run(store.import_session(session("ov2")))


def test_import_archives_in_their_state_once(store: Store, run: Runner) -> None:
    with pytest.raises(NotFound):
        run(store.import_archive(archive(1, ImportedState.DONE, "a"), at(9)))
    run(store.import_session(session()))
    done = run(store.import_archive(archive(1, ImportedState.DONE, "a", "b"), at(9)))
    assert done.created and done.duplicates == 0
    failed = run(store.import_archive(archive(2, ImportedState.FAILED, "c", "a"), at(9)))
    assert failed.created and failed.duplicates == 1  # "a" is in archive 1 already
    assert run(store.import_archive(archive(5, ImportedState.PENDING, "e"), at(9))).created
    again = run(store.import_archive(archive(1, ImportedState.DONE, "a", "b", task="t2"),
                                     at(10)))
    assert not again.created
    meta = run(store.get_session(ID, "ov1"))
    assert meta is not None
    assert (meta.archive_count, meta.commit_count, meta.message_count) == (5, 1, 4)

    a1 = run(store.get_archive(ID, "ov1", 1))
    assert a1 is not None and a1.state is ArchiveState.DONE and a1.overview == "overview 1"
    assert a1.completed_at == at(3)
    assert [m.client_message_id for m in run(store.archive_messages(ID, "ov1", 1))] == \
        ["a", "b"]
    t1 = run(store.get_task("task_imp_ov1_1"))
    assert t1 is not None and t1.state is TaskState.COMPLETED
    assert t1.done_stage is Stage.FINALIZE
    assert [e.kind for e in run(store.list_events(t1.task_id, 0))] == \
        [EventKind.CREATED, EventKind.COMPLETED]
    a2 = run(store.get_archive(ID, "ov1", 2))
    assert a2 is not None and a2.state is ArchiveState.PENDING and a2.overview == ""
    t2 = run(store.get_task("task_imp_ov1_2"))
    assert t2 is not None and t2.state is TaskState.FAILED and t2.error is not None
    assert t2.error.reason == "IMPORTED_FAILED"
    # the PENDING one is claimable; live messages with an imported client id are duplicates
    claimed = run(store.claim_task("w1", at(20), at(50)))
    assert claimed is not None and claimed.task_id == "task_imp_ov1_5"
    added = run(store.add_messages(ID, "ov1", [dataclasses.replace(msg("x"),
                                                                   client_message_id="e")]))
    assert added[0].duplicate
    # an archive every message of which is stored already is not created
    assert not run(store.import_archive(archive(6, ImportedState.DONE, "a"), at(9))).created


def test_import_memory_once_and_searchable(store: Store, run: Runner) -> None:
    owner = memory_owner(ID, MemoryCategory.PREFERENCES)
    mem = ImportedMemory(owner=owner, category=MemoryCategory.PREFERENCES,
                         key="openviking:preferences/mem_1.md",
                         content="Prefers zeppelins to airplanes.", source_session_id="",
                         source_uri="openviking:x", created_at=at(0), updated_at=at(1))
    assert run(store.import_memory(mem))
    assert not run(store.import_memory(dataclasses.replace(mem, content="changed")))
    found = run(store.search_memories(ID, "zeppelins", None, 5))
    assert [m.content for m, _ in found] == ["Prefers zeppelins to airplanes."]
    assert found[0][0].created_at == at(0)
    assert not run(store.search_memories(OTHER_USER, "zeppelins", None, 5))
    # not indexed for Recall yet: reindex's pass finds it
    assert [e.memory_id for e in run(store.unindexed_memories("", 10))] == \
        [found[0][0].memory_id]
