from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from sessiond.v1 import memory_pb2, session_pb2, task_pb2

from tests.api.helpers import add
from tests.conftest import Running

ALICE = (("x-sessiond-user", "alice"),)
BOB = (("x-sessiond-user", "bob"),)


def test_other_identity_gets_not_found_everywhere(server: Running) -> None:
    s = server.sessions
    s.CreateSession(session_pb2.CreateSessionRequest(session_id="shared"), metadata=ALICE)
    add(s, "shared", "My name is Alice. I prefer dark mode.", metadata=ALICE)
    reply = s.Commit(session_pb2.CommitRequest(session_id="shared"), metadata=ALICE)
    list(server.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                metadata=ALICE, timeout=20))
    calls: list[Callable[[], object]] = [
        lambda: s.GetSession(session_pb2.GetSessionRequest(session_id="shared"), metadata=BOB),
        lambda: add(s, "shared", "intrude", metadata=BOB),
        lambda: s.Commit(session_pb2.CommitRequest(session_id="shared"), metadata=BOB),
        lambda: s.GetArchive(session_pb2.GetArchiveRequest(session_id="shared", index=1),
                             metadata=BOB),
        lambda: s.GetSessionContext(session_pb2.GetSessionContextRequest(session_id="shared"),
                                    metadata=BOB),
        lambda: s.DeleteSession(session_pb2.DeleteSessionRequest(session_id="shared"),
                                metadata=BOB),
        lambda: server.tasks.GetTask(task_pb2.GetTaskRequest(task_id=reply.task_id),
                                     metadata=BOB),
        lambda: server.tasks.CancelTask(task_pb2.CancelTaskRequest(task_id=reply.task_id),
                                        metadata=BOB),
        lambda: list(server.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                            metadata=BOB, timeout=5)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # the default identity does not see alice's data either
    assert not s.ListSessions(session_pb2.ListSessionsRequest()).sessions
    assert not server.tasks.ListTasks(task_pb2.ListTasksRequest()).tasks
    assert not server.memories.ListMemories(memory_pb2.ListMemoriesRequest()).memories
    mine = server.memories.ListMemories(memory_pb2.ListMemoriesRequest(), metadata=ALICE)
    assert mine.memories
    with pytest.raises(grpc.RpcError) as err:
        server.memories.GetMemory(memory_pb2.GetMemoryRequest(
            memory_id=mine.memories[0].memory_id), metadata=BOB)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # bob may use the same session id for his own session: ids are per identity
    s.CreateSession(session_pb2.CreateSessionRequest(session_id="shared"), metadata=BOB)
    assert s.GetSession(session_pb2.GetSessionRequest(session_id="shared"),
                        metadata=BOB).message_count == 0


def test_bad_identity_metadata_is_invalid_argument(server: Running) -> None:
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.ListSessions(session_pb2.ListSessionsRequest(),
                                     metadata=(("x-sessiond-user", "bad user!"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
