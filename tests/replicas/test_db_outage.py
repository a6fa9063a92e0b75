"""A replica whose PostgreSQL goes away and comes back.

The `sessiond serve` process reaches the database through a TCP proxy in the test
process. Cutting the proxy refuses new connections and resets the open ones (the
pool's, the LISTEN connection, the one in the middle of a Phase 2 stage). Expected:

* RPCs fail fast (< 3 s) with UNAVAILABLE, they do not hang;
* the standard health service turns NOT_SERVING within ~5 s;
* when the proxy is back the replica recovers by itself: SERVING again, RPCs work,
  the interrupted Phase 2 task resumes and completes, a watch that re-attaches with
  `sessiond.client.watch_task` sees every event once and in order;
* nothing acknowledged is lost, and a write retried with its request_id after the
  outage takes effect exactly once.

Two more ways to lose the database: a silent partition (the proxy stops passing
bytes; health must still turn NOT_SERVING, within ~7 s) and PostgreSQL terminating
the backend of a Phase 2 stage in mid-write while staying reachable (the task must
resume, not end FAILED).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2
from sessiond.client import ResumePolicy, watch_task
from sessiond.v1 import session_pb2, task_pb2

from tests.faults.harness import ServerProcess, Stubs, heavy_text
from tests.pg import temporary_database
from tests.replicas.helpers import (
    TcpProxy,
    closing_all,
    migrate,
    sql,
    start_replicas,
    table_write_lock,
    text_part,
    wait_until,
)

pytestmark = pytest.mark.postgres

FAST_FAIL = 3.0  # an RPC during the outage answers UNAVAILABLE within this
HEALTH_WITHIN = 5.0  # NOT_SERVING after the cut / SERVING after the restore
RECOVER_WITHIN = 10.0
HEAVY_SENTENCES = 300  # per message: an extract stage of a few seconds
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _via(url: str, port: int) -> str:
    """`url` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{port}"))


def _health(stubs: Stubs) -> int:
    return int(stubs.health.Check(health_pb2.HealthCheckRequest(), timeout=2).status)


def _add(stubs: Stubs, sid: str, text: str, request_id: str,
         timeout: float = 10.0) -> session_pb2.Message:
    return stubs.sessions.AddMessage(session_pb2.AddMessageRequest(
        session_id=sid, role=session_pb2.ROLE_USER, parts=[text_part(text)],
        request_id=request_id), timeout=timeout).message


def _events(stubs: Stubs, task_id: str, until_kind: int | None = None,
            until_stage: str = "") -> list[task_pb2.TaskEvent]:
    """Events of a plain WatchTask stream, to the end or up to a given event."""
    out: list[task_pb2.TaskEvent] = []
    call = stubs.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id), timeout=30)
    try:
        for resp in call:
            if not resp.HasField("event"):
                continue
            out.append(resp.event)
            if resp.event.kind == until_kind and resp.event.stage == until_stage:
                break
    finally:
        call.cancel()
    return out


def _expect_unavailable(what: str, fn: Callable[[], object]) -> float:
    """Call `fn`; it must fail with UNAVAILABLE within FAST_FAIL seconds."""
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        fn()
    took = time.monotonic() - start
    code = exc.value.code()
    assert code == grpc.StatusCode.UNAVAILABLE, f"{what}: {code} {exc.value}"
    assert took < FAST_FAIL, f"{what} took {took:.1f}s to fail"
    return took


@contextlib.contextmanager
def _replica_behind_proxy(tmp_path: Path) -> Iterator[tuple[str, TcpProxy, ServerProcess]]:
    """(direct database URL, the proxy, one replica that reaches it through the proxy);
    the replica's log tail is printed when the test fails."""
    with temporary_database("sessiond_outage") as url:
        migrate(url)
        parts = urlsplit(url)
        proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        try:
            proxy.restore()
            servers = start_replicas(tmp_path, _via(url, proxy.port), 1, lease_seconds=2.0,
                                     poll_seconds=0.3, workers=2)
            with closing_all(servers):
                try:
                    yield url, proxy, servers[0]
                except BaseException:
                    print(f"--- replica log tail ---\n{servers[0].log_tail(4000)}")
                    raise
        finally:
            proxy.close()


