"""`sessiond import-openviking` on a tree built here in OpenViking's layout, on both
backends: what it imports (sessions with metadata, live messages, archives in their
state, memories by category, identities from the tree), what it skips and why, that
a second run imports nothing, and that a real server afterwards recalls what was
imported, runs the PENDING archive's Phase 2 and retries the FAILED one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sessiond.server.cli import main as cli_main
from sessiond.server.store.postgres.store import PostgresStore
from sessiond.v1 import memory_pb2, session_pb2, task_pb2

from tests.conftest import Running, ServerFactory
from tests.pg import temporary_database

ALICE = (("x-sessiond-account", "acme"), ("x-sessiond-user", "alice"),
         ("x-sessiond-agent", "bot"))
MESSAGE_BYTES = 2000


def _msg(mid: str, role: str, text: str, at: str = "2025-01-02T03:04:05Z") -> str:
    return json.dumps({"id": mid, "role": role, "role_id": None, "created_at": at,
                       "parts": [{"type": "text", "text": text}]})


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def build_tree(root: Path) -> Path:
    """An AGFS data directory with account `acme` in OpenViking's file layout."""
    acme = root / "local" / "acme"
    s = acme / "session" / "atlas"
    _write(s / ".meta.json", json.dumps({
        "session_id": "atlas", "created_at": "2025-01-01T10:00:00Z",
        "updated_at": "2025-01-03T10:00:00Z", "created_by_user_id": "alice",
        "participant_user_ids": ["alice"], "participant_agent_ids": ["bot"],
        "commit_count": 1, "last_commit_at": "2025-01-02T12:00:00Z",
        "memories_extracted": {"profile": 1, "cases": 1, "total": 2},
        "llm_token_usage": {"prompt_tokens": 100, "completion_tokens": 20,
                            "total_tokens": 120}}))
    _write(s / "messages.jsonl", "\n".join([
        _msg("msg_live1", "user", "Can we talk about the quarterly roadmap?"),
        "{not json",
        json.dumps({"id": "msg_x", "role": "narrator", "parts": [{"type": "text",
                                                                  "text": "hm"}]}),
        _msg("msg_big", "user", "x" * (MESSAGE_BYTES + 1)),
        _msg("msg_live2", "assistant", "Sure, the roadmap has three milestones."),
    ]) + "\n")
    a1 = s / "history" / "archive_001"
    _write(a1 / "messages.jsonl", "\n".join([
        _msg("msg_a1", "user", "The deploy of project Atlas fails with a timeout error."),
        _msg("msg_a2", "assistant", "Raise the health-check timeout to 30 s and redeploy."),
    ]) + "\n")
    _write(a1 / ".overview.md", "# Atlas deploy\nThe deploy failed on a health-check "
                                "timeout; raising it to 30 s fixed it.")
    _write(a1 / ".abstract.md", "Atlas deploy fixed by a longer health-check timeout.")
    _write(a1 / ".done", json.dumps({"starting_message_id": "msg_a1",
                                     "ending_message_id": "msg_a2"}))
    a2 = s / "history" / "archive_002"
    _write(a2 / "messages.jsonl", "\n".join([
        _msg("msg_b1", "user", "My favourite lunch spot is the ramen bar on Elm street."),
        _msg("msg_b2", "assistant", "Noted: the ramen bar on Elm street."),
    ]) + "\n")
    _write(a2 / ".failed.json", json.dumps({"stage": "memory_extraction",
                                            "error": "LLM returned 500",
                                            "failed_at": "2025-01-02T13:00:00Z"}))
    a3 = s / "history" / "archive_003"
    _write(a3 / "messages.jsonl", "\n".join([
        _msg("msg_c1", "user", "We adopted a puppy named Biscuit last weekend."),
        _msg("msg_c2", "assistant", "Congratulations on Biscuit!"),
    ]) + "\n")
    # the older layout session/<user>/<session_id>/, with a broken .meta.json
    old = acme / "session" / "alice" / "notes"
    _write(old / ".meta.json", "{oops")
    _write(old / "messages.jsonl", _msg("msg_n1", "user", "Remember the dentist on Friday.")
           + "\n")
    mem = acme / "user" / "alice" / "memories"
    _write(mem / "profile.md", "Name: Ada Lovelace")
    _write(mem / "preferences" / "mem_p1.md", "Prefers zeppelins over airplanes.\n\n"
           "<!-- MEMORY_FIELDS\n{\"abstract\": \"zeppelins\"}\n-->")
    _write(mem / "preferences" / ".overview.md", "a directory summary, not a memory")
    _write(mem / "cards" / "mem_k1.md", "a memory type sessiond has no category for")
    space = hashlib.md5(b"alice:bot", usedforsecurity=False).hexdigest()[:12]
    _write(acme / "agent" / space / "memories" / "cases" / "mem_c1.md",
           "Case: the Atlas timeout was fixed by raising the health-check limit.")
    return root


