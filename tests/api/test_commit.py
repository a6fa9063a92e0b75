from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import FailingEngine, GatedEngine, add, events, wait_task, watch_all
from tests.conftest import Running, ServerFactory


def _session(r: Running, sid: str, n: int) -> list[str]:
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=sid))
    return [add(r.sessions, sid, f"message {i}: I prefer option {i}.").id for i in range(n)]


def _ctx(r: Running, sid: str) -> session_pb2.SessionContext:
    return r.sessions.GetSessionContext(session_pb2.GetSessionContextRequest(session_id=sid))


def _commit(r: Running, sid: str, **kw: object) -> session_pb2.CommitReply:
    return r.sessions.Commit(session_pb2.CommitRequest(session_id=sid, **kw))  # type: ignore[arg-type]


def test_empty_commit_archives_nothing(server: Running) -> None:
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="e"))
    reply = _commit(server, "e")
    assert reply.status == session_pb2.COMMIT_STATUS_ACCEPTED
    assert not reply.archived and reply.task_id == "" and reply.archive_uri == ""
    assert list(server.sessions.ListArchives(
        session_pb2.ListArchivesRequest(session_id="e")).archives) == []
    with pytest.raises(grpc.RpcError) as err:
        _commit(server, "missing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_commit_archives_then_live_buffer_keeps_recent(server: Running) -> None:
    ids = _session(server, "k", 5)
    reply = _commit(server, "k", keep_recent_count=2)
    assert reply.archived and reply.archive_uri.endswith("/archives/000001")
    assert [m.id for m in _ctx(server, "k").current_messages] == ids[3:]
    task = wait_task(server.tasks, reply.task_id)
    assert task.state == task_pb2.TASK_STATE_COMPLETED
    arch = server.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="k", index=1))
    assert [m.id for m in arch.messages] == ids[:3]
    assert arch.state == session_pb2.ARCHIVE_STATE_DONE
    assert (arch.first_message_id, arch.last_message_id) == (ids[0], ids[2])
    assert arch.abstract and "## Overview" in arch.overview
    meta = server.sessions.GetSession(session_pb2.GetSessionRequest(session_id="k"))
    assert (meta.message_count, meta.live_message_count, meta.commit_count) == (5, 2, 1)
    assert meta.archive_count == 1 and meta.HasField("last_commit_at")
    assert meta.memories_extracted.preferences == task.result.memories_extracted.preferences > 0
    assert meta.memories_extracted.total == task.result.memories_extracted.total
    ctx = _ctx(server, "k")
    assert ctx.latest_archive_overview == arch.overview
    limited = server.sessions.GetSessionContext(
        session_pb2.GetSessionContextRequest(session_id="k", max_messages=1))
    assert [m.id for m in limited.current_messages] == ids[4:]


def test_message_added_during_phase2_is_kept(server_factory: ServerFactory) -> None:
    engine = GatedEngine()
    r = server_factory(engine=engine)
    _session(r, "d", 3)
    reply = _commit(r, "d")
    assert engine.entered.wait(10)
    late = add(r.sessions, "d", "arrived while Phase 2 ran")
    engine.release()
    wait_task(r.tasks, reply.task_id)
    assert [m.id for m in _ctx(r, "d").current_messages] == [late.id]
    arch = r.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="d", index=1))
    assert late.id not in [m.id for m in arch.messages] and len(arch.messages) == 3


def test_two_quick_commits_are_ordered_and_threaded(server: Running) -> None:
    _session(server, "q", 2)
    first = _commit(server, "q")
    add(server.sessions, "q", "second batch")
    second = _commit(server, "q")
    assert first.task_id != second.task_id
    assert second.archive_uri.endswith("/archives/000002")
    t2 = wait_task(server.tasks, second.task_id)
    t1 = server.tasks.GetTask(task_pb2.GetTaskRequest(task_id=first.task_id))
    assert t1.state == t2.state == task_pb2.TASK_STATE_COMPLETED
    assert t1.finished_at.ToNanoseconds() <= t2.started_at.ToNanoseconds(), (t1, t2)
    a1 = server.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="q", index=1))
    a2 = server.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="q", index=2))
    first_line = a1.overview.split("## Overview\n", 1)[1].splitlines()[0]
    history = a2.overview.split("## Historical context", 1)[1].split("## New information")[0]
    assert first_line[:80] in history


def test_second_summary_receives_first_completed_overview(server_factory: ServerFactory) -> None:
    engine = GatedEngine()
    engine.release()
    r = server_factory(engine=engine)
    _session(r, "th", 2)
    first = _commit(r, "th")
    add(r.sessions, "th", "more")
    second = _commit(r, "th")
    wait_task(r.tasks, second.task_id)
    wait_task(r.tasks, first.task_id)
    a1 = r.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="th", index=1))
    assert engine.previous_overviews == ["", a1.overview]