def test_replica_rides_out_a_database_outage(tmp_path: Path) -> None:
    started = time.monotonic()
    with _replica_behind_proxy(tmp_path) as (url, proxy, srv):
        _scenario(url, proxy, srv, started)


def _scenario(url: str, proxy: TcpProxy, srv: ServerProcess, started: float) -> None:
    rng = random.Random(7)
    with srv.stubs() as st:
        # ---------------------------------------------------------------- before
        st.sessions.CreateSession(session_pb2.CreateSessionRequest(
            session_id="s1", request_id="create-s1"), timeout=10)
        acked = [_add(st, "s1", f"I prefer tea number {i}.", f"pre-{i}").id for i in range(4)]
        first = st.sessions.Commit(session_pb2.CommitRequest(
            session_id="s1", request_id="commit-1"), timeout=10)
        assert first.archived
        assert _events(st, first.task_id)[-1].kind == task_pb2.TASK_EVENT_KIND_COMPLETED
        acked += [_add(st, "s1", f"live message {i}", f"live-{i}").id for i in range(3)]
        # a second session whose Phase 2 is in its long extract stage during the outage
        st.sessions.CreateSession(session_pb2.CreateSessionRequest(
            session_id="s2", request_id="create-s2"), timeout=10)
        heavy = [_add(st, "s2", heavy_text(rng, HEAVY_SENTENCES), f"heavy-{i}").id
                 for i in range(3)]
        busy = st.sessions.Commit(session_pb2.CommitRequest(
            session_id="s2", request_id="commit-s2"), timeout=10)
        assert busy.archived
        _events(st, busy.task_id, until_kind=task_pb2.TASK_EVENT_KIND_STAGE_STARTED,
                until_stage="extract")
        # a client watching it re-attaches across the outage
        watch = watch_task(st.tasks, busy.task_id, timeout=60,
                           resume=ResumePolicy(max_attempts=60, initial_backoff=0.1,
                                               max_backoff=0.5))
        seen = [next(watch)]
        assert _health(st) == SERVING

        # ---------------------------------------------------------------- outage
        proxy.cut()
        cut_at = time.monotonic()
        fails = [
            _expect_unavailable("AddMessage", lambda: _add(st, "s1", "during", "outage-1")),
            _expect_unavailable("GetSession", lambda: st.sessions.GetSession(
                session_pb2.GetSessionRequest(session_id="s1"), timeout=10)),
            _expect_unavailable("GetSessionContext", lambda: st.sessions.GetSessionContext(
                session_pb2.GetSessionContextRequest(session_id="s1"), timeout=10)),
            _expect_unavailable("Commit", lambda: st.sessions.Commit(
                session_pb2.CommitRequest(session_id="s1", request_id="commit-2"),
                timeout=10)),
            _expect_unavailable("GetTask", lambda: st.tasks.GetTask(
                task_pb2.GetTaskRequest(task_id=busy.task_id), timeout=10)),
            _expect_unavailable("WatchTask", lambda: _events(st, busy.task_id)),
        ]
        not_serving = wait_until(lambda: _health(st) == NOT_SERVING, HEALTH_WITHIN,
                                 "health NOT_SERVING after the database went away")
        # still failing fast once the replica knows it is cut off
        fails.append(_expect_unavailable("AddMessage again", lambda: _add(
            st, "s1", "during", "outage-1")))
        time.sleep(max(0.0, 3.0 - (time.monotonic() - cut_at)))  # the lease (2 s) expires
        assert _health(st) == NOT_SERVING

        # ---------------------------------------------------------------- back
        proxy.restore()
        restored_at = time.monotonic()
        back = wait_until(lambda: _health(st) == SERVING, HEALTH_WITHIN,
                          "health SERVING after the database came back")
        wait_until(lambda: _responds(st), RECOVER_WITHIN, "RPCs work again")
        # the write that failed during the outage, sent again with its request_id
        retried = _add(st, "s1", "during", "outage-1")
        assert _add(st, "s1", "during", "outage-1").id == retried.id  # replayed, not re-added
        acked.append(retried.id)
        # nothing acknowledged before the outage is lost
        archive = st.sessions.GetArchive(session_pb2.GetArchiveRequest(
            session_id="s1", index=1), timeout=10)
        ctx = st.sessions.GetSessionContext(session_pb2.GetSessionContextRequest(
            session_id="s1"), timeout=10)
        placed = [m.id for m in archive.messages] + [m.id for m in ctx.current_messages]
        assert placed == acked
        assert [m.seq for m in [*archive.messages, *ctx.current_messages]] == \
            list(range(1, len(acked) + 1))
        # the interrupted task resumes and completes; the re-attached watch saw it all
        seen += list(watch)
        assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
        assert seen[-1].kind == task_pb2.TASK_EVENT_KIND_COMPLETED
        assert watch.resumes >= 1
        task = st.tasks.GetTask(task_pb2.GetTaskRequest(task_id=busy.task_id), timeout=10)
        assert task.state == task_pb2.TASK_STATE_COMPLETED and task.last_seq == len(seen)
        assert task.attempts >= 2, "the extract stage cut off by the outage was not retried"
        heavy_archive = st.sessions.GetArchive(session_pb2.GetArchiveRequest(
            session_id="s2", index=1), timeout=10)
        assert [m.id for m in heavy_archive.messages] == heavy
        # new work is accepted and runs through Phase 2
        later = st.sessions.Commit(session_pb2.CommitRequest(
            session_id="s1", request_id="commit-3"), timeout=10)
        assert later.archived
        assert _events(st, later.task_id)[-1].kind == task_pb2.TASK_EVENT_KIND_COMPLETED
        s1 = st.sessions.GetSession(session_pb2.GetSessionRequest(session_id="s1"), timeout=10)
        assert s1.commit_count == s1.archive_count == 2
        assert s1.message_count == len(acked)
        # finalize ran once per task, whatever the outage interrupted
        rows = sql(url, "SELECT state, count(*) AS n FROM tasks GROUP BY state")
        assert {r["state"]: r["n"] for r in rows} == {"completed": 3}
    print(f"db outage: RPCs failed in <= {max(fails):.2f}s, NOT_SERVING after "
          f"{not_serving:.1f}s, SERVING {back:.1f}s after the restore, interrupted task "
          f"completed on attempt {task.attempts} (watch re-attached {watch.resumes}x), "
          f"recovered {time.monotonic() - restored_at:.1f}s after the restore, "
          f"total {time.monotonic() - started:.1f}s")


