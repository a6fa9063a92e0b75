"""Every limit of `Limits` over a real server: configured, enforced, answered with the
documented code (INVALID_ARGUMENT for sizes, RESOURCE_EXHAUSTED + QuotaFailure for
quotas)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sessiond.server.cli import _parser, settings_from_args
from sessiond.server.domain.limits import Limits
from sessiond.v1 import memory_pb2, session_pb2, task_pb2

from tests.api.helpers import GatedEngine, add, text_part
from tests.conftest import ServerFactory

ALICE = (("x-sessiond-user", "alice"),)
BOB = (("x-sessiond-user", "bob"),)


def refused(fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    return err.value


def quota_of(err: grpc.RpcError) -> tuple[str, str]:
    """(ErrorInfo reason, QuotaFailure description) of a RESOURCE_EXHAUSTED answer."""
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    st = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert st is not None
    reason = description = ""
    for d in st.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason = info.reason
        elif d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            qf = error_details_pb2.QuotaFailure()
            d.Unpack(qf)
            description = qf.violations[0].description
    return reason, description


def test_live_messages_per_session(server_factory: ServerFactory) -> None:
    r = server_factory(limits=Limits(live_messages_per_session=3))
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="q"))
    for i in range(3):
        add(r.sessions, "q", f"m{i}")
    err = refused(add, r.sessions, "q", "one too many")
    assert quota_of(err) == ("LIVE_MESSAGES_QUOTA", "live_messages_per_session=3")
    assert r.sessions.GetSession(session_pb2.GetSessionRequest(session_id="q")).message_count == 3
    r.sessions.Commit(session_pb2.CommitRequest(session_id="q", keep_recent_count=1))
    add(r.sessions, "q", "room again")
    add(r.sessions, "q", "and again")
    assert quota_of(refused(add, r.sessions, "q", "full"))[0] == "LIVE_MESSAGES_QUOTA"


def test_live_bytes_per_session(server_factory: ServerFactory) -> None:
    r = server_factory(limits=Limits(live_bytes_per_session=1000, message_bytes=400))
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="b"))
    add(r.sessions, "b", "x" * 400)
    msg = r.sessions.AddMessage(session_pb2.AddMessageRequest(
        session_id="b", role=session_pb2.ROLE_TOOL,
        parts=[session_pb2.Part(tool=session_pb2.ToolPart(tool_id="t", tool_name="n"))])).message
    add(r.sessions, "b", "y" * 390)
    err = refused(add, r.sessions, "b", "z" * 300)
    assert quota_of(err) == ("LIVE_BYTES_QUOTA", "live_bytes_per_session=1000")
    # a tool output that grows the buffer past the quota is refused too
    update = session_pb2.UpdateToolPartRequest(session_id="b", message_id=msg.id, tool_id="t",
                                               output="o" * 300,
                                               status=session_pb2.TOOL_STATUS_COMPLETED)
    assert quota_of(refused(r.sessions.UpdateToolPart, update))[0] == "LIVE_BYTES_QUOTA"
    update.output = "o" * 100
    r.sessions.UpdateToolPart(update)
    r.sessions.Commit(session_pb2.CommitRequest(session_id="b"))
    add(r.sessions, "b", "z" * 300)  # the commit emptied the buffer
    # bigger than one message may be: INVALID_ARGUMENT, not a quota
    assert refused(add, r.sessions, "b", "w" * 401).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_usage_records_per_session(server_factory: ServerFactory) -> None:
    r = server_factory(limits=Limits(usage_records_per_session=2))
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="u"))
    use = session_pb2.RecordUsageRequest(session_id="u", context_uris=["sessiond://r/1"])
    assert r.sessions.RecordUsage(use).pending_usage_count == 1
    assert r.sessions.RecordUsage(use).pending_usage_count == 2
    assert quota_of(refused(r.sessions.RecordUsage, use)) == (
        "USAGE_QUOTA", "usage_records_per_session=2")
    add(r.sessions, "u", "something to commit")
    r.sessions.Commit(session_pb2.CommitRequest(session_id="u"))
    assert r.sessions.RecordUsage(use).pending_usage_count == 1


def test_sessions_per_identity(server_factory: ServerFactory) -> None:
    r = server_factory(limits=Limits(sessions_per_identity=2))
    for sid in ("s1", "s2"):
        r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=sid), metadata=ALICE)
    err = refused(r.sessions.CreateSession, session_pb2.CreateSessionRequest(session_id="s3"),
                  metadata=ALICE)
    assert quota_of(err) == ("SESSIONS_QUOTA", "sessions_per_identity=2")
    err = refused(r.sessions.GetSession, session_pb2.GetSessionRequest(session_id="s3",
                                                                     auto_create=True),
                  metadata=ALICE)
    assert quota_of(err)[0] == "SESSIONS_QUOTA"
    # existing sessions stay reachable, a duplicate is still ALREADY_EXISTS
    r.sessions.GetSession(session_pb2.GetSessionRequest(session_id="s1", auto_create=True),
                          metadata=ALICE)
    err = refused(r.sessions.CreateSession, session_pb2.CreateSessionRequest(session_id="s1"),
                  metadata=ALICE)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s3"), metadata=BOB)
    r.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id="s1"), metadata=ALICE)
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s3"), metadata=ALICE)


def test_watch_streams_per_identity(server_factory: ServerFactory, tmp_path: Path) -> None:
    engine = GatedEngine()
    r = server_factory(engine=engine, limits=Limits(watch_streams_per_identity=2))
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="w"))
    add(r.sessions, "w", "hello")
    tid = r.sessions.Commit(session_pb2.CommitRequest(session_id="w")).task_id
    assert engine.entered.wait(10)
    streams = [r.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=tid), timeout=20)
               for _ in range(2)]
    for s in streams:
        assert next(s).WhichOneof("kind") == "snapshot"
    third = r.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=tid), timeout=20)
    err = refused(next, third)
    assert quota_of(err) == ("WATCH_STREAMS_QUOTA", "watch_streams_per_identity=2")
    # another identity is not affected (it gets NOT_FOUND for a task not its own)
    other = r.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=tid), timeout=20, metadata=BOB)
    assert refused(next, other).code() == grpc.StatusCode.NOT_FOUND
    streams[0].cancel()
    done = threading.Event()
    for _ in range(50):  # the server notices the cancel shortly after
        again = r.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=tid), timeout=20)
        try:
            next(again)
            done.set()
            again.cancel()
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            threading.Event().wait(0.1)
    assert done.is_set()
    engine.release()
    streams[1].cancel()


def test_size_limits_are_invalid_argument(server_factory: ServerFactory) -> None:
    r = server_factory(limits=Limits(message_parts=3, message_bytes=100, request_id_chars=16,
                                     query_chars=10, default_page_size=1, max_page_size=2))
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="z"))
    four = session_pb2.AddMessageRequest(session_id="z", role=session_pb2.ROLE_USER,
                                         parts=[text_part("a")] * 4)
    assert refused(r.sessions.AddMessage, four).code() == grpc.StatusCode.INVALID_ARGUMENT
    big = session_pb2.AddMessageRequest(session_id="z", role=session_pb2.ROLE_USER,
                                        parts=[text_part("é" * 51)])  # 102 bytes
    assert refused(r.sessions.AddMessage, big).code() == grpc.StatusCode.INVALID_ARGUMENT
    ok = session_pb2.AddMessageRequest(session_id="z", role=session_pb2.ROLE_USER,
                                       parts=[text_part("é" * 50)], request_id="r" * 16)
    r.sessions.AddMessage(ok)
    ok.request_id = "r" * 17
    assert refused(r.sessions.AddMessage, ok).code() == grpc.StatusCode.INVALID_ARGUMENT
    for q in ("recall me now", "x" * 11):
        err = refused(r.memories.Recall, memory_pb2.RecallRequest(query=q))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = refused(r.memories.SearchMemories, memory_pb2.SearchMemoriesRequest(query=q))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    r.memories.Recall(memory_pb2.RecallRequest(query="x" * 10))
    for sid in ("z2", "z3"):
        r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=sid))
    assert len(r.sessions.ListSessions(session_pb2.ListSessionsRequest()).sessions) == 1
    assert len(r.sessions.ListSessions(
        session_pb2.ListSessionsRequest(page_size=50)).sessions) == 2


def test_limits_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIOND_LIMIT_QUERY_CHARS", "99")
    ns = _parser().parse_args(["serve", "--limit-live-messages-per-session", "7",
                               "--limit-archive-page-bytes", "5000000"])
    s = settings_from_args(ns)
    assert s.limits.live_messages_per_session == 7 and s.limits.query_chars == 99
    assert s.limits.archive_page_bytes == 5_000_000
    assert s.limits.message_bytes == Limits().message_bytes
    bad = _parser().parse_args(["serve", "--limit-max-page-size", "0"])
    with pytest.raises(ValueError, match="max_page_size"):
        settings_from_args(bad)


def test_add_messages_counts_the_whole_batch_against_the_live_quotas(
        server_factory: ServerFactory) -> None:
    r = server_factory(limits=Limits(live_messages_per_session=3, live_bytes_per_session=1000,
                                     message_bytes=400))
    S = session_pb2
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="a"))

    def batch(*texts: str, cid: str = "") -> S.AddMessagesRequest:
        return S.AddMessagesRequest(session_id="a", messages=[
            S.NewMessage(role=S.ROLE_USER, parts=[S.Part(text=S.TextPart(text=t))],
                         client_message_id=f"{cid}{i}" if cid else "")
            for i, t in enumerate(texts)])

    r.sessions.AddMessages(batch("a" * 300, "b", cid="c"))
    # 2 stored + 2 more would exceed 3 messages: nothing of the batch is stored
    err = refused(r.sessions.AddMessages, batch("c", "d"))
    assert quota_of(err) == ("LIVE_MESSAGES_QUOTA", "live_messages_per_session=3")
    assert r.sessions.GetSession(S.GetSessionRequest(session_id="a")).message_count == 2
    # duplicates of stored client ids take no room
    again = r.sessions.AddMessages(batch("a" * 300, "b", cid="c"))
    assert [x.duplicate for x in again.results] == [True, True]
    # a commit empties the live buffer; then the byte quota counts the batch's bytes
    r.sessions.Commit(S.CommitRequest(session_id="a"))
    r.sessions.AddMessages(batch("p" * 390, "q" * 390))
    assert quota_of(refused(r.sessions.AddMessages, batch("r" * 300)))[0] == \
        "LIVE_BYTES_QUOTA"
