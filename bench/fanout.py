"""WatchTask fan-out: N watchers in P client processes on one task, one event to all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import BENCH_DIR, CpuMeter, rss_mb


@dataclass
class FanoutRound:
    watchers: int
    procs: int
    ready_s: float = 0.0  # time until every stream had its snapshot
    delays: list[float] = field(default_factory=list)  # seconds
    missing: int = 0
    errors: list[str] = field(default_factory=list)
    idle_cpu_pct: float = float("nan")  # server CPU while the watchers just wait
    server_rss_mb: float = float("nan")  # with every watcher connected
    client_cpu_s: float = 0.0


async def _readline(proc: asyncio.subprocess.Process, prefix: str, wait_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + wait_s
    for _ in range(1000):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        raw = await asyncio.wait_for(proc.stdout.readline(), left)
        if not raw:
            break
        line = raw.decode(errors="replace").strip()
        if line.startswith(prefix) or line.startswith("NOT" + prefix):
            return line
    raise TimeoutError(f"watcher process {proc.pid} gave no {prefix} line")


async def fanout_round(target: str, task_id: str, watchers: int, procs: int, after_seq: int,
                       trigger: Callable[[], Awaitable[object]], server_pid: int,
                       log_path: Path, settle: float = 1.0,
                       wait_s: float = 90.0) -> FanoutRound:
    out = FanoutRound(watchers=watchers, procs=procs)
    per = [watchers // procs + (1 if i < watchers % procs else 0) for i in range(procs)]
    log = log_path.open("ab")
    children: list[asyncio.subprocess.Process] = []
    try:
        t0 = time.monotonic()
        for n in per:
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, str(BENCH_DIR / "watchers.py"), "--target", target,
                "--task-id", task_id, "--n", str(n), "--after-seq", str(after_seq),
                "--timeout", str(wait_s), stdout=asyncio.subprocess.PIPE, stderr=log))
        for c in children:
            line = await _readline(c, "READY", wait_s)
            if not line.startswith("READY"):
                raise RuntimeError(f"watchers not ready: {line}")
        out.ready_s = time.monotonic() - t0
        meter = CpuMeter({"server": server_pid})
        await asyncio.sleep(settle)
        out.idle_cpu_pct = meter.read()["server"]
        out.server_rss_mb = rss_mb(server_pid)
        await trigger()
        for c in children:
            line = await _readline(c, "RESULT", wait_s)
            res = json.loads(line.split(" ", 1)[1])
            out.delays += res["delays"]
            out.errors += res["errors"]
            out.client_cpu_s += res["cpu_seconds"]
        out.missing = watchers - len(out.delays)
    finally:
        for c in children:
            if c.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.wait(), 10)
        log.close()
    return out
