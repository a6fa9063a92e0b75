"""Profile a sessiond server process with py-spy under load and summarize hotspots.

    python bench/pyspy_profile.py [--duration 8] [--rate 200] [--views threads,gil]
                                  [--loads addmessage-c16,phase2-c16,floor-addmessage-c16]
                                  [--out-dir bench/results]
    python bench/pyspy_profile.py --summarize bench/results/profile-X.speedscope.json

1. AddMessage at concurrency 16 (~500-byte text part, one session per worker).
2. Phase 2 end to end: 16 sessions committing 10 messages at a time, each waiting for
   its task's terminal event on WatchTask before the next commit.

For each load it starts a fresh `sessiond serve` (SQLite, product defaults), warms it
up, attaches `py-spy record --pid ...` for --duration seconds while the load runs from
this process, and writes, per load and view,
    bench/results/profile-<load>[-<view>].speedscope.json  (open at https://www.speedscope.app)
    bench/results/profile-<load>[-<view>].txt               (top functions, self and inclusive)
Views: "threads" = every thread, minus the samples py-spy judges idle (waiting on a
lock or condition; epoll waits and fsync are often still counted); "gil" = only the
thread holding the GIL, i.e. what the single interpreter spends itself on; "native"
adds C/Cython frames (perturbs the server more). Percentages are of the view's samples.
A third load, floor-addmessage-c16, profiles bench/floor_server.py under the same
AddMessage load: what grpc.aio alone costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/x.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness as h
from bench import workloads as w


def pyspy_exe() -> str:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    found = shutil.which("py-spy")
    if not found:
        raise SystemExit('py-spy not found: pip install -e ".[bench]"')
    return found


def frame_label(fr: dict[str, Any]) -> str:
    file = str(fr.get("file", ""))
    short = file
    for marker in ("/sessiond/", "/grpc/", "/asyncio/", "/site-packages/", "/lib/python3"):
        if marker in file:
            short = file[file.index(marker) + 1:]
            break
    return f"{fr.get('name', '?')} ({short}:{fr.get('line', '?')})"


def summarize(path: Path, top: int = 25) -> str:
    """Top functions by self and by inclusive share of all non-idle samples."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    ours_c: Counter[str] = Counter()
    file_c: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0.0
    nsamples = 0
    for prof in doc["profiles"]:
        name = str(prof.get("name", "?"))
        for stack, weight in zip(prof["samples"], prof["weights"], strict=False):
            if not stack:
                continue
            total += weight
            nsamples += 1
            threads[name] += weight
            labels = [frame_label(frames[i]) for i in stack]
            self_c[labels[-1]] += weight
            for lab in set(labels):
                incl_c[lab] += weight
            for lab in {frame_label(frames[i]).split(" (")[0] for i in stack
                        if "/sessiond/server/" in str(frames[i].get("file", ""))
                        and not str(frames[i].get("file", "")).endswith("/cli.py")}:
                ours_c[lab] += weight
            leaf_file = str(frames[stack[-1]].get("file", "?"))
            file_c[_module_group(leaf_file)] += weight
    if not total:
        return f"{path.name}: no samples\n"

    def pct(v: float) -> str:
        return f"{100.0 * v / total:5.1f}%"

    out = [f"{path.name}: {nsamples} non-idle samples ({total:.1f} s of thread time)", "",
           "by thread:"]
    out += [f"  {pct(v)}  {k}" for k, v in threads.most_common(10)]
    out += ["", "self time by code area (leaf frame's file):"]
    out += [f"  {pct(v)}  {k}" for k, v in file_c.most_common(12)]
    out += ["", f"top {top} functions by self time:"]
    out += [f"  {pct(v)}  {k}" for k, v in self_c.most_common(top)]
    out += ["", f"top {top} functions by inclusive time:"]
    out += [f"  {pct(v)}  {k}" for k, v in incl_c.most_common(top)]
    out += ["", f"top {top} sessiond functions by inclusive time (all lines of a function):"]
    out += [f"  {pct(v)}  {k}" for k, v in ours_c.most_common(top)]
    return "\n".join(out) + "\n"


def _module_group(file: str) -> str:
    for marker, group in (("/sessiond/server/store/", "sessiond store (sqlite calls, codec)"),
                          ("/sessiond/server/commit/", "sessiond Phase 2 pipeline/engine"),
                          ("/sessiond/server/tasks/", "sessiond tasks (watch, hub, worker)"),
                          ("/sessiond/server/api/", "sessiond API layer (servicers, converters)"),
                          ("/sessiond/server/", "sessiond other (domain, sessions)"),
                          ("/sessiond/v1/", "generated protobuf modules"),
                          ("/grpc/", "grpc (python + cython)"),
                          ("/asyncio/", "asyncio event loop"),
                          ("/google/protobuf/", "protobuf runtime"),
                          ("/sqlite3/", "sqlite3 module"),
                          ("/threading.py", "threading"),
                          ("/concurrent/", "concurrent.futures")):
        if marker in file:
            return group
    return file.rsplit("/", 1)[-1] or "?"


