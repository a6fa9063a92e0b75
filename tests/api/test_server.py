from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import GatedEngine, add
from tests.conftest import Running, ServerFactory


def test_health_and_reflection(server: Running) -> None:
    health: Any = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "sessiond.v1.SessionService", "sessiond.v1.TaskService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl: Any = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    reqs = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    names = {s.name for r in refl.ServerReflectionInfo(reqs)
             for s in r.list_services_response.service}
    assert {"sessiond.v1.SessionService", "sessiond.v1.TaskService",
            "sessiond.v1.MemoryService", "grpc.health.v1.Health"} <= names


def test_graceful_stop_ends_watches_unavailable_and_health(server_factory: ServerFactory,
                                                           tmp_path: Path) -> None:
    engine = GatedEngine()
    r = server_factory(engine=engine, data_dir=tmp_path / "g")
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="g"))
    add(r.sessions, "g", "hello")
    tid = r.sessions.Commit(session_pb2.CommitRequest(session_id="g")).task_id
    assert engine.entered.wait(10)
    outcome: list[grpc.StatusCode] = []
    watching = threading.Event()

    def watch() -> None:
        try:
            for _ in r.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=tid), timeout=20):
                watching.set()
            outcome.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            outcome.append(err.code())

    t = threading.Thread(target=watch)
    t.start()
    assert watching.wait(10)
    r.loop.run(r.app.stop(0.5))
    r.app._stopped_by_test = True  # type: ignore[attr-defined]
    t.join(10)
    assert outcome == [grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(grpc.RpcError):
        stub: Any = health_pb2_grpc.HealthStub(r.channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
    engine.release()
    r2 = server_factory(data_dir=tmp_path / "g")
    final = list(r2.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=tid), timeout=20))
    assert final[-1].event.kind == task_pb2.TASK_EVENT_KIND_COMPLETED


def test_second_process_on_same_data_dir_is_refused(server_factory: ServerFactory,
                                                    tmp_path: Path) -> None:
    import subprocess
    import sys

    data = tmp_path / "locked"
    server_factory(data_dir=data)
    proc = subprocess.run([sys.executable, "-m", "sessiond.server.cli", "serve", "--address",
                           "127.0.0.1:0", "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "DATA_DIR_LOCKED" in proc.stderr
