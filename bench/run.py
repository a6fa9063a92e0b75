"""sessiond benchmarks against the floor.

    python bench/run.py [--quick] [--store sqlite|postgres|both]
                        [--out bench/results/latest.json]

Every figure is measured in the same run as its baseline: a no-op grpc.aio server
(bench/floor_server.py, same server options, canned replies) running next to the
sessiond under test, each in its own process. Throughputs are the median of several
interleaved trials (floor trial, sessiond trial, floor trial, ...); latencies are
percentiles of all samples. See docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/x.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
from sessiond.server.config import Settings
from sessiond.v1 import session_pb2, task_pb2

from bench import harness as h
from bench import workloads as w
from bench.fanout import FanoutRound, fanout_round

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
CONCURRENCY = (1, 16, 64)
FANOUT_WATCHERS = 1000
SMALL_FANOUT = 100
E2E_MESSAGES = 10  # messages per archive in the Phase 2 tests
COMMIT_SIZES = (10, 100, 1000)
# Sessions timed by the Commit test are filled this many at a time, so each session's
# rows are interleaved with INTERLEAVE-1 others' as with concurrent clients. SQLite
# keeps rows in insertion order, and a session whose rows are spread over more pages
# costs more to archive: the figure is only comparable at a fixed width.
INTERLEAVE = 8
NOISY_PCT = 20.0  # other processes' CPU (% of one core) above which figures are flagged


@dataclass(frozen=True)
class Mode:
    name: str
    trials: int  # interleaved floor/sessiond trials per unary figure
    unary_seconds: float
    warmup: float
    stream_samples: int
    commit_samples: dict[int, int]  # archive size -> number of commits timed
    e2e_samples: int
    tput_rounds: int  # commits per session in the 16-session throughput test
    tput_trials: int
    fanout_rounds: int
    client_checks: int  # alternating 1-process / 2-process trials for the client check
    sessions: int = 10_000


QUICK = Mode("quick", trials=3, unary_seconds=1.0, warmup=0.2, stream_samples=100,
             commit_samples={10: 24, 100: 16, 1000: 8}, e2e_samples=30, tput_rounds=6,
             tput_trials=2, fanout_rounds=2, client_checks=1)
FULL = Mode("full", trials=5, unary_seconds=3.0, warmup=0.5, stream_samples=300,
            commit_samples={10: 64, 100: 32, 1000: 16}, e2e_samples=100, tput_rounds=12,
            tput_trials=3, fanout_rounds=4, client_checks=3)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Phases:
    """Names the phase being measured and records, per phase, the CPU that processes
    other than the benchmark's own used meanwhile (a shared machine makes figures noisy)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._name = ""
        self._meter: h.MachineMeter | None = None

    def start(self, name: str) -> None:
        self.stop()
        say(name)
        self._name, self._meter = name, h.MachineMeter()

    def stop(self) -> None:
        if self._meter is not None:
            self.items.append({"phase": self._name, **self._meter.read()})
        self._name, self._meter = "", None

    def worst(self) -> dict[str, Any]:
        return max(self.items, key=lambda x: x["other_pct"], default={})


# ---------------------------------------------------------------------- environment
def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def environment(workdir: Path) -> dict[str, Any]:
    rev = ""
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=h.REPO_DIR,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "git": rev,
            "python": platform.python_version(), "grpc": grpc.__version__,
            "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(), "cpu_model": cpu,
            "platform": platform.platform(), "data_fs": fs_type(workdir)}


# ---------------------------------------------------------------------- postgres
def pg_adapter_available() -> tuple[bool, str]:
    try:
        importlib.import_module("sessiond.server.store.postgres.store")
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


async def pg_reachable() -> tuple[bool, str]:
    try:
        import asyncpg
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=3)
        await conn.close()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


async def pg_create_db() -> tuple[str, str]:
    import asyncpg
    name = f"sessiond_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"


async def pg_drop_db(name: str) -> None:
    import asyncpg
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# ---------------------------------------------------------------------- servers
@dataclass
class Target:
    kind: str  # sqlite | postgres
    store_arg: str  # "sqlite" or a postgresql:// URL
    workdir: Path

    def serve(self, name: str, extra: list[str] | None = None) -> h.ServerProc:
        data = self.workdir / f"{name}-data"
        cmd = [*h.sessiond_cmd(), "serve", "--address", "127.0.0.1:0", "--data-dir", str(data),
               "--store", self.store_arg, "--shutdown-grace", "2",
               # The fan-out figure opens 1,000 streams of one identity on one task:
               # above the default per-identity quota (64), which it does not measure.
               "--limit-watch-streams-per-identity", "5000", *(extra or [])]
        return h.start_server(name, cmd, self.workdir / f"{name}.log", data_dir=data)


def start_floor(workdir: Path) -> h.ServerProc:
    return h.start_server("floor", [h.python_exe(), str(h.BENCH_DIR / "floor_server.py"),
                                    "--address", "127.0.0.1:0"], workdir / "floor.log")


