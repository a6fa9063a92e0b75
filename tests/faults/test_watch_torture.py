"""Watch torture: many watchers of running tasks are disconnected at random (the call
is cancelled) and resume with after_seq = last seen, while the server is restarted
gracefully twice (open streams end UNAVAILABLE; resume after the restart). Each
watcher's concatenated events must equal the task's journal exactly: 1..n in order,
no gaps, no repeats, ending with the terminal event."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from sessiond.v1 import session_pb2, task_pb2

from tests.faults.harness import FAST_ARGS, TERMINAL, ServerProcess, Stubs, heavy_text

SESSIONS = 4
COMMITS_PER_SESSION = 4
WATCHERS_PER_TASK = 3
RESTARTS = 2
TIMEOUT = 15.0


@dataclass
class Watcher:
    task_id: str
    rng: random.Random
    seqs: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    calls: int = 0
    cancels: int = 0
    unavailable: int = 0
    shutdown_endings: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.kinds) and self.kinds[-1] in TERMINAL

    def run(self, srv: ServerProcess, deadline: float) -> None:
        stubs = Stubs(srv.target)
        try:
            while not self.done and time.monotonic() < deadline:
                stubs = self._one_call(srv, stubs)
        finally:
            stubs.close()

    def _one_call(self, srv: ServerProcess, stubs: Stubs) -> Stubs:
        after = self.seqs[-1] if self.seqs else 0
        self.calls += 1
        call = stubs.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=self.task_id,
                                                               after_seq=after), timeout=30)
        # Disconnect at a random moment, or after a random number of events.
        timer = threading.Timer(self.rng.uniform(0.02, 0.5), call.cancel)
        timer.start()
        quota = self.rng.randint(1, 4)
        first = True
        try:
            for item in call:
                kind = item.WhichOneof("kind")
                if first:
                    first = False
                    if kind != "snapshot":
                        self.problems.append(f"first item {kind}")
                    elif item.snapshot.last_seq < after:
                        self.problems.append(f"snapshot last_seq {item.snapshot.last_seq} "
                                             f"< after_seq {after}")
                    continue
                if kind != "event":
                    continue
                ev = item.event
                last = self.seqs[-1] if self.seqs else 0
                if ev.seq != last + 1:
                    self.problems.append(f"seq {ev.seq} after {last}")
                self.seqs.append(ev.seq)
                self.kinds.append(ev.kind)
                quota -= 1
                if quota <= 0 and not self.done and self.rng.random() < 0.5:
                    call.cancel()
                    self.cancels += 1
                    return stubs
            if not self.done:
                self.problems.append(f"stream ended OK before the terminal event "
                                     f"(last {self.seqs[-1:]})")
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.CANCELLED:
                self.cancels += 1
            elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self.unavailable += 1
                if "shutting down" in (exc.details() or ""):
                    self.shutdown_endings += 1
                stubs.close()  # the server restarts: a fresh channel skips the backoff
                time.sleep(0.05)
                return Stubs(srv.target)
            else:
                self.problems.append(f"{code.name}: {exc.details()}")
                time.sleep(0.05)
        finally:
            timer.cancel()
        return stubs


def test_watchers_disconnect_and_resume_across_restarts(tmp_path: Path) -> None:
    rng = random.Random(11)
    # Set-up with no Phase 2 worker, so every task is still queued when the watchers
    # attach; the first restart turns one worker on.
    srv = ServerProcess(tmp_path / "data", extra_args=[*FAST_ARGS, "--workers", "0"])
    try:
        srv.start()
        task_ids: list[str] = []
        with srv.stubs() as s:
            for i in range(SESSIONS):
                s.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=f"w{i}"),
                                         timeout=TIMEOUT)
            for _ in range(COMMITS_PER_SESSION):
                for i in range(SESSIONS):
                    for _ in range(2):
                        s.sessions.AddMessage(session_pb2.AddMessageRequest(
                            session_id=f"w{i}", role=session_pb2.ROLE_USER,
                            parts=[session_pb2.Part(text=session_pb2.TextPart(
                                text=heavy_text(rng, 150)))]), timeout=TIMEOUT)
                    reply = s.sessions.Commit(session_pb2.CommitRequest(session_id=f"w{i}"),
                                              timeout=TIMEOUT)
                    task_ids.append(reply.task_id)
        watchers = [Watcher(t, random.Random(rng.random())) for t in task_ids
                    for _ in range(WATCHERS_PER_TASK)]
        deadline = time.monotonic() + 90
        threads = [threading.Thread(target=w.run, args=(srv, deadline), daemon=True)
                   for w in watchers]
        for t in threads:
            t.start()
        exit_codes = []
        unfinished_at_restart = []
        for n in range(RESTARTS):
            time.sleep(0.4 if n == 0 else 0.8)
            with srv.stubs() as s:
                unfinished_at_restart.append(sum(
                    1 for t in task_ids if s.tasks.GetTask(task_pb2.GetTaskRequest(task_id=t),
                                                           timeout=TIMEOUT).state
                    not in (task_pb2.TASK_STATE_COMPLETED, task_pb2.TASK_STATE_FAILED)))
            exit_codes.append(srv.terminate())
            srv.extra_args = [*FAST_ARGS, "--workers", "1"]
            srv.start()
        # A watcher stops at the deadline; its last call ends within its cancel timer
        # (<= 0.5 s), given slack for a loaded machine's thread scheduling.
        for t in threads:
            t.join(max(10.0, deadline - time.monotonic()))
        stuck = [(w.task_id, w.seqs[-1:], w.calls)
                 for w, t in zip(watchers, threads, strict=True) if t.is_alive() or not w.done]
        assert not stuck, f"watchers did not finish (task, last seq, calls): {stuck[:5]}"
        assert exit_codes == [0] * RESTARTS, srv.log_tail()
        assert unfinished_at_restart[0] == len(task_ids)
        assert unfinished_at_restart[-1] > 0, "Phase 2 finished before the last restart"
        with srv.stubs() as s:
            for tid in task_ids:
                task = s.tasks.GetTask(task_pb2.GetTaskRequest(task_id=tid), timeout=TIMEOUT)
                assert task.state == task_pb2.TASK_STATE_COMPLETED, task
                journal = [i.event for i in s.tasks.WatchTask(
                    task_pb2.WatchTaskRequest(task_id=tid), timeout=TIMEOUT)
                    if i.WhichOneof("kind") == "event"]
                seqs = [e.seq for e in journal]
                assert seqs == list(range(1, task.last_seq + 1))
                assert journal[-1].kind in TERMINAL
                for w in (w for w in watchers if w.task_id == tid):
                    assert not w.problems, (tid, w.problems)
                    assert w.seqs == seqs, (tid, w.seqs, seqs)
                    assert w.kinds == [e.kind for e in journal]
        calls = sum(w.calls for w in watchers)
        cancels = sum(w.cancels for w in watchers)
        unavailable = sum(w.unavailable for w in watchers)
        shutdown = sum(w.shutdown_endings for w in watchers)
        print(f"{len(watchers)} watchers of {len(task_ids)} tasks: {calls} calls, "
              f"{cancels} cancelled, {unavailable} UNAVAILABLE ({shutdown} by graceful "
              f"shutdown), unfinished at restarts {unfinished_at_restart}")
        assert cancels >= len(watchers)  # every watcher was cut off at least ~once
        assert shutdown >= 1, "no stream was ended UNAVAILABLE by a graceful shutdown"
        assert srv.terminate() == 0
    finally:
        srv.close()
