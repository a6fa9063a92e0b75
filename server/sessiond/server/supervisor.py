"""`sessiond serve --processes N`: N server processes on one port, under one parent.

PostgreSQL only: the store is shared and multi-replica safe (leases, row locks,
LISTEN/NOTIFY), so each child is a complete sessiond (its own pool, Phase 2 workers,
sweeps) exactly like a replica on another machine. The SQLite store has one writer
and one process owns its file: N > 1 is refused before anything starts.

- **Port.** The parent binds (never listens on) a socket with SO_REUSEPORT on the
  address, so port 0 becomes one concrete port, kept reserved while the parent runs.
  Every child listens on that host:port with `grpc.so_reuseport`; the kernel spreads
  new connections over the listening children (a connection stays with its child).
- **Start.** Children are started with multiprocessing's `spawn`; each reports its pid
  and ports over a pipe once it serves. Only when all N serve does the parent print
  `sessiond serving on host:port (...; N processes: pids ...)`. A child that fails to
  start stops the others; the parent exits with that child's code.
- **Signals.** SIGTERM or SIGINT to the parent: SIGTERM to every child, each shuts down
  gracefully (docs/deployment.md); after the shutdown grace plus `STOP_SLACK` seconds
  a child still running is killed. Exit 0 when every child ended with 0. SIGHUP is
  forwarded (TLS and token-key reload). Children ignore SIGINT (a terminal's Ctrl-C
  reaches the whole process group; the parent decides) and stop by themselves when
  the parent is gone.
- **A child that dies** while serving is restarted on the same port (its Phase 2
  tasks are taken over by lease expiry, by it or the others). More than
  `MAX_RESTARTS` restarts within `RESTART_WINDOW` seconds: the parent stops the rest
  and exits 1, so an outer supervisor sees the crash loop.
- **Metrics.** With `--metrics-address host:P` child i serves /metrics on host:P+i
  (P = 0: each on a free port); each port is printed. Scrape every child as its own
  target: counters and histograms are per process.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from sessiond.server.config import Settings

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 120.0  # seconds for a child to serve (the first one may migrate)
STOP_SLACK = 20.0  # seconds beyond the shutdown grace before a child is killed
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


def is_postgres(store: str) -> bool:
    return store.startswith(("postgresql://", "postgres://"))


def check(settings: Settings) -> None:
    """ValueError when `settings.processes` cannot be served."""
    if settings.processes < 1:
        raise ValueError(f"--processes {settings.processes}: must be at least 1")
    if settings.processes > 1 and not is_postgres(settings.store):
        raise ValueError(f"--processes {settings.processes} needs a PostgreSQL store "
                         "(--store postgresql://...): the SQLite store has a single "
                         "writer and one process owns its file; run one process")


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--address {address!r}: use host:port")
    return host, int(port)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT that never listens: it turns
    port 0 into a concrete port and keeps that port for the children."""
    infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def child_settings(settings: Settings, index: int, port: int) -> Settings:
    """What child `index` runs with: the shared port with SO_REUSEPORT, its own
    metrics port."""
    s = copy.deepcopy(settings)
    host, _ = split_address(settings.address)
    s.address, s.reuse_port, s.processes = f"{host}:{port}", True, 1
    if s.observe.metrics_address:
        mhost, mport = split_address(s.observe.metrics_address)
        s.observe.metrics_address = f"{mhost}:{mport + index if mport else 0}"
    return s


