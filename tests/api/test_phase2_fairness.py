"""Phase 2 is fair between identities (the CPU gate, phase2/gate.py): a light
identity's small commits finish about as fast while a heavy identity's backlog of
large archives runs as on the idle server, over a real server and store.

Robust on a loaded machine: the bound is a generous ratio to the idle figure
measured in the same test, and the heavy backlog must still be mostly open when
the light commits are done (else the figure would say nothing)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from sessiond.server.phase2.engines.base import SummaryRequest, SummaryResponse
from sessiond.server.phase2.engines.offline import OfflineEngine
from sessiond.server.phase2.gate import checkpoint
from sessiond.v1 import session_pb2 as S
from sessiond.v1 import task_pb2 as T

from tests.api.helpers import text_part
from tests.conftest import Running, ServerFactory

HEAVY = (("x-sessiond-account", "heavy"),)
LIGHT = (("x-sessiond-account", "light"),)
HEAVY_ARCHIVES = 8
HEAVY_MESSAGES = 100
HEAVY_CPU_SECONDS = 0.4


class HeavySummaries(OfflineEngine):
    """The offline engine, with the heavy identity's summaries costing
    HEAVY_CPU_SECONDS of pure-Python CPU each (as a large archive's would), sliced at
    checkpoints as the engine's own loops are."""

    def summarize_now(self, request: SummaryRequest) -> SummaryResponse:
        if request.session_id.startswith("heavy-"):
            end = time.thread_time() + HEAVY_CPU_SECONDS
            while time.thread_time() < end:
                sum(i * i for i in range(2000))
                checkpoint()
        return super().summarize_now(request)


def _words(seed: int, n: int) -> str:
    vocab = ("alpha", "beta", "gamma", "delta", "error", "deploy", "cache", "index",
             "shard", "query", "token", "vector", "yesterday", "meeting", "service")
    return " ".join(vocab[(seed * 7 + i * 3) % len(vocab)] + str((seed + i) % 97)
                    for i in range(n))


def _fill_heavy(server: Running) -> None:
    for k in range(HEAVY_ARCHIVES):
        sid = f"heavy-{k}"
        server.sessions.CreateSession(S.CreateSessionRequest(session_id=sid), metadata=HEAVY)
        for start in range(0, HEAVY_MESSAGES, 100):
            server.sessions.AddMessages(S.AddMessagesRequest(session_id=sid, messages=[
                S.NewMessage(role=S.ROLE_USER if j % 2 == 0 else S.ROLE_ASSISTANT,
                             parts=[text_part(_words(k * 1000 + j, 40) + ". It fails?")])
                for j in range(start, start + 100)]), metadata=HEAVY, timeout=60)


def _light_commit(server: Running, sid: str) -> float:
    """Seconds from the light task's claim (STARTED) to its COMPLETED event, as its
    journal records them: the Phase 2 run itself, which is what the gate shares
    (the way there and back, Commit and the watch, also waits for the GIL held by
    an in-process client and the heavy threads, and is measured by bench/fairness.py)."""
    server.sessions.CreateSession(S.CreateSessionRequest(session_id=sid), metadata=LIGHT)
    for j in range(4):
        server.sessions.AddMessage(S.AddMessageRequest(
            session_id=sid, role=S.ROLE_USER if j % 2 == 0 else S.ROLE_ASSISTANT,
            parts=[text_part(f"small message {j} about {sid}")]), metadata=LIGHT)
    task_id = server.sessions.Commit(S.CommitRequest(session_id=sid), metadata=LIGHT).task_id
    at: dict[int, float] = {}
    for item in server.tasks.WatchTask(T.WatchTaskRequest(task_id=task_id), metadata=LIGHT,
                                       timeout=120):
        if item.WhichOneof("kind") == "event":
            at.setdefault(item.event.kind, item.event.time.ToDatetime().timestamp())
    assert T.TASK_EVENT_KIND_COMPLETED in at, f"{sid}: task {task_id} did not complete"
    return at[T.TASK_EVENT_KIND_COMPLETED] - at[T.TASK_EVENT_KIND_STARTED]


def _open_heavy(server: Running) -> int:
    n = 0
    for state in (T.TASK_STATE_PENDING, T.TASK_STATE_RUNNING):
        n += len(server.tasks.ListTasks(T.ListTasksRequest(state=state, page_size=100),
                                        metadata=HEAVY).tasks)
    return n


def _light_under_heavy(server: Running, rounds: int = 6) -> tuple[float, float, int]:
    """(idle median, median under the heavy backlog, heavy tasks still open after)."""
    _light_commit(server, "warm")
    idle = statistics.median(_light_commit(server, f"idle-{i}") for i in range(rounds))
    heavy = [server.sessions.Commit(S.CommitRequest(session_id=f"heavy-{k}"),
                                    metadata=HEAVY).task_id for k in range(HEAVY_ARCHIVES)]
    assert all(heavy)
    time.sleep(0.3)  # the heavy tasks are claimed and running
    loaded = statistics.median(_light_commit(server, f"loaded-{i}") for i in range(rounds))
    still_open = _open_heavy(server)
    for task_id in heavy:  # the heavy backlog completes too (nothing starves)
        list(server.tasks.WatchTask(T.WatchTaskRequest(task_id=task_id), metadata=HEAVY,
                                    timeout=300))
        state = server.tasks.GetTask(T.GetTaskRequest(task_id=task_id), metadata=HEAVY).state
        assert state == T.TASK_STATE_COMPLETED, state
    return idle, loaded, still_open


def test_light_identity_is_not_held_back_by_a_heavy_backlog(
        server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory(tmp_path / "data", engine=HeavySummaries(), phase2_cpu_slots=1,
                            worker_per_identity=HEAVY_ARCHIVES)
    _fill_heavy(server)
    idle, loaded, still_open = _light_under_heavy(server)
    print(f"light Phase 2 run median: idle {idle * 1000:.1f} ms, under the heavy backlog "
          f"{loaded * 1000:.1f} ms ({loaded / idle:.1f}x); heavy open after: {still_open}")
    assert still_open >= HEAVY_ARCHIVES // 2, "the heavy backlog ended too soon to say"
    # A bound against starvation, generous for a loaded 2-core CI machine. It does
    # not separate the gate from no gate reliably on every machine state: measured
    # on this machine 5.1x with the gate and 8.4x with --phase2-cpu-slots 0 (an
    # earlier hour, commit e2e: 1.9x and 7.7x); the gate's order is pinned by the
    # deterministic tests in tests/test_gate.py.
    assert loaded <= 10 * idle + 0.05, (idle, loaded)