# ---------------------------------------------------------------------- figures
@dataclass
class Unary:
    trials_rps: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    server_cpu: list[float] = field(default_factory=list)
    loop_cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"throughput_rps": round(h.median(self.trials_rps), 1),
                "trials_rps": [round(x, 1) for x in self.trials_rps],
                **h.summarize_ms(self.latencies), "errors": self.errors,
                "first_error": self.first_error,
                "server_cpu_pct": round(h.median(self.server_cpu), 1),
                "server_loop_thread_cpu_pct": round(h.median(self.loop_cpu), 1),
                "client_cpu_pct": round(h.median(self.client_cpu), 1)}


async def unary_trial(stubs: w.Stubs, sessions: list[str], conc: int, mode: Mode,
                      server_pid: int, into: Unary) -> None:
    meter = h.CpuMeter({"server": server_pid})
    c0, t0 = h.self_cpu_seconds(), time.monotonic()
    r = await w.closed_loop(w.add_message_caller(stubs, sessions), conc, mode.unary_seconds,
                            mode.warmup)
    dt = time.monotonic() - t0
    into.trials_rps.append(r.throughput)
    into.latencies += r.latencies
    into.errors += r.errors
    into.first_error = into.first_error or r.first_error
    cpu = meter.read()
    into.server_cpu.append(cpu["server"])
    into.loop_cpu.append(cpu["server_loop"])
    into.client_cpu.append(100.0 * (h.self_cpu_seconds() - c0) / dt)


async def loadgen_procs(target: str, procs: int, conc: int, mode: Mode, sessions: list[str],
                        log_path: Path) -> dict[str, Any]:
    """The c`conc` AddMessage load split over `procs` client processes."""
    start_at = time.time() + 2.0  # both processes import grpc and connect first
    per = conc // procs
    log = log_path.open("ab")
    children: list[asyncio.subprocess.Process] = []
    results: list[dict[str, Any]] = []
    try:
        for _ in range(procs):
            children.append(await asyncio.create_subprocess_exec(
                h.python_exe(), str(h.BENCH_DIR / "loadgen.py"), "--target", target,
                "--concurrency", str(per), "--duration", str(mode.unary_seconds),
                "--warmup", str(mode.warmup), "--start-at", str(start_at),
                "--sessions", ",".join(sessions), stdout=asyncio.subprocess.PIPE, stderr=log))
        for c in children:
            assert c.stdout is not None
            raw = await asyncio.wait_for(c.stdout.read(), 60 + mode.unary_seconds)
            for line in raw.decode().splitlines():
                if line.startswith("RESULT "):
                    results.append(json.loads(line[7:]))
    finally:
        for c in children:
            if c.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.wait(), 10)
        log.close()
    lat = [x for r in results for x in r["latencies"]]
    dur = max((r["elapsed"] for r in results), default=float("nan"))
    return {"procs": procs, "concurrency": conc,
            "throughput_rps": round(sum(r["count"] for r in results) / dur, 1),
            **h.summarize_ms(lat), "errors": sum(r["errors"] for r in results),
            "client_cpu_pct_each": [round(100 * r["cpu_seconds"] / (dur + mode.warmup), 1)
                                    for r in results]}


def commit_summary(s: w.CommitSamples) -> dict[str, Any]:
    return {"phase1": h.summarize_ms(s.phase1), "e2e": h.summarize_ms(s.e2e),
            "completed": s.completed, "failed": s.failed, "terminal_kinds": s.kinds,
            "elapsed_s": round(s.elapsed, 3),
            "commits_per_s": round(s.completed / s.elapsed, 1) if s.elapsed else float("nan"),
            "steady_commits_per_s": round(s.steady_rate, 1)}


def fanout_summary(rounds: list[FanoutRound]) -> dict[str, Any]:
    delays = [d for r in rounds for d in r.delays]
    return {"watchers": rounds[0].watchers if rounds else 0,
            "procs": rounds[0].procs if rounds else 0, "rounds": len(rounds),
            **h.summarize_ms(delays),
            "round_p99_ms": [round(h.percentile(r.delays, 99) * 1000, 3) for r in rounds],
            "missing": sum(r.missing for r in rounds),
            "errors": [e for r in rounds for e in r.errors][:5],
            "ready_s": [round(r.ready_s, 3) for r in rounds],
            "idle_server_cpu_pct": [r.idle_cpu_pct for r in rounds],
            "server_rss_mb": round(max((r.server_rss_mb for r in rounds), default=math.nan), 1),
            "client_cpu_s": [round(r.client_cpu_s, 2) for r in rounds]}


async def new_pending_task(stubs: w.Stubs, sid: str) -> str:
    """A task that stays PENDING (the fan-out server runs no Phase 2 worker)."""
    await w.create_sessions(stubs, [sid])
    await w.populate(stubs, [sid], 1)
    reply = await stubs.sessions.Commit(session_pb2.CommitRequest(session_id=sid),
                                        timeout=w.RPC_TIMEOUT)
    return reply.task_id


