"""`pip install .` must give a working wheel: one namespace package over both source
roots, the generated code, the prompt templates and the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contents(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("sessiond-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sessiond/__init__.py" not in names  # PEP 420 namespace over two roots
    for required in ("sessiond/v1/session_pb2.py", "sessiond/v1/task_pb2_grpc.py",
                     "sessiond/v1/memory_pb2.pyi", "sessiond/client/__init__.py",
                     "sessiond/server/cli.py",
                     "sessiond/server/phase2/engines/prompts/archive_summary.v1.md",
                     "sessiond/server/phase2/engines/prompts/memory_extraction.v1.schema.json"):
        assert required in names, required
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sessiond = sessiond.server.cli:main" in text
