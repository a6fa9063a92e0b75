from __future__ import annotations

import threading

import grpc
import pytest
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import GatedEngine, add, events, wait_task, watch_all
from tests.conftest import Running, ServerFactory

TERMINAL = (task_pb2.TASK_EVENT_KIND_COMPLETED, task_pb2.TASK_EVENT_KIND_FAILED,
            task_pb2.TASK_EVENT_KIND_CANCELLED)


def _commit(r: Running, sid: str, n: int = 2) -> str:
    r.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid, auto_create=True))
    for i in range(n):
        add(r.sessions, sid, f"msg {i}")
    return r.sessions.Commit(session_pb2.CommitRequest(session_id=sid)).task_id


def test_watch_finished_task_gets_snapshot_and_journal(server: Running) -> None:
    tid = _commit(server, "w")
    wait_task(server.tasks, tid)
    items = watch_all(server.tasks, tid)
    assert items[0].WhichOneof("kind") == "snapshot"
    snap = items[0].snapshot
    assert snap.state == task_pb2.TASK_STATE_COMPLETED and snap.task_type == "session_commit"
    evs = events(items)
    assert [e.seq for e in evs] == list(range(1, snap.last_seq + 1))
    assert evs[0].kind == task_pb2.TASK_EVENT_KIND_CREATED and evs[-1].kind in TERMINAL
    stages = [e.stage for e in evs if e.kind == task_pb2.TASK_EVENT_KIND_STAGE_COMPLETED]
    assert stages == ["summarize", "extract", "relations", "active_counts", "index"]
    assert evs[-1].result.archive_uri == snap.archive_uri
    # after the terminal seq: snapshot only, then OK
    tail = watch_all(server.tasks, tid, after_seq=snap.last_seq)
    assert len(tail) == 1 and tail[0].WhichOneof("kind") == "snapshot"
    # resume from the middle: exactly the rest
    mid = watch_all(server.tasks, tid, after_seq=3)
    assert [e.seq for e in events(mid)] == list(range(4, snap.last_seq + 1))


def test_watch_errors(server: Running) -> None:
    with pytest.raises(grpc.RpcError) as err:
        watch_all(server.tasks, "task_missing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    tid = _commit(server, "we")
    task = wait_task(server.tasks, tid)
    with pytest.raises(grpc.RpcError) as err:
        watch_all(server.tasks, tid, after_seq=task.last_seq + 5)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    with pytest.raises(grpc.RpcError) as err:
        watch_all(server.tasks, tid, after_seq=-1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_watch_compacted_journal_is_out_of_range(server_factory: ServerFactory) -> None:
    r = server_factory()
    r.app.store.journal_cap = 3  # type: ignore[attr-defined]
    tid = _commit(r, "cap")
    import time

    deadline = time.monotonic() + 20
    while True:  # not WatchTask: the journal is compacted under a watcher's feet
        task = r.tasks.GetTask(task_pb2.GetTaskRequest(task_id=tid))
        if task.state == task_pb2.TASK_STATE_COMPLETED or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as err:
        watch_all(r.tasks, tid, after_seq=0)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    kept = events(watch_all(r.tasks, tid, after_seq=task.last_seq - 3))
    assert [e.seq for e in kept] == list(range(task.last_seq - 2, task.last_seq + 1))


def test_live_watchers_heartbeat_and_all_see_every_event(server_factory: ServerFactory) -> None:
    engine = GatedEngine()
    r = server_factory(engine=engine)
    tid = _commit(r, "live")
    assert engine.entered.wait(10)
    results: list[list[task_pb2.WatchTaskResponse]] = [[] for _ in range(10)]

    def watch(i: int) -> None:
        results[i] = watch_all(r.tasks, tid)

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    import time

    time.sleep(1.2)  # longer than heartbeat_seconds (0.5 in tests)
    engine.release()
    for t in threads:
        t.join(20)
    final = r.tasks.GetTask(task_pb2.GetTaskRequest(task_id=tid))
    for items in results:
        assert [e.seq for e in events(items)] == list(range(1, final.last_seq + 1))
        assert any(i.WhichOneof("kind") == "heartbeat" for i in items)


def test_watch_resume_after_forced_disconnect(server_factory: ServerFactory) -> None:
    engine = GatedEngine()
    r = server_factory(engine=engine)
    tid = _commit(r, "rs")
    assert engine.entered.wait(10)
    call = r.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=tid), timeout=20)
    seen: list[int] = []
    for item in call:
        if item.WhichOneof("kind") == "event":
            seen.append(item.event.seq)
            if len(seen) == 2:
                break
    call.cancel()
    engine.release()
    wait_task(r.tasks, tid)
    rest = events(watch_all(r.tasks, tid, after_seq=seen[-1]))
    final = r.tasks.GetTask(task_pb2.GetTaskRequest(task_id=tid))
    assert seen + [e.seq for e in rest] == list(range(1, final.last_seq + 1))


