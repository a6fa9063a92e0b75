"""Crash episodes of archive reverts and RetryTask: nothing lost, nothing twice.

Each episode arms one failpoint (`failpoints.HISTORY_POINTS`), makes a real `sessiond
serve` process reach it, restarts it without failpoints, repeats the unacknowledged
call with the same request_id and checks the outcome through the API:

- revert.*: a session with two archives (archive 2 updates archive 1's profile and
  creates a preference); RevertArchive(2) is interrupted. Afterwards exactly one
  archive_revert task exists and COMPLETED once (journal 1..n, one STAGE_COMPLETED,
  one COMPLETED), each of the two memories has exactly one `reverted` change, the
  profile reads as before archive 2, the preference is gone (also from Recall), and a
  second revert is FAILED_PRECONDITION ALREADY_REVERTED.
- retry.*: a commit task held PENDING (a server with no Phase 2 workers) is
  cancelled, then RetryTask is interrupted. Afterwards the task COMPLETED with
  `retries` = 1 and exactly one RETRIED event, its archive DONE, commit_count 1.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sessiond.server.failpoints import HISTORY_POINTS
from sessiond.v1 import memory_pb2, session_pb2, task_pb2

from tests.faults.harness import FAST_ARGS, ServerProcess, Stubs

M, S, K = memory_pb2, session_pb2, task_pb2
TIMEOUT = 10.0
TERMINAL = (K.TASK_STATE_COMPLETED, K.TASK_STATE_FAILED, K.TASK_STATE_CANCELLED)


@dataclass
class HistoryStats:
    episodes: int = 0
    failpoint_kills: int = 0
    failpoints_not_reached: list[str] = field(default_factory=list)
    reverts_completed: int = 0
    retries_completed: int = 0

    def summary(self) -> str:
        return (f"history_episodes={self.episodes} failpoint_kills={self.failpoint_kills} "
                f"not_reached={len(self.failpoints_not_reached)} "
                f"reverts_completed={self.reverts_completed} "
                f"retries_completed={self.retries_completed}")


class HistoryCrashRun:
    def __init__(self, work_dir: Path, *, seed: int, server_args: Sequence[str] = FAST_ARGS,
                 log: Callable[[str], None] = print) -> None:
        self.rng = random.Random(seed)
        self.args = list(server_args)
        self.srv = ServerProcess(Path(work_dir) / "history-data", extra_args=self.args,
                                 log_path=Path(work_dir) / "history-server.log")
        self.log = log
        self.stats = HistoryStats()
        self.violations: list[str] = []

    def violation(self, msg: str) -> None:
        self.violations.append(msg)
        self.log(f"VIOLATION: {msg}")

    def close(self) -> None:
        self.srv.close()

    def run(self, points: Sequence[str]) -> HistoryStats:
        try:
            for point in points:
                assert point in HISTORY_POINTS, point
                t0 = time.monotonic()
                self.stats.episodes += 1
                try:
                    if point.startswith("revert."):
                        self._revert_episode(point)
                    else:
                        self._retry_episode(point)
                except (grpc.RpcError, AssertionError, StopIteration) as exc:
                    self.violation(f"{point}: the episode broke off: {exc!r}")
                    self.srv.kill()
                self.log(f"history episode {point}: {time.monotonic() - t0:.1f}s, "
                         f"violations so far {len(self.violations)}")
        finally:
            self.close()
        return self.stats

    # ------------------------------------------------------------------ helpers
    def _start(self, failpoints: str = "", workers: int | None = None) -> Stubs:
        args = [a for a in self.args]
        if "--workers" in args:
            i = args.index("--workers")
            del args[i:i + 2]
        if workers is not None:
            args += ["--workers", str(workers)]
        self.srv.extra_args = args
        self.srv.start(failpoints)
        return self.srv.stubs()

    def _interrupted(self, point: str, call: Callable[[], Any]) -> Any:
        """Make the call the armed server should die in; the reply if it got one."""
        reply = None
        try:
            reply = call()
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                self.violation(f"{point}: the interrupted call answered {err.code().name}: "
                               f"{err.details()}")
        status = self.srv.wait_exit(8.0)
        if status is None:
            self.srv.kill()
            self.stats.failpoints_not_reached.append(point)
            self.log(f"failpoint {point} not reached; killed")
        elif status != 137:
            self.violation(f"{point}: server exited with {status}, expected 137")
        else:
            self.stats.failpoint_kills += 1
        return reply

    def _wait(self, stubs: Stubs, task_id: str, timeout: float = 30.0) -> K.Task:
        deadline = time.monotonic() + timeout
        while True:
            task = stubs.tasks.GetTask(K.GetTaskRequest(task_id=task_id), timeout=TIMEOUT)
            if task.state in TERMINAL or time.monotonic() > deadline:
                return task
            time.sleep(0.05)

    def _journal(self, point: str, stubs: Stubs, task_id: str) -> list[K.TaskEvent]:
        evs = [i.event for i in stubs.tasks.WatchTask(K.WatchTaskRequest(task_id=task_id),
                                                      timeout=30)
               if i.WhichOneof("kind") == "event"]
        if [e.seq for e in evs] != list(range(1, len(evs) + 1)):
            self.violation(f"{point}: journal of {task_id} is not 1..n: {[e.seq for e in evs]}")
        done = [e for e in evs if e.kind == K.TASK_EVENT_KIND_COMPLETED]
        if len(done) != 1 or evs[-1].kind != K.TASK_EVENT_KIND_COMPLETED:
            self.violation(f"{point}: {task_id} has {len(done)} COMPLETED events")
        return evs

    def _commit(self, stubs: Stubs, sid: str, *texts: str) -> str:
        for t in texts:
            stubs.sessions.AddMessage(S.AddMessageRequest(
                session_id=sid, role=S.ROLE_USER,
                parts=[S.Part(text=S.TextPart(text=t))]), timeout=TIMEOUT)
        return str(stubs.sessions.Commit(S.CommitRequest(session_id=sid),
                                         timeout=TIMEOUT).task_id)

    # ------------------------------------------------------------------ revert
    def _revert_episode(self, point: str) -> None:
        n = self.stats.episodes
        sid = f"rv{n}"
        with self._start() as stubs:
            stubs.sessions.CreateSession(S.CreateSessionRequest(session_id=sid), timeout=TIMEOUT)
            # Words unique to this episode, so Recall checks see only its memories.
            city, editor = f"Zanzibar{n}x", f"vimeditor{n}x"
            for texts in ((f"My name is Ada{n}.", "I prefer green tea in the morning."),
                          (f"I live in {city}.", f"I prefer the {editor} for code.")):
                t = self._wait(stubs, self._commit(stubs, sid, *texts))
                if t.state != K.TASK_STATE_COMPLETED:
                    self.violation(f"{point}: setup commit ended {t.state}")
                    return
            before = [c for c in stubs.memories.ListMemoryChanges(M.ListMemoryChangesRequest(
                session_id=sid, archive_index=2), timeout=TIMEOUT).changes]
        self.srv.terminate()
        profile_before = next(c.before.content for c in before
                              if c.op == M.MEMORY_CHANGE_OP_UPDATED)
        created = next(c.memory_id for c in before if c.op == M.MEMORY_CHANGE_OP_CREATED)
        rid = f"rv-{uuid.uuid4().hex}"
        request = S.RevertArchiveRequest(session_id=sid, index=2, request_id=rid)
        stubs = self._start(f"{point}@1")
        try:
            self._interrupted(point, lambda: stubs.sessions.RevertArchive(request,
                                                                          timeout=TIMEOUT))
        finally:
            stubs.close()
        with self._start() as stubs:
            task = stubs.sessions.RevertArchive(request, timeout=TIMEOUT)
            done = self._wait(stubs, task.task_id)
            listed = stubs.tasks.ListTasks(K.ListTasksRequest(
                session_id=sid, task_type="archive_revert"), timeout=TIMEOUT).tasks
            if [t.task_id for t in listed] != [task.task_id]:
                self.violation(f"{point}: revert tasks {[t.task_id for t in listed]}, "
                               f"expected just {task.task_id}")
            if done.state != K.TASK_STATE_COMPLETED:
                self.violation(f"{point}: revert ended {done.state}: {done.error.message}")
                return
            self.stats.reverts_completed += 1
            evs = self._journal(point, stubs, task.task_id)
            if sum(e.kind == K.TASK_EVENT_KIND_STAGE_COMPLETED for e in evs) != 1:
                self.violation(f"{point}: the revert stage completed more than once")
            r = done.result.revert
            if (r.deleted, r.restored) != (1, 1):
                self.violation(f"{point}: revert result {r}")
            rev = [c for c in stubs.memories.ListMemoryChanges(M.ListMemoryChangesRequest(
                session_id=sid, archive_index=2), timeout=TIMEOUT).changes
                   if c.op == M.MEMORY_CHANGE_OP_REVERTED]
            if sorted(c.memory_id for c in rev) != sorted(c.memory_id for c in before):
                self.violation(f"{point}: reverted changes {[c.memory_id for c in rev]}")
            mems = stubs.memories.ListMemories(M.ListMemoriesRequest(page_size=1000),
                                               timeout=TIMEOUT).memories
            if any(m.memory_id == created for m in mems):
                self.violation(f"{point}: the memory archive 2 created is still there")
            if profile_before not in [m.content for m in mems]:
                self.violation(f"{point}: no memory reads {profile_before!r} again")
            for word in (city, editor):
                items = stubs.memories.Recall(M.RecallRequest(
                    query=word, kinds=[M.RECALL_KIND_MEMORY]), timeout=TIMEOUT).items
                if items:
                    self.violation(f"{point}: Recall still finds {word!r} in memories")
            try:
                stubs.sessions.RevertArchive(S.RevertArchiveRequest(session_id=sid, index=2),
                                             timeout=TIMEOUT)
                self.violation(f"{point}: a second revert was accepted")
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.FAILED_PRECONDITION or \
                        _reason(err) != "ALREADY_REVERTED":
                    self.violation(f"{point}: second revert: {err.code().name}")
        self.srv.terminate()

    # ------------------------------------------------------------------ retry
    def _retry_episode(self, point: str) -> None:
        sid = f"rt{self.stats.episodes}"
        stubs = self._start(f"{point}@1", workers=0)  # Phase 2 never starts here
        try:
            stubs.sessions.CreateSession(S.CreateSessionRequest(session_id=sid), timeout=TIMEOUT)
            task_id = self._commit(stubs, sid, "My name is Bea.", "The deadline is tomorrow.")
            cancelled = stubs.tasks.CancelTask(K.CancelTaskRequest(task_id=task_id),
                                               timeout=TIMEOUT)
            if cancelled.state != K.TASK_STATE_CANCELLED:
                self.violation(f"{point}: a PENDING task did not cancel at once")
                self.srv.kill()
                return
            request = K.RetryTaskRequest(task_id=task_id, request_id=f"rt-{uuid.uuid4().hex}")
            self._interrupted(point, lambda: stubs.tasks.RetryTask(request, timeout=TIMEOUT))
        finally:
            stubs.close()
        with self._start() as stubs:
            stubs.tasks.RetryTask(request, timeout=TIMEOUT)
            done = self._wait(stubs, task_id)
            if done.state != K.TASK_STATE_COMPLETED or done.retries != 1:
                self.violation(f"{point}: retried task ended {done.state} with "
                               f"retries={done.retries}")
                return
            self.stats.retries_completed += 1
            evs = self._journal(point, stubs, task_id)
            if sum(e.kind == K.TASK_EVENT_KIND_RETRIED for e in evs) != 1:
                self.violation(f"{point}: {task_id} was retried more than once")
            arch = stubs.sessions.GetArchive(S.GetArchiveRequest(session_id=sid, index=1),
                                             timeout=TIMEOUT)
            meta = stubs.sessions.GetSession(S.GetSessionRequest(session_id=sid),
                                             timeout=TIMEOUT)
            if arch.state != S.ARCHIVE_STATE_DONE or meta.commit_count != 1:
                self.violation(f"{point}: archive {arch.state}, commit_count "
                               f"{meta.commit_count}")
        self.srv.terminate()


def _reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for d in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if d.Unpack(info):
            return str(info.reason)
    return ""
