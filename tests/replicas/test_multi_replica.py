"""Three `sessiond serve` replicas on one PostgreSQL database; one is SIGKILLed while
it runs Phase 2.

Writers add messages and commit through random replicas (every call carries a
request_id; a call that fails with UNAVAILABLE, e.g. because its replica died under
it, is sent again unchanged to another replica). Every accepted task is watched
live through a replica other than the one that accepted the commit, and never the
one that will be killed; a second watcher per task (until the kill) uses
`sessiond.client.watch_task` on a channel that prefers the doomed replica, so it has
to re-attach elsewhere. The doomed replica is killed once ten commits were accepted
and the database shows it holding a task past its first stage (checked while the
process is stopped with SIGSTOP, so the task cannot finish in between).

Checked afterwards, through the API of the survivors (and the database for what the
API does not show): every accepted task COMPLETED, the taken-over ones with
attempts > 1 and resumed after the stage that was done when the replica died; every
stage of every task completed exactly once; every watcher saw seq 1..n in order,
ending with COMPLETED; every acknowledged message is in exactly one place (live, or
one archive) with per-session seqs 1..m; archives 1..n without gaps, all DONE;
finalize ran exactly once per task (commit_count == DONE archives, memories totals ==
sum of the task results); no task the clients did not get an answer for.

Replay a run: SESSIOND_REPLICA_SEED=<seed> (printed by the test).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from sessiond.client import watch_task
from sessiond.v1 import common_pb2, session_pb2, task_pb2, task_pb2_grpc

from tests.faults.harness import ServerProcess, Stubs, heavy_text
from tests.pg import temporary_database
from tests.replicas.helpers import (
    FailoverClient,
    closing_all,
    migrate,
    sql,
    start_replicas,
    text_part,
    wait_until,
)

pytestmark = pytest.mark.postgres

REPLICAS = 3
VICTIM = 0  # index of the replica that gets SIGKILLed
SESSIONS = 6
WRITERS = 4
MAX_ROUNDS = 12  # per writer; writers stop ~1 s after the kill anyway
SENTENCES = 30  # per message: makes the extract stage last a few hundred ms
LEASE_SECONDS = 2.0
POLL_SECONDS = 0.3
WATCH_TIMEOUT = 50.0
KILL_AFTER_COMMITS = 10
PHASE2_STAGES = ("summarize", "extract", "relations", "active_counts", "index")
MEMORY_FIELDS = tuple(f.name for f in common_pb2.MemoryCounts.DESCRIPTOR.fields)
EK = task_pb2.TaskEventKind


@dataclass
class WatchRecord:
    task_id: str
    replica: int  # the replica watched through; -1: the fail-over channel
    events: list[tuple[float, task_pb2.TaskEvent]] = field(default_factory=list)
    error: str = ""
    resumes: int = 0
    done: bool = False

    @property
    def seqs(self) -> list[int]:
        return [e.seq for _, e in self.events]


@dataclass
class CommitRecord:
    session_id: str
    task_id: str
    acceptor: int
    accepted_at: float


@dataclass
class Ledger:
    """What the clients were told (acknowledged), shared by the client threads."""

    messages: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    commits: list[CommitRecord] = field(default_factory=list)
    watches: list[WatchRecord] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self.lock:
            self.threads.append(t)
        t.start()


def _watch_raw(stubs: Stubs, rec: WatchRecord) -> None:
    """One plain WatchTask stream (no re-attach): it must deliver everything itself."""
    try:
        for resp in stubs.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=rec.task_id),
                                          timeout=WATCH_TIMEOUT):
            if resp.HasField("event"):
                rec.events.append((time.monotonic(), resp.event))
        rec.done = True
    except grpc.RpcError as exc:
        rec.error = f"{exc.code()}: {exc.details()}"
    except Exception as exc:  # reported by the test
        rec.error = repr(exc)


def _watch_failover(stub: task_pb2_grpc.TaskServiceStub, rec: WatchRecord) -> None:
    """`watch_task` re-attaching (after_seq = last delivered) across the kill."""
    try:
        watch = watch_task(stub, rec.task_id, timeout=WATCH_TIMEOUT)
        for ev in watch:
            rec.events.append((time.monotonic(), ev))
        rec.resumes = watch.resumes
        rec.done = True
    except Exception as exc:  # reported by the test
        rec.error = repr(exc)


def _list_archives(stubs: Stubs, session_id: str) -> list[session_pb2.Archive]:
    out: list[session_pb2.Archive] = []
    token = ""
    for _ in range(100):
        page = stubs.sessions.ListArchives(session_pb2.ListArchivesRequest(
            session_id=session_id, page_size=50, page_token=token), timeout=10)
        out += page.archives
        token = page.next_page_token
        if not token:
            return out
    raise AssertionError("ListArchives did not end")


def _list_tasks(stubs: Stubs, session_id: str) -> list[task_pb2.Task]:
    out: list[task_pb2.Task] = []
    token = ""
    for _ in range(100):
        page = stubs.tasks.ListTasks(task_pb2.ListTasksRequest(
            session_id=session_id, page_size=50, page_token=token), timeout=10)
        out += page.tasks
        token = page.next_page_token
        if not token:
            return out
    raise AssertionError("ListTasks did not end")


def test_three_replicas_survive_sigkill_during_phase2(tmp_path: Path) -> None:
    seed = int(os.environ.get("SESSIOND_REPLICA_SEED")
               or random.SystemRandom().randrange(2**31))
    started = time.monotonic()
    with temporary_database("sessiond_replicas") as url:
        assert "schema version 0 ->" in migrate(url)
        servers = start_replicas(tmp_path, url, REPLICAS, lease_seconds=LEASE_SECONDS,
                                 poll_seconds=POLL_SECONDS, workers=4)
        with closing_all(servers):
            stubs = [s.stubs() for s in servers]
            victim = servers[VICTIM]
            backup = servers[(VICTIM + 1) % REPLICAS]
            # pick_first over two addresses: the doomed replica while it lives, then the next.
            failover_channel = grpc.insecure_channel(
                f"ipv4:127.0.0.1:{victim.port},127.0.0.1:{backup.port}")
            try:
                _scenario(url, seed, servers, stubs,
                          task_pb2_grpc.TaskServiceStub(failover_channel), started)
            except BaseException:
                for i, s in enumerate(servers):
                    print(f"--- replica {i} (pid {s.pid}) log tail ---\n{s.log_tail(3000)}")
                raise
            finally:
                failover_channel.close()
                for st in stubs:
                    st.close()


def _scenario(url: str, seed: int, servers: list[ServerProcess], stubs: list[Stubs],
              failover_tasks: task_pb2_grpc.TaskServiceStub, started: float) -> None:
    victim = servers[VICTIM]
    survivors = [i for i in range(REPLICAS) if i != VICTIM]
    client = FailoverClient(stubs)
    ledger = Ledger()
    killed = threading.Event()
    stop = threading.Event()
    sessions = [f"s{i}" for i in range(SESSIONS)]
    rng0 = random.Random(seed)
    for sid in sessions:
        client.call(rng0, "CreateSession", session_pb2.CreateSessionRequest(
            session_id=sid, request_id=f"create-{sid}"))

    def writer(w: int) -> None:
        rng = random.Random(seed * 31 + w)
        try:
            for r in range(MAX_ROUNDS):
                if stop.is_set():
                    return
                sid = rng.choice(sessions)
                for k in range(rng.randint(1, 3)):
                    req = session_pb2.AddMessageRequest(
                        session_id=sid, role=session_pb2.ROLE_USER,
                        parts=[text_part(heavy_text(rng, SENTENCES))],
                        request_id=f"add-{w}-{r}-{k}")
                    resp, _ = client.call(rng, "AddMessage", req)
                    with ledger.lock:
                        ledger.messages[sid].append(resp.message.id)
                creq = session_pb2.CommitRequest(session_id=sid,
                                                 keep_recent_count=rng.choice((0, 0, 1)),
                                                 request_id=f"commit-{w}-{r}")
                reply, acceptor = client.call(rng, "Commit", creq)
                if reply.archived:
                    with ledger.lock:
                        ledger.commits.append(CommitRecord(sid, reply.task_id, acceptor,
                                                           time.monotonic()))
                    others = [i for i in range(REPLICAS) if i not in (acceptor, VICTIM)]
                    raw = WatchRecord(reply.task_id, rng.choice(others))
                    with ledger.lock:
                        ledger.watches.append(raw)
                    ledger.spawn(_watch_raw, stubs[raw.replica], raw)
                    if not killed.is_set():
                        fo = WatchRecord(reply.task_id, -1)
                        with ledger.lock:
                            ledger.watches.append(fo)
                        ledger.spawn(_watch_failover, failover_tasks, fo)
                time.sleep(rng.uniform(0.05, 0.3))
        except Exception as exc:
            with ledger.lock:
                ledger.errors.append(f"writer {w}: {exc!r}")

    writers = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(WRITERS)]
    for th in writers:
        th.start()

    # ------------------------------------------------------------------ the kill
    victim_pid = victim.pid
    assert victim_pid is not None
    owner = f"%:{victim_pid}:%"  # lease_owner is hostname:pid:random
    held_sql = ("SELECT task_id, done_stage FROM tasks WHERE state='running' "
                "AND lease_owner LIKE $1")

    def victim_mid_phase2() -> bool:
        with ledger.lock:
            if len(ledger.commits) < KILL_AFTER_COMMITS:  # let a backlog build up
                return False
        return bool(sql(url, held_sql + " AND done_stage <> 'queued'", owner))

    def kill_victim_mid_phase2() -> dict[str, str]:
        """Freeze the victim (SIGSTOP) when it looks busy, confirm from the database
        that it holds a task past its first stage, then SIGKILL it; else thaw it and
        look again. Returns the tasks it held, with the stage each had done."""
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if victim_mid_phase2():
                os.killpg(victim_pid, signal.SIGSTOP)
                held = {str(r["task_id"]): str(r["done_stage"]) for r in sql(url, held_sql,
                                                                              owner)}
                if any(stage != "queued" for stage in held.values()):
                    victim.kill()
                    return held
                os.killpg(victim_pid, signal.SIGCONT)
            time.sleep(0.02)
        raise AssertionError("the victim never ran a task past its first stage")

    taken = kill_victim_mid_phase2()
    kill_time = time.monotonic()
    killed.set()
    time.sleep(1.0)  # writers keep going on the survivors for a while
    stop.set()
    for th in writers:
        th.join(40.0)
    assert not any(th.is_alive() for th in writers), "a writer hung"
    assert not ledger.errors, ledger.errors

    # ------------------------------------------------------------------ Phase 2 finishes
    task_ids = [c.task_id for c in ledger.commits]
    assert len(set(task_ids)) == len(task_ids), "one task id acknowledged twice"
    assert set(taken) <= set(task_ids)

    def settled() -> bool:
        rows = sql(url, "SELECT count(*) AS n FROM tasks WHERE state IN ('pending', 'running')")
        return int(rows[0]["n"]) == 0

    wait_until(settled, 45.0, "every task finished on the survivors", interval=0.2)
    settle_time = time.monotonic()
    with ledger.lock:
        threads = list(ledger.threads)
    for th in threads:
        th.join(max(1.0, WATCH_TIMEOUT - (time.monotonic() - kill_time)))
    assert not any(th.is_alive() for th in threads), "a watcher did not end"

    survivor = stubs[survivors[0]]
    tasks: dict[str, task_pb2.Task] = {}
    for i, tid in enumerate(task_ids):
        st = stubs[survivors[i % len(survivors)]]
        tasks[tid] = st.tasks.GetTask(task_pb2.GetTaskRequest(task_id=tid), timeout=10)
    not_completed = {tid: task_pb2.TaskState.Name(t.state) for tid, t in tasks.items()
                     if t.state != task_pb2.TASK_STATE_COMPLETED}
    assert not not_completed, f"tasks not COMPLETED: {not_completed}"
    # nothing the clients were not told about (a retried commit did not run twice)
    assert int(sql(url, "SELECT count(*) AS n FROM tasks")[0]["n"]) == len(task_ids)

    # ------------------------------------------------------------------ watchers
    raw_by_task = {w.task_id: w for w in ledger.watches if w.replica >= 0}
    assert set(raw_by_task) == set(task_ids)
    commit_by_task = {c.task_id: c for c in ledger.commits}
    for w in ledger.watches:
        label = f"watch of {w.task_id} via {'fail-over' if w.replica < 0 else w.replica}"
        assert w.done and not w.error, f"{label} broke: {w.error}"
        n = tasks[w.task_id].last_seq
        assert w.seqs == list(range(1, n + 1)), f"{label}: seqs {w.seqs}, last_seq {n}"
        assert w.events[-1][1].kind == task_pb2.TASK_EVENT_KIND_COMPLETED, label
        if w.replica >= 0:
            assert w.replica not in (VICTIM, commit_by_task[w.task_id].acceptor), label
    failover = [w for w in ledger.watches if w.replica < 0]
    resumed = [w for w in failover if w.resumes > 0]
    assert resumed, "no watch through the killed replica had to re-attach"
    # the taken-over tasks' plain watchers were streaming before the kill and after it
    assert any(raw_by_task[t].events[0][0] < kill_time < raw_by_task[t].events[-1][0]
               for t in taken)

    # ------------------------------------------------------------------ journals
    for tid, t in tasks.items():
        events = [e for _, e in raw_by_task[tid].events]
        done = collections.Counter(e.stage for e in events
                                   if e.kind == EK.TASK_EVENT_KIND_STAGE_COMPLETED)
        assert done == collections.Counter(PHASE2_STAGES), f"{tid}: stages completed {done}"
        assert [e.kind for e in events].count(EK.TASK_EVENT_KIND_COMPLETED) == 1, tid
        starts = [e for e in events if e.kind == EK.TASK_EVENT_KIND_STARTED]
        assert [e.attempt for e in starts] == list(range(1, t.attempts + 1)), tid
        if tid in taken:
            assert t.attempts > 1, f"{tid} was taken over but ran {t.attempts} attempt(s)"
            assert any(e.attempt > 1 and e.message.startswith(f"resumed after {taken[tid]}")
                       for e in starts), f"{tid}: {[e.message for e in starts]}"
        assert t.HasField("result") and t.result.archive_uri == t.archive_uri

    # ------------------------------------------------------------------ sessions
    tasks_of = collections.defaultdict(list)
    for c in ledger.commits:
        tasks_of[c.session_id].append(c.task_id)
    for sid in sessions:
        acked = ledger.messages[sid]
        archives = _list_archives(survivor, sid)
        assert [a.index for a in archives] == list(range(1, len(archives) + 1)), sid
        assert all(a.state == session_pb2.ARCHIVE_STATE_DONE for a in archives), sid
        assert sorted(a.task_id for a in archives) == sorted(tasks_of[sid]), sid
        placed: list[session_pb2.Message] = []
        for a in archives:
            full = survivor.sessions.GetArchive(session_pb2.GetArchiveRequest(
                session_id=sid, index=a.index), timeout=10)
            assert len(full.messages) == a.message_count > 0, (sid, a.index)
            placed += full.messages
        ctx = survivor.sessions.GetSessionContext(session_pb2.GetSessionContextRequest(
            session_id=sid), timeout=10)
        placed += ctx.current_messages
        ids = collections.Counter(m.id for m in placed)
        assert [m.seq for m in placed] == list(range(1, len(acked) + 1)), sid
        assert set(ids) == set(acked) and max(ids.values(), default=1) == 1, sid
        meta = survivor.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid),
                                            timeout=10)
        assert meta.commit_count == len(archives) == meta.archive_count, sid
        assert meta.message_count == len(acked)
        assert meta.live_message_count == len(ctx.current_messages)
        listed = _list_tasks(survivor, sid)
        assert sorted(t.task_id for t in listed) == sorted(tasks_of[sid]), sid
        for name in MEMORY_FIELDS:
            total = sum(getattr(tasks[tid].result.memories_extracted, name)
                        for tid in tasks_of[sid])
            assert getattr(meta.memories_extracted, name) == total, (sid, name)

    print(f"replicas seed={seed} (replay: SESSIOND_REPLICA_SEED={seed}): "
          f"{len(task_ids)} tasks, {len(taken)} taken over "
          f"({', '.join(sorted(set(taken.values())))} done), "
          f"{sum(len(v) for v in ledger.messages.values())} messages, "
          f"{client.retries} client retries, {len(resumed)}/{len(failover)} fail-over "
          f"watches re-attached, settled {settle_time - kill_time:.1f}s after the kill, "
          f"total {time.monotonic() - started:.1f}s")
