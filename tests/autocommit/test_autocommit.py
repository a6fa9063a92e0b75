"""Auto-commit over a real server on both backends: a session's own policy
(UpdateSessionConfig) and the server default, commits by message count, by estimated
tokens and by idle time, keep_recent_count, the trigger on the task, and the errors."""

from __future__ import annotations

import time

import grpc
import pytest
from sessiond.server.domain.autocommit import AutoCommitPolicy
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import add, text_part, wait_task
from tests.api.test_sessions import details
from tests.autocommit.conftest import Start
from tests.conftest import Running

S, K = session_pb2, task_pb2


def configure(r: Running, sid: str, **policy: int) -> S.Session:
    return r.sessions.UpdateSessionConfig(S.UpdateSessionConfigRequest(
        session_id=sid, auto_commit=S.AutoCommitPolicy(**policy)))


def tasks_of(r: Running, sid: str) -> list[K.Task]:
    return list(r.tasks.ListTasks(K.ListTasksRequest(session_id=sid)).tasks)


def archives(r: Running, sid: str) -> list[S.Archive]:
    return list(r.sessions.ListArchives(S.ListArchivesRequest(session_id=sid)).archives)


def live_texts(r: Running, sid: str) -> list[str]:
    ctx = r.sessions.GetSessionContext(S.GetSessionContextRequest(session_id=sid))
    return [m.parts[0].text.text for m in ctx.current_messages]


def test_commit_by_message_count_keeps_the_newest(start: Start) -> None:
    r: Running = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    meta = configure(r, "s1", max_messages=4, keep_recent_count=1)
    assert not meta.auto_commit_inherited
    assert (meta.auto_commit.max_messages, meta.auto_commit.keep_recent_count) == (4, 1)
    for i in range(3):
        add(r.sessions, "s1", f"message {i}")
    assert tasks_of(r, "s1") == []
    add(r.sessions, "s1", "message 3")  # the 4th live message: commit, keep 1
    (task,) = tasks_of(r, "s1")
    assert task.commit_trigger == K.COMMIT_TRIGGER_MESSAGES
    (arch,) = archives(r, "s1")
    assert arch.message_count == 3 and arch.task_id == task.task_id
    assert live_texts(r, "s1") == ["message 3"]
    done = wait_task(r.tasks, task.task_id)
    assert done.state == K.TASK_STATE_COMPLETED  # an ordinary Phase 2
    first = r.tasks.WatchTask(K.WatchTaskRequest(task_id=task.task_id))
    created = next(i.event for i in first if i.WhichOneof("kind") == "event")
    assert "auto-commit: messages" in created.message
    # 1 kept + 3 more: the next commit, and again only one
    for i in range(4, 7):
        add(r.sessions, "s1", f"message {i}")
    assert [t.commit_trigger for t in tasks_of(r, "s1")] == [K.COMMIT_TRIGGER_MESSAGES] * 2
    assert [a.message_count for a in archives(r, "s1")] == [3, 3]
    assert live_texts(r, "s1") == ["message 6"]


def test_a_batch_that_passes_the_count_commits_once(start: Start) -> None:
    r: Running = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    configure(r, "s1", max_messages=3)
    reply = r.sessions.AddMessages(S.AddMessagesRequest(session_id="s1", messages=[
        S.NewMessage(role=S.ROLE_USER, parts=[text_part(f"m{i}")]) for i in range(5)]))
    assert len(reply.results) == 5
    (task,) = tasks_of(r, "s1")
    assert task.commit_trigger == K.COMMIT_TRIGGER_MESSAGES
    assert [a.message_count for a in archives(r, "s1")] == [5]
    assert live_texts(r, "s1") == []
    # a manual commit is MANUAL
    add(r.sessions, "s1", "after")
    out = r.sessions.Commit(S.CommitRequest(session_id="s1"))
    assert r.tasks.GetTask(K.GetTaskRequest(task_id=out.task_id)).commit_trigger == \
        K.COMMIT_TRIGGER_MANUAL


def test_commit_by_estimated_tokens(start: Start) -> None:
    r: Running = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    configure(r, "s1", max_tokens=20)  # 80 bytes of text
    add(r.sessions, "s1", "x" * 40)
    assert tasks_of(r, "s1") == []
    add(r.sessions, "s1", "y" * 40)
    (task,) = tasks_of(r, "s1")
    assert task.commit_trigger == K.COMMIT_TRIGGER_TOKENS
    assert archives(r, "s1")[0].message_count == 2