def cancel_trigger(stubs: w.Stubs, task_id: str) -> Callable[[], Any]:
    def trigger() -> Any:
        return stubs.tasks.CancelTask(task_pb2.CancelTaskRequest(task_id=task_id),
                                      timeout=w.RPC_TIMEOUT)
    return trigger


# ---------------------------------------------------------------------- one store
async def bench_store(target: Target, mode: Mode, phases: Phases) -> dict[str, Any]:
    res: dict[str, Any] = {"store": target.kind}
    workdir = target.workdir
    phases.start(f"{target.kind}: starting servers, idle RSS")
    floor = start_floor(workdir)
    sd: h.ServerProc | None = None
    fs = ss = None
    try:
        sd = target.serve("sessiond")
        d = Settings.from_env()  # what `sessiond serve` falls back to without flags
        res["server_defaults"] = {"workers": d.worker_concurrency, "poll_seconds": d.poll_seconds,
                                  "heartbeat_seconds": d.heartbeat_seconds,
                                  "sqlite_synchronous": d.sqlite_synchronous,
                                  "engine": d.engine, "pg_pool_max": d.pg_pool_max}
        await asyncio.sleep(1.5)
        rss: dict[str, Any] = {"sessiond_idle_mb": round(sd.rss_mb(), 1),
                               "floor_idle_mb": round(floor.rss_mb(), 1)}
        fs, ss = w.Stubs.connect(floor.target), w.Stubs.connect(sd.target)
        await fs.ready()
        await ss.ready()

        phases.start(f"{target.kind}: {mode.sessions} CreateSession (and on the floor)")
        ids = [f"s{i:05d}-{uuid.uuid4().hex[:6]}" for i in range(mode.sessions)]
        meter = h.CpuMeter({"server": sd.pid})
        t_create = await w.create_sessions(ss, ids, 32)
        create_cpu = meter.read()["server"]
        await asyncio.sleep(0.5)
        rss["sessiond_10k_sessions_mb"] = round(sd.rss_mb(), 1)
        t_floor_create = await w.create_sessions(fs, ids, 32)
        await asyncio.sleep(0.5)
        rss["floor_after_10k_calls_mb"] = round(floor.rss_mb(), 1)
        rss["sessiond_10k_added_mb"] = round(rss["sessiond_10k_sessions_mb"]
                                             - rss["sessiond_idle_mb"], 1)
        rss["floor_10k_added_mb"] = round(rss["floor_after_10k_calls_mb"]
                                          - rss["floor_idle_mb"], 1)
        res["create_sessions"] = {
            "count": mode.sessions, "sessiond_per_s": round(mode.sessions / t_create, 1),
            "floor_per_s": round(mode.sessions / t_floor_create, 1),
            "sessiond_server_cpu_pct": create_cpu}

        # -- unary: AddMessage vs the floor, interleaved trials
        add_ids = [f"add-{i}" for i in range(max(CONCURRENCY))]
        await w.create_sessions(ss, add_ids)
        unary: dict[str, Any] = {}
        for conc in CONCURRENCY:
            phases.start(f"{target.kind}: AddMessage c{conc} vs floor ({mode.trials} trials each)")
            fl, sm = Unary(), Unary()
            for _ in range(mode.trials):
                await unary_trial(fs, add_ids, conc, mode, floor.pid, fl)
                await unary_trial(ss, add_ids, conc, mode, sd.pid, sm)
            unary[f"c{conc}"] = {"floor": fl.summary(), "sessiond": sm.summary()}
        res["unary"] = unary

        phases.start(f"{target.kind}: client check (floor c64 from 2 client processes)")
        one = Unary()
        two_procs: list[dict[str, Any]] = []
        for _ in range(mode.client_checks):
            await unary_trial(fs, add_ids, 64, mode, floor.pid, one)
            two_procs.append(await loadgen_procs(floor.target, 2, 64, mode, add_ids,
                                                 workdir / "loadgen.log"))
        res["client_check_unary"] = {
            "one_process_floor_c64": one.summary(),
            "two_processes_floor_c64": {
                "throughput_rps": round(h.median([t["throughput_rps"] for t in two_procs]), 1),
                "trials": two_procs}}

        # -- floor streams: WatchTask of 10 events; Commit + watch
        phases.start(f"{target.kind}: floor stream and floor commit cycles")
        res["floor_stream"] = h.summarize_ms(await w.stream_latency(fs, "task_floor",
                                                                    mode.stream_samples))
        floor_seq = await w.sequential_commits(fs, ["floor"] * mode.e2e_samples)
        floor_tput = [await w.concurrent_commits(fs, [f"f{i}" for i in range(16)],
                                                 mode.tput_rounds, E2E_MESSAGES)
                      for _ in range(mode.tput_trials)]

        # -- Commit Phase 1 by archive size
        phase1: dict[str, Any] = {}
        for n in COMMIT_SIZES:
            k = math.ceil(mode.commit_samples[n] / INTERLEAVE) * INTERLEAVE
            phases.start(f"{target.kind}: Commit Phase 1, {k} sessions of {n} messages")
            sids = [f"commit{n}-{j}-{uuid.uuid4().hex[:6]}" for j in range(k)]
            await w.create_sessions(ss, sids)
            fill_s = 0.0
            for g in range(0, k, INTERLEAVE):
                fill_s += await w.populate(ss, sids[g:g + INTERLEAVE], n,
                                           concurrency=INTERLEAVE, seed=n + g)
            meter = h.CpuMeter({"server": sd.pid})
            s = await w.sequential_commits(ss, sids, time_budget=240)
            kb = n * w.PAYLOAD_BYTES / 1024.0
            summ = commit_summary(s)
            phase1[str(n)] = {"messages": n, "archived_kb": round(kb, 2), **summ["phase1"],
                              "ms_per_kb_p50": round(summ["phase1"]["p50_ms"] / kb, 4),
                              "phase2_e2e": summ["e2e"], "populate_s": round(fill_s, 2),
                              "interleave": INTERLEAVE,
                              "server_cpu_pct": meter.read()["server"],
                              "failed": s.failed}
        res["commit_phase1"] = phase1

        # -- Phase 2 end to end, one at a time
        phases.start(f"{target.kind}: Phase 2 e2e, {mode.e2e_samples} commits one at a time")
        sids = [f"e2e-{j}-{uuid.uuid4().hex[:6]}" for j in range(mode.e2e_samples)]
        await w.create_sessions(ss, sids)
        await w.populate(ss, sids, E2E_MESSAGES, concurrency=16, seed=77)
        e2e = await w.sequential_commits(ss, sids, time_budget=240)
        res["phase2_e2e"] = {"sessiond": commit_summary(e2e), "floor": commit_summary(floor_seq)}

        # -- commits completed per second, 16 sessions committing at once
        phases.start(f"{target.kind}: commits/s, 16 sessions x {mode.tput_rounds} commits "
            f"x {mode.tput_trials} trials")
        trials: list[w.CommitSamples] = []
        cpu: list[float] = []
        for _ in range(mode.tput_trials):
            sids = [f"tput-{j}-{uuid.uuid4().hex[:6]}" for j in range(16)]
            await w.create_sessions(ss, sids)
            await w.populate(ss, sids, mode.tput_rounds * E2E_MESSAGES, concurrency=16, seed=99)
            meter = h.CpuMeter({"server": sd.pid})
            trials.append(await w.concurrent_commits(ss, sids, mode.tput_rounds, E2E_MESSAGES,
                                                     time_budget=240))
            cpu.append(meter.read()["server"])
        res["commit_throughput"] = {
            "sessions": 16, "messages_per_commit": E2E_MESSAGES,
            "sessiond_commits_per_s": round(h.median([t.steady_rate for t in trials]), 1),
            "floor_commits_per_s": round(h.median([t.steady_rate for t in floor_tput]), 1),
            "sessiond_overall_commits_per_s": round(h.median([t.completed / t.elapsed
                                                              for t in trials]), 1),
            "sessiond_trials": [commit_summary(t) for t in trials],
            "floor_trials": [commit_summary(t) for t in floor_tput],
            "sessiond_e2e_under_load": h.summarize_ms([x for t in trials for x in t.e2e]),
            "server_cpu_pct": cpu}

        phases.start(f"{target.kind}: RSS after the load, stopping sessiond")
        await asyncio.sleep(1.0)
        rss["sessiond_after_load_mb"] = round(sd.rss_mb(), 1)
        rss["floor_after_load_mb"] = round(floor.rss_mb(), 1)
        with contextlib.suppress(OSError):
            db = sum(p.stat().st_size for p in (sd.data_dir or workdir).glob("*"))
            rss["sqlite_files_mb"] = round(db / 2**20, 1) if target.kind == "sqlite" else None
        res["rss"] = rss
        await ss.close()
        ss = None
        sd.stop()
        sd = None

        # -- WatchTask fan-out, on a server that runs no Phase 2 worker
        res["fanout"] = await bench_fanout(target, mode, floor, fs, phases)
    finally:
        phases.stop()
        for st in (fs, ss):
            if st is not None:
                with contextlib.suppress(Exception):
                    await st.close()
        if sd is not None:
            sd.stop()
        floor.stop()
    return res