class _no_database:
    def __enter__(self) -> str:
        return ""

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with (temporary_database("sessiond_import") if request.param == "postgres"
          else _no_database()) as url:
        yield url


def run_import(tree: Path, data: Path, url: str, capsys: pytest.CaptureFixture[str],
               *extra: str) -> tuple[int, dict[str, Any]]:
    code = cli_main(["import-openviking", str(tree), "--store", url or "sqlite",
                     "--data-dir", str(data), "--json", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out) if code == 0 else {}


def start(server_factory: ServerFactory, data: Path, url: str) -> Running:
    store = PostgresStore(url, min_size=1, max_size=4) if url else None
    return server_factory(data_dir=data, store=store)


def wait_task(r: Running, task_id: str) -> task_pb2.Task:
    list(r.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id), metadata=ALICE,
                           timeout=30))
    return r.tasks.GetTask(task_pb2.GetTaskRequest(task_id=task_id), metadata=ALICE)


def recall(r: Running, query: str) -> list[memory_pb2.RecallItem]:
    return list(r.memories.Recall(memory_pb2.RecallRequest(query=query, max_chars=4000),
                                  metadata=ALICE).items)


def test_import_openviking_tree(store_url: str, server_factory: ServerFactory,
                                tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIOND_LIMIT_MESSAGE_BYTES", str(MESSAGE_BYTES))
    tree, data = build_tree(tmp_path / "ov"), tmp_path / "data"

    code, dry = run_import(tree, data, store_url, capsys, "--dry-run")
    assert code == 0 and dry["dry_run"] and dry["sessions"]["imported"] == 2
    assert dry["index"]["entries"] == 0

    code, first = run_import(tree, data, store_url, capsys)
    assert code == 0, first
    assert first["sessions"] == {"imported": 2, "present": 0}
    assert first["archives"] == {"done": 1, "failed": 1, "pending": 1, "present": 0}
    assert first["messages"] == {"live": 3, "archived": 6, "duplicates": 0}
    assert first["memories"] == {"imported": 3, "present": 0}
    # the completed archive and every memory are indexed for Recall
    assert first["index"]["archives"] == 1 and first["index"]["memories"] == 3
    reasons = {(s["path"], s["reason"]) for s in first["skipped"]}
    live = "local/acme/session/atlas/messages.jsonl"
    assert reasons == {(f"{live}:2", "malformed_json"), (f"{live}:3", "unknown_role"),
                       (f"{live}:4", "oversize"),
                       ("local/acme/session/alice/notes/.meta.json", "malformed_json"),
                       ("local/acme/user/alice/memories/cards/mem_k1.md",
                        "unknown_category")}
    oversize = next(s for s in first["skipped"] if s["reason"] == "oversize")
    assert f"at most {MESSAGE_BYTES} bytes" in oversize["detail"]

    # idempotent: the second run imports nothing and says what it found
    code, second = run_import(tree, data, store_url, capsys)
    assert code == 0
    assert second["sessions"] == {"imported": 0, "present": 2}
    assert second["archives"] == {"done": 0, "failed": 0, "pending": 0, "present": 3}
    assert second["messages"] == {"live": 0, "archived": 0, "duplicates": 3}
    assert second["memories"] == {"imported": 0, "present": 3}
    assert second["index"] == {"archives": 0, "entries": 0, "memories": 0, "vectors": 0}

    r = start(server_factory, data, store_url)
    meta = r.sessions.GetSession(session_pb2.GetSessionRequest(session_id="atlas"),
                                 metadata=ALICE)
    # (commit_count is checked at the end: the PENDING archive's Phase 2 may already
    # have completed on this server, adding one)
    assert (meta.archive_count, meta.live_message_count) == (3, 2)
    assert meta.memories_extracted.profile == 1 and meta.llm_token_usage.prompt_tokens == 100
    assert meta.created_at.ToJsonString().startswith("2025-01-01T10:00:00")
    # session/<user>/<id>: user from the path, agent "default" (no participants known)
    notes = r.sessions.GetSession(session_pb2.GetSessionRequest(session_id="notes"),
                                  metadata=(("x-sessiond-account", "acme"),
                                            ("x-sessiond-user", "alice")))
    assert notes.live_message_count == 1
    archives = r.sessions.ListArchives(session_pb2.ListArchivesRequest(session_id="atlas"),
                                       metadata=ALICE).archives
    assert archives[0].state == session_pb2.ARCHIVE_STATE_DONE
    assert archives[0].abstract.startswith("Atlas deploy fixed")
    tasks = sorted(r.tasks.ListTasks(task_pb2.ListTasksRequest(session_id="atlas"),
                                     metadata=ALICE).tasks, key=lambda t: t.archive_uri)
    assert tasks[0].state == task_pb2.TASK_STATE_COMPLETED
    assert tasks[1].state == task_pb2.TASK_STATE_FAILED
    assert "memory_extraction" in tasks[1].error.message
    # the PENDING archive's Phase 2 runs on the server that opens the store
    done = wait_task(r, tasks[2].task_id)
    assert done.state == task_pb2.TASK_STATE_COMPLETED
    # the FAILED one runs again with RetryTask
    r.tasks.RetryTask(task_pb2.RetryTaskRequest(task_id=tasks[1].task_id), metadata=ALICE)
    assert wait_task(r, tasks[1].task_id).state == task_pb2.TASK_STATE_COMPLETED
    # the imported DONE archive counted as one commit, the two run here one each
    assert r.sessions.GetSession(session_pb2.GetSessionRequest(session_id="atlas"),
                                 metadata=ALICE).commit_count == 3

    # Recall finds imported memories (user and agent space) and archived turns
    pref = recall(r, "zeppelins")
    assert pref and pref[0].kind == memory_pb2.RECALL_KIND_MEMORY
    assert "MEMORY_FIELDS" not in pref[0].text
    assert any("Atlas timeout" in i.text for i in recall(r, "atlas timeout case")
               if i.kind == memory_pb2.RECALL_KIND_MEMORY)
    turns = [i for i in recall(r, "health-check timeout redeploy")
             if i.kind == memory_pb2.RECALL_KIND_MESSAGE]
    assert turns and turns[0].archive_uri.endswith("/archives/000001")
    assert any("Biscuit" in i.text for i in recall(r, "puppy Biscuit"))
    # another identity sees none of it
    assert not r.memories.Recall(memory_pb2.RecallRequest(query="zeppelins"),
                                 metadata=(("x-sessiond-account", "acme"),)).items


def test_import_flags_choose_the_identity(tmp_path: Path, server_factory: ServerFactory,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    tree, data = build_tree(tmp_path / "ov"), tmp_path / "data"
    code, out = run_import(tree, data, "", capsys, "--account", "corp", "--user", "u9",
                           "--agent", "a9")
    assert code == 0 and out["sessions"]["imported"] == 2
    r = start(server_factory, data, "")
    who = (("x-sessiond-account", "corp"), ("x-sessiond-user", "u9"),
           ("x-sessiond-agent", "a9"))
    assert r.sessions.GetSession(session_pb2.GetSessionRequest(session_id="atlas"),
                                 metadata=who).archive_count == 3
    assert r.memories.Recall(memory_pb2.RecallRequest(query="zeppelins"),
                             metadata=who).items


def test_import_refuses_what_is_not_a_tree(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["import-openviking", str(tmp_path / "missing"),
                     "--data-dir", str(tmp_path / "d")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code, out = run_import(tmp_path / "empty", tmp_path / "d", "", capsys)
    assert code == 0 and [s["reason"] for s in out["skipped"]] == ["not_openviking"]
