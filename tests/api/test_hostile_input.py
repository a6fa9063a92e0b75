"""Hostile input over a real server (issue 11, findings 1-4 and 6): every answer is a
precise status with bounded details, never UNKNOWN, INTERNAL or a broken trailer."""

from __future__ import annotations

import base64
import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message as ProtoMessage
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiond.client import connect
from sessiond.v1 import memory_pb2, session_pb2, session_pb2_grpc, task_pb2

from tests.api.helpers import add, text_part
from tests.api.test_sessions import details
from tests.conftest import Running

MiB = 1024 * 1024


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def code(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, grpc.RpcError | None]:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code(), err
    return grpc.StatusCode.OK, None


# ------------------------------------------------------------------ 1: page tokens
BAD_TOKENS = [b64("²"), b64("9" * 25), b64("٣"), b64("1\x00"), b64("x" * 5000), "%%%"]


def test_bad_page_tokens_are_invalid_argument_on_every_paged_rpc(server: Running) -> None:
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="p"))
    calls: dict[str, Callable[[str], Any]] = {
        "ListArchives": lambda t: server.sessions.ListArchives(
            session_pb2.ListArchivesRequest(session_id="p", page_token=t)),
        "ListSessions": lambda t: server.sessions.ListSessions(
            session_pb2.ListSessionsRequest(page_token=t)),
        "ListTasks": lambda t: server.tasks.ListTasks(task_pb2.ListTasksRequest(page_token=t)),
        "ListMemories": lambda t: server.memories.ListMemories(
            memory_pb2.ListMemoriesRequest(page_token=t)),
    }
    for name, call in calls.items():
        for token in BAD_TOKENS:
            if name in ("ListSessions", "ListMemories", "ListTasks") and token in (
                    b64("²"), b64("9" * 25), b64("٣")):
                continue  # a plain key or number there: a valid (empty) position
            got, err = code(functools.partial(call, token))
            assert got == grpc.StatusCode.INVALID_ARGUMENT, (name, token[:20], got)
            assert err is not None
            info, _ = details(err)
            assert info is not None and info.reason == "BAD_PAGE_TOKEN", name
    # Task cursors with a digit string are still answered (an empty page), not INTERNAL.
    got, _ = code(lambda: server.tasks.ListTasks(task_pb2.ListTasksRequest(
        page_token=b64("9" * 25 + "|t"))))
    assert got == grpc.StatusCode.OK


# ------------------------------------------------------------------ 2: raw bytes
def all_methods() -> list[tuple[str, bool]]:
    """(full method, server-streaming) of every sessiond RPC, from the descriptors."""
    out = []
    for mod in (session_pb2, task_pb2, memory_pb2):
        for service in mod.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out.append((f"/{service.full_name}/{m.name}", m.server_streaming))
    return out


