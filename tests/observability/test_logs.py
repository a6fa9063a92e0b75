"""`sessiond serve --log-format json`: one JSON object per log line (the ids of Phase 2
work are tested in tests/llm/test_llm_observability.py, against the fake LLM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_serve_log_format_json(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "sessiond"
    err = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    with err.open("wb") as sink:
        proc = subprocess.Popen([str(exe), "serve", "--address", "127.0.0.1:0", "--data-dir",
                                 str(tmp_path / "data"), "--log-format", "json"],
                                stdout=subprocess.DEVNULL, stderr=sink, env=env)
        try:
            deadline = time.monotonic() + 30
            while "sessiond listening" not in err.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, err.read_text()
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    lines = [json.loads(line) for line in err.read_text().splitlines() if line.strip()]
    listening = next(x for x in lines if x["message"].startswith("sessiond listening"))
    assert listening["level"] == "INFO" and listening["logger"] == "sessiond.server.app"
    assert listening["time"].endswith("Z")
    assert "task_id" not in listening  # nothing bound outside Phase 2
