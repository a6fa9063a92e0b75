"""The extract stage writes a large extraction in batches (so it never holds the store
writer long): over a real server, the memories and their counts are the same as with
one transaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from sessiond.server.phase2 import pipeline
from sessiond.v1 import memory_pb2, session_pb2, task_pb2

from tests.api.helpers import add, wait_task
from tests.conftest import ServerFactory

TEXTS = [f"We use project Atlas{i} for the billing work and the service Relay{i} too."
         for i in range(12)] + ["My name is Alice Smith.", "I prefer tea over coffee."]


def _run(server_factory: ServerFactory, data: Path, user: str
         ) -> tuple[task_pb2.Task, int, list[str]]:
    r = server_factory(data_dir=data / user)  # a server of its own, default identity
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s"))
    for t in TEXTS:
        add(r.sessions, "s", t)
    task_id = r.sessions.Commit(session_pb2.CommitRequest(session_id="s")).task_id
    task = wait_task(r.tasks, task_id)
    listed = r.memories.ListMemories(memory_pb2.ListMemoriesRequest(page_size=1000)).memories
    return task, len(listed), sorted(f"{m.category}:{m.content}" for m in listed)


def test_batched_extraction_matches_one_transaction(server_factory: ServerFactory,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    whole, n_whole, memories_whole = _run(server_factory, tmp_path, "one")
    monkeypatch.setattr(pipeline, "MEMORY_BATCH", 3)
    batched, n_batched, memories_batched = _run(server_factory, tmp_path, "batched")
    assert whole.state == batched.state == task_pb2.TASK_STATE_COMPLETED
    assert n_whole > 3 * 3  # enough memories for several batches
    assert n_batched == n_whole and memories_batched == memories_whole
    assert batched.result.memories_extracted == whole.result.memories_extracted
    counts = batched.result.memories_extracted
    assert counts.total == n_batched
