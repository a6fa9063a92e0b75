"""Fair Phase 2 scheduling: tenant B's commit latency while tenant A's backlog runs.

    .venv/bin/python bench/fairness.py [--large-archives 200] [--large-messages 500]
        [--small-commits 20] [--server-arg=--workers-per-identity=0]

Tenant A's (account tenant-a) --large-archives sessions of --large-messages messages
each are written into a fresh SQLite store directly (through the Store API, before
the server starts: filling 100,000 messages through gRPC would take minutes and is
not what is measured). Then one `sessiond serve` process (product defaults) on that
store. Tenant B (account tenant-b) first commits --small-commits small archives (4
messages each; one started every --interval seconds, open loop) on the idle server:
each figure is Commit sent -> COMPLETED event received on WatchTask (the commit's
end-to-end time). Then A commits all its sessions at once; while that backlog runs,
B repeats its small commits. Prints B's p50/p90/max in both phases, the p50 ratio
(goal: within 2x), B's AddMessage latency in both, and how much of A's backlog was
still unfinished when B's last commit completed (it must be most of it, or the
figure says nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from sessiond.v1 import session_pb2, session_pb2_grpc, task_pb2, task_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import BENCH_DIR, percentile, sessiond_cmd, start_server
from bench.workloads import TERMINAL_KINDS, make_text

A = (("x-sessiond-account", "tenant-a"),)
B = (("x-sessiond-account", "tenant-b"),)


class Client:
    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self.sessions: Any = session_pb2_grpc.SessionServiceStub(self.channel)
        self.tasks: Any = task_pb2_grpc.TaskServiceStub(self.channel)

    async def add(self, md: Any, sid: str, text: str, seed: int) -> float:
        role = session_pb2.ROLE_USER if seed % 2 == 0 else session_pb2.ROLE_ASSISTANT
        t0 = time.perf_counter()
        await self.sessions.AddMessage(session_pb2.AddMessageRequest(
            session_id=sid, role=role,
            parts=[session_pb2.Part(text=session_pb2.TextPart(text=text))]),
            metadata=md, timeout=60)
        return time.perf_counter() - t0

    async def wait(self, md: Any, task_id: str) -> str:
        async for resp in self.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id),
                                               metadata=md, timeout=900):
            kind = resp.WhichOneof("kind")
            if kind == "snapshot" and resp.snapshot.state in (
                    task_pb2.TASK_STATE_COMPLETED, task_pb2.TASK_STATE_FAILED,
                    task_pb2.TASK_STATE_CANCELLED):
                return str(task_pb2.TaskState.Name(resp.snapshot.state))
            if kind == "event" and resp.event.kind in TERMINAL_KINDS:
                return str(task_pb2.TaskEventKind.Name(resp.event.kind))
        return "STREAM_ENDED"


async def small_commit(c: Client, sid: str, seed: int) -> tuple[float, list[float]]:
    """One small commit of B: e2e seconds (Commit sent -> COMPLETED), AddMessage seconds."""
    await c.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=sid),
                                   metadata=B)
    adds = [await c.add(B, sid, make_text(seed * 10 + j, 200), j) for j in range(4)]
    t0 = time.perf_counter()
    reply = await c.sessions.Commit(session_pb2.CommitRequest(session_id=sid),
                                    metadata=B, timeout=60)
    end = await c.wait(B, reply.task_id)
    assert "COMPLETED" in end, end
    return time.perf_counter() - t0, adds


async def small_commits(c: Client, tag: str, n: int, interval: float
                        ) -> tuple[list[float], list[float]]:
    """B's commits, open loop: one started every `interval` seconds whatever the
    earlier ones are doing (so a commit stuck behind A's backlog does not hide the
    others' wait)."""
    runs = []
    for i in range(n):
        runs.append(asyncio.create_task(small_commit(c, f"{tag}-{i}", i)))
        await asyncio.sleep(interval)
    done = await asyncio.gather(*runs)
    return [e for e, _ in done], [a for _, adds in done for a in adds]


async def prefill(data_dir: Path, archives: int, messages: int) -> float:
    """A's sessions and live messages, written through the Store API."""
    from sessiond.server.domain import rules
    from sessiond.server.domain.values import Identity, Message, Role, TextPart
    from sessiond.server.store.sqlite.store import SqliteStore

    t0 = time.perf_counter()
    store = SqliteStore(data_dir, synchronous="NORMAL")
    await store.open()
    ident = Identity("tenant-a", "default", "default")
    try:
        for k in range(archives):
            await store.create_session(ident, f"big-{k}", rules.utcnow())
        for j in range(messages):  # one message of every session at a time: group commits
            await asyncio.gather(*(store.add_message(ident, f"big-{k}", Message(
                id=rules.new_message_id(), role=Role.USER if j % 2 == 0 else Role.ASSISTANT,
                parts=(TextPart(make_text(k * 100_000 + j, 300)),),
                created_at=rules.utcnow())) for k in range(archives)))
    finally:
        await store.close()
    return time.perf_counter() - t0


async def open_a_tasks(c: Client) -> int:
    n = 0
    for state in (task_pb2.TASK_STATE_PENDING, task_pb2.TASK_STATE_RUNNING):
        token = ""
        while True:
            page = await c.tasks.ListTasks(task_pb2.ListTasksRequest(
                state=state, page_size=100, page_token=token), metadata=A)
            n += len(page.tasks)
            token = page.next_page_token
            if not token:
                break
    return n


def ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 1)