async def bench_fanout(target: Target, mode: Mode, floor: h.ServerProc,
                       fs: w.Stubs, phases: Phases) -> dict[str, Any]:
    phases.start(f"{target.kind}: WatchTask fan-out, {FANOUT_WATCHERS} watchers x "
        f"{mode.fanout_rounds} rounds (and the floor)")
    sd = target.serve("fanout", ["--workers", "0"])
    ss = w.Stubs.connect(sd.target)
    log = target.workdir / "watchers.log"
    out: dict[str, Any] = {}
    try:
        await ss.ready()
        rss_idle = sd.rss_mb()
        floor_rounds: list[FanoutRound] = []
        sd_rounds: list[FanoutRound] = []
        # one unrecorded round each first: the first 1,000-stream burst of a process
        # pays for growing its heap and is much slower than the following ones
        tid = f"hold-warm-{uuid.uuid4().hex[:8]}"
        await fanout_round(floor.target, tid, FANOUT_WATCHERS, 1, 0, cancel_trigger(fs, tid),
                           floor.pid, log, settle=0.2)
        tid = await new_pending_task(ss, f"fan-warm-{uuid.uuid4().hex[:6]}")
        await fanout_round(sd.target, tid, FANOUT_WATCHERS, 1, 1, cancel_trigger(ss, tid), sd.pid,
                           log, settle=0.2)
        for r in range(mode.fanout_rounds):
            # the first recorded round waits a full poll period to measure what idle
            # watchers cost the server; the others only settle briefly
            settle = 1.0 if r == 0 else 0.3
            tid = f"hold-{r}-{uuid.uuid4().hex[:8]}"
            floor_rounds.append(await fanout_round(
                floor.target, tid, FANOUT_WATCHERS, 1, 0, cancel_trigger(fs, tid), floor.pid,
                log, settle=settle))
            tid = await new_pending_task(ss, f"fan-{r}-{uuid.uuid4().hex[:6]}")
            sd_rounds.append(await fanout_round(
                sd.target, tid, FANOUT_WATCHERS, 1, 1, cancel_trigger(ss, tid), sd.pid, log,
                settle=settle))
        tid = f"hold-small-{uuid.uuid4().hex[:8]}"
        small_floor = await fanout_round(floor.target, tid, SMALL_FANOUT, 1, 0,
                                         cancel_trigger(fs, tid), floor.pid, log, settle=0.3)
        tid = await new_pending_task(ss, f"fan-small-{uuid.uuid4().hex[:6]}")
        small_sd = await fanout_round(sd.target, tid, SMALL_FANOUT, 1, 1,
                                      cancel_trigger(ss, tid), sd.pid, log, settle=0.3)
        phases.start(f"{target.kind}: fan-out client check (floor, 2 watcher processes)")
        two: list[FanoutRound] = []
        for _ in range(mode.client_checks):
            tid = f"hold-2p-{uuid.uuid4().hex[:8]}"
            two.append(await fanout_round(floor.target, tid, FANOUT_WATCHERS, 2, 0,
                                          cancel_trigger(fs, tid), floor.pid, log, settle=0.3))
        out = {"sessiond": fanout_summary(sd_rounds), "floor": fanout_summary(floor_rounds),
               "sessiond_100": fanout_summary([small_sd]),
               "floor_100": fanout_summary([small_floor]),
               "floor_two_client_procs": fanout_summary(two),
               "sessiond_rss_idle_mb": round(rss_idle, 1)}
    finally:
        with contextlib.suppress(Exception):
            await ss.close()
        sd.stop()
    return out


