"""Retry storm: the same request_id sent at once by many clients (each on its own
channel) is applied once and every client gets the same answer; the same request_id
with a different payload is ALREADY_EXISTS with reason REQUEST_ID_REUSED."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sessiond.v1 import session_pb2, task_pb2

from tests.faults.harness import ServerProcess, Stubs

T = TypeVar("T")
CLIENTS = 12
ROUNDS = 4
TIMEOUT = 15.0


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(Path(tmp_path_factory.mktemp("storm")) / "data")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def stubs(srv: ServerProcess) -> Iterator[Stubs]:
    with srv.stubs() as s:
        yield s


def storm(srv: ServerProcess, calls: Sequence[Callable[[Stubs], T]]
          ) -> list[T | grpc.RpcError]:
    """Run calls[i] on thread i, each with its own channel, released together."""
    n = len(calls)
    barrier = threading.Barrier(n)
    results: list[T | grpc.RpcError | None] = [None] * n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with srv.stubs() as s:
                # Connect first so that the calls themselves race.
                grpc.channel_ready_future(s.channel).result(timeout=TIMEOUT)
                barrier.wait(TIMEOUT)
                try:
                    results[i] = calls[i](s)
                except grpc.RpcError as exc:
                    results[i] = exc
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "storm thread hung"
    assert not errors, errors
    return [r for r in results if r is not None]


def error_reason(exc: grpc.RpcError) -> str:
    st = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert st is not None, f"no rich status in {exc}"
    for d in st.details:
        info = error_details_pb2.ErrorInfo()
        if d.Is(info.DESCRIPTOR):
            d.Unpack(info)
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {st}")


def ok(results: list[T | grpc.RpcError]) -> list[T]:
    errs = [r for r in results if isinstance(r, grpc.RpcError)]
    assert not errs, [(e.code(), e.details()) for e in errs]
    return [r for r in results if not isinstance(r, grpc.RpcError)]


def text_msg(session_id: str, text: str, request_id: str) -> session_pb2.AddMessageRequest:
    return session_pb2.AddMessageRequest(
        session_id=session_id, role=session_pb2.ROLE_USER, request_id=request_id,
        parts=[session_pb2.Part(text=session_pb2.TextPart(text=text))])


def new_session(stubs: Stubs) -> str:
    sid = f"storm-{uuid.uuid4().hex[:12]}"
    stubs.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=sid),
                                 timeout=TIMEOUT)
    return sid


def create(req: session_pb2.CreateSessionRequest, s: Stubs) -> session_pb2.Session:
    return s.sessions.CreateSession(req, timeout=TIMEOUT)


def add(req: session_pb2.AddMessageRequest, s: Stubs) -> session_pb2.AddMessageResponse:
    return s.sessions.AddMessage(req, timeout=TIMEOUT)


def usage(req: session_pb2.RecordUsageRequest, s: Stubs) -> session_pb2.RecordUsageResponse:
    return s.sessions.RecordUsage(req, timeout=TIMEOUT)


def commit(req: session_pb2.CommitRequest, s: Stubs) -> session_pb2.CommitReply:
    return s.sessions.Commit(req, timeout=TIMEOUT)


def rid() -> str:
    return f"req-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------- same payload
def test_create_session_storm(srv: ServerProcess, stubs: Stubs) -> None:
    for _ in range(ROUNDS):
        sid, r = f"storm-{uuid.uuid4().hex[:12]}", rid()
        req = session_pb2.CreateSessionRequest(session_id=sid, request_id=r)
        got = ok(storm(srv, [partial(create, req)] * CLIENTS))
        assert {g.session_id for g in got} == {sid}
        assert len({g.created_at.ToNanoseconds() for g in got}) == 1
        # Server-chosen id: derived from the request id, so one session for all.
        req2 = session_pb2.CreateSessionRequest(request_id=rid())
        got2 = ok(storm(srv, [partial(create, req2)] * CLIENTS))
        ids = {g.session_id for g in got2}
        assert len(ids) == 1, ids
        assert len({g.created_at.ToNanoseconds() for g in got2}) == 1
        # Replayed later, still the same session.
        again = stubs.sessions.CreateSession(req2, timeout=TIMEOUT)
        assert again.session_id in ids


def test_add_message_storm(srv: ServerProcess, stubs: Stubs) -> None:
    for _ in range(ROUNDS):
        sid = new_session(stubs)
        req = text_msg(sid, "I prefer tea.", rid())
        got = ok(storm(srv, [partial(add, req)] * CLIENTS))
        assert len({(g.message.id, g.message.seq) for g in got}) == 1, got
        meta = stubs.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid),
                                         timeout=TIMEOUT)
        assert (meta.message_count, meta.live_message_count) == (1, 1)
        live = stubs.sessions.GetSessionContext(
            session_pb2.GetSessionContextRequest(session_id=sid), timeout=TIMEOUT)
        assert [m.id for m in live.current_messages] == [got[0].message.id]


def test_record_usage_storm(srv: ServerProcess, stubs: Stubs) -> None:
    for _ in range(ROUNDS):
        sid = new_session(stubs)
        req = session_pb2.RecordUsageRequest(session_id=sid, context_uris=["ctx://a"],
                                             request_id=rid())
        got = ok(storm(srv, [partial(usage, req)] * CLIENTS))
        assert {g.pending_usage_count for g in got} == {1}
        other = stubs.sessions.RecordUsage(session_pb2.RecordUsageRequest(
            session_id=sid, context_uris=["ctx://b"], request_id=rid()), timeout=TIMEOUT)
        assert other.pending_usage_count == 2


def test_commit_storm(srv: ServerProcess, stubs: Stubs) -> None:
    for _ in range(ROUNDS):
        sid = new_session(stubs)
        for i in range(3):
            stubs.sessions.AddMessage(text_msg(sid, f"My name is Bob. step {i}", rid()),
                                      timeout=TIMEOUT)
        req = session_pb2.CommitRequest(session_id=sid, request_id=rid())
        got = ok(storm(srv, [partial(commit, req)] * CLIENTS))
        assert len({(g.archived, g.task_id, g.archive_uri) for g in got}) == 1, got
        assert got[0].archived and got[0].task_id
        archives = stubs.sessions.ListArchives(
            session_pb2.ListArchivesRequest(session_id=sid), timeout=TIMEOUT).archives
        assert [(a.index, a.task_id, a.message_count) for a in archives] == [
            (1, got[0].task_id, 3)]
        tasks = stubs.tasks.ListTasks(task_pb2.ListTasksRequest(session_id=sid),
                                      timeout=TIMEOUT).tasks
        assert [t.task_id for t in tasks] == [got[0].task_id]
        events = [i.event for i in stubs.tasks.WatchTask(
            task_pb2.WatchTaskRequest(task_id=got[0].task_id), timeout=TIMEOUT)
            if i.WhichOneof("kind") == "event"]
        assert events[-1].kind == task_pb2.TASK_EVENT_KIND_COMPLETED
        meta = stubs.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid),
                                         timeout=TIMEOUT)
        assert (meta.commit_count, meta.archive_count, meta.live_message_count) == (1, 1, 0)


# ---------------------------------------------------------------------- other payload
def _reused(stubs: Stubs, call: Callable[[], Any]) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS, ei.value
    assert error_reason(ei.value) == "REQUEST_ID_REUSED"


def test_same_request_id_other_payload_is_rejected(stubs: Stubs) -> None:
    s = stubs.sessions
    r = rid()
    s.CreateSession(session_pb2.CreateSessionRequest(session_id="reuse-a", request_id=r),
                    timeout=TIMEOUT)
    _reused(stubs, lambda: s.CreateSession(
        session_pb2.CreateSessionRequest(session_id="reuse-b", request_id=r), timeout=TIMEOUT))
    r = rid()
    s.AddMessage(text_msg("reuse-a", "one", r), timeout=TIMEOUT)
    _reused(stubs, lambda: s.AddMessage(text_msg("reuse-a", "two", r), timeout=TIMEOUT))
    r = rid()
    s.RecordUsage(session_pb2.RecordUsageRequest(session_id="reuse-a", context_uris=["x://1"],
                                                 request_id=r), timeout=TIMEOUT)
    _reused(stubs, lambda: s.RecordUsage(session_pb2.RecordUsageRequest(
        session_id="reuse-a", context_uris=["x://2"], request_id=r), timeout=TIMEOUT))
    r = rid()
    s.Commit(session_pb2.CommitRequest(session_id="reuse-a", request_id=r), timeout=TIMEOUT)
    _reused(stubs, lambda: s.Commit(session_pb2.CommitRequest(
        session_id="reuse-a", keep_recent_count=1, request_id=r), timeout=TIMEOUT))
    meta = s.GetSession(session_pb2.GetSessionRequest(session_id="reuse-a"), timeout=TIMEOUT)
    assert (meta.message_count, meta.archive_count) == (1, 1)
    with pytest.raises(grpc.RpcError) as ei:
        s.GetSession(session_pb2.GetSessionRequest(session_id="reuse-b"), timeout=TIMEOUT)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_mixed_payload_storm_one_wins(srv: ServerProcess, stubs: Stubs) -> None:
    """Half the clients send payload A, half payload B, one request_id: exactly one
    payload is applied; its senders all get the same message, the others
    REQUEST_ID_REUSED."""
    for _ in range(ROUNDS):
        sid = new_session(stubs)
        r = rid()
        reqs = [text_msg(sid, "payload A", r), text_msg(sid, "payload B", r)]
        results = storm(srv, [partial(add, reqs[i % 2]) for i in range(CLIENTS)])
        by_payload: dict[int, list[Any]] = {0: [], 1: []}
        for i, res in enumerate(results):
            by_payload[i % 2].append(res)
        winners = [p for p, rs in by_payload.items()
                   if all(not isinstance(x, grpc.RpcError) for x in rs)]
        assert len(winners) == 1, {p: [type(x).__name__ for x in rs]
                                   for p, rs in by_payload.items()}
        win = winners[0]
        assert len({(x.message.id, x.message.seq) for x in by_payload[win]}) == 1
        for x in by_payload[1 - win]:
            assert isinstance(x, grpc.RpcError)
            assert x.code() == grpc.StatusCode.ALREADY_EXISTS
            assert error_reason(x) == "REQUEST_ID_REUSED"
        live = stubs.sessions.GetSessionContext(
            session_pb2.GetSessionContextRequest(session_id=sid), timeout=TIMEOUT)
        assert [m.parts[0].text.text for m in live.current_messages] == [
            reqs[win].parts[0].text.text]


def test_storm_across_a_kill(srv: ServerProcess) -> None:
    """The storm goes on while the server is SIGKILLed: after the restart every client
    retries with the same request_id and all end with the one same message."""
    with srv.stubs() as s:
        sid = new_session(s)
    req = text_msg(sid, "I prefer coffee.", rid())
    stop = threading.Event()
    restarted = threading.Event()
    answers: list[tuple[str, int, bool]] = []
    bad: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        s2 = srv.stubs()
        try:
            while not stop.is_set():
                try:
                    m = s2.sessions.AddMessage(req, timeout=2.0).message
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                          grpc.StatusCode.DEADLINE_EXCEEDED):
                        bad.append(f"{exc.code()}: {exc.details()}")
                    s2.close()  # a fresh channel skips the reconnect backoff
                    s2 = srv.stubs()
                    stop.wait(0.02)
                    continue
                with lock:
                    answers.append((m.id, m.seq, restarted.is_set()))
        finally:
            s2.close()

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        stop.wait(0.3)
        srv.kill()
        srv.start()
        restarted.set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if sum(1 for a in answers if a[2]) >= 12:
                    break
            stop.wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not bad, bad
    assert any(a[2] for a in answers) and any(not a[2] for a in answers)
    assert len({a[:2] for a in answers}) == 1, set(answers)
    with srv.stubs() as s:
        meta = s.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid),
                                     timeout=TIMEOUT)
        assert meta.message_count == 1