def _responds(st: Stubs) -> bool:
    try:
        st.sessions.GetSession(session_pb2.GetSessionRequest(session_id="s1"), timeout=5)
    except grpc.RpcError:
        return False
    return True


def test_replica_detects_a_silent_partition(tmp_path: Path) -> None:
    """The network to the database goes silent (no RST, nothing refused): health must
    still turn NOT_SERVING (a stuck ping counts as a failure), and come back. RPCs
    cannot fail fast here: they end at the driver's timeouts (connect 5 s, acquire
    10 s, statement 15 s), or at the client's deadline, whichever comes first."""
    started = time.monotonic()
    with _replica_behind_proxy(tmp_path) as (_url, proxy, srv), srv.stubs() as st:
        st.sessions.CreateSession(session_pb2.CreateSessionRequest(
            session_id="s1", request_id="create-s1"), timeout=10)
        acked = [_add(st, "s1", f"I prefer coffee number {i}.", f"pre-{i}").id
                 for i in range(3)]
        assert _health(st) == SERVING
        proxy.freeze()
        frozen_at = time.monotonic()
        # 2 s between probes + 5 s for a probe to answer, plus slack for a loaded machine.
        # The probe's query hangs on an open pooled connection: it must not take the
        # driver's own timeouts (10-15 s) to count as failed.
        wait_until(lambda: _health(st) == NOT_SERVING, 9.0,
                   "health NOT_SERVING during a silent partition")
        not_serving = time.monotonic() - frozen_at
        # outcome unknown to the client: it retries with the same request_id later
        with pytest.raises(grpc.RpcError) as exc:
            _add(st, "s1", "sent into the void", "frozen-1", timeout=2.0)
        assert exc.value.code() in (
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        proxy.thaw()
        thawed_at = time.monotonic()
        wait_until(lambda: _health(st) == SERVING, RECOVER_WITHIN,
                   "health SERVING after the partition healed")
        wait_until(lambda: _responds(st), RECOVER_WITHIN, "RPCs work again")
        back = time.monotonic() - thawed_at
        retried = _add(st, "s1", "sent into the void", "frozen-1")
        acked.append(retried.id)
        ctx = st.sessions.GetSessionContext(session_pb2.GetSessionContextRequest(
            session_id="s1"), timeout=10)
        assert [m.id for m in ctx.current_messages] == acked
        assert [m.seq for m in ctx.current_messages] == list(range(1, len(acked) + 1))
        done = st.sessions.Commit(session_pb2.CommitRequest(
            session_id="s1", request_id="commit-1"), timeout=10)
        assert _events(st, done.task_id)[-1].kind == task_pb2.TASK_EVENT_KIND_COMPLETED
    print(f"silent partition: NOT_SERVING after {not_serving:.1f}s, serving again "
          f"{back:.1f}s after it healed, total {time.monotonic() - started:.1f}s")


def test_connection_reset_mid_stage_does_not_fail_the_task(tmp_path: Path) -> None:
    """PostgreSQL terminates the replica's connections (administrator command,
    idle-session reaper, pooler restart) while a Phase 2 stage is writing, and is
    reachable again at once. The stage's transaction rolled back; the task must run
    that stage again (attempt 2) and complete, not end FAILED."""
    rng = random.Random(11)
    with temporary_database("sessiond_reset") as url:
        [srv] = start_replicas(tmp_path, url, 1, lease_seconds=2.0, poll_seconds=0.3,
                               workers=2)
        with closing_all([srv]), srv.stubs() as st:
            st.sessions.CreateSession(session_pb2.CreateSessionRequest(
                session_id="s1", request_id="create-s1"), timeout=10)
            for i in range(3):
                _add(st, "s1", heavy_text(rng, HEAVY_SENTENCES), f"heavy-{i}")
            # Writes of memories wait on a lock the test holds, so the extract stage's
            # transaction is caught mid-write, whatever the machine's speed: its backend
            # waits on the lock inside the transaction until it is terminated. (Reads of
            # memories go on; a read that lost its connection is retried on a new one
            # without failing the stage, so only a write shows the interruption.)
            writing: list[dict[str, object]] = []

            def stage_writing() -> bool:
                writing[:] = sql(url, "SELECT pid FROM pg_stat_activity WHERE datname = "
                                      "current_database() AND application_name = 'sessiond' "
                                      "AND xact_start IS NOT NULL AND wait_event_type = 'Lock' "
                                      "AND query ILIKE '%memor%' "
                                      "AND query ~* '^\\s*(INSERT|UPDATE|DELETE)'")
                return bool(writing)

            with table_write_lock(url, "memories"):
                busy = st.sessions.Commit(session_pb2.CommitRequest(
                    session_id="s1", request_id="commit-1"), timeout=10)
                wait_until(stage_writing, 30.0, "the extract stage writing", interval=0.01)
                killed = sql(url, "SELECT count(pg_terminate_backend(pid)) AS n FROM "
                                  "pg_stat_activity WHERE pid = ANY($1::int[])",
                             [r["pid"] for r in writing])
                assert killed[0]["n"] >= 1
            watch = watch_task(st.tasks, busy.task_id, timeout=30,
                               resume=ResumePolicy(max_attempts=30, max_backoff=0.5))
            last = list(watch)[-1]
            task = st.tasks.GetTask(task_pb2.GetTaskRequest(task_id=busy.task_id),
                                    timeout=10)
            assert task.state == task_pb2.TASK_STATE_COMPLETED, (
                f"{task_pb2.TaskState.Name(task.state)}: {task.error.message}")
            assert last.kind == task_pb2.TASK_EVENT_KIND_COMPLETED
            assert task.attempts >= 2, "the reset did not interrupt the stage"
    print(f"connection reset mid-stage: task completed on attempt {task.attempts}")