async def _addmessage_load(target: str, seconds: float) -> str:
    stubs = w.Stubs.connect(target)
    await stubs.ready()
    sids = [f"prof-add-{i}" for i in range(16)]
    await w.create_sessions(stubs, sids)
    r = await w.closed_loop(w.add_message_caller(stubs, sids), 16, seconds, warmup=0.0)
    await stubs.close()
    p50 = h.percentile(r.latencies, 50) * 1e3
    return f"AddMessage c16: {r.throughput:.0f} req/s, p50 {p50:.2f} ms"


async def _phase2_setup(target: str, rounds: int) -> list[str]:
    stubs = w.Stubs.connect(target)
    await stubs.ready()
    sids = [f"prof-p2-{i}" for i in range(16)]
    await w.create_sessions(stubs, sids)
    await w.populate(stubs, sids, rounds * 10, concurrency=16)
    await stubs.close()
    return sids


async def _phase2_load(target: str, sids: list[str], rounds: int, seconds: float) -> str:
    stubs = w.Stubs.connect(target)
    await stubs.ready()
    s = await w.concurrent_commits(stubs, sids, rounds, 10, time_budget=seconds)
    await stubs.close()
    return (f"Phase 2 c16: {s.completed / s.elapsed:.0f} commits/s, e2e p50 "
            f"{h.percentile(s.e2e, 50)*1e3:.1f} ms")


VIEWS = {
    # all threads, samples where py-spy does not consider the thread idle
    "threads": ["--nonblocking"],
    # only the thread that holds the GIL: what the one interpreter spends itself on
    "gil": ["--nonblocking", "--gil"],
    # C/Cython frames too (grpc core, sqlite, upb); pauses the server for each sample
    "native": ["--native"],
}
LOADS = ("addmessage-c16", "phase2-c16", "floor-addmessage-c16")


def start_target(load: str, work: Path) -> h.ServerProc:
    if load.startswith("floor-"):
        return h.start_server("floor", [h.python_exe(), str(h.BENCH_DIR / "floor_server.py"),
                                        "--address", "127.0.0.1:0"], work / "floor.log")
    return h.start_server("sessiond", [*h.sessiond_cmd(), "serve", "--address", "127.0.0.1:0",
                                       "--data-dir", str(work / "data"), "--shutdown-grace", "2"],
                          work / "server.log", data_dir=work / "data")


def profile_one(load: str, view: str, out_dir: Path, duration: float, rate: int) -> str:
    work = Path(tempfile.mkdtemp(prefix="sessiond-prof-"))
    srv = start_target(load, work)
    suffix = "" if view == "threads" else f"-{view}"
    out = out_dir / f"profile-{load}{suffix}.speedscope.json"
    rounds = max(10, int(duration * 6))  # ~enough commits to outlast the recording
    sids: list[str] = []
    try:
        if load == "phase2-c16":
            sids = asyncio.run(_phase2_setup(srv.target, rounds))
        else:
            asyncio.run(_addmessage_load(srv.target, 1.0))  # warm-up
        spy = subprocess.Popen([pyspy_exe(), "record", "--pid", str(srv.pid), "--rate", str(rate),
                                "--duration", str(int(duration)), "--format", "speedscope",
                                "--output", str(out), *VIEWS[view]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        if load == "phase2-c16":
            info = asyncio.run(_phase2_load(srv.target, sids, rounds, duration))
        else:
            info = asyncio.run(_addmessage_load(srv.target, duration))
        try:
            _, err = spy.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate(timeout=10)
        if spy.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode()[-500:]}")
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = (f"server: {srv.name}; view: {view}; load: {info} (recording {duration:.0f} s at "
            f"{rate} Hz)\n" + summarize(out))
    out.with_name(f"profile-{load}{suffix}.txt").write_text(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description="py-spy profiles of sessiond under load")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--out-dir", default=str(h.BENCH_DIR / "results"))
    p.add_argument("--views", default="threads,gil",
                   help=f"comma-separated, of: {', '.join(VIEWS)}")
    p.add_argument("--loads", default=",".join(LOADS),
                   help=f"comma-separated, of: {', '.join(LOADS)}")
    p.add_argument("--summarize", metavar="SPEEDSCOPE_JSON",
                   help="only print the summary of an existing profile")
    a = p.parse_args()
    if a.summarize:
        print(summarize(Path(a.summarize)))
        return 0
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    views = [v for v in a.views.split(",") if v]
    loads = [x for x in a.loads.split(",") if x]
    bad = [v for v in views if v not in VIEWS] + [x for x in loads if x not in LOADS]
    if bad:
        p.error(f"unknown view/load: {bad}")
    for load in loads:
        for view in views:
            text = profile_one(load, view, out_dir, a.duration, a.rate)
            print(f"== {load} / {view} ==\n{text}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
