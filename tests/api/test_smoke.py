from __future__ import annotations

from sessiond.v1 import session_pb2, task_pb2

from tests.conftest import Running


def text(role: session_pb2.Role.ValueType, t: str) -> session_pb2.AddMessageRequest:
    return session_pb2.AddMessageRequest(role=role, parts=[session_pb2.Part(
        text=session_pb2.TextPart(text=t))])


def test_commit_and_watch(server: Running) -> None:
    s = server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s1"))
    assert s.session_id == "s1"
    for i in range(3):
        req = text(session_pb2.ROLE_USER, f"My name is Alice. I prefer tea {i}?")
        req.session_id = "s1"
        server.sessions.AddMessage(req)
    reply = server.sessions.Commit(session_pb2.CommitRequest(session_id="s1"))
    assert reply.archived and reply.task_id
    items = list(server.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                        timeout=10))
    assert items[0].WhichOneof("kind") == "snapshot"
    kinds = [i.event.kind for i in items[1:] if i.WhichOneof("kind") == "event"]
    assert kinds[-1] == task_pb2.TASK_EVENT_KIND_COMPLETED, items
    seqs = [i.event.seq for i in items[1:] if i.WhichOneof("kind") == "event"]
    assert seqs == list(range(1, len(seqs) + 1))
    ctx = server.sessions.GetSessionContext(session_pb2.GetSessionContextRequest(session_id="s1"))
    assert "## Overview" in ctx.latest_archive_overview
    meta = server.sessions.GetSession(session_pb2.GetSessionRequest(session_id="s1"))
    assert meta.commit_count == 1 and meta.memories_extracted.total > 0, meta
