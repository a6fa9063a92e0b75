"""MemoryService.Recall and GetSessionContext's budget, over a real server."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import timestamp_pb2
from sessiond.v1 import memory_pb2, session_pb2, task_pb2

from tests.api.helpers import add
from tests.conftest import Running

ALICE = (("x-sessiond-user", "alice"),)
BOB = (("x-sessiond-user", "bob"),)

TURNS = [
    (session_pb2.ROLE_USER, "Hi, my name is Ada. We adopted a puppy named Biscuit."),
    (session_pb2.ROLE_ASSISTANT, "Lovely! What breed is Biscuit?"),
    (session_pb2.ROLE_USER, "A golden retriever, three months old, very playful."),
    (session_pb2.ROLE_ASSISTANT, "Golden retrievers love water; try the lake on Sunday."),
    (session_pb2.ROLE_USER, "The deploy of project Atlas fails with a timeout error."),
    (session_pb2.ROLE_ASSISTANT, "Raise the health-check timeout to 30 s and redeploy."),
]


def _session(server: Running, sid: str = "s1",
             md: tuple[tuple[str, str], ...] = ALICE) -> dict[str, str]:
    """Add the turns, commit, wait for Phase 2; text -> message id."""
    s = server.sessions
    s.GetSession(session_pb2.GetSessionRequest(session_id=sid, auto_create=True), metadata=md)
    ids = {text: add(s, sid, text, role, metadata=md).id for role, text in TURNS}
    reply = s.Commit(session_pb2.CommitRequest(session_id=sid), metadata=md)
    list(server.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                metadata=md, timeout=20))
    task = server.tasks.GetTask(task_pb2.GetTaskRequest(task_id=reply.task_id), metadata=md)
    assert task.state == task_pb2.TASK_STATE_COMPLETED
    return ids


def _recall(server: Running, md: tuple[tuple[str, str], ...] = ALICE,
            **kw: object) -> memory_pb2.RecallResponse:
    resp: memory_pb2.RecallResponse = server.memories.Recall(
        memory_pb2.RecallRequest(**kw), metadata=md)  # type: ignore[arg-type]
    return resp


def _chars(resp: memory_pb2.RecallResponse) -> int:
    return len(resp.latest_archive_overview) + sum(len(i.text) for i in resp.items)


def test_recall_returns_the_turn_with_its_neighbours(server: Running) -> None:
    ids = _session(server)
    resp = _recall(server, query="what breed is the puppy?")
    top = resp.items[0]
    assert top.kind in (memory_pb2.RECALL_KIND_MESSAGE, memory_pb2.RECALL_KIND_MEMORY)
    msgs = [i for i in resp.items if i.kind == memory_pb2.RECALL_KIND_MESSAGE]
    assert msgs, resp
    first = msgs[0]
    assert ids[TURNS[1][1]] in first.message_ids  # "What breed is Biscuit?"
    assert len(first.message_ids) >= 2  # with a neighbouring turn
    assert "golden retriever" in first.text.lower() or any(
        "golden retriever" in i.text.lower() for i in resp.items)
    assert first.session_id == "s1" and first.archive_uri.endswith("/archives/000001")
    assert first.time.seconds > 0 and first.score > 0
    # no message appears in two message items
    seen: list[str] = [m for i in msgs for m in i.message_ids]
    assert len(seen) == len(set(seen))
    assert resp.latest_archive_overview == ""  # no session named


def test_every_kind_is_indexed_and_can_be_selected(server: Running) -> None:
    _session(server)
    for kind in (memory_pb2.RECALL_KIND_MESSAGE, memory_pb2.RECALL_KIND_MEMORY,
                 memory_pb2.RECALL_KIND_OVERVIEW):
        resp = _recall(server, query="Ada Atlas deploy timeout puppy Biscuit", kinds=[kind])
        assert resp.items, memory_pb2.RecallKind.Name(kind)
        assert {i.kind for i in resp.items} == {kind}
    mem = _recall(server, query="Ada", kinds=[memory_pb2.RECALL_KIND_MEMORY]).items[0]
    assert mem.memory_id and mem.archive_uri == ""


@pytest.mark.parametrize("budget", [1, 50, 200, 333, 1000, 4000])
def test_the_budget_is_honoured_exactly(server: Running, budget: int) -> None:
    _session(server)
    resp = _recall(server, query="golden retriever Atlas timeout Ada", session_id="s1",
                   max_chars=budget)
    assert _chars(resp) <= budget
    if budget >= 1000:
        # Six short turns: all of them are returned, and the overview comes first.
        assert resp.latest_archive_overview
        returned = {m for i in resp.items for m in i.message_ids}
        assert len(returned) >= 5


def test_default_budget_and_max_items(server: Running) -> None:
    _session(server)
    resp = _recall(server, query="golden retriever Atlas timeout Ada Biscuit", max_items=2)
    assert 1 <= len(resp.items) <= 2
    assert _chars(_recall(server, query="golden retriever Atlas timeout")) <= 4000


def test_recall_is_isolated_per_identity(server: Running) -> None:
    _session(server, md=ALICE)
    assert _recall(server, md=BOB, query="golden retriever Biscuit Atlas").items == []
    assert _recall(server, md=BOB, query="golden retriever", session_id="s1"
                   ).latest_archive_overview == ""


def test_time_filters(server: Running) -> None:
    _session(server)
    future = timestamp_pb2.Timestamp(seconds=4_000_000_000)
    assert _recall(server, query="golden retriever", since=future).items == []
    assert _recall(server, query="golden retriever", until=future).items


def test_deleting_the_session_removes_its_entries(server: Running) -> None:
    _session(server)
    server.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id="s1"),
                                  metadata=ALICE)
    resp = _recall(server, query="golden retriever Atlas timeout",
                   kinds=[memory_pb2.RECALL_KIND_MESSAGE, memory_pb2.RECALL_KIND_OVERVIEW])
    assert resp.items == []


def test_deleting_a_memory_removes_its_entry(server: Running) -> None:
    _session(server)
    mems = _recall(server, query="Ada", kinds=[memory_pb2.RECALL_KIND_MEMORY]).items
    for m in mems:
        server.memories.DeleteMemory(memory_pb2.DeleteMemoryRequest(memory_id=m.memory_id),
                                     metadata=ALICE)
    after = _recall(server, query="Ada", kinds=[memory_pb2.RECALL_KIND_MEMORY]).items
    assert {m.memory_id for m in after}.isdisjoint({m.memory_id for m in mems})


@pytest.mark.parametrize("request_kw, field", [
    ({"query": ""}, "query"),
    ({"query": "x" * 5000}, "query"),
    ({"query": "a", "max_chars": -1}, "max_chars"),
    ({"query": "a", "max_chars": 10_000_000}, "max_chars"),
    ({"query": "a", "max_items": 1000}, "max_items"),
    ({"query": "a", "kinds": [99]}, "kinds[0]"),
    ({"query": "a", "since": timestamp_pb2.Timestamp(seconds=20),
      "until": timestamp_pb2.Timestamp(seconds=10)}, "until"),
    ({"query": "a", "session_id": "bad\nid"}, "session_id"),
])
def test_bad_requests_are_invalid_argument(server: Running, request_kw: dict[str, object],
                                           field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        server.memories.Recall(memory_pb2.RecallRequest(**request_kw),  # type: ignore[arg-type]
                               metadata=ALICE)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details() or "") < 500


def test_a_query_of_stop_words_only_returns_nothing(server: Running) -> None:
    _session(server)
    assert _recall(server, query="what is the of").items == []


def test_session_context_budget(server: Running) -> None:
    _session(server)
    s = server.sessions
    for text in ("one more live message", "and the newest live message"):
        add(s, "s1", text, metadata=ALICE)
    full = s.GetSessionContext(session_pb2.GetSessionContextRequest(session_id="s1"),
                               metadata=ALICE)
    assert full.latest_archive_overview and len(full.current_messages) == 2
    budget = 60
    small = s.GetSessionContext(session_pb2.GetSessionContextRequest(
        session_id="s1", max_chars=budget), metadata=ALICE)
    text_len = sum(len(p.text.text) for m in small.current_messages for p in m.parts)
    assert len(small.latest_archive_overview) + text_len <= budget
    assert [m.parts[0].text.text for m in small.current_messages][-1:] == \
        ["and the newest live message"]
    with pytest.raises(grpc.RpcError) as err:
        s.GetSessionContext(session_pb2.GetSessionContextRequest(session_id="s1",
                                                                 max_chars=-5),
                            metadata=ALICE)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
