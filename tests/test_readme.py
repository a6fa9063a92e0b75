"""The README's worked example runs as written against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import Running

ROOT = Path(__file__).resolve().parent.parent


def test_readme_example_runs(server: Running, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python example"
    # The worked example, then its Recall continuation.
    code = "\n".join(blocks[:2]).replace("127.0.0.1:50051", server.target)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "accepted task_" in out
    assert "TASK_EVENT_KIND_COMPLETED" in out
    assert "commits: 1" in out
    assert "## Overview" in out
    assert "RECALL_KIND_MESSAGE" in out and "health-check timeout" in out
    memories = int(re.search(r"memories: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert memories >= 3  # name, preference, the Atlas case at least
