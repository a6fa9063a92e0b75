"""Fuzzing every RPC over a real server (issue 11): typed requests generated from the
proto descriptors, and raw bytes. Every answer must be a code documented for that RPC
in docs/api.md (never UNKNOWN or INTERNAL), the server must stay SERVING, and a known
session's archive must be intact afterwards.

Bounded and reproducible: `derandomize=True` (the examples are a function of the test)
and fixed `max_examples`; the whole module runs in well under 60 s."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sessiond.v1 import (
    memory_pb2,
    memory_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

from tests.api.helpers import add, wait_task
from tests.conftest import LoopThread, Running, _make_app, fast_settings

C = grpc.StatusCode
# The codes each RPC may answer without authentication and with a healthy store
# (docs/api.md, "Codes by RPC"); every RPC may also answer INVALID_ARGUMENT.
DOCUMENTED: dict[str, set[C]] = {
    "CreateSession": {C.OK, C.ALREADY_EXISTS, C.NOT_FOUND, C.RESOURCE_EXHAUSTED},
    "GetSession": {C.OK, C.NOT_FOUND, C.RESOURCE_EXHAUSTED},
    "ListSessions": {C.OK},
    "DeleteSession": {C.OK, C.NOT_FOUND},
    "AddMessage": {C.OK, C.NOT_FOUND, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED},
    "AddMessages": {C.OK, C.NOT_FOUND, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED},
    "UpdateToolPart": {C.OK, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED},
    "RecordUsage": {C.OK, C.NOT_FOUND, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED},
    "Commit": {C.OK, C.NOT_FOUND, C.ALREADY_EXISTS, C.ABORTED},
    "GetSessionContext": {C.OK, C.NOT_FOUND},
    "ListArchives": {C.OK, C.NOT_FOUND},
    "GetArchive": {C.OK, C.NOT_FOUND},
    "UpdateSessionConfig": {C.OK, C.NOT_FOUND},
    "WatchSession": {C.OK, C.NOT_FOUND, C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED},
    "GetTask": {C.OK, C.NOT_FOUND},
    "ListTasks": {C.OK},
    "WatchTask": {C.OK, C.NOT_FOUND, C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED},
    "CancelTask": {C.OK, C.NOT_FOUND},
    "RetryTask": {C.OK, C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION},
    "ListMemories": {C.OK},
    "GetMemory": {C.OK, C.NOT_FOUND},
    "SearchMemories": {C.OK},
    "DeleteMemory": {C.OK, C.NOT_FOUND},
    "Recall": {C.OK},
    "ListMemoryChanges": {C.OK},
    "RevertArchive": {C.OK, C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION},
    "GetSessionUsage": {C.OK, C.NOT_FOUND},
}
METHODS: list[MethodDescriptor] = [
    m for mod in (session_pb2, task_pb2, memory_pb2)
    for service in mod.DESCRIPTOR.services_by_name.values() for m in service.methods]
KEEPER = (("x-sessiond-user", "keeper"),)
CALL_TIMEOUT = 15.0

# Strings that reach past the first checks (ids that exist) and ones that probe them.
VALID = st.sampled_from(["s1", "s2", "known", "s3", "x.y-z", "msg_0", "t1"])
HOSTILE = st.sampled_from([
    "", "a" * 129, "id\n", "²", "٣", "9" * 25, "\x00", "MQ==",
    "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OQ==", "wrA=", "sessiond://sessions/s1/archives/000001",
    "' OR 1=1 --", "%s%n", "\u202e", "😀" * 40])
STRINGS = st.one_of(VALID, VALID, VALID, HOSTILE, st.text(max_size=24), st.just("x" * 70_000))
SMALL = st.integers(0, 5)
INT32 = st.one_of(SMALL, SMALL, st.sampled_from([-1, 1000, 1001, 2**31 - 1, -(2**31)]),
                  st.integers(-(2**31), 2**31 - 1))
INT64 = st.one_of(SMALL, SMALL, st.sampled_from([-1, 2**31, 2**63 - 1, -(2**63)]),
                  st.integers(-(2**63), 2**63 - 1))
F = FieldDescriptor


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == F.TYPE_STRING:
        return STRINGS
    if t == F.TYPE_BYTES:
        return st.binary(max_size=32)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_ENUM:
        enum: Any = field.enum_type
        known = [v.number for v in enum.values]
        return st.one_of(st.sampled_from(known), st.sampled_from(known), st.integers(-3, 1000))
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return INT32
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return INT64
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    return st.floats(allow_nan=True, allow_infinity=True, width=32 if t == F.TYPE_FLOAT else 64)


@st.composite
def messages(draw: st.DrawFn, desc: Descriptor, depth: int = 0) -> Message:
    """A message of type `desc` with a random subset of its fields set."""
    msg = message_factory.GetMessageClass(desc)()
    for field in desc.fields:
        if draw(st.integers(0, 3)) == 0:  # each field set 3 times in 4
            continue
        oneof = field.containing_oneof
        if oneof is not None and msg.WhichOneof(oneof.name) is not None:
            continue
        is_msg = field.type == F.TYPE_MESSAGE
        sub: Any = field.message_type
        if field.is_repeated:
            if is_msg and sub.GetOptions().map_entry:
                continue
            n = draw(st.integers(0, 3))
            if is_msg:
                if depth < 3:
                    for _ in range(n):
                        getattr(msg, field.name).add().CopyFrom(
                            draw(messages(sub, depth + 1)))
            else:
                getattr(msg, field.name).extend(draw(st.lists(scalar(field), max_size=n)))
        elif is_msg:
            if depth < 3:
                getattr(msg, field.name).CopyFrom(draw(messages(sub, depth + 1)))
        else:
            setattr(msg, field.name, draw(scalar(field)))
    return msg


def call(r: Running, method: MethodDescriptor, payload: bytes) -> C:
    """Send raw request bytes to `method`; the status code of the answer (a stream is
    read to its first item)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            open_stream: Any = r.channel.unary_stream(path, request_serializer=None,
                                                      response_deserializer=None)
            stream = open_stream(payload, timeout=CALL_TIMEOUT)
            try:
                next(stream, None)
            finally:
                stream.cancel()
        else:
            unary: Any = r.channel.unary_unary(path, request_serializer=None,
                                               response_deserializer=None)
            unary(payload, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        return err.code()
    return C.OK


def check(method: MethodDescriptor, got: C) -> None:
    allowed = DOCUMENTED[method.name] | {C.INVALID_ARGUMENT}
    assert got in allowed, f"{method.name} answered {got.name}"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Any]]:
    """One server for the module, with a known session of another identity archived
    and finished (its archive is checked after the fuzzing)."""
    loop = LoopThread()
    app = loop.run(_make_app(fast_settings(tmp_path_factory.mktemp("fuzz") / "data"),
                             None, None))
    port = loop.run(app.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    r = Running(app, port, channel, session_pb2_grpc.SessionServiceStub(channel),
                task_pb2_grpc.TaskServiceStub(channel),
                memory_pb2_grpc.MemoryServiceStub(channel), loop)
    s = r.sessions
    s.CreateSession(session_pb2.CreateSessionRequest(session_id="known"), metadata=KEEPER)
    for text in ("My name is Ada.", "The Atlas deploy fails with a timeout.", "Raise it."):
        add(s, "known", text, metadata=KEEPER)
    tid = s.Commit(session_pb2.CommitRequest(session_id="known"), metadata=KEEPER).task_id
    wait_task_as(r, tid)
    before = s.GetArchive(session_pb2.GetArchiveRequest(session_id="known", index=1),
                          metadata=KEEPER)
    # Something for the default identity to hit: a session, an archive, a task.
    s.CreateSession(session_pb2.CreateSessionRequest(session_id="s1"))
    add(s, "s1", "hello there")
    wait_task(r.tasks, s.Commit(session_pb2.CommitRequest(session_id="s1")).task_id)
    yield r, before
    health: Any = health_pb2_grpc.HealthStub(r.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    after = s.GetArchive(session_pb2.GetArchiveRequest(session_id="known", index=1),
                         metadata=KEEPER)
    assert after == before
    channel.close()
    loop.run(app.stop(0.5))
    loop.close()


def wait_task_as(r: Running, task_id: str) -> None:
    for _ in r.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id), metadata=KEEPER,
                               timeout=20):
        pass


FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_typed_requests(fuzzed: tuple[Running, Any], data: st.DataObject) -> None:
    r, _ = fuzzed
    method = data.draw(st.sampled_from(METHODS), label="method")
    request = data.draw(messages(method.input_type), label="request")
    check(method, call(r, method, request.SerializeToString()))


@st.composite
def raw_bytes(draw: st.DrawFn, desc: Descriptor) -> bytes:
    """Arbitrary bytes, or a valid request with bytes flipped, cut or appended."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=48))
    valid = draw(messages(desc)).SerializeToString()
    if kind == 1 and valid:
        i = draw(st.integers(0, len(valid) - 1))
        return valid[:i] + bytes([draw(st.integers(0, 255))]) + valid[i + 1:]
    return valid[: draw(st.integers(0, len(valid)))] + draw(st.binary(max_size=8))


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_raw_bytes(fuzzed: tuple[Running, Any], data: st.DataObject) -> None:
    r, _ = fuzzed
    method = data.draw(st.sampled_from(METHODS), label="method")
    check(method, call(r, method, data.draw(raw_bytes(method.input_type), label="bytes")))


def test_every_rpc_is_fuzzed_and_documented() -> None:
    assert {m.name for m in METHODS} == set(DOCUMENTED)
    doc = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    doc = doc.split("## Codes by RPC", 1)[1]
    for name, codes in DOCUMENTED.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{name}` ")), "")
        assert row, f"docs/api.md has no codes row for {name}"
        for code in codes - {C.OK}:
            assert code.name in row, f"docs/api.md: {name} does not list {code.name}"

