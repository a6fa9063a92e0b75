"""Watcher client process for the WatchTask fan-out test (spawned by bench/run.py).

Opens N WatchTask streams on one task, prints `READY <n>` once every stream has
received its first message (the snapshot: the server has subscribed it), then waits
for one terminal event per stream and prints one JSON line: for each stream that got
it, the delivery delay = client receive wall-clock time - the event's `time` field
(stamped by the server when it wrote the event; same machine, same clock).

Usage: python bench/watchers.py --target 127.0.0.1:PORT --task-id T --n 250
       [--after-seq 1] [--timeout 120] [--channels 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import grpc
from sessiond.v1 import task_pb2, task_pb2_grpc

TERMINAL_KINDS = frozenset({task_pb2.TASK_EVENT_KIND_COMPLETED, task_pb2.TASK_EVENT_KIND_FAILED,
                            task_pb2.TASK_EVENT_KIND_CANCELLED})


async def run(target: str, task_id: str, n: int, after_seq: int, wait_s: float,
              channels: int) -> dict[str, object]:
    chans = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(max(1, channels))]
    stubs = [task_pb2_grpc.TaskServiceStub(c) for c in chans]
    ready = 0
    all_ready = asyncio.Event()
    delays: list[float] = []
    errors: list[str] = []
    other = 0
    req = task_pb2.WatchTaskRequest(task_id=task_id, after_seq=after_seq)

    async def one(i: int) -> None:
        nonlocal ready, other
        call = stubs[i % len(stubs)].WatchTask(req, timeout=wait_s)
        first = True
        try:
            async for item in call:
                now = time.time()
                if first:
                    first = False
                    ready += 1
                    if ready == n:
                        all_ready.set()
                    continue
                if item.WhichOneof("kind") != "event":
                    other += 1
                    continue
                ev = item.event
                if ev.kind in TERMINAL_KINDS:
                    delays.append(now - (ev.time.seconds + ev.time.nanos / 1e9))
                    break
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")
        finally:
            if not call.done():
                call.cancel()

    t0 = time.monotonic()
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    try:
        await asyncio.wait_for(all_ready.wait(), wait_s)
        print(f"READY {n} {time.monotonic() - t0:.3f}", flush=True)
    except TimeoutError:
        print(f"NOTREADY {ready}", flush=True)
    t_end = time.monotonic() + wait_s
    await asyncio.wait(tasks, timeout=max(0.1, t_end - time.monotonic()))
    for t in tasks:
        t.cancel()
    for c in chans:
        await c.close()
    cpu = os.times()
    return {"pid": os.getpid(), "n": n, "ready": ready, "received": len(delays),
            "delays": delays, "errors": errors[:5], "error_count": len(errors),
            "other_items": other, "cpu_seconds": cpu.user + cpu.system}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--task-id", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--after-seq", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--channels", type=int, default=1)
    a = p.parse_args()
    out = asyncio.run(run(a.target, a.task_id, a.n, a.after_seq, a.timeout, a.channels))
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
