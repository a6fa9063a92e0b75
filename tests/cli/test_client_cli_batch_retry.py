"""`sessiond tasks retry` and `sessiond messages add --file` against a real server,
and `--output json` on the admin commands (keys, reindex, import-openviking)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from sessiond.server.cli_client import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_TASK_FAILED,
    EXIT_USAGE,
)
from sessiond.server.phase2.engines.base import (
    EngineError,
    ExtractionRequest,
    ExtractionResponse,
    RetryReporter,
    no_report,
)
from sessiond.server.phase2.engines.offline import OfflineEngine

from tests.api.helpers import FailingEngine
from tests.cli.test_client_cli import _clean_env, js, sd
from tests.conftest import Running, ServerFactory

__all__ = ["_clean_env"]  # the autouse fixture: no SESSIOND_* from the environment


class FailsOnceEngine(OfflineEngine):
    """Offline; the first extraction fails (an outage), later ones work."""

    name = "fails-once-offline"

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def extract(self, request: ExtractionRequest,
                      report: RetryReporter = no_report) -> ExtractionResponse:
        if not self.failed:
            self.failed = True
            raise EngineError("the model server is down", reason="LLM_UNAVAILABLE",
                              retryable=True)
        return await super().extract(request, report)


def failed_task(capsys: pytest.CaptureFixture[str], a: tuple[str, str], sid: str) -> str:
    sd(capsys, "messages", "add", sid, "Hi, my name is Ada.", "--create", *a)
    code, _, _ = sd(capsys, "commit", sid, "--watch", *a)
    assert code == EXIT_TASK_FAILED
    tasks = js(capsys, "tasks", "ls", "--state", "failed", *a)["tasks"]
    return str(tasks[0]["task_id"])


def test_tasks_retry_runs_a_failed_task_again(server_factory: ServerFactory,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    server = server_factory(engine=FailsOnceEngine())
    a = ("--address", server.target)
    task_id = failed_task(capsys, a, "r1")
    code, out, err = sd(capsys, "tasks", "retry", task_id, "--watch", "--output", "json", *a)
    assert code == EXIT_OK, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0]["retry"]["task_id"] == task_id and lines[0]["retry"]["retries"] == 1
    kinds = [x["event"]["kind"] for x in lines if "event" in x]
    # from the RETRIED event on, not the first attempt's FAILED
    assert kinds[0] == "TASK_EVENT_KIND_RETRIED" and kinds[-1] == "TASK_EVENT_KIND_COMPLETED"
    assert "TASK_EVENT_KIND_FAILED" not in kinds
    assert lines[-1]["task"]["state"] == "TASK_STATE_COMPLETED"
    # a COMPLETED task cannot be retried: one line with the reason, exit 4
    code, _, err = sd(capsys, "tasks", "retry", task_id, *a)
    assert code == EXIT_REJECTED and err.startswith("sessiond: FAILED_PRECONDITION ")
    assert len(err.splitlines()) == 1
    code, _, err = sd(capsys, "tasks", "retry", "task_missing", *a, "-o", "json")
    assert code == EXIT_NOT_FOUND and json.loads(err)["error"]["code"] == "NOT_FOUND"


def test_tasks_retry_without_watch_and_failing_again(server_factory: ServerFactory,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    server = server_factory(engine=FailingEngine())
    a = ("--address", server.target)
    task_id = failed_task(capsys, a, "r2")
    shown = js(capsys, "tasks", "retry", task_id, "--request-id", "retry-1", *a)["task"]
    assert shown["task_id"] == task_id and shown["retries"] == 1
    # the same request id replays: no second retry
    again = js(capsys, "tasks", "retry", task_id, "--request-id", "retry-1", *a)["task"]
    assert again["retries"] == 1
    code, out, _ = sd(capsys, "tasks", "watch", task_id, "--after-seq",
                      str(int(shown["last_seq"]) - 1), *a)
    assert code == EXIT_TASK_FAILED and "retried" in out and "LLM_AUTH" in out
    code, out, _ = sd(capsys, "tasks", "retry", task_id, "--watch", *a)
    assert code == EXIT_TASK_FAILED and "retrying" in out and "retry 2" in out


def test_messages_add_a_jsonl_batch(server: Running, capsys: pytest.CaptureFixture[str],
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = ("--address", server.target)
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join([
        json.dumps({"role": "user", "text": "Hi, I am Ada.", "client_message_id": "c1"}),
        "",
        json.dumps({"role": "assistant", "client_message_id": "c2",
                    "parts": [{"text": {"text": "Hello Ada."}}]}),
        json.dumps({"text": "No id, role from --role.", "role": "ROLE_SYSTEM"}),
    ]) + "\n")
    first = js(capsys, "messages", "add", "b1", "--file", str(batch), "--create", *a)
    assert first["added"] == 3 and first["duplicates"] == 0
    roles = [r["message"]["role"] for r in first["results"]]
    assert roles == ["ROLE_USER", "ROLE_ASSISTANT", "ROLE_SYSTEM"]
    # sent again (stdin this time): the client message ids are stored already
    monkeypatch.setattr("sys.stdin", io.StringIO(batch.read_text()))
    code, out, err = sd(capsys, "messages", "add", "b1", "-f", "-", *a)
    assert code == EXIT_OK, err
    assert "added 1 message(s) to b1 (2 duplicate(s)" in out
    shown = js(capsys, "sessions", "show", "b1", *a)
    assert shown["session"]["live_message_count"] == "4"
    # a bad line: nothing is sent, exit 2 naming the line
    batch.write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    code, _, err = sd(capsys, "messages", "add", "b1", "--file", str(batch), *a)
    assert code == EXIT_USAGE and f"{batch}:2: not JSON" in err
    batch.write_text(json.dumps({"text": "x", "role": "narrator"}) + "\n")
    code, _, err = sd(capsys, "messages", "add", "b1", "--file", str(batch), *a)
    assert code == EXIT_USAGE and "role 'narrator'" in err
    assert js(capsys, "sessions", "show", "b1", *a)["session"]["live_message_count"] == "4"
    code, _, err = sd(capsys, "messages", "add", "b1", "text", "--file", str(batch), *a)
    assert code == EXIT_USAGE and "not both" in err
    code, _, _ = sd(capsys, "messages", "add", "nope", "--file", str(tmp_path / "x"), *a)
    assert code == EXIT_USAGE


def test_admin_commands_take_output_json(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    code, out, err = sd(capsys, "reindex", "--data-dir", data, "--output", "json")
    assert code == EXIT_OK, err
    assert json.loads(out)["archives"] == 0
    code, out, _ = sd(capsys, "keys", "list", "--data-dir", data, "-o", "json")
    assert code == EXIT_OK and json.loads(out) == []
    (tmp_path / "ov" / "session").mkdir(parents=True)
    code, out, _ = sd(capsys, "import-openviking", str(tmp_path / "ov"), "--data-dir", data,
                      "-o", "json")
    assert code == EXIT_OK and json.loads(out)["sessions"]["imported"] == 0