# ---------------------------------------------------------------------- report
@dataclass
class Row:
    figure: str
    sessiond: str = ""
    floor: str = ""
    ratio: str = ""
    target: str = ""
    status: str = ""
    note: str = ""


def f1(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.1f}"


def f2(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.2f}"


def check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def build_rows(r: dict[str, Any]) -> tuple[list[Row], list[dict[str, Any]]]:
    rows: list[Row] = []
    targets: list[dict[str, Any]] = []

    def target(name: str, value: float, limit: float, ok: bool, row: Row, text: str) -> None:
        status = check(None if math.isnan(value) else ok)
        row.target, row.status = text, status
        targets.append({"target": name, "value": value, "limit": limit, "status": status})

    u = r["unary"]
    for c in CONCURRENCY:
        fl, sm = u[f"c{c}"]["floor"], u[f"c{c}"]["sessiond"]
        row = Row(f"AddMessage c{c} throughput (req/s)", f1(sm["throughput_rps"]),
                  f1(fl["throughput_rps"]), f2(h.ratio(sm["throughput_rps"],
                                                       fl["throughput_rps"])) + "x",
                  note=f"cpu: srv {sm['server_cpu_pct']:.0f}% (loop thread "
                       f"{sm['server_loop_thread_cpu_pct']:.0f}%) cli {sm['client_cpu_pct']:.0f}%"
                       f"; floor srv {fl['server_cpu_pct']:.0f}% (loop "
                       f"{fl['server_loop_thread_cpu_pct']:.0f}%) cli {fl['client_cpu_pct']:.0f}%")
        if c == 16:
            v = h.ratio(sm["throughput_rps"], fl["throughput_rps"])
            target("AddMessage c16 throughput >= 50% of floor c16", v, 0.5, v >= 0.5, row,
                   ">= 0.50x floor")
        rows.append(row)
        row = Row(f"AddMessage c{c} p50 / p99 (ms)", f"{f2(sm['p50_ms'])} / {f2(sm['p99_ms'])}",
                  f"{f2(fl['p50_ms'])} / {f2(fl['p99_ms'])}",
                  f2(h.ratio(sm["p50_ms"], fl["p50_ms"])) + "x",
                  note=f"errors {sm['errors']}" if sm["errors"] else "")
        if c == 1:
            v = h.ratio(sm["p50_ms"], fl["p50_ms"])
            target("AddMessage c1 p50 <= 2x floor p50", v, 2.0, v <= 2.0, row, "p50 <= 2x floor")
        rows.append(row)
    cc = r["client_check_unary"]
    two_rps = cc["two_processes_floor_c64"]["throughput_rps"]
    one_rps = cc["one_process_floor_c64"]["throughput_rps"]
    rows.append(Row("client check: floor c64 from 2 client procs (req/s)",
                    "", f"{f1(two_rps)} (1 proc: {f1(one_rps)})",
                    f2(h.ratio(two_rps, one_rps)) + "x",
                    note=f"{len(cc['two_processes_floor_c64'].get('trials', [1]))} alternating "
                         "trial(s) of each, medians; >1 means one client process limits"))
    fstream = r["floor_stream"]
    rows.append(Row("floor WatchTask 10-event stream p50 / p99 (ms)", "",
                    f"{f2(fstream['p50_ms'])} / {f2(fstream['p99_ms'])}"))
    floor_p50 = u["c1"]["floor"]["p50_ms"]
    p1 = r["commit_phase1"]
    for n in COMMIT_SIZES:
        c = p1[str(n)]
        row = Row(f"Commit Phase 1, {n} msgs ({c['archived_kb']:.0f} KB) p50 / p99 (ms)",
                  f"{f2(c['p50_ms'])} / {f2(c['p99_ms'])}", f"{f2(floor_p50)} (unary p50)",
                  f2(h.ratio(c["p50_ms"], floor_p50)) + "x",
                  note=f"n={c['n']}, {c['ms_per_kb_p50']:.3f} ms/KB, rows "
                       f"{c.get('interleave', INTERLEAVE)}-way interleaved")
        if n == 100:
            v = h.ratio(c["p50_ms"], floor_p50)
            target("Commit(100 msgs) p50 <= 3x floor unary p50", v, 3.0, v <= 3.0, row,
                   "p50 <= 3x floor")
        rows.append(row)
    k100, k1000 = p1["100"]["ms_per_kb_p50"], p1["1000"]["ms_per_kb_p50"]
    marginal = ((p1["1000"]["p50_ms"] - p1["100"]["p50_ms"])
                / (p1["1000"]["archived_kb"] - p1["100"]["archived_kb"]))
    row = Row("Commit cost per archived KB, 10 / 100 / 1000 msgs (ms/KB)",
              " / ".join(f"{p1[str(n)]['ms_per_kb_p50']:.3f}" for n in COMMIT_SIZES),
              note=f"marginal 100->1000: {marginal:.4f} ms/KB")
    v = h.ratio(k1000, k100)
    target("Commit cost growth no worse than linear (ms/KB at 1000 <= 1.25x at 100)", v, 1.25,
           v <= 1.25, row, "<= linear")
    rows.append(row)
    e2e = r["phase2_e2e"]
    se, fe = e2e["sessiond"]["e2e"], e2e["floor"]["e2e"]
    row = Row(f"Phase 2 e2e offline, {E2E_MESSAGES} msgs, p50 / p99 (ms)",
              f"{f2(se['p50_ms'])} / {f2(se['p99_ms'])}",
              f"{f2(fe['p50_ms'])} / {f2(fe['p99_ms'])} (stream)",
              f2(h.ratio(se["p50_ms"], fe["p50_ms"])) + "x",
              note=f"n={se['n']}, failed {e2e['sessiond']['failed']}")
    target("Phase 2 offline e2e p50 <= 50 ms", se["p50_ms"], 50.0, se["p50_ms"] <= 50.0, row,
           "p50 <= 50 ms")
    rows.append(row)
    ct = r["commit_throughput"]
    row = Row("Commits completed/s, 16 sessions committing", f1(ct["sessiond_commits_per_s"]),
              f1(ct["floor_commits_per_s"]),
              f2(h.ratio(ct["sessiond_commits_per_s"], ct["floor_commits_per_s"])) + "x",
              note=f"overall incl. tail {f1(ct['sessiond_overall_commits_per_s'])}/s; "
                   f"e2e under load p50 {f1(ct['sessiond_e2e_under_load']['p50_ms'])} ms, "
                   f"p99 {f1(ct['sessiond_e2e_under_load']['p99_ms'])} ms; srv cpu "
                   f"{'/'.join(f'{x:.0f}' for x in ct['server_cpu_pct'])}%")
    v = ct["sessiond_commits_per_s"]
    target(">= 100 commits/s completed", v, 100.0, v >= 100.0, row, ">= 100/s")
    rows.append(row)
    fo = r["fanout"]
    for key, fkey, label in (("sessiond", "floor", f"{FANOUT_WATCHERS} watchers"),
                             ("sessiond_100", "floor_100", f"{SMALL_FANOUT} watchers")):
        s, f = fo[key], fo[fkey]
        row = Row(f"WatchTask delivery, {label}, p50 / p99 (ms)",
                  f"{f2(s['p50_ms'])} / {f2(s['p99_ms'])}",
                  f"{f2(f['p50_ms'])} / {f2(f['p99_ms'])}",
                  f2(h.ratio(s["p99_ms"], f["p99_ms"])) + "x (p99)",
                  note=f"n={s['n']}, missing {s['missing']}"
                       + (f", idle srv cpu {s['idle_server_cpu_pct'][0]:.0f}%"
                          if s["idle_server_cpu_pct"] else ""))
        if key == "sessiond":
            target("watch delivery p99 <= 20 ms with 1,000 watchers", s["p99_ms"], 20.0,
                   s["p99_ms"] <= 20.0, row, "p99 <= 20 ms")
        rows.append(row)
    two = fo["floor_two_client_procs"]
    rows.append(Row("client check: floor 1,000 watchers, 2 client procs p50 / p99 (ms)", "",
                    f"{f2(two['p50_ms'])} / {f2(two['p99_ms'])}",
                    f2(h.ratio(two["p99_ms"], fo["floor"]["p99_ms"])) + "x (p99)",
                    note="vs 1 watcher process; <1 means one client process limits"))
    m = r["rss"]
    row = Row("RSS idle (MB)", f1(m["sessiond_idle_mb"]), f1(m["floor_idle_mb"]),
              f2(h.ratio(m["sessiond_idle_mb"], m["floor_idle_mb"])) + "x")
    target("idle RSS <= 80 MB", m["sessiond_idle_mb"], 80.0, m["sessiond_idle_mb"] <= 80.0, row,
           "<= 80 MB")
    rows.append(row)
    cs = r["create_sessions"]
    row = Row(f"RSS added by {cs['count']:,} sessions (MB)", f1(m["sessiond_10k_added_mb"]),
              f"{f1(m['floor_10k_added_mb'])} (10k calls)",
              note=f"created {f1(cs['sessiond_per_s'])}/s (floor {f1(cs['floor_per_s'])}/s)")
    target("10,000 sessions add <= 100 MB", m["sessiond_10k_added_mb"], 100.0,
           m["sessiond_10k_added_mb"] <= 100.0, row, "<= 100 MB")
    rows.append(row)
    rows.append(Row("RSS after the load (MB)", f1(m["sessiond_after_load_mb"]),
                    f1(m["floor_after_load_mb"]),
                    f2(h.ratio(m["sessiond_after_load_mb"], m["floor_after_load_mb"])) + "x",
                    note=(f"SQLite files {f1(m['sqlite_files_mb'])} MB at that point"
                          if m.get("sqlite_files_mb") else "")))
    rows.append(Row(f"RSS with {FANOUT_WATCHERS} watchers (MB)",
                    f1(fo["sessiond"]["server_rss_mb"]), f1(fo["floor"]["server_rss_mb"]),
                    f2(h.ratio(fo["sessiond"]["server_rss_mb"],
                               fo["floor"]["server_rss_mb"])) + "x",
                    note=f"fan-out server idle {f1(fo['sessiond_rss_idle_mb'])} MB"))
    bg = r.get("background_load", [])
    if bg:
        worst = max(bg, key=lambda x: x["other_pct"])
        mean = sum(x["other_pct"] * x["seconds"] for x in bg) / max(
            1e-9, sum(x["seconds"] for x in bg))
        rows.append(Row("other processes' CPU during the run (% of one core)",
                        f"mean {mean:.0f}%, max {worst['other_pct']:.0f}%",
                        note=f"max during '{worst['phase']}'"
                             + ("  <-- NOISY" if worst["other_pct"] > NOISY_PCT else "")))
    return rows, targets