async def measure(target: str, args: argparse.Namespace) -> dict[str, Any]:
    c = Client(target)
    await asyncio.wait_for(c.channel.channel_ready(), 15)
    await small_commits(c, "warm", 3, args.interval)
    idle, idle_adds = await small_commits(c, "idle", args.small_commits, args.interval)
    t0 = time.perf_counter()
    commits = await asyncio.gather(*(c.sessions.Commit(
        session_pb2.CommitRequest(session_id=f"big-{k}"), metadata=A, timeout=120)
        for k in range(args.large_archives)))
    commit_s = time.perf_counter() - t0
    loaded, loaded_adds = await small_commits(c, "loaded", args.small_commits, args.interval)
    still_open = await open_a_tasks(c)
    await c.channel.close()  # A's backlog is not waited for: the server stops
    return {
        "b_commit_e2e_ms": {"idle_p50": ms(idle, 50), "idle_p90": ms(idle, 90),
                            "idle_max": ms(idle, 100),
                            "loaded_p50": ms(loaded, 50), "loaded_p90": ms(loaded, 90),
                            "loaded_max": ms(loaded, 100),
                            "ratio_p50": round(percentile(loaded, 50) / percentile(idle, 50),
                                               2)},
        "b_add_message_ms": {"idle_p50": ms(idle_adds, 50), "idle_p99": ms(idle_adds, 99),
                             "loaded_p50": ms(loaded_adds, 50),
                             "loaded_p99": ms(loaded_adds, 99)},
        "a_backlog": {"archives": args.large_archives, "messages_each": args.large_messages,
                      "fill_s": round(args.fill_s, 1), "commit_all_s": round(commit_s, 2),
                      "accepted": sum(1 for r in commits if r.task_id),
                      "open_when_b_done": still_open},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--large-archives", type=int, default=200)
    p.add_argument("--large-messages", type=int, default=500)
    p.add_argument("--small-commits", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.5,
                   help="seconds between the starts of B's commits (open loop)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `sessiond serve` argument (repeatable)")
    p.add_argument("--env", action="append", default=[], type=lambda v: tuple(v.split("=", 1)),
                   help="NAME=VALUE for the server's environment (e.g. PYTHONASYNCIODEBUG=1)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sessiond-fair-") as tmp:
        args.fill_s = asyncio.run(prefill(Path(tmp) / "data", args.large_archives,
                                          args.large_messages))
        cmd = [*sessiond_cmd(), "serve", "--address", "127.0.0.1:0", "--data-dir",
               f"{tmp}/data", *args.server_arg]
        server = start_server("sessiond", cmd, BENCH_DIR / "results" / "fairness-server.log",
                              data_dir=Path(tmp), env=dict(args.env))
        try:
            result = asyncio.run(measure(server.target, args))
        finally:
            server.stop()
    result["server_args"] = args.server_arg
    print(json.dumps(result, indent=2))
    r = result["b_commit_e2e_ms"]
    print(f"B commit e2e p50: idle {r['idle_p50']} ms, with A's backlog {r['loaded_p50']} ms "
          f"({r['ratio_p50']}x; goal <= 2x); A tasks still open when B finished: "
          f"{result['a_backlog']['open_when_b_done']} of {args.large_archives}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
