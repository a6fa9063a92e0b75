"""examples/ run against a real server: the README example as a file, the asyncio one,
and the Node.js @grpc/grpc-js one loading protos/ directly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import Running
from tests.npm_cache import installed

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run_python(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, timeout=90, check=False)


def test_quickstart_file_is_the_readme_example(server: Running, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    source = (EXAMPLES / "quickstart.py").read_text()
    for block in blocks[:2]:
        assert block in source, "examples/quickstart.py differs from the README example"
    script = tmp_path / "quickstart.py"
    script.write_text(source.replace("127.0.0.1:50051", server.target))
    proc = _run_python(script)
    assert proc.returncode == 0, proc.stderr
    assert "TASK_EVENT_KIND_COMPLETED" in proc.stdout
    assert "RECALL_KIND_MESSAGE" in proc.stdout and "health-check timeout" in proc.stdout


def test_asyncio_example(server: Running) -> None:
    proc = _run_python(EXAMPLES / "quickstart_asyncio.py", server.target)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("TASK_EVENT_KIND_COMPLETED") == 3
    assert "commits: 1" in out
    assert "RECALL_KIND_MESSAGE" in out and "build cache" in out


def test_node_example_loads_protos_directly(server: Running) -> None:
    modules = installed((EXAMPLES / "node" / "package.json").read_bytes())
    env = {**os.environ, "NODE_PATH": str(modules), "SESSIOND_TARGET": server.target}
    proc = subprocess.run(["node", str(EXAMPLES / "node" / "watch.js"), "node-watch"],
                          env=env, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    steps = [line["step"] for line in lines]
    assert steps[0] == "Commit" and steps[-2:] == ["GetTask", "Recall"]
    kinds = [line["kind"] for line in lines if line["step"] == "WatchTask"]
    assert kinds[-1] == "TASK_EVENT_KIND_COMPLETED"
    assert lines[-2]["state"] == "TASK_STATE_COMPLETED"
    assert "RECALL_KIND_MESSAGE" in lines[-1]["kinds"]
    assert any("health-check timeout" in t for t in lines[-1]["texts"])