def test_commit_after_idle_time(start: Start) -> None:
    r: Running = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    configure(r, "s1", idle_seconds=1, keep_recent_count=1)
    add(r.sessions, "s1", "one")
    add(r.sessions, "s1", "two")
    assert tasks_of(r, "s1") == []
    deadline = time.monotonic() + 15
    while not tasks_of(r, "s1") and time.monotonic() < deadline:
        time.sleep(0.1)
    (task,) = tasks_of(r, "s1")
    assert task.commit_trigger == K.COMMIT_TRIGGER_IDLE
    assert archives(r, "s1")[0].message_count == 1 and live_texts(r, "s1") == ["two"]
    time.sleep(1.5)  # fired once: the kept message does not commit again
    assert len(tasks_of(r, "s1")) == 1
    assert wait_task(r.tasks, task.task_id).state == K.TASK_STATE_COMPLETED


def test_the_server_default_applies_until_a_session_has_its_own(start: Start) -> None:
    r: Running = start(auto_commit=AutoCommitPolicy(max_messages=2))
    meta = r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    assert meta.auto_commit_inherited and meta.auto_commit.max_messages == 2
    add(r.sessions, "s1", "a")
    add(r.sessions, "s1", "b")
    assert [t.commit_trigger for t in tasks_of(r, "s1")] == [K.COMMIT_TRIGGER_MESSAGES]
    # its own policy: off
    own = r.sessions.UpdateSessionConfig(S.UpdateSessionConfigRequest(
        session_id="s1", auto_commit=S.AutoCommitPolicy()))
    assert not own.auto_commit_inherited and own.auto_commit.max_messages == 0
    for t in ("c", "d", "e"):
        add(r.sessions, "s1", t)
    assert len(tasks_of(r, "s1")) == 1
    # back to the default: the 3 live messages pass it at once
    back = r.sessions.UpdateSessionConfig(S.UpdateSessionConfigRequest(
        session_id="s1", reset_auto_commit=True))
    assert back.auto_commit_inherited and back.auto_commit.max_messages == 2
    assert len(tasks_of(r, "s1")) == 2 and back.live_message_count == 0
    listed = r.sessions.ListSessions(S.ListSessionsRequest()).sessions
    assert listed[0].auto_commit.max_messages == 2


def test_policy_errors(start: Start) -> None:
    r: Running = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    bad = [
        (S.UpdateSessionConfigRequest(session_id="s1", auto_commit=S.AutoCommitPolicy(
            max_messages=-1, idle_seconds=-5)),
         {"auto_commit.max_messages", "auto_commit.idle_seconds"}),
        (S.UpdateSessionConfigRequest(session_id="s1", auto_commit=S.AutoCommitPolicy(
            max_messages=3, keep_recent_count=3)), {"auto_commit.keep_recent_count"}),
        (S.UpdateSessionConfigRequest(session_id="s1", auto_commit=S.AutoCommitPolicy(
            idle_seconds=10**12)), {"auto_commit.idle_seconds"}),
        (S.UpdateSessionConfigRequest(session_id="s1"), {"auto_commit"}),
        (S.UpdateSessionConfigRequest(session_id="s1", reset_auto_commit=True,
                                      auto_commit=S.AutoCommitPolicy()), {"auto_commit"}),
        (S.UpdateSessionConfigRequest(session_id="", reset_auto_commit=True), {"session_id"}),
    ]
    for req, fields in bad:
        with pytest.raises(grpc.RpcError) as err:
            r.sessions.UpdateSessionConfig(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
        _, violations = details(err.value)
        assert violations is not None
        assert {v.field for v in violations.field_violations} == fields
    with pytest.raises(grpc.RpcError) as err:
        r.sessions.UpdateSessionConfig(S.UpdateSessionConfigRequest(
            session_id="nope", reset_auto_commit=True))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # nothing changed
    meta = r.sessions.GetSession(S.GetSessionRequest(session_id="s1"))
    assert meta.auto_commit_inherited and meta.auto_commit.max_messages == 0