def _child_main(settings: Settings, index: int, conn: Connection, log_level: str,
                log_format: str, parent_pid: int) -> None:
    """Entry point of one child process (spawned: a fresh interpreter)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from sessiond.server.cli import serve_main

    def ready(port: int, metrics_port: int, describe: str) -> None:
        conn.send({"pid": os.getpid(), "port": port, "metrics_port": metrics_port,
                   "describe": describe})
        conn.close()

    code = serve_main(settings, log_level, log_format, ready=ready, parent_pid=parent_pid)
    sys.exit(code)


@dataclass
class Child:
    index: int
    process: BaseProcess
    conn: Connection
    pid: int = 0
    metrics_port: int = 0
    describe: str = ""


class Supervisor:
    """Starts, watches and stops the children; `run` returns the exit code."""

    def __init__(self, settings: Settings, log_level: str, log_format: str) -> None:
        check(settings)
        self.settings = settings
        self.log_level, self.log_format = log_level, log_format
        self.host, port = split_address(settings.address)
        self._reservation = reserve_port(self.host, port)
        self.port = int(self._reservation.getsockname()[1])
        self._ctx = multiprocessing.get_context("spawn")
        self.children: list[Child] = []
        self._stop_signal = 0
        self._hup = False
        self._restarts: list[float] = []

    # -- children ----------------------------------------------------------------
    def _spawn(self, index: int) -> Child:
        parent_end, child_end = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_child_main, name=f"sessiond-{index}",
            args=(child_settings(self.settings, index, self.port), index, child_end,
                  self.log_level, self.log_format, os.getpid()))
        proc.start()
        child_end.close()
        return Child(index, proc, parent_end)

    def _await_ready(self, child: Child) -> bool:
        """Wait for the child's ready report; False if it died, timed out, or a stop
        signal came meanwhile."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and not self._stop_signal:
            got = wait([child.conn, child.process.sentinel], timeout=0.2)
            if child.conn in got:
                try:
                    msg: dict[str, Any] = child.conn.recv()
                except EOFError:
                    return False
                child.pid, child.metrics_port = int(msg["pid"]), int(msg["metrics_port"])
                child.describe = str(msg["describe"])
                child.conn.close()
                return True
            if got:  # the process ended before it reported
                return False
        return False

    def _signal(self, child: Child, sig: int) -> None:
        pid = child.process.pid
        if pid is not None and child.process.exitcode is None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _stop_all(self) -> int:
        """SIGTERM every child, wait, kill stragglers; 0 when all ended with 0."""
        for c in self.children:
            self._signal(c, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds + STOP_SLACK
        code = 0
        for c in self.children:
            c.process.join(max(0.0, deadline - time.monotonic()))
            if c.process.exitcode is None:
                log.warning("process %d (pid %s) did not stop in time; killing it",
                            c.index, c.process.pid)
                self._signal(c, signal.SIGKILL)
                c.process.join(5.0)
                code = 1
            elif c.process.exitcode != 0:
                code = 1
        return code

    # -- signals -----------------------------------------------------------------
    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self._hup = True

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_stop)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._reservation.close()

    def _run(self) -> int:
        n = self.settings.processes
        self.children = [self._spawn(i) for i in range(n)]
        for c in self.children:
            if not self._await_ready(c):
                failed = c.process.exitcode
                self._stop_all()
                if self._stop_signal:
                    return 0
                print(f"sessiond: process {c.index} did not start (exit {failed}); "
                      "stopped the others", file=sys.stderr, flush=True)
                return failed if failed else 2
        pids = ", ".join(str(c.pid) for c in self.children)
        print(f"sessiond serving on {self.host}:{self.port} ({self.children[0].describe}; "
              f"{n} processes: pids {pids})", flush=True)
        self._print_metrics(self.children)
        while not self._stop_signal:
            if self._hup:
                self._hup = False
                for c in self.children:
                    self._signal(c, signal.SIGHUP)
            wait([c.process.sentinel for c in self.children], timeout=0.5)
            for i, c in enumerate(self.children):
                if c.process.exitcode is None or self._stop_signal:
                    continue
                if not self._restart(i, c):
                    self._stop_all()
                    return 1
        print("sessiond: shutting down", flush=True)
        return self._stop_all()

    def _restart(self, i: int, dead: Child) -> bool:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
        if len(self._restarts) >= MAX_RESTARTS:
            log.error("process %d (pid %s) exited with code %s; %d restarts within %.0f s: "
                      "stopping", dead.index, dead.pid, dead.process.exitcode,
                      len(self._restarts), RESTART_WINDOW)
            return False
        self._restarts.append(now)
        log.warning("process %d (pid %s) exited with code %s; restarting it", dead.index,
                    dead.pid, dead.process.exitcode)
        child = self._spawn(dead.index)
        self.children[i] = child
        if not self._await_ready(child):
            return bool(self._stop_signal)
        print(f"sessiond: process {child.index} restarted (pid {child.pid})", flush=True)
        self._print_metrics([child])
        return True

    def _print_metrics(self, children: list[Child]) -> None:
        if not self.settings.observe.metrics_address:
            return
        mhost, _ = split_address(self.settings.observe.metrics_address)
        for c in children:
            print(f"sessiond metrics on {mhost}:{c.metrics_port}/metrics "
                  f"(process {c.index}, pid {c.pid})", flush=True)


def serve_processes(settings: Settings, log_level: str, log_format: str) -> int:
    """Run `settings.processes` children on one port; the exit code."""
    return Supervisor(settings, log_level, log_format).run()
