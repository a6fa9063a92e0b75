"""What Prometheus metrics cost: AddMessage throughput at concurrency 16 with metrics
off and on (`--metrics-address`), side by side. Goal: less than 5% apart.

Two `sessiond serve` processes (same flags but the metrics one), trials interleaved
(off, on, off, on, ...) so drift on a shared machine hits both; the table has the
median of the trials. The metrics server is scraped while it is loaded, as Prometheus
would (every `--scrape-interval` seconds), so the cost of rendering is included.

Usage: .venv/bin/python bench/metrics_cost.py [--trials 5] [--seconds 3] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python bench/x.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
from prometheus_client.parser import text_string_to_metric_families
from sessiond.v1 import session_pb2

from bench import harness as h
from bench.workloads import Stubs, add_message_caller, closed_loop

_METRICS_PORT = re.compile(rb"metrics on 127\.0\.0\.1:(\d+)")


async def _trial(target: str, sessions: list[str], concurrency: int, seconds: float
                 ) -> tuple[float, list[float], int]:
    stubs = Stubs.connect(target)
    await stubs.ready()
    res = await closed_loop(add_message_caller(stubs, sessions), concurrency, seconds, 0.3)
    await stubs.close()
    return res.count / res.elapsed, res.latencies, res.errors


async def _make_sessions(target: str, sessions: list[str]) -> None:
    stubs = Stubs.connect(target)
    await stubs.ready()
    for sid in sessions:
        await stubs.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid,
                                                                      auto_create=True))
    await stubs.close()


async def _micro(n: int) -> tuple[float, float]:
    """In-process cost of the instrumentation itself, µs per call: the RPC wrapper of
    MetricsInterceptor around a no-op handler, and TimedStore around a no-op store
    method (each minus the bare call). Stable where whole-server numbers are noisy."""
    from sessiond.server.observability import metrics

    class Ctx:
        def code(self) -> None:
            return None

    async def noop(request: int, context: Ctx) -> int:
        return request

    class Inner:
        async def op(self) -> int:
            return 1

    was = metrics.enabled()
    metrics.enable(True)
    try:
        handler: Any = grpc.unary_unary_rpc_method_handler(noop)
        wrapped: Any = metrics.MetricsInterceptor._wrap("bench/Noop", handler).unary_unary
        timed: Any = metrics.TimedStore(Inner())
        bare, ctx = Inner(), Ctx()

        async def loop(fn: Callable[[], Awaitable[object]]) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                await fn()
            return (time.perf_counter() - t0) / n * 1e6

        rpc = await loop(lambda: wrapped(1, ctx)) - await loop(lambda: noop(1, ctx))
        store = await loop(lambda: timed.op()) - await loop(lambda: bare.op())
        return rpc, store
    finally:
        metrics.enable(was)


def _store_ops_per_add(url: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    adds = ops = 0.0
    for family in text_string_to_metric_families(text):
        for sm in family.samples:
            if sm.name == "sessiond_rpc_duration_seconds_count" and \
                    sm.labels.get("method", "").endswith("/AddMessage"):
                adds += sm.value
            if sm.name == "sessiond_store_operation_duration_seconds_count":
                ops += sm.value
    return ops / adds if adds else 0.0


class Scraper:
    """GET /metrics every `interval` seconds in a thread while a trial runs."""

    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval = url, interval
        self.stop = threading.Event()
        self.scrapes, self.bytes = 0, 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            with urllib.request.urlopen(self.url, timeout=5) as r:
                self.bytes = len(r.read())
                self.scrapes += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--scrape-interval", type=float, default=1.0)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sessiond-metrics-bench-"))
    sessions = [f"add-{i}" for i in range(a.concurrency)]
    base = [*h.sessiond_cmd(), "serve", "--address", "127.0.0.1:0", "--log-level", "WARNING",
            "--sqlite-synchronous", "NORMAL"]
    modes = {"metrics off": [], "metrics on": ["--metrics-address", "127.0.0.1:0"]}
    servers = {name: h.start_server(name, [*base, "--data-dir", str(work / str(i)), *flags],
                                    work / f"server{i}.log", data_dir=work / str(i))
               for i, (name, flags) in enumerate(modes.items())}
    results: dict[str, list[tuple[float, list[float]]]] = {n: [] for n in modes}
    cpu_us: dict[str, list[float]] = {n: [] for n in modes}  # server CPU per call
    scrapes = 0
    try:
        for s in servers.values():
            asyncio.run(_make_sessions(s.target, sessions))
        on = servers["metrics on"]
        m = None
        deadline = time.monotonic() + 10
        while m is None and time.monotonic() < deadline:
            m = _METRICS_PORT.search(on.log_path.read_bytes())
            time.sleep(0.05)
        if m is None:
            raise RuntimeError("the metrics server did not report its port:\n" + on.log_tail())
        url = f"http://127.0.0.1:{int(m.group(1))}/metrics"
        for _ in range(a.trials):
            for name, s in servers.items():
                scraper = Scraper(url, a.scrape_interval) if name == "metrics on" else None
                if scraper is not None:
                    scraper.thread.start()
                cpu0 = s.cpu_seconds()
                tput, lat, errors = asyncio.run(_trial(s.target, sessions, a.concurrency,
                                                       a.seconds))
                calls = max(1, len(lat))
                cpu_us[name].append((s.cpu_seconds() - cpu0) / calls * 1e6)
                if scraper is not None:
                    scraper.stop.set()
                    scraper.thread.join()
                    scrapes += scraper.scrapes
                if errors:
                    raise RuntimeError(f"{name}: {errors} failed calls")
                results[name].append((tput, lat))
        ops_per_add = _store_ops_per_add(url)
    finally:
        for s in servers.values():
            s.stop(10)
    off = h.median([t for t, _ in results["metrics off"]])
    print(f"AddMessage, closed loop, concurrency {a.concurrency}, {a.trials} trials of "
          f"{a.seconds:g} s per mode (interleaved), SQLite NORMAL, grpc {grpc.__version__}; "
          f"{scrapes} scrapes of /metrics during the 'on' trials")
    print("| mode | calls/s (median) | ratio | p50 ms | p99 ms | server CPU µs/call (median) "
          "| trials (calls/s) |")
    print("|---|---|---|---|---|---|---|")
    for name in modes:
        tputs = [t for t, _ in results[name]]
        ms = h.summarize_ms([x for _, ls in results[name] for x in ls])
        print(f"| {name} | {h.median(tputs):.0f} | {h.ratio(h.median(tputs), off):.3f} | "
              f"{ms['p50_ms']:.2f} | {ms['p99_ms']:.2f} | {h.median(cpu_us[name]):.0f} | "
              f"{', '.join(f'{t:.0f}' for t in tputs)} |")
    rpc_us, store_us = asyncio.run(_micro(200_000))
    per_call = rpc_us + ops_per_add * store_us
    base_cpu = h.median(cpu_us["metrics off"])
    print(f"\nInstrumentation measured in-process (200k calls): RPC wrapper {rpc_us:.2f} µs, "
          f"store timer {store_us:.2f} µs x {ops_per_add:.2f} store operations per "
          f"AddMessage (counted by the metrics) = {per_call:.2f} µs per AddMessage, "
          f"{per_call / base_cpu * 100:.2f}% of the {base_cpu:.0f} µs of server CPU a call "
          "takes with metrics off.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
