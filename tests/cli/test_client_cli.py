"""The client commands of `sessiond` against a real in-process server: main() with the
real parser, the real client library and gRPC on a loopback port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sessiond.server import cli
from sessiond.server.cli_client import (
    EXIT_AUTH,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_TASK_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from sessiond.server.phase2.engines.base import (
    RetryReporter,
    SummaryRequest,
    SummaryResponse,
    no_report,
)
from sessiond.server.phase2.engines.offline import OfflineEngine
from sessiond.server.store.sql.schema import SCHEMA_VERSION

from tests.api.helpers import FailingEngine, GatedEngine
from tests.conftest import Running, ServerFactory


class RetryOnceEngine(OfflineEngine):
    """The offline engine, but summarize reports one rate-limited retry first (as the
    OpenAI engine does after a 429)."""

    name = "retry-once-offline"

    async def summarize(self, request: SummaryRequest,
                        report: RetryReporter = no_report) -> SummaryResponse:
        await report(2, 5, "LLM_RATE_LIMITED: 429 Too Many Requests")
        return await super().summarize(request, report)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in list(os.environ):
        if var.startswith("SESSIOND_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("SESSIOND_CONFIG", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.config/sessiond/client.toml
    monkeypatch.setenv("COLUMNS", "200")


def sd(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def js(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    code, out, err = sd(capsys, *args, "--output", "json")
    assert code == EXIT_OK, err
    return json.loads(out)


def test_version_and_serve_help_show_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == "sessiond 0.1.0"
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "host:port to listen on (default: 127.0.0.1:50051)" in text
    assert "--workers WORKERS Phase 2 tasks run at once by this process (default: 16)" in text
    assert "--llm-timeout LLM_TIMEOUT (default: 60.0)" in text
    assert "is remembered (default: 24.0)" in text  # --request-id-retention-hours
    assert "[SESSIOND_METRICS_ADDRESS]" in text and "--otel-exporter" in text
    ns = cli._parser().parse_args(["serve", "--request-id-retention-hours", "2",
                                   "--metrics-address", "127.0.0.1:0", "--log-format", "json"])
    s = cli.settings_from_args(ns)
    assert s.request_id_retention_hours == 2
    assert s.observe.metrics_address == "127.0.0.1:0" and s.observe.log_format == "json"


def test_sessions_messages_commit_and_memories(server: Running,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    a = ("--address", server.target)
    code, out, err = sd(capsys, "messages", "add", "s1", "Hi, my name is Ada.", "--create", *a)
    assert code == EXIT_OK, err
    assert "to s1" in out and "(seq 1)" in out
    added = js(capsys, "messages", "add", "s1", "I prefer short answers.", "--role",
               "assistant", *a)
    assert added["message"]["role"] == "ROLE_ASSISTANT" and added["message"]["seq"] == "2"
    listed = js(capsys, "sessions", "ls", *a)
    assert [s["session_id"] for s in listed["sessions"]] == ["s1"]
    code, out, _ = sd(capsys, "sessions", "show", "s1", *a)
    assert code == EXIT_OK and "live messages" in out and "Hi, my name is Ada." in out
    shown = js(capsys, "sessions", "show", "s1", *a)
    assert shown["session"]["live_message_count"] == "2"
    assert len(shown["context"]["current_messages"]) == 2

    code, out, err = sd(capsys, "commit", "s1", "--watch", "--watch-timeout", "30", *a)
    assert code == EXIT_OK, err
    assert "committed s1: sessiond://" in out
    for stage in ("summarize", "extract", "finalize"):
        assert f"stage_started {stage}" in out
    assert "completed" in out and "task task_" in out  # the closing table

    tasks = js(capsys, "tasks", "ls", "--session", "s1", *a)["tasks"]
    assert len(tasks) == 1 and tasks[0]["state"] == "TASK_STATE_COMPLETED"
    code, out, _ = sd(capsys, "tasks", "show", tasks[0]["task_id"], *a)
    assert code == EXIT_OK and "completed" in out and "session_commit" in out

    memories = js(capsys, "memories", "ls", *a)["memories"]
    assert memories, "the offline engine extracts the name and the preference"
    found = js(capsys, "memories", "search", "Ada", *a)["results"]
    assert any("Ada" in r["memory"]["content"] for r in found)
    code, out, _ = sd(capsys, "memories", "ls", "--category", "profile", *a)
    assert code == EXIT_OK and "profile" in out
    victim = memories[0]["memory_id"]
    assert js(capsys, "memories", "rm", victim, *a) == {"deleted": victim}
    code, _, err = sd(capsys, "memories", "rm", victim, *a)
    assert code == EXIT_NOT_FOUND and "NOT_FOUND" in err

    recalled = js(capsys, "recall", "what is my name", "--session", "s1", *a)
    assert any("Ada" in i["text"] for i in recalled["items"])
    code, out, _ = sd(capsys, "recall", "Ada", "--kind", "message", *a)
    assert code == EXIT_OK and "message" in out

    assert js(capsys, "sessions", "rm", "s1", *a) == {"deleted": "s1"}
    code, out, err = sd(capsys, "sessions", "show", "s1", *a)
    assert code == EXIT_NOT_FOUND and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("sessiond: NOT_FOUND SESSION_NOT_FOUND: ")


def test_commit_watch_shows_retries_with_their_reason(
        server_factory: ServerFactory, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = server_factory(engine=RetryOnceEngine())
    a = ("--address", server.target)
    assert sd(capsys, "messages", "add", "r", "The deploy fails with a timeout.", "--create",
              *a)[0] == EXIT_OK
    code, out, err = sd(capsys, "commit", "r", "--watch", *a)
    assert code == EXIT_OK, err
    assert "retrying summarize, attempt 2 of 5, after LLM_RATE_LIMITED: 429" in out
    row = next(line for line in out.splitlines() if line.strip("│┃ ").startswith("summarize"))
    cells = [c.strip() for c in row.strip("│┃").split("│")]
    assert cells[:4] == ["summarize", "done", "2", "1"]  # stage, status, attempt, retries
    assert cells[4] == "LLM_RATE_LIMITED: 429 Too Many Requests"
    assert cells[5].endswith("s")

    # JSON lines: the commit, every event, then the final task.
    code, out, err = sd(capsys, "messages", "add", "r", "Again.", *a)
    code, out, err = sd(capsys, "commit", "r", "--watch", "--output", "json", *a)
    assert code == EXIT_OK, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert "commit" in lines[0] and "task" in lines[-1]
    kinds = [line["event"]["kind"] for line in lines[1:-1]]
    assert "TASK_EVENT_KIND_RETRYING" in kinds and kinds[-1] == "TASK_EVENT_KIND_COMPLETED"
    assert lines[-1]["task"]["state"] == "TASK_STATE_COMPLETED"

    # On a terminal the same view is a live display (redrawn in place).
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")
    sd(capsys, "messages", "add", "r", "Once more.", *a)
    code, out, err = sd(capsys, "commit", "r", "--watch", *a)
    assert code == EXIT_OK, err
    assert "\x1b[2K" in out  # rich.live erasing its previous frame
    assert "LLM_RATE_LIMITED: 429 Too Many Requests" in out


def test_commit_watch_of_a_failing_task_exits_7_with_the_reason(
        server_factory: ServerFactory, capsys: pytest.CaptureFixture[str]) -> None:
    server = server_factory(engine=FailingEngine())
    a = ("--address", server.target)
    sd(capsys, "messages", "add", "f", "Hello.", "--create", *a)
    code, out, _ = sd(capsys, "commit", "f", "--watch", *a)
    assert code == EXIT_TASK_FAILED
    assert "LLM_AUTH" in out and "failed" in out
    assert "sk-live-abcdef1234567890" not in out
    task_id = js(capsys, "tasks", "ls", "--state", "failed", *a)["tasks"][0]["task_id"]
    code, out, _ = sd(capsys, "tasks", "watch", task_id, *a)
    assert code == EXIT_TASK_FAILED
    code, _, err = sd(capsys, "tasks", "cancel", task_id, *a)
    assert code in (EXIT_OK, EXIT_REJECTED), err


def test_watch_timeout_exits_6(server_factory: ServerFactory,
                               capsys: pytest.CaptureFixture[str]) -> None:
    gated = GatedEngine()
    server = server_factory(engine=gated)
    a = ("--address", server.target)
    sd(capsys, "messages", "add", "g", "Hello.", "--create", *a)
    try:
        code, _, err = sd(capsys, "commit", "g", "--watch", "--watch-timeout", "0.5", *a)
    finally:
        gated.release()
    assert code == EXIT_UNAVAILABLE
    assert err.startswith("sessiond: DEADLINE_EXCEEDED WATCH_TIMEOUT: ")


def test_errors_are_one_line_with_meaningful_exit_codes(
        server: Running, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a = ("--address", server.target)
    code, _, err = sd(capsys, "messages", "add", "bad id!", "x", *a)
    assert code == EXIT_REJECTED
    assert err.startswith("sessiond: INVALID_ARGUMENT ") and len(err.splitlines()) == 1
    code, _, err = sd(capsys, "tasks", "show", "task_missing", *a, "--output", "json")
    assert code == EXIT_NOT_FOUND
    assert json.loads(err)["error"]["code"] == "NOT_FOUND"
    assert json.loads(err)["error"]["reason"]
    code, _, err = sd(capsys, "sessions", "ls", "--address", "127.0.0.1:1", "--timeout", "2")
    assert code == EXIT_UNAVAILABLE and err.startswith("sessiond: ")
    code, _, err = sd(capsys, "sessions", "ls", "--timeout", "zero", *a)
    assert code == EXIT_USAGE and "timeout" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('adress = "x"\n')
    code, _, err = sd(capsys, "sessions", "ls", "--config", str(bad))
    assert code == EXIT_USAGE and "unknown setting(s) adress" in err


def test_settings_from_env_and_config_file(server: Running, capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "client.toml"
    config.write_text(f'address = "{server.target}"\naccount = "acme"\noutput = "json"\n')
    monkeypatch.setenv("SESSIOND_CONFIG", str(config))
    code, out, err = sd(capsys, "messages", "add", "cfg", "from config", "--create")
    assert code == EXIT_OK, err
    assert json.loads(out)["message"]["seq"] == "1"
    # The identity came from the file: the default account does not see the session.
    code, _, _ = sd(capsys, "sessions", "show", "cfg", "--account", "default")
    assert code == EXIT_NOT_FOUND
    # The environment beats the file; a flag beats the environment.
    monkeypatch.setenv("SESSIOND_ACCOUNT", "other")
    assert js(capsys, "sessions", "ls")["sessions"] == []
    assert [s["session_id"] for s in js(capsys, "sessions", "ls", "--account", "acme")
            ["sessions"]] == ["cfg"]
    monkeypatch.setenv("SESSIOND_ADDRESS", "127.0.0.1:1")
    code, _, _ = sd(capsys, "sessions", "ls", "--timeout", "2")
    assert code == EXIT_UNAVAILABLE


def test_info_reports_the_server_version(server: Running,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    got = js(capsys, "info", "--address", server.target)
    assert got["client"] == {"version": "0.1.0"}
    assert got["server"] == {"version": "0.1.0", "api": "sessiond.v1",
                             "schema_version": SCHEMA_VERSION, "engine": "offline",
                             "store": "sqlite", "process_id": os.getpid()}
    code, out, _ = sd(capsys, "info", "--address", server.target)
    assert code == EXIT_OK and "sessiond 0.1.0" in out and "sqlite" in out
    assert str(os.getpid()) in out


def test_installed_console_script(server: Running) -> None:
    # The real `sessiond` executable, as a user runs it (a subprocess, fresh process).
    exe = Path(sys.executable).parent / "sessiond"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIOND_")}
    env.update(SESSIOND_ADDRESS=server.target, SESSIOND_CONFIG="")
    out = subprocess.run([str(exe), "sessions", "ls", "-o", "json"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"sessions": []}


def test_api_key_from_a_file_and_the_environment(server_factory: ServerFactory,
                                                 capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.security.test_apikeys import create_key, key_server

    server, store_args = key_server(server_factory, tmp_path)
    made = create_key(store_args, "--account", "acme", "--user", "cli")
    a = ("--address", server.target)
    code, _, err = sd(capsys, "sessions", "ls", *a)
    assert code == EXIT_AUTH and err.startswith("sessiond: UNAUTHENTICATED ")
    key_file = tmp_path / "key"
    key_file.write_text(made["key"] + "\n")
    code, _, err = sd(capsys, "messages", "add", "k", "with a key", "--create",
                        "--api-key-file", str(key_file), *a)
    assert code == EXIT_OK, err
    monkeypatch.setenv("SESSIOND_API_KEY", made["key"])
    listed = js(capsys, "sessions", "ls", *a)
    assert [s["session_id"] for s in listed["sessions"]] == ["k"]
    code, _, err = sd(capsys, "sessions", "ls", "--api-key", made["key"][:-1] + "x", *a)
    assert code == EXIT_AUTH
    assert made["key"] not in err  # the secret never shows in an error


def test_memory_history_revert_and_usage_commands(server: Running,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    a = ("--address", server.target)
    assert sd(capsys, "messages", "add", "h", "My name is Ada.", "--create", *a)[0] == EXIT_OK
    assert sd(capsys, "commit", "h", "--watch", "--watch-timeout", "30", *a)[0] == EXIT_OK
    assert sd(capsys, "messages", "add", "h", "I live in Zanzibar.", *a)[0] == EXIT_OK
    assert sd(capsys, "commit", "h", "--watch", "--watch-timeout", "30", *a)[0] == EXIT_OK
    changes = js(capsys, "memories", "history", "--session", "h", *a)["changes"]
    assert [c["op"] for c in changes] == ["MEMORY_CHANGE_OP_CREATED", "MEMORY_CHANGE_OP_UPDATED"]
    code, out, _ = sd(capsys, "memories", "history", "--session", "h", "--archive", "2", *a)
    assert code == EXIT_OK and "updated" in out and "Zanzibar" in out
    # archive 1 conflicts with archive 2's update: refused, the reason on stderr
    code, _, err = sd(capsys, "sessions", "revert", "h", "1", *a)
    assert code != EXIT_OK and "FAILED_PRECONDITION REVERT_CONFLICT" in err
    code, out, err = sd(capsys, "sessions", "revert", "h", "2", "--watch", "--watch-timeout",
                        "30", *a)
    assert code == EXIT_OK, err
    assert "revert of sessiond://sessions/h/archives/000002 queued" in out and "completed" in out
    mems = js(capsys, "memories", "ls", *a)["memories"]
    assert [m["content"] for m in mems] == ["name: Ada"]
    assert js(capsys, "sessions", "usage", "h", *a) == {"uris": []}
