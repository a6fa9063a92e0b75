"""`sessiond serve --processes N`: real processes on one port, one PostgreSQL database.

Two children of one parent listen on the same port (SO_REUSEPORT); fresh connections
reach both (each answers GetServerInfo with its own process_id); a commit accepted by
each completes its Phase 2; a child killed with SIGKILL is restarted on the same port;
SIGTERM to the parent stops every child and the parent exits 0. On SQLite the flag is
refused before anything starts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from sessiond.v1 import (
    server_pb2,
    server_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

from tests.api.helpers import text_part, wait_task
from tests.pg import temporary_database
from tests.replicas.helpers import wait_until

READY = re.compile(r"serving on 127\.0\.0\.1:(\d+) \(.*; (\d+) processes: pids ([\d, ]+)\)")


class Supervised:
    """One `sessiond serve --processes N` parent, its log, and its children."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log = proc, log
        self.port = 0
        self.pids: list[int] = []

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = READY.search(self.text())
            if m:
                self.port = int(m.group(1))
                self.pids = [int(p) for p in m.group(3).split(", ")]
                assert len(self.pids) == int(m.group(2))
                return
            assert self.proc.poll() is None, f"parent exited {self.proc.returncode}:\n{self.text()}"
            time.sleep(0.1)
        raise AssertionError(f"not serving within {timeout}s:\n{self.text()}")

    @contextmanager
    def channel(self) -> Iterator[grpc.Channel]:
        """A channel with its own connection (a fresh one per call of this)."""
        ch = grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                   options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            yield ch
        finally:
            ch.close()

    def channel_to(self, pid: int, attempts: int = 200) -> grpc.Channel:
        """A channel whose connection landed on child `pid` (the caller closes it)."""
        for _ in range(attempts):
            ch = grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)])
            if process_id(ch) == pid:
                return ch
            ch.close()
        raise AssertionError(f"no connection reached pid {pid} in {attempts} attempts")


def process_id(ch: grpc.Channel) -> int:
    stub = server_pb2_grpc.ServerServiceStub(ch)
    return int(stub.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=10).process_id)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@contextmanager
def supervised(tmp_path: Path, store: str, processes: int = 2) -> Iterator[Supervised]:
    log = tmp_path / "parent.log"
    cmd = [sys.executable, "-m", "sessiond.server.cli", "serve", "--address", "127.0.0.1:0",
           "--data-dir", str(tmp_path / "data"), "--store", store,
           "--processes", str(processes), "--workers", "4", "--poll-seconds", "0.3",
           "--heartbeat-seconds", "1", "--lease-seconds", "5", "--shutdown-grace", "2",
           "--pg-pool-max", "4", "--log-level", "WARNING"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)
    sup = Supervised(proc, log)
    try:
        yield sup
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def commit_and_wait(ch: grpc.Channel, sid: str) -> task_pb2.Task:
    sessions = session_pb2_grpc.SessionServiceStub(ch)
    sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=sid), timeout=10)
    for i in range(3):
        sessions.AddMessage(session_pb2.AddMessageRequest(
            session_id=sid, role=session_pb2.ROLE_USER,
            parts=[text_part(f"message {i} of {sid} about the Atlas deploy")]), timeout=10)
    reply = sessions.Commit(session_pb2.CommitRequest(session_id=sid), timeout=10)
    assert reply.status == session_pb2.COMMIT_STATUS_ACCEPTED
    return wait_task(task_pb2_grpc.TaskServiceStub(ch), reply.task_id, timeout=60)


def test_two_processes_share_a_port_serve_phase2_and_stop_on_sigterm(tmp_path: Path) -> None:
    with temporary_database("sessiond_procs") as url, supervised(tmp_path, url) as sup:
        sup.wait_ready()
        assert len(set(sup.pids)) == 2
        assert all(parent_of(pid) == sup.proc.pid for pid in sup.pids)
        seen: set[int] = set()
        for _ in range(200):
            with sup.channel() as ch:
                seen.add(process_id(ch))
            if seen == set(sup.pids):
                break
        assert seen == set(sup.pids), f"answers came from {seen}, children are {sup.pids}"
        # Each child accepts a commit; its Phase 2 completes (run by whichever child's
        # workers claimed it), and the other child sees the same result.
        for pid in sup.pids:
            ch = sup.channel_to(pid)
            try:
                task = commit_and_wait(ch, f"s-{pid}")
            finally:
                ch.close()
            assert task.state == task_pb2.TASK_STATE_COMPLETED, task
            other = sup.channel_to(next(p for p in sup.pids if p != pid))
            try:
                meta = session_pb2_grpc.SessionServiceStub(other).GetSession(
                    session_pb2.GetSessionRequest(session_id=f"s-{pid}"), timeout=10)
            finally:
                other.close()
            assert meta.commit_count == 1
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(40) == 0, sup.text()
        assert all(gone(pid) for pid in sup.pids)
        assert "shutting down" in sup.text()


def test_a_killed_process_is_restarted_on_the_same_port(tmp_path: Path) -> None:
    with temporary_database("sessiond_procs") as url, supervised(tmp_path, url) as sup:
        sup.wait_ready()
        victim, survivor = sup.pids
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "process 0 restarted (pid " in sup.text(), 60,
                   "the killed process was restarted")
        m = re.search(r"process 0 restarted \(pid (\d+)\)", sup.text())
        assert m is not None
        new = int(m.group(1))
        assert new not in (victim, survivor) and parent_of(new) == sup.proc.pid
        seen: set[int] = set()
        for _ in range(200):
            with sup.channel() as ch:
                seen.add(process_id(ch))
            if seen == {new, survivor}:
                break
        assert seen == {new, survivor}
        ch = sup.channel_to(new)
        try:
            assert commit_and_wait(ch, "after-restart").state == task_pb2.TASK_STATE_COMPLETED
        finally:
            ch.close()
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(40) == 0, sup.text()
        assert gone(new) and gone(survivor)


def test_processes_are_refused_on_sqlite(tmp_path: Path) -> None:
    for n, words in (("2", "needs a PostgreSQL store"), ("0", "must be at least 1")):
        out = subprocess.run([sys.executable, "-m", "sessiond.server.cli", "serve",
                              "--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                              "--processes", n], capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 2, out
        assert words in out.stderr and "serving on" not in out.stdout
    assert not (tmp_path / "d").exists()