def test_undecodable_bytes_are_invalid_argument_on_every_rpc(
        server: Running, caplog: pytest.LogCaptureFixture) -> None:
    methods = all_methods()
    assert len(methods) == 27  # 16 session, 5 task, 6 memory RPCs
    garbage = b"\n\xff\xff\xff\xff\x0f"
    caplog.set_level(logging.INFO)
    for method, streaming in methods:
        if streaming:
            stream: Any = server.channel.unary_stream(method, request_serializer=None,
                                                      response_deserializer=None)
            got, err = code(functools.partial(lambda s: list(s(garbage, timeout=5)), stream))
        else:
            unary: Any = server.channel.unary_unary(method, request_serializer=None,
                                                    response_deserializer=None)
            got, err = code(functools.partial(unary, garbage, timeout=5))
        assert got == grpc.StatusCode.INVALID_ARGUMENT, (method, got)
        assert err is not None and len(err.details() or "") < 200
        info, _ = details(err)
        assert info is not None and info.reason == "MALFORMED_REQUEST", method
    # One short line per failure at most, never a traceback.
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert 1 <= len(lines) <= len(methods)
    assert all(r.exc_info is None and len(r.getMessage()) < 400 for r in lines)
    assert "Traceback" not in caplog.text and "Unexpected" not in caplog.text
    # grpc's own health service too, its Watch (a coroutine writing with
    # context.write) included, and valid requests still get their answers.
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"):
        stream_or_unary: Any = (server.channel.unary_stream if method.endswith("Watch")
                                else server.channel.unary_unary)(
            method, request_serializer=None, response_deserializer=None)
        got, _ = code(functools.partial(lambda c: list(c(garbage, timeout=5)), stream_or_unary))
        assert got == grpc.StatusCode.INVALID_ARGUMENT, method
    reflect: Any = server.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=None, response_deserializer=None)
    got, _ = code(lambda: list(reflect(iter([garbage]), timeout=5)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    health: Any = health_pb2_grpc.HealthStub(server.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    # Valid bytes still work through the same path.
    raw: Any = server.channel.unary_unary("/sessiond.v1.SessionService/CreateSession",
                                     request_serializer=None, response_deserializer=None)
    out = raw(session_pb2.CreateSessionRequest(session_id="raw").SerializeToString(), timeout=5)
    assert session_pb2.Session.FromString(out).session_id == "raw"


# ------------------------------------------------------------------ 3: full match
@pytest.mark.parametrize("bad", ["inj-nl\n", "ok\nnext", "a" * 129, "\nlead"])
def test_session_ids_must_match_whole(server: Running, bad: str) -> None:
    got, _ = code(lambda: server.sessions.CreateSession(
        session_pb2.CreateSessionRequest(session_id=bad)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    got, _ = code(lambda: server.sessions.GetSession(
        session_pb2.GetSessionRequest(session_id=bad, auto_create=True)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ 4: size cap
def tool(**fields: Any) -> session_pb2.Part:
    return session_pb2.Part(tool=session_pb2.ToolPart(**fields))


@pytest.mark.parametrize("field", ["tool_name", "tool_id", "tool_uri", "skill_uri", "input"])
def test_message_size_counts_every_string_field(server: Running, field: str) -> None:
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="big"))
    fields: dict[str, Any] = {"tool_id": "t1", field: "x" * (4 * MiB + 1)}
    got, err = code(lambda: server.sessions.AddMessage(session_pb2.AddMessageRequest(
        session_id="big", role=session_pb2.ROLE_TOOL, parts=[tool(**fields)])))
    assert got == grpc.StatusCode.INVALID_ARGUMENT, field
    assert err is not None
    _, bad = details(err)
    assert bad is not None and any("bytes" in v.description for v in bad.field_violations)
    # split over a text part and a tool name: still counted together
    got, _ = code(lambda: server.sessions.AddMessage(session_pb2.AddMessageRequest(
        session_id="big", role=session_pb2.ROLE_TOOL,
        parts=[text_part("y" * (2 * MiB)), tool(tool_id="t2", tool_name="z" * (2 * MiB + 1))])))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    live = server.sessions.GetSession(session_pb2.GetSessionRequest(session_id="big"))
    assert live.message_count == 0


def test_update_tool_part_output_is_capped(server: Running) -> None:
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="tp"))
    msg = server.sessions.AddMessage(session_pb2.AddMessageRequest(
        session_id="tp", role=session_pb2.ROLE_TOOL,
        parts=[text_part("a" * (3 * MiB)), tool(tool_id="c1", tool_name="fetch")])).message
    req = session_pb2.UpdateToolPartRequest(
        session_id="tp", message_id=msg.id, tool_id="c1", output="o" * (MiB + 1),
        status=session_pb2.TOOL_STATUS_COMPLETED)
    got, _ = code(lambda: server.sessions.UpdateToolPart(req))
    assert got == grpc.StatusCode.INVALID_ARGUMENT  # 3 MiB + 1 MiB + 1 > 4 MiB in all
    req.output = "o" * (5 * MiB)
    got, _ = code(lambda: server.sessions.UpdateToolPart(req))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    req.output = "done"
    out = server.sessions.UpdateToolPart(req)
    assert out.parts[1].tool.output == "done"


# ------------------------------------------------------------------ 6: bounded details
def trailer_size(err: grpc.RpcError) -> int:
    call: Any = err
    return sum(len(k) + len(v) for k, v in call.trailing_metadata() or ())


def test_ten_thousand_empty_parts_is_a_readable_invalid_argument(server: Running) -> None:
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="many"))
    req = session_pb2.AddMessageRequest(session_id="many", role=session_pb2.ROLE_USER,
                                        parts=[session_pb2.Part() for _ in range(10_000)])
    got, err = code(lambda: server.sessions.AddMessage(req))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    assert err is not None
    _, bad = details(err)
    assert bad is not None and len(bad.field_violations) <= 21
    assert "more" in bad.field_violations[-1].description
    assert trailer_size(err) < 4 * 1024  # 6.6 KB when clipped in characters


def huge_id_calls(server: Running, huge: str) -> list[Callable[[], ProtoMessage]]:
    return [
        lambda: server.tasks.GetTask(task_pb2.GetTaskRequest(task_id=huge)),
        lambda: server.tasks.CancelTask(task_pb2.CancelTaskRequest(task_id=huge)),
        lambda: server.memories.GetMemory(memory_pb2.GetMemoryRequest(memory_id=huge)),
        lambda: server.memories.DeleteMemory(memory_pb2.DeleteMemoryRequest(memory_id=huge)),
        lambda: server.sessions.GetSession(session_pb2.GetSessionRequest(session_id=huge)),
        lambda: server.sessions.UpdateToolPart(session_pb2.UpdateToolPartRequest(
            session_id="ok", message_id=huge, tool_id=huge,
            status=session_pb2.TOOL_STATUS_COMPLETED)),
    ]


def test_huge_ids_are_echoed_clipped(server: Running) -> None:
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="ok"))
    huge = "q" * 100_000
    for call in huge_id_calls(server, huge):
        got, err = code(call)
        assert got in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), got
        assert err is not None
        assert len(err.details() or "") < 300
        assert trailer_size(err) < 4 * 1024
    add(server.sessions, "ok", "still fine")