def render(rows: list[Row]) -> str:
    head = Row("figure", "sessiond", "floor", "ratio", "target", "status", "notes")
    cols = ["figure", "sessiond", "floor", "ratio", "target", "status"]
    widths = {c: max(len(getattr(x, c)) for x in [head, *rows]) for c in cols}
    lines = []
    for i, x in enumerate([head, *rows]):
        lines.append("  ".join(getattr(x, c).ljust(widths[c]) for c in cols) + "  " + x.note)
        if i == 0:
            lines.append("  ".join("-" * widths[c] for c in cols) + "  " + "-" * 5)
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    out = ["| figure | sessiond | floor | ratio | target | status | notes |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {x.figure} | {x.sessiond} | {x.floor} | {x.ratio} | {x.target} | {x.status} "
            f"| {x.note} |" for x in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------- main
async def preflight(wait_quiet: float) -> None:
    """Report (and optionally wait out) CPU used by other processes."""
    deadline = time.monotonic() + wait_quiet
    for _ in range(1000):
        m = h.MachineMeter()
        await asyncio.sleep(1.0)
        other = m.read()["other_pct"]
        if other <= NOISY_PCT:
            return
        if time.monotonic() >= deadline:
            say(f"WARNING: other processes use {other:.0f}% of a core right now "
                f"(loadavg {h.loadavg()[0]:.1f}); figures will be noisy")
            return
        say(f"waiting for a quiet machine: other processes use {other:.0f}% of a core")
        await asyncio.sleep(min(4.0, max(0.0, deadline - time.monotonic())))


def pg_migrate(url: str) -> None:
    mig = subprocess.run([*h.sessiond_cmd(), "migrate", "--store", url], capture_output=True,
                         text=True, timeout=120)
    if mig.returncode != 0:
        say(f"postgres: migrate exited {mig.returncode}: {mig.stderr[-300:]}")


def print_logs(root: Path) -> None:
    for log in sorted(root.glob("*/*.log")):
        print(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))