def test_cancel_pending_and_running(server_factory: ServerFactory) -> None:
    engine = GatedEngine()
    r = server_factory(engine=engine)
    first = _commit(r, "cx")
    assert engine.entered.wait(10)
    add(r.sessions, "cx", "later")
    second = r.sessions.Commit(session_pb2.CommitRequest(session_id="cx")).task_id
    # the second waits behind the first (per-session order): still PENDING
    t2 = r.tasks.CancelTask(task_pb2.CancelTaskRequest(task_id=second))
    assert t2.state == task_pb2.TASK_STATE_CANCELLED
    t1 = r.tasks.CancelTask(task_pb2.CancelTaskRequest(task_id=first))
    assert t1.state == task_pb2.TASK_STATE_RUNNING and t1.cancel_requested
    engine.release()
    t1 = wait_task(r.tasks, first)
    assert t1.state == task_pb2.TASK_STATE_CANCELLED
    for idx in (1, 2):
        arch = r.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="cx", index=idx))
        assert arch.state == session_pb2.ARCHIVE_STATE_PENDING
    ctx = r.sessions.GetSessionContext(session_pb2.GetSessionContextRequest(session_id="cx"))
    assert ctx.latest_archive_overview == ""
    # cancel of a terminal task changes nothing
    again = r.tasks.CancelTask(task_pb2.CancelTaskRequest(task_id=first))
    assert again.state == task_pb2.TASK_STATE_CANCELLED and again.last_seq == t1.last_seq
    # a later commit runs, and its continuity skips the cancelled archives
    add(r.sessions, "cx", "third")
    third = r.sessions.Commit(session_pb2.CommitRequest(session_id="cx")).task_id
    assert wait_task(r.tasks, third).state == task_pb2.TASK_STATE_COMPLETED
    assert engine.previous_overviews[-1] == ""


def test_list_tasks_filters_newest_first_and_pages(server: Running) -> None:
    ids = [_commit(server, "l1"), _commit(server, "l2")]
    for i in range(3):
        add(server.sessions, "l1", f"again {i}")
        ids.append(server.sessions.Commit(session_pb2.CommitRequest(session_id="l1")).task_id)
    for tid in ids:
        wait_task(server.tasks, tid)
    all_l1 = server.tasks.ListTasks(task_pb2.ListTasksRequest(session_id="l1"))
    assert [t.task_id for t in all_l1.tasks] == list(reversed([ids[0], *ids[2:]]))
    got: list[str] = []
    token = ""
    while True:
        page = server.tasks.ListTasks(task_pb2.ListTasksRequest(page_size=2, page_token=token))
        got += [t.task_id for t in page.tasks]
        token = page.next_page_token
        if not token:
            break
    assert sorted(got) == sorted(ids) and len(got) == len(ids)
    done = server.tasks.ListTasks(task_pb2.ListTasksRequest(
        state=task_pb2.TASK_STATE_COMPLETED, task_type="session_commit"))
    assert len(done.tasks) == len(ids)
    assert not server.tasks.ListTasks(task_pb2.ListTasksRequest(
        state=task_pb2.TASK_STATE_FAILED)).tasks


def test_retention_removes_old_tasks_then_not_found(server: Running) -> None:
    tid = _commit(server, "ret")
    wait_task(server.tasks, tid)
    server.app.settings.completed_retention_hours = 0.0
    removed = server.loop.run(server.app.sweep_once())
    assert removed >= 1
    with pytest.raises(grpc.RpcError) as err:
        server.tasks.GetTask(task_pb2.GetTaskRequest(task_id=tid))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    arch = server.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id="ret", index=1))
    assert arch.state == session_pb2.ARCHIVE_STATE_DONE  # archives are never removed
