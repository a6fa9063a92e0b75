"""How long can one tenant's work delay another's calls (the tenant-stall bound)?

    .venv/bin/python bench/stall.py [--messages 10000] [--big-mb 3.9] [--big-count 3]
        [--store URL] [--server-arg=...]

One `sessiond serve` process (product defaults). Tenant B probes all along: one
AddMessage and one health Check, then 20 ms pause, again. First on the idle server,
then while tenant A (1) commits a --messages-message archive (its Phase 2 runs) and
(2) appends --big-count messages of --big-mb MB each to another session. The window
ends when A's Phase 2 has completed and the big messages are stored. Prints B's
p50 / p99 / max for both probes in both phases, and what A's work took.
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

from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiond.v1 import session_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.fairness import A, B, Client
from bench.harness import BENCH_DIR, percentile, sessiond_cmd, start_server
from bench.workloads import make_text


class Probe:
    def __init__(self, c: Client) -> None:
        self.c = c
        self.health: Any = health_pb2_grpc.HealthStub(c.channel)
        self.add: list[float] = []
        self.check: list[float] = []
        self.n = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.add.append(await self.c.add(B, "probe", make_text(self.n, 200), self.n))
            t0 = time.perf_counter()
            await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=60)
            self.check.append(time.perf_counter() - t0)
            self.n += 1
            await asyncio.sleep(0.02)

    def summary(self) -> dict[str, Any]:
        def f(v: list[float]) -> dict[str, float]:
            return {"n": len(v), "p50_ms": round(percentile(v, 50) * 1000, 1),
                    "p99_ms": round(percentile(v, 99) * 1000, 1),
                    "max_ms": round(max(v) * 1000, 1)}
        return {"add_message": f(self.add), "health_check": f(self.check)}


async def probe_for(c: Client, seconds: float) -> dict[str, Any]:
    p, stop = Probe(c), asyncio.Event()
    task = asyncio.create_task(p.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    return p.summary()


async def measure(target: str, args: argparse.Namespace) -> dict[str, Any]:
    c = Client(target)
    await asyncio.wait_for(c.channel.channel_ready(), 15)
    for md, sid in ((B, "probe"), (A, "huge"), (A, "big")):
        await c.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=sid),
                                       metadata=md)
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(32)

    async def one(j: int) -> None:
        async with sem:
            await c.add(A, "huge", make_text(j, 300), j)

    await asyncio.gather(*(one(j) for j in range(args.messages)))
    fill_s = time.perf_counter() - t0
    idle = await probe_for(c, args.idle_seconds)

    p, stop = Probe(c), asyncio.Event()
    probe = asyncio.create_task(p.run(stop))
    await asyncio.sleep(0.5)
    t0 = time.perf_counter()
    reply = await c.sessions.Commit(session_pb2.CommitRequest(session_id="huge"), metadata=A,
                                    timeout=120)
    commit_s = time.perf_counter() - t0
    big_text = "x" * int(args.big_mb * 1_000_000)

    async def big() -> list[float]:
        took = []
        for k in range(args.big_count):
            took.append(await c.add(A, "big", big_text, k))
        return took

    phase2 = asyncio.create_task(c.wait(A, reply.task_id))
    big_took = await big()
    end = await phase2
    phase2_s = time.perf_counter() - t0
    stop.set()
    await probe
    await c.channel.close()
    return {"idle": idle, "loaded": p.summary(),
            "a": {"messages": args.messages, "fill_s": round(fill_s, 1),
                  "commit_rpc_s": round(commit_s, 3), "phase2_s": round(phase2_s, 1),
                  "phase2_end": end, "big_mb": args.big_mb,
                  "big_add_s": [round(x, 2) for x in big_took]}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--big-mb", type=float, default=3.9)
    p.add_argument("--big-count", type=int, default=3)
    p.add_argument("--idle-seconds", type=float, default=5.0)
    p.add_argument("--store", default="sqlite")
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument("--env", action="append", default=[], type=lambda v: tuple(v.split("=", 1)),
                   help="NAME=VALUE for the server's environment")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sessiond-stall-") as tmp:
        cmd = [*sessiond_cmd(), "serve", "--address", "127.0.0.1:0", "--data-dir",
               f"{tmp}/data", "--store", args.store, *args.server_arg]
        server = start_server("sessiond", cmd, BENCH_DIR / "results" / "stall-server.log",
                              data_dir=Path(tmp), env=dict(args.env))
        try:
            result = asyncio.run(measure(server.target, args))
        finally:
            server.stop()
    result["server_args"] = args.server_arg
    print(json.dumps(result, indent=2))
    i, ld = result["idle"], result["loaded"]
    print(f"B AddMessage p50/p99/max: idle {i['add_message']['p50_ms']}/"
          f"{i['add_message']['p99_ms']}/{i['add_message']['max_ms']} ms, during A's work "
          f"{ld['add_message']['p50_ms']}/{ld['add_message']['p99_ms']}/"
          f"{ld['add_message']['max_ms']} ms; health max {ld['health_check']['max_ms']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
