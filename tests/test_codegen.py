"""Generated code in clients/sessiond/v1 must be exactly what protos/ produce."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_protos() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generated_modules_import_under_the_contract_names() -> None:
    from sessiond.v1 import session_pb2, session_pb2_grpc, task_pb2, task_pb2_grpc

    assert session_pb2.DESCRIPTOR.package == "sessiond.v1"
    assert hasattr(session_pb2_grpc, "SessionServiceStub")
    assert hasattr(task_pb2_grpc, "TaskServiceStub")
    assert "WatchTask" in task_pb2.DESCRIPTOR.services_by_name["TaskService"].methods_by_name
