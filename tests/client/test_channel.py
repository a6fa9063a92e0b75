"""Channel factories: service config, identity metadata, request ids (AIP-155)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from sessiond.client import (
    REQUEST_ID_METHODS,
    RETRYABLE_METHODS,
    SERVICE_CONFIG_JSON,
    Identity,
    aio_connect,
    channel_options,
    connect,
    wait_for_task,
    watch_task,
    with_request_id,
)
from sessiond.v1 import (
    memory_pb2,
    server_pb2,
    session_pb2,
    session_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

from tests.client.fakes import add_text
from tests.conftest import Running

BOB = Identity("acme", "bob", "assistant")
EVE = Identity("acme", "eve", "assistant")
DESCRIPTORS = {f.services_by_name[name].full_name: f.services_by_name[name]
               for f, name in ((session_pb2.DESCRIPTOR, "SessionService"),
                               (task_pb2.DESCRIPTOR, "TaskService"),
                               (memory_pb2.DESCRIPTOR, "MemoryService"),
                               (server_pb2.DESCRIPTOR, "ServerService"))}


# -- configuration --------------------------------------------------------------------

def test_service_config_names_real_idempotent_methods() -> None:
    config = json.loads(SERVICE_CONFIG_JSON)
    [method_config] = config["methodConfig"]
    policy = method_config["retryPolicy"]
    assert policy == {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s",
                      "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    named = {(n["service"], n["method"]) for n in method_config["name"]}
    for service, method in named:
        assert method in DESCRIPTORS[service].methods_by_name, (service, method)
    methods = {m for _, m in named}
    every = {m for d in DESCRIPTORS.values() for m in d.methods_by_name}
    reads = {m for m in every if m.startswith(("Get", "List"))}
    assert reads <= methods
    assert {"CancelTask", "CreateSession", "AddMessage", "AddMessages", "Commit", "RecordUsage",
            "RetryTask"} <= methods
    assert {"/sessiond.v1.SessionService/AddMessages",
            "/sessiond.v1.TaskService/RetryTask"} <= REQUEST_ID_METHODS
    assert not methods & {"WatchTask", "DeleteSession", "DeleteMemory", "UpdateToolPart"}
    assert {f"/{s}/{m}" for s, ms in RETRYABLE_METHODS.items() for m in ms} >= REQUEST_ID_METHODS


def test_channel_options_defaults_and_overrides() -> None:
    opts = dict(channel_options([("grpc.keepalive_time_ms", 5000), ("grpc.lb_policy_name",
                                                                    "round_robin")]))
    assert opts["grpc.enable_retries"] == 1
    assert opts["grpc.keepalive_time_ms"] == 5000
    assert opts["grpc.keepalive_timeout_ms"] == 10_000
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.max_receive_message_length"] == 16 * 1024 * 1024
    assert opts["grpc.max_send_message_length"] == 16 * 1024 * 1024
    assert opts["grpc.lb_policy_name"] == "round_robin"


def test_identity_and_request_id_helpers() -> None:
    assert Identity().metadata() == (("x-sessiond-account", "default"),
                                     ("x-sessiond-user", "default"),
                                     ("x-sessiond-agent", "default"))
    with pytest.raises(ValueError):
        Identity("acme", "bob smith", "x")
    req = session_pb2.CommitRequest(session_id="s")
    assert with_request_id(req) is req and len(req.request_id) == 36
    first = req.request_id
    assert with_request_id(req).request_id == first  # kept once set
    with pytest.raises(TypeError):
        with_request_id(session_pb2.GetSessionRequest(session_id="s"))


# -- against the real server ----------------------------------------------------------

@pytest.fixture
def bob(server: Running) -> Iterator[grpc.Channel]:
    with connect(server.target, identity=BOB) as channel:
        yield channel


def test_replayed_commit_returns_the_same_task(server: Running, bob: grpc.Channel) -> None:
    sessions = session_pb2_grpc.SessionServiceStub(bob)
    sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s1"))
    add_text(sessions, "s1", "I prefer tea.")
    request = with_request_id(session_pb2.CommitRequest(session_id="s1"))
    first = sessions.Commit(request)
    again = sessions.Commit(request)  # e.g. our own retry after a lost reply
    assert first.archived and first.task_id
    assert (again.task_id, again.archive_uri) == (first.task_id, first.archive_uri)
    task = wait_for_task(bob, first.task_id, timeout=10)
    assert task.state == task_pb2.TASK_STATE_COMPLETED

    # Another identity sees none of it, whether set on the channel or per call.
    with connect(server.target, identity=EVE) as eve:
        for call in (
            lambda: task_pb2_grpc.TaskServiceStub(eve).GetTask(
                task_pb2.GetTaskRequest(task_id=first.task_id)),
            lambda: session_pb2_grpc.SessionServiceStub(eve).GetSession(
                session_pb2.GetSessionRequest(session_id="s1")),
            lambda: list(watch_task(eve, first.task_id)),
            lambda: task_pb2_grpc.TaskServiceStub(bob).GetTask(
                task_pb2.GetTaskRequest(task_id=first.task_id),
                metadata=(("x-sessiond-user", "eve"),)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
    # The default identity (a plain channel) is someone else too.
    with pytest.raises(grpc.RpcError) as info:
        server.tasks.GetTask(task_pb2.GetTaskRequest(task_id=first.task_id))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_interceptor_fills_ids_on_a_copy(bob: grpc.Channel) -> None:
    sessions = session_pb2_grpc.SessionServiceStub(bob)
    request = session_pb2.CreateSessionRequest()  # server-chosen id, derived from request_id
    a = sessions.CreateSession(request)
    b = sessions.CreateSession(request)
    assert request.request_id == ""  # the caller's object is untouched
    assert a.session_id != b.session_id  # each call got its own id: two operations
    replay = with_request_id(session_pb2.CreateSessionRequest())
    assert sessions.CreateSession(replay).session_id == sessions.CreateSession(replay).session_id


# -- built-in retries, seen from a flaky server ---------------------------------------

@dataclass
class Flaky:
    """Commit fails UNAVAILABLE `failures` times, then succeeds; DeleteSession always
    fails UNAVAILABLE. Records (request_id, metadata) of every attempt."""

    failures: int = 2
    commits: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    deletes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Commit(self, request: session_pb2.CommitRequest, context: grpc.ServicerContext
               ) -> session_pb2.CommitReply:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with self.lock:
            self.commits.append((request.request_id, md))
            fail = len(self.commits) <= self.failures
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return session_pb2.CommitReply(session_id=request.session_id, task_id="task_1",
                                       archived=True)

    def DeleteSession(self, request: session_pb2.DeleteSessionRequest,
                      context: grpc.ServicerContext) -> session_pb2.DeleteSessionResponse:
        with self.lock:
            self.deletes += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "try again")


@pytest.fixture
def flaky() -> Iterator[tuple[Flaky, str]]:
    servicer = Flaky()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "sessiond.v1.SessionService", {
            "Commit": grpc.unary_unary_rpc_method_handler(
                servicer.Commit, session_pb2.CommitRequest.FromString,
                session_pb2.CommitReply.SerializeToString),
            "DeleteSession": grpc.unary_unary_rpc_method_handler(
                servicer.DeleteSession, session_pb2.DeleteSessionRequest.FromString,
                session_pb2.DeleteSessionResponse.SerializeToString),
        }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def _check_retried(servicer: Flaky, reply: session_pb2.CommitReply) -> None:
    assert reply.task_id == "task_1"
    assert len(servicer.commits) == 3
    ids = {rid for rid, _ in servicer.commits}
    assert len(ids) == 1 and "" not in ids  # one id, replayed by every retry
    for _, md in servicer.commits:
        assert (md["x-sessiond-account"], md["x-sessiond-user"],
                md["x-sessiond-agent"]) == ("acme", "bob", "assistant")


def test_sync_channel_retries_with_one_request_id(flaky: tuple[Flaky, str]) -> None:
    servicer, target = flaky
    with connect(target, identity=BOB) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        request = session_pb2.CommitRequest(session_id="s1")
        _check_retried(servicer, stub.Commit(request, timeout=10))
        assert request.request_id == ""
        with pytest.raises(grpc.RpcError) as info:  # no request id: not retried
            stub.DeleteSession(session_pb2.DeleteSessionRequest(session_id="s1"), timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE and servicer.deletes == 1


def test_aio_channel_retries_with_one_request_id(flaky: tuple[Flaky, str]) -> None:
    servicer, target = flaky

    async def run() -> session_pb2.CommitReply:
        async with aio_connect(target, identity=BOB) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            reply = await stub.Commit(session_pb2.CommitRequest(session_id="s1"), timeout=10)
            with pytest.raises(grpc.RpcError):
                await stub.DeleteSession(session_pb2.DeleteSessionRequest(session_id="s1"),
                                         timeout=10)
            return reply

    _check_retried(servicer, asyncio.run(run()))
    assert servicer.deletes == 1