# ------------------------------------------------------------------ 5: archive pages
def read_archive(stub: session_pb2_grpc.SessionServiceStub, sid: str, index: int,
                 page_size: int = 0) -> tuple[list[session_pb2.Message], int]:
    """Every message of an archive through its pages; returns them and the page count."""
    out: list[session_pb2.Message] = []
    token, pages = "", 0
    while True:
        reply = stub.GetArchive(session_pb2.GetArchiveRequest(
            session_id=sid, index=index, page_size=page_size, page_token=token), timeout=30)
        assert reply.ByteSize() < 16 * MiB
        pages += 1
        out.extend(reply.messages)
        token = reply.next_page_token
        if not token:
            return out, pages


def test_five_large_messages_are_all_readable_from_the_archive(server: Running) -> None:
    channel = connect(server.target)  # the sessiond client: 16 MiB replies
    stub = session_pb2_grpc.SessionServiceStub(channel)
    stub.CreateSession(session_pb2.CreateSessionRequest(session_id="huge"))
    sent = []
    for i in range(5):
        text = chr(ord("a") + i) * 3_900_000
        sent.append(stub.AddMessage(session_pb2.AddMessageRequest(
            session_id="huge", role=session_pb2.ROLE_USER, parts=[text_part(text)]),
            timeout=30).message.id)
    reply = stub.Commit(session_pb2.CommitRequest(session_id="huge"), timeout=30)
    assert reply.archived
    got, pages = read_archive(stub, "huge", 1)
    assert [m.id for m in got] == sent and pages == 3  # 2 + 2 + 1 under 8 MiB each
    assert all(len(m.parts[0].text.text) == 3_900_000 for m in got)
    one_by_one, pages = read_archive(stub, "huge", 1, page_size=1)
    assert [m.id for m in one_by_one] == sent and pages == 5
    channel.close()


def test_archive_pages_count_bytes_not_characters(server: Running) -> None:
    channel = connect(server.target)
    stub = session_pb2_grpc.SessionServiceStub(channel)
    stub.CreateSession(session_pb2.CreateSessionRequest(session_id="wide"))
    for _ in range(3):  # 1 M four-byte characters: 4 MB each, 3 M characters in all
        stub.AddMessage(session_pb2.AddMessageRequest(
            session_id="wide", role=session_pb2.ROLE_USER,
            parts=[text_part("\U0001f600" * 1_000_000)]), timeout=30)
    stub.Commit(session_pb2.CommitRequest(session_id="wide"), timeout=30)
    got, pages = read_archive(stub, "wide", 1)
    assert len(got) == 3 and pages == 2  # 8 MB + 4 MB: bytes, not characters, counted
    channel.close()


def test_archive_page_small_and_bad_tokens(server: Running) -> None:
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="small"))
    ids = [add(server.sessions, "small", f"m{i}").id for i in range(5)]
    server.sessions.Commit(session_pb2.CommitRequest(session_id="small"))
    whole = server.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="small",
                                                                     index=1))
    assert [m.id for m in whole.messages] == ids and not whole.next_page_token
    got, pages = read_archive(server.sessions, "small", 1, page_size=2)
    assert [m.id for m in got] == ids and pages == 3
    for token in BAD_TOKENS:
        req = session_pb2.GetArchiveRequest(session_id="small", index=1, page_token=token)
        got_code, _ = code(functools.partial(server.sessions.GetArchive, req))
        assert got_code == grpc.StatusCode.INVALID_ARGUMENT
    got_code, _ = code(lambda: server.sessions.GetArchive(
        session_pb2.GetArchiveRequest(session_id="small", index=1, page_size=-1)))
    assert got_code == grpc.StatusCode.INVALID_ARGUMENT


def test_session_context_reply_stays_under_the_reply_size(server: Running) -> None:
    channel = connect(server.target)
    stub = session_pb2_grpc.SessionServiceStub(channel)
    stub.CreateSession(session_pb2.CreateSessionRequest(session_id="ctx"))
    ids = [stub.AddMessage(session_pb2.AddMessageRequest(
        session_id="ctx", role=session_pb2.ROLE_USER, parts=[text_part("c" * 3_900_000)]),
        timeout=30).message.id for _ in range(5)]
    ctx = stub.GetSessionContext(session_pb2.GetSessionContextRequest(session_id="ctx"),
                                 timeout=30)
    assert [m.id for m in ctx.current_messages] == ids[-2:]  # the newest that fit 8 MiB
    channel.close()


def test_wide_character_violations_stay_small(server: Running) -> None:
    """255 duplicate tool ids of 4-byte characters: bounded in bytes, not characters."""
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="dup"))
    wide = "😀" * 200
    req = session_pb2.AddMessageRequest(session_id="dup", role=session_pb2.ROLE_TOOL,
                                        parts=[tool(tool_id=wide)] * 256)
    got, err = code(functools.partial(server.sessions.AddMessage, req))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and err is not None
    _, bad = details(err)
    assert bad is not None and "more violations" in bad.field_violations[-1].description
    assert trailer_size(err) < 4 * 1024  # 6.6 KB when clipped in characters
