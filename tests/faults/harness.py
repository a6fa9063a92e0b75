"""A real `sessiond serve` subprocess for fault tests.

`ServerProcess` starts `python -m sessiond.server.cli serve` on a loopback port with a
given data dir and environment (e.g. SESSIOND_FAILPOINTS), waits until the standard
gRPC health check answers SERVING, and can SIGKILL / SIGTERM it and start it again on
the same data dir (and, when possible, the same port). The child runs in its own
process group; `close()` (or leaving the `with` block) kills the whole group.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiond.server.failpoints import ENV as FAILPOINTS_ENV
from sessiond.v1 import memory_pb2_grpc, session_pb2_grpc, task_pb2, task_pb2_grpc

#: Flags that keep fault tests fast: short polls, short grace, no fsync per commit
#: (WAL + NORMAL still survives a killed process; only an OS crash could lose data).
FAST_ARGS: tuple[str, ...] = (
    "--poll-seconds", "0.2",
    "--heartbeat-seconds", "0.5",
    "--lease-seconds", "5",
    "--shutdown-grace", "3",
    "--sqlite-synchronous", "NORMAL",
    "--log-level", "WARNING",
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TERMINAL = (task_pb2.TASK_EVENT_KIND_COMPLETED, task_pb2.TASK_EVENT_KIND_FAILED,
            task_pb2.TASK_EVENT_KIND_CANCELLED)
_WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()


class ServerError(RuntimeError):
    """The server did not come up (or died when it should not have)."""


def heavy_text(rng: random.Random, sentences: int) -> str:
    """Text the offline engine needs a while to mine (distinct preferences and events):
    a way to make Phase 2 slow without touching the server."""
    out = []
    for _ in range(sentences):
        w = " ".join(rng.choice(_WORDS) for _ in range(5))
        out.append(f"I prefer {w} {rng.randrange(10**9)}. The project named "
                   f"P{rng.randrange(10**6)} launched yesterday.")
    return " ".join(out)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_status(target: str, timeout: float = 1.0,
                  credentials: grpc.ChannelCredentials | None = None) -> int | None:
    """The overall health status of `target`, or None when it does not answer
    (over TLS when `credentials` are given)."""
    with (grpc.secure_channel(target, credentials) if credentials is not None
          else grpc.insecure_channel(target)) as ch:
        try:
            stub: Any = health_pb2_grpc.HealthStub(ch)
            resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return None
        return int(resp.status)


class Stubs:
    """One channel with the three sessiond stubs and the health stub."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target)
        self.sessions = session_pb2_grpc.SessionServiceStub(self.channel)
        self.tasks = task_pb2_grpc.TaskServiceStub(self.channel)
        self.memories = memory_pb2_grpc.MemoryServiceStub(self.channel)
        self.health: Any = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Stubs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServerProcess:
    """One sessiond server process at a time on `data_dir`; restartable."""

    def __init__(self, data_dir: Path, *, port: int | None = None,
                 extra_args: Sequence[str] = FAST_ARGS, log_path: Path | None = None,
                 env: Mapping[str, str] | None = None, python: str = sys.executable,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.credentials = credentials  # for the health check of a TLS server
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}.server.log"
        self.python = python
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    # ------------------------------------------------------------------ basics
    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stubs(self) -> Stubs:
        return Stubs(self.target)

    def _command(self) -> list[str]:
        return [self.python, "-m", "sessiond.server.cli", "serve", "--address", self.target,
                "--data-dir", str(self.data_dir), *self.extra_args]

    def _env(self, failpoints: str, env: Mapping[str, str] | None) -> dict[str, str]:
        out = {k: v for k, v in os.environ.items() if k != FAILPOINTS_ENV}
        out["PYTHONUNBUFFERED"] = "1"
        out.update(self.env)
        if env:
            out.update(env)
        if failpoints:
            out[FAILPOINTS_ENV] = failpoints
        return out

    # ------------------------------------------------------------------ lifecycle
    def start(self, failpoints: str = "", env: Mapping[str, str] | None = None,
              timeout: float = 30.0) -> None:
        """Start the server (armed with `failpoints`, e.g. "commit.after_write@2") and
        wait until it reports SERVING. If the port was taken meanwhile, move to a
        fresh one (clients must then use the new `target`)."""
        if self.alive():
            raise ServerError("server already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.starts += 1
            with self.log_path.open("ab") as log:
                log.write(f"\n=== start #{self.starts} port={self.port} "
                          f"failpoints={failpoints or '-'} ===\n".encode())
                log.flush()
                self.proc = subprocess.Popen(self._command(), env=self._env(failpoints, env),
                                             stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             cwd=str(self.data_dir.parent))
            try:
                self.wait_serving(timeout)
                return
            except ServerError:
                rc = self.proc.poll()
                if rc == 2 and attempt < 2 and "cannot listen" in self.log_tail(400):
                    self.port = free_port()
                    continue
                self.kill()
                raise
        raise ServerError("could not start the server")  # pragma: no cover

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc and self.proc.returncode} "
                                  f"before serving:\n{self.log_tail()}")
            if health_status(self.target, 0.5, self.credentials) == SERVING:
                return
            time.sleep(0.05)
        raise ServerError(f"server not SERVING after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> int | None:
        """SIGKILL the process group now; returns the exit status (None if not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.kills += 1
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful shutdown) and wait; SIGKILL and raise when it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            raise ServerError("server is not running")
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise ServerError(f"server did not exit within {timeout}s of SIGTERM") from exc

    def signal_term(self) -> None:
        """Send SIGTERM and return at once (see `terminate` to wait)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the process to end by itself (e.g. a failpoint); None on timeout."""
        if self.proc is None:
            return None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return rc

    def restart(self, failpoints: str = "", timeout: float = 30.0) -> None:
        self.kill()
        self.start(failpoints, timeout=timeout)

    def close(self) -> None:
        # Only signal a child not yet reaped: after wait() its pid may be reused.
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-chars:].decode(errors="replace")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "sessiond.sqlite3"

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@contextlib.contextmanager
def running_server(data_dir: Path, failpoints: str = "",
                   extra_args: Sequence[str] = FAST_ARGS) -> Iterator[ServerProcess]:
    """Start a server, yield it, and always kill it at the end."""
    srv = ServerProcess(data_dir, extra_args=extra_args)
    try:
        srv.start(failpoints)
        yield srv
    finally:
        srv.close()
