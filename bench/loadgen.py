"""Unary load generator process (spawned by bench/run.py to check whether one Python
client process limits a figure). Runs the closed-loop AddMessage workload of
`workloads.closed_loop` from a given wall-clock start time and prints one JSON line.

Usage: python bench/loadgen.py --target 127.0.0.1:PORT --concurrency 32 --duration 2
       --start-at EPOCH --sessions add-0,add-1,... [--channels 1]

--channels K opens K channels, each with its own connection, worker i using channel
i % K (a server of several processes on one port gets a connection per channel).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/x.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import Stubs, add_message_caller, closed_loop


async def run(target: str, concurrency: int, duration: float, warmup: float, start_at: float,
              sessions: list[str], channels: int = 1) -> dict[str, object]:
    stubs = [Stubs.connect(target, own_connection=channels > 1) for _ in range(channels)]
    for s in stubs:
        await s.ready()
    wait = start_at - time.time()
    if 0 < wait < 60:
        await asyncio.sleep(wait)
    makers = [add_message_caller(s, sessions) for s in stubs]
    c0 = os.times()
    res = await closed_loop(lambda i: makers[i % channels](i), concurrency, duration, warmup)
    c1 = os.times()
    for s in stubs:
        await s.close()
    return {"latencies": res.latencies, "count": res.count, "errors": res.errors,
            "elapsed": res.elapsed, "first_error": res.first_error,
            "cpu_seconds": (c1.user + c1.system) - (c0.user + c0.system)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--start-at", type=float, default=0.0)
    p.add_argument("--sessions", required=True, help="comma-separated session ids")
    p.add_argument("--channels", type=int, default=1)
    a = p.parse_args()
    out = asyncio.run(run(a.target, a.concurrency, a.duration, a.warmup, a.start_at,
                          a.sessions.split(","), a.channels))
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