def test_context_skips_archive_not_done(server_factory: ServerFactory) -> None:
    engine = GatedEngine()
    r = server_factory(engine=engine)
    _session(r, "c", 1)
    engine.release()
    first = _commit(r, "c")
    wait_task(r.tasks, first.task_id)
    done_overview = _ctx(r, "c").latest_archive_overview
    assert done_overview
    engine._gate.clear()
    engine.entered.clear()
    add(r.sessions, "c", "next")
    second = _commit(r, "c")
    assert engine.entered.wait(10)
    ctx = _ctx(r, "c")
    assert ctx.latest_archive_overview == done_overview
    assert ctx.latest_archive_uri.endswith("/archives/000001")
    engine.release()
    wait_task(r.tasks, second.task_id)
    assert _ctx(r, "c").latest_archive_uri.endswith("/archives/000002")


def test_reject_if_running_aborts_while_phase2_unfinished(server_factory: ServerFactory) -> None:
    engine = GatedEngine()
    r = server_factory(engine=engine)
    _session(r, "r", 1)
    first = _commit(r, "r")
    add(r.sessions, "r", "more")
    with pytest.raises(grpc.RpcError) as err:
        _commit(r, "r", reject_if_running=True)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert first.task_id in (err.value.details() or "")
    assert [m.text.text for m in
            (_ctx(r, "r").current_messages[0].parts)] == ["more"]  # nothing archived
    engine.release()
    wait_task(r.tasks, first.task_id)
    assert _commit(r, "r", reject_if_running=True).archived


def test_phase2_failure_is_sanitized_and_archive_stays(server_factory: ServerFactory) -> None:
    r = server_factory(engine=FailingEngine())
    _session(r, "f", 2)
    reply = _commit(r, "f")
    items = watch_all(r.tasks, reply.task_id)
    last = events(items)[-1]
    assert last.kind == task_pb2.TASK_EVENT_KIND_FAILED
    task = r.tasks.GetTask(task_pb2.GetTaskRequest(task_id=reply.task_id))
    assert task.state == task_pb2.TASK_STATE_FAILED
    msg = task.error.message
    assert task.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]  # LLM_AUTH
    assert "sk-live" not in msg and "abc.def.ghi" not in msg and len(msg) <= 512
    assert "[REDACTED]" in msg
    arch = r.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="f", index=1))
    assert arch.state == session_pb2.ARCHIVE_STATE_PENDING and len(arch.messages) == 2
    assert _ctx(r, "f").latest_archive_overview == ""
    meta = r.sessions.GetSession(session_pb2.GetSessionRequest(session_id="f"))
    assert meta.commit_count == 0


def test_failed_archive_is_skipped_by_next_commit_continuity(server_factory: ServerFactory,
                                                             tmp_path: Path) -> None:
    data = tmp_path / "cont"
    ok = server_factory(data_dir=data)
    _session(ok, "x", 1)
    wait_task(ok.tasks, _commit(ok, "x").task_id)
    a1 = ok.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="x", index=1))
    ok.loop.run(ok.app.stop(0.5))
    ok.app._stopped_by_test = True  # type: ignore[attr-defined]
    bad = server_factory(data_dir=data, engine=FailingEngine())
    add(bad.sessions, "x", "doomed")
    wait_task(bad.tasks, _commit(bad, "x").task_id)
    bad.loop.run(bad.app.stop(0.5))
    bad.app._stopped_by_test = True  # type: ignore[attr-defined]
    engine = GatedEngine()
    engine.release()
    good = server_factory(data_dir=data, engine=engine)
    add(good.sessions, "x", "third")
    wait_task(good.tasks, _commit(good, "x").task_id)
    assert engine.previous_overviews == [a1.overview]


def test_restart_resumes_unfinished_task(server_factory: ServerFactory, tmp_path: Path) -> None:
    data = tmp_path / "resume"
    engine = GatedEngine()
    r = server_factory(data_dir=data, engine=engine)
    _session(r, "z", 3)
    reply = _commit(r, "z")
    assert engine.entered.wait(10)
    r.loop.run(r.app.stop(0.2))
    r.app._stopped_by_test = True  # type: ignore[attr-defined]
    r2 = server_factory(data_dir=data)
    task = wait_task(r2.tasks, reply.task_id)
    assert task.state == task_pb2.TASK_STATE_COMPLETED and task.attempts == 2
    evs = events(watch_all(r2.tasks, reply.task_id))
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
    started = [e for e in evs if e.kind == task_pb2.TASK_EVENT_KIND_STARTED]
    assert len(started) == 2 and "resumed" in started[1].message
    meta = r2.sessions.GetSession(session_pb2.GetSessionRequest(session_id="z"))
    assert meta.commit_count == 1


def test_many_sessions_commit_concurrently(server: Running) -> None:
    errors: list[BaseException] = []
    task_ids: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            sid = f"m{i}"
            _session(server, sid, 3)
            for _ in range(2):
                reply = _commit(server, sid)
                add(server.sessions, sid, "again")
                with lock:
                    task_ids.append(reply.task_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    deadline = time.monotonic() + 30
    for tid in task_ids:
        task = wait_task(server.tasks, tid, timeout=max(1.0, deadline - time.monotonic()))
        assert task.state == task_pb2.TASK_STATE_COMPLETED
