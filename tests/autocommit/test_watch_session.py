"""WatchSession over a real server on both backends: the feed live (messages, an
auto-commit with its trigger and task, every Phase 2 event of the task, a config
change), resume by seq with nothing missed or repeated, the errors and the shared
watch-stream quota; and messages' own created_at, validated."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sessiond.server.domain.limits import Limits
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import add, text_part, wait_task
from tests.api.test_sessions import details
from tests.autocommit.conftest import Start
from tests.conftest import Running

S, K = session_pb2, task_pb2
E = S.SessionEventKind


def collect(r: Running, sid: str, after_seq: int, until: int, out: list[S.WatchSessionResponse],
            timeout: float = 30) -> None:
    """Read the feed into `out` until the event numbered `until` arrived."""
    stream = r.sessions.WatchSession(S.WatchSessionRequest(session_id=sid, after_seq=after_seq),
                                     timeout=timeout)
    try:
        for item in stream:
            out.append(item)
            if item.WhichOneof("kind") == "event" and item.event.seq >= until:
                stream.cancel()
                return
    except grpc.RpcError as exc:  # the server stopped (UNAVAILABLE) at teardown
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise


def feed(items: list[S.WatchSessionResponse]) -> list[S.SessionEvent]:
    return [i.event for i in items if i.WhichOneof("kind") == "event"]


def test_watch_session_live_then_resume(start: Start) -> None:
    r: Running = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    got: list[S.WatchSessionResponse] = []
    # 1 config + 2 messages + commit + the task's journal (created .. completed: 15)
    watcher = threading.Thread(target=collect, args=(r, "s1", 0, 200, got), daemon=True)
    watcher.start()
    time.sleep(0.5)
    r.sessions.UpdateSessionConfig(S.UpdateSessionConfigRequest(
        session_id="s1", auto_commit=S.AutoCommitPolicy(max_messages=2)))
    m1 = add(r.sessions, "s1", "Hi, I am Ada.")
    add(r.sessions, "s1", "Hello Ada.", S.ROLE_ASSISTANT)
    (task,) = r.tasks.ListTasks(K.ListTasksRequest(session_id="s1")).tasks
    done = wait_task(r.tasks, task.task_id)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        evs = feed(got)
        if evs and evs[-1].kind == E.SESSION_EVENT_KIND_TASK_EVENT and \
                evs[-1].task_event.kind == K.TASK_EVENT_KIND_COMPLETED:
            break
        time.sleep(0.05)
    assert got[0].WhichOneof("kind") == "snapshot" and got[0].snapshot.session_id == "s1"
    evs = feed(got)
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
    kinds = [e.kind for e in evs]
    assert kinds[:4] == [E.SESSION_EVENT_KIND_CONFIG_CHANGED,
                         E.SESSION_EVENT_KIND_MESSAGE_APPENDED,
                         E.SESSION_EVENT_KIND_MESSAGE_APPENDED,
                         E.SESSION_EVENT_KIND_COMMIT_ACCEPTED]
    assert evs[0].auto_commit.max_messages == 2 and not evs[0].auto_commit_inherited
    assert (evs[1].message_id, evs[1].message_seq, evs[1].role) == (m1.id, 1, S.ROLE_USER)
    commit = evs[3]
    assert (commit.task_id, commit.trigger, commit.archive_index, commit.archived_messages) == \
        (task.task_id, K.COMMIT_TRIGGER_MESSAGES, 1, 2)
    assert commit.archive_uri == "sessiond://sessions/s1/archives/000001"
    task_events = [e.task_event for e in evs[4:]]
    assert all(e.kind == E.SESSION_EVENT_KIND_TASK_EVENT and e.task_id == task.task_id
               for e in evs[4:])
    assert [t.seq for t in task_events] == list(range(1, done.last_seq + 1))
    assert task_events[0].kind == K.TASK_EVENT_KIND_CREATED
    assert task_events[-1].kind == K.TASK_EVENT_KIND_COMPLETED
    assert any(t.kind == K.TASK_EVENT_KIND_STAGE_COMPLETED and t.stage == "extract"
               for t in task_events)
    # resume from the middle: exactly the rest, in order
    mid = 3
    again: list[S.WatchSessionResponse] = []
    collect(r, "s1", mid, evs[-1].seq, again)
    assert again[0].snapshot.last_event_seq == evs[-1].seq
    assert [e.SerializeToString() for e in feed(again)] == \
        [e.SerializeToString() for e in evs[mid:]]
    # a watch at the end gets the snapshot and heartbeats, then new events live
    tail: list[S.WatchSessionResponse] = []
    t = threading.Thread(target=collect, args=(r, "s1", evs[-1].seq, evs[-1].seq + 1, tail),
                         daemon=True)
    t.start()
    time.sleep(1.2)
    add(r.sessions, "s1", "one more")
    t.join(20)
    assert any(i.WhichOneof("kind") == "heartbeat" and i.heartbeat.last_seq == evs[-1].seq
               for i in tail)
    assert feed(tail)[-1].kind == E.SESSION_EVENT_KIND_MESSAGE_APPENDED
    assert feed(tail)[-1].seq == evs[-1].seq + 1


def test_watch_session_errors_and_quota(start: Start) -> None:
    r: Running = start(limits=Limits(watch_streams_per_identity=1))
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    add(r.sessions, "s1", "hello")

    def first(sid: str, after: int) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            next(iter(r.sessions.WatchSession(S.WatchSessionRequest(
                session_id=sid, after_seq=after), timeout=10)))
        return err.value

    assert first("nope", 0).code() == grpc.StatusCode.NOT_FOUND
    assert first("s1", -1).code() == grpc.StatusCode.INVALID_ARGUMENT
    beyond = first("s1", 2)
    assert beyond.code() == grpc.StatusCode.OUT_OF_RANGE
    info, _ = details(beyond)
    assert info is not None and info.reason == "SEQ_IN_FUTURE"
    # one stream open (a WatchSession): a WatchTask of the same identity is refused
    # (and the other way round)
    open_stream = r.sessions.WatchSession(S.WatchSessionRequest(session_id="s1"), timeout=20)
    assert next(iter(open_stream)).WhichOneof("kind") == "snapshot"
    out = r.sessions.Commit(S.CommitRequest(session_id="s1"))
    with pytest.raises(grpc.RpcError) as err:
        next(iter(r.tasks.WatchTask(K.WatchTaskRequest(task_id=out.task_id), timeout=10)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert first("s1", 0).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    open_stream.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the slot is given back when the stream ends
        try:
            next(iter(r.tasks.WatchTask(K.WatchTaskRequest(task_id=out.task_id), timeout=10)))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(0.1)
    else:
        raise AssertionError("the watch slot was not released")


def test_deleting_the_session_ends_its_watch_not_found(start: Start) -> None:
    r: Running = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    stream = r.sessions.WatchSession(S.WatchSessionRequest(session_id="s1"), timeout=30)
    items = iter(stream)
    assert next(items).WhichOneof("kind") == "snapshot"
    r.sessions.DeleteSession(S.DeleteSessionRequest(session_id="s1"))
    with pytest.raises(grpc.RpcError) as err:
        for _ in items:
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def ts(dt: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(dt)
    return out


def test_messages_may_carry_their_own_created_at(start: Start) -> None:
    r: Running = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    then = datetime(2021, 5, 4, 12, 0, 0, tzinfo=UTC)
    one = r.sessions.AddMessage(S.AddMessageRequest(
        session_id="s1", role=S.ROLE_USER, parts=[text_part("imported")],
        created_at=ts(then))).message
    assert one.created_at.ToDatetime(tzinfo=UTC) == then
    batch = r.sessions.AddMessages(S.AddMessagesRequest(session_id="s1", messages=[
        S.NewMessage(role=S.ROLE_USER, parts=[text_part("a")], created_at=ts(then)),
        S.NewMessage(role=S.ROLE_USER, parts=[text_part("b")],
                     created_at=ts(then + timedelta(seconds=1))),
        S.NewMessage(role=S.ROLE_USER, parts=[text_part("now")])]))
    times = [x.message.created_at.ToDatetime(tzinfo=UTC) for x in batch.results]
    assert times[:2] == [then, then + timedelta(seconds=1)]
    assert abs((times[2] - datetime.now(UTC)).total_seconds()) < 60
    # the session's own times are the server's: an import does not move updated_at back
    meta = r.sessions.GetSession(S.GetSessionRequest(session_id="s1"))
    assert meta.updated_at.ToDatetime(tzinfo=UTC) > then + timedelta(days=365)
    ctx = r.sessions.GetSessionContext(S.GetSessionContextRequest(session_id="s1"))
    assert ctx.current_messages[0].created_at.ToDatetime(tzinfo=UTC) == then


def test_created_at_is_validated(start: Start) -> None:
    r: Running = start()
    r.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    now = datetime.now(UTC)
    before_1970 = Timestamp(seconds=-1)
    far = ts(now + timedelta(minutes=10))
    out_of_range = Timestamp(seconds=2**62)
    for value in (before_1970, far, out_of_range):
        with pytest.raises(grpc.RpcError) as err:
            r.sessions.AddMessage(S.AddMessageRequest(
                session_id="s1", role=S.ROLE_USER, parts=[text_part("x")], created_at=value))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, bad = details(err.value)
        assert bad is not None and [v.field for v in bad.field_violations] == ["created_at"]
    # a little ahead (clock skew) is fine
    r.sessions.AddMessage(S.AddMessageRequest(
        session_id="s1", role=S.ROLE_USER, parts=[text_part("x")],
        created_at=ts(now + timedelta(minutes=1))))
    decreasing = [S.NewMessage(role=S.ROLE_USER, parts=[text_part("a")],
                               created_at=ts(now - timedelta(hours=1))),
                  S.NewMessage(role=S.ROLE_USER, parts=[text_part("b")],
                               created_at=ts(now - timedelta(hours=2)))]
    unset_then_past = [S.NewMessage(role=S.ROLE_USER, parts=[text_part("a")]),
                       S.NewMessage(role=S.ROLE_USER, parts=[text_part("b")]),
                       S.NewMessage(role=S.ROLE_USER, parts=[text_part("c")],
                                    created_at=ts(now - timedelta(hours=2)))]
    for batch, field in ((decreasing, "messages[1].created_at"),
                         (unset_then_past, "messages[2].created_at"),
                         ([S.NewMessage(role=S.ROLE_USER, parts=[text_part("a")],
                                        created_at=far)], "messages[0].created_at")):
        with pytest.raises(grpc.RpcError) as err:
            r.sessions.AddMessages(S.AddMessagesRequest(session_id="s1", messages=batch))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, bad = details(err.value)
        assert bad is not None and [v.field for v in bad.field_violations] == [field]
    meta = r.sessions.GetSession(S.GetSessionRequest(session_id="s1"))
    assert meta.message_count == 1  # nothing of the refused calls was stored
