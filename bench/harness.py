"""Process and statistics helpers shared by the benchmark scripts.

Servers under test always run in their own process: `sessiond serve` (the product)
or `bench/floor_server.py` (the no-op floor). Both are started with `--address
127.0.0.1:0` and report the bound port on stdout; that output goes to a log file
that is polled for the ready line, so nothing ever blocks on a full pipe.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

_READY = re.compile(r"serving on (127\.0\.0\.1):(\d+)")


def python_exe() -> str:
    return sys.executable


def sessiond_cmd() -> list[str]:
    """`sessiond` console script next to this interpreter (falls back to -m)."""
    script = Path(sys.executable).parent / "sessiond"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "sessiond.server.cli"]


@dataclass
class ServerProc:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    data_dir: Path | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL this one process (never anything else)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_server(name: str, cmd: Sequence[str], log_path: Path, *,
                 data_dir: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> ServerProc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=full_env,
                            cwd=str(REPO_DIR), start_new_session=True)
    sp = ServerProc(name, proc, 0, log_path, data_dir, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _READY.search(log_path.read_text(errors="replace"))
        if m:
            sp.port = int(m.group(2))
            return sp
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    sp.stop(5)
    raise RuntimeError(f"{name} did not start (exit {proc.returncode}); log:\n"
                       f"{sp.log_tail(40)}")


def rss_mb(pid: int) -> float:
    """VmRSS of a process from /proc/PID/status, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (all threads) from /proc/PID/stat, or of
    one of its threads (/proc/PID/task/TID/stat; the main thread's TID is the PID)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        raw = f.read()
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is state (field 3); utime/stime are fields 14/15 -> index 11/12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """CPU used by some processes over a window, as % of one core. For each process
    `name` it also reports `name_loop`: its main thread alone, which is where a
    grpc.aio server runs its event loop (100% there = the loop is saturated)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = time.monotonic()
        self._c0 = {k: self._cpu(p) for k, p in pids.items()}
        self._m0 = {k: self._cpu(p, p) for k, p in pids.items()}

    @staticmethod
    def _cpu(pid: int, tid: int | None = None) -> float:
        try:
            return cpu_seconds(pid, tid)
        except OSError:
            return float("nan")

    def read(self) -> dict[str, float]:
        dt = max(time.monotonic() - self._t0, 1e-9)
        out: dict[str, float] = {}
        for k, p in self.pids.items():
            out[k] = round(100.0 * (self._cpu(p) - self._c0[k]) / dt, 1)
            out[f"{k}_loop"] = round(100.0 * (self._cpu(p, p) - self._m0[k]) / dt, 1)
        return out


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def summarize_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max of latencies given in seconds, reported in milliseconds."""
    ms = [v * 1000.0 for v in latencies_s]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 3),
            "p90_ms": round(percentile(ms, 90), 3), "p99_ms": round(percentile(ms, 99), 3),
            "max_ms": round(max(ms), 3) if ms else float("nan")}


def ratio(value: float, base: float) -> float:
    if not base or math.isnan(base) or math.isnan(value):
        return float("nan")
    return round(value / base, 3)


def pb_time(ts: Any) -> float:
    """google.protobuf.Timestamp -> epoch seconds."""
    return float(ts.seconds) + float(ts.nanos) / 1e9


# ---------------------------------------------------------------------- machine load
def _machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts[:8]]
    idle = vals[3] + vals[4]  # idle + iowait
    return (sum(vals) - idle) / CLK_TCK


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        out[int(name)] = int(raw[raw.rindex(")") + 2:].split()[1])
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for p in pids:
        try:
            out[p] = cpu_seconds(p)
        except (OSError, ValueError):
            pass
    return out


PG_BACKEND_MARK = "sessiond_bench_"  # database names the benchmark creates


class MachineMeter:
    """How much CPU *other* processes used over a window: all busy CPU time minus this
    process, its descendants (servers, client processes; reaped ones included) and the
    PostgreSQL backends serving the benchmark's own databases (reported apart). Values
    are % of one core; the machine has os.cpu_count() of them. What a PostgreSQL backend
    used before exiting inside the window counts as "other" (overestimates, never hides)."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._b0, self._self0, self._d0, self._p0 = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, dict[int, float], dict[int, float]]:
        me = os.getpid()
        ppids = _ppid_map()
        children: dict[int, list[int]] = {}
        for pid, ppid in ppids.items():
            children.setdefault(ppid, []).append(pid)
        desc: list[int] = []
        todo = list(children.get(me, []))
        while todo and len(desc) < 10_000:
            p = todo.pop()
            desc.append(p)
            todo += children.get(p, [])
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        mine = set(desc)
        pg = [p for p in ppids if p not in mine and PG_BACKEND_MARK in _cmdline(p)]
        return _machine_busy_seconds(), own, _cpu_by_pid(desc), _cpu_by_pid(pg)

    def read(self) -> dict[str, float]:
        dt = max(time.monotonic() - self._t0, 1e-9)
        b, own, d, p = self._sample()
        busy = b - self._b0
        # A descendant reaped inside the window moved its whole lifetime into the
        # children times of `own`: take back what it had used before the window.
        gone = sum(v for k, v in self._d0.items() if k not in d)
        ours = (own - self._self0) - gone + sum(v - self._d0.get(k, 0.0) for k, v in d.items())
        pg = sum(v - self._p0.get(k, 0.0) for k, v in p.items())
        return {"seconds": round(dt, 1), "machine_busy_pct": round(100 * busy / dt, 1),
                "bench_pct": round(100 * ours / dt, 1), "postgres_pct": round(100 * pg / dt, 1),
                "other_pct": round(max(0.0, 100 * (busy - ours - pg) / dt), 1)}


def loadavg() -> tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)