def write_outputs(out: Path, report: dict[str, Any], md: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    env = report["environment"]
    out.with_suffix(".md").write_text(
        f"sessiond benchmarks, {report['mode']} mode, {env['date']}, git {env['git']}, "
        f"{env['cpus']} CPUs, data on {env['data_fs']}\n\n" + "\n".join(md) + "\n")


async def main_async(args: argparse.Namespace) -> int:
    mode = QUICK if args.quick else FULL
    root = Path(tempfile.mkdtemp(prefix="sessiond-bench-"))
    report: dict[str, Any] = {"mode": mode.name, "mode_params": asdict(mode),
                              "environment": environment(root), "stores": {}}
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    t_all = time.monotonic()
    md: list[str] = []
    try:
        for kind in stores:
            t0 = time.monotonic()
            workdir = root / kind
            workdir.mkdir()
            phases = Phases()
            await preflight(args.wait_quiet)
            if kind == "sqlite":
                res = await bench_store(Target("sqlite", "sqlite", workdir), mode, phases)
            else:
                ok, why = pg_adapter_available()
                if not ok:
                    print(f"postgres: skipped: adapter not available ({why})", flush=True)
                    report["stores"]["postgres"] = {"skipped": "adapter not available",
                                                    "detail": why}
                    continue
                ok, why = await pg_reachable()
                if not ok:
                    print(f"postgres: skipped: not reachable at {PG_HOST}:{PG_PORT} ({why})",
                          flush=True)
                    report["stores"]["postgres"] = {"skipped": "not reachable", "detail": why}
                    continue
                name, url = await pg_create_db()
                say(f"postgres: database {name}")
                try:
                    await asyncio.to_thread(pg_migrate, url)
                    res = await bench_store(Target("postgres", url, workdir), mode, phases)
                    res["database"] = name
                finally:
                    await pg_drop_db(name)
            res["seconds"] = round(time.monotonic() - t0, 1)
            res["background_load"] = phases.items
            rows, targets = build_rows(res)
            res["targets"] = targets
            report["stores"][kind] = res
            title = (f"== {kind} ({mode.name} mode, {res['seconds']:.0f} s; "
                     f"data on {report['environment']['data_fs']}) ==")
            print("\n" + title + "\n" + render(rows) + "\n", flush=True)
            worst = phases.worst()
            if worst and worst["other_pct"] > NOISY_PCT:
                print(f"WARNING: other processes used {worst['other_pct']:.0f}% of a core "
                      f"during '{worst['phase']}' (of {os.cpu_count()} cores): figures of a "
                      "shared machine are noisy; see background_load in the JSON\n",
                      flush=True)
            md += [f"### {kind}", "", markdown(rows), ""]
    except Exception:
        say("benchmark failed; server logs:")
        await asyncio.to_thread(print_logs, root)
        raise
    finally:
        report["seconds"] = round(time.monotonic() - t_all, 1)
        await asyncio.to_thread(write_outputs, Path(args.out), report, md)
        if args.keep:
            say(f"kept work dir {root}")
        else:
            await asyncio.to_thread(shutil.rmtree, root, True)
    say(f"done in {report['seconds']:.0f} s; wrote {args.out} (and {Path(args.out).stem}.md)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description="sessiond benchmarks against the floor")
    p.add_argument("--quick", action="store_true", help="fewer iterations (< ~2 minutes)")
    p.add_argument("--store", choices=["sqlite", "postgres", "both"], default="sqlite")
    p.add_argument("--out", default=str(h.BENCH_DIR / "results" / "latest.json"))
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each store, wait up to this long for other processes to "
                        f"use < {NOISY_PCT}%% of a core")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir and logs")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
