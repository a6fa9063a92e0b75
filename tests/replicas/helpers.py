"""Helpers of the multi-replica tests: `sessiond serve` processes sharing one
PostgreSQL database, direct SQL for looking behind the API, a TCP proxy that can cut
a replica off its database, and client calls that fail over between replicas.

Server processes come from `tests.faults.harness.ServerProcess` (its own process
group, SIGKILL, log file, waits for the standard health check); here they get
`--store postgresql://...` instead of an SQLite data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
from sessiond.v1 import session_pb2

from tests.faults.harness import ServerProcess, Stubs

T = TypeVar("T")

#: Status codes after which a call is sent again (same request, same request_id).
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
CALL_TIMEOUT = 10.0


def replica_args(store_url: str, *, lease_seconds: float = 2.0, poll_seconds: float = 0.3,
                 workers: int = 4, extra: Sequence[str] = ()) -> list[str]:
    """Command-line flags of one `sessiond serve` replica on `store_url`."""
    return ["--store", store_url, "--lease-seconds", str(lease_seconds),
            "--poll-seconds", str(poll_seconds), "--heartbeat-seconds", "1",
            "--workers", str(workers), "--shutdown-grace", "2", "--pg-pool-max", "6",
            "--log-level", "WARNING", *extra]


def migrate(store_url: str, timeout: float = 30.0) -> str:
    """`sessiond migrate --store URL` (what an operator runs before the first start)."""
    out = subprocess.run([sys.executable, "-m", "sessiond.server.cli", "migrate", "--store",
                          store_url], capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert out.returncode == 0, f"sessiond migrate failed: {out.stdout}{out.stderr}"
    return out.stdout.strip()


def start_replicas(base: Path, store_url: str, count: int,
                   **kwargs: Any) -> list[ServerProcess]:
    """Start `count` replicas on `store_url` concurrently; each is SERVING on return.
    On failure every process already started is killed."""
    servers = [ServerProcess(base / f"replica{i}", extra_args=replica_args(store_url, **kwargs))
               for i in range(count)]
    errors: list[BaseException] = []

    def start(srv: ServerProcess) -> None:
        try:
            srv.start(timeout=30.0)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,), daemon=True) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45.0)
    if errors or any(not s.alive() for s in servers):
        for s in servers:
            s.close()
        raise errors[0] if errors else RuntimeError("a replica did not start")
    return servers


def sql(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    """Run one statement on its own connection; the rows as dicts."""

    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return [dict(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    return asyncio.run(go())


@contextlib.contextmanager
def table_write_lock(url: str, table: str, within: float = 10.0) -> Iterator[None]:
    """Hold `LOCK TABLE <table> IN SHARE ROW EXCLUSIVE MODE` on a connection of its own
    for the duration of the block: reads of the table go on, every INSERT, UPDATE and
    DELETE of it waits (its backend shows wait_event_type 'Lock'). Released (rolled
    back) on exit."""
    ready = threading.Event()
    release = threading.Event()
    failed: list[BaseException] = []

    async def hold() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
                ready.set()
                await asyncio.get_running_loop().run_in_executor(None, release.wait)
        finally:
            await conn.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as exc:  # reported in the test's thread
            failed.append(exc)
            ready.set()

    holder = threading.Thread(target=run, daemon=True)
    holder.start()
    if not ready.wait(within) or failed:
        release.set()
        raise failed[0] if failed else AssertionError(f"no lock on {table} within {within}s")
    try:
        yield
    finally:
        release.set()
        holder.join(within)


def text_part(text: str) -> session_pb2.Part:
    return session_pb2.Part(text=session_pb2.TextPart(text=text))


def wait_until(cond: Callable[[], bool], within: float, what: str,
               interval: float = 0.05) -> float:
    """Poll `cond` until true; the seconds it took. AssertionError after `within`."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(interval)
    return time.monotonic() - start


class FailoverClient:
    """Calls a random replica; a transient failure (UNAVAILABLE, DEADLINE_EXCEEDED,
    e.g. the replica was killed mid-call) sends the SAME request again to another
    replica, so a call carrying a request_id takes effect exactly once."""

    def __init__(self, stubs: Sequence[Stubs], budget: float = 30.0) -> None:
        self.stubs = list(stubs)
        self.budget = budget
        self.retries = 0
        self._lock = threading.Lock()

    def call(self, rng: random.Random, method: str, request: Any,
             service: str = "sessions") -> tuple[Any, int]:
        """(response, index of the replica that answered)."""
        deadline = time.monotonic() + self.budget
        index = rng.randrange(len(self.stubs))
        while True:
            stub = getattr(self.stubs[index], service)
            try:
                return getattr(stub, method)(request, timeout=CALL_TIMEOUT), index
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in TRANSIENT or time.monotonic() > deadline:
                    raise
            with self._lock:
                self.retries += 1
            index = (index + rng.randrange(1, len(self.stubs))) % len(self.stubs)
            time.sleep(0.02)


class TcpProxy:
    """A loopback TCP proxy in front of PostgreSQL, run by an event loop in its own
    thread. `cut()` stops listening and aborts every open connection (the database
    "goes away": refused connections, reset sockets); `restore()` listens again on the
    same port. `freeze()` is a silent network partition instead: connections stay
    open and new ones are accepted, but no byte goes through until `thaw()`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy",
                                        daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10.0)

    @property
    def listening(self) -> bool:
        return self._server is not None

    def restore(self) -> None:
        self._run(self._up())

    def cut(self) -> None:
        self._run(self._down())

    def freeze(self) -> None:
        self._run(self._set_flowing(False))

    def thaw(self) -> None:
        self._run(self._set_flowing(True))

    async def _set_flowing(self, flowing: bool) -> None:
        event = self._flow()
        if flowing:
            event.set()
        else:
            event.clear()

    def _flow(self) -> asyncio.Event:
        if self._flowing is None:  # created on the proxy's loop
            self._flowing = asyncio.Event()
            self._flowing.set()
        return self._flowing

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._set_flowing(True))  # releases connections waiting on a freeze
            self._run(self._down())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    async def _up(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            writer.transport.abort()
            return
        flowing = self._flow()
        self._writers.add(writer)
        await flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await flowing.wait()
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}


@contextlib.contextmanager
def closing_all(servers: Sequence[ServerProcess]) -> Iterator[Sequence[ServerProcess]]:
    """Kill every server process at the end, whatever happened."""
    try:
        yield servers
    finally:
        for s in servers:
            s.close()
