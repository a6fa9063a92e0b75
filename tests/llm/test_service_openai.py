"""The whole service with `OpenAIEngine` against a real HTTP fake of
/v1/chat/completions: commits driven through gRPC, watched through WatchTask."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest
from sessiond.server.phase2.engines.openai import OpenAIEngine
from sessiond.v1 import memory_pb2, session_pb2, task_pb2

from tests.conftest import Running, ServerFactory
from tests.llm.conftest import (
    API_KEY,
    FAST,
    KEY_ENV,
    EngineFactory,
    commit,
    failure_reason,
    llm_settings,
    say,
    watch,
)
from tests.llm.fake_openai import FakeLLM, Received, Reply, good_summary

RETRYING = task_pb2.TASK_EVENT_KIND_RETRYING
COMPLETED = task_pb2.TASK_EVENT_KIND_COMPLETED
FAILED = task_pb2.TASK_EVENT_KIND_FAILED


def session(running: Running, sid: str, *texts: str) -> list[str]:
    running.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=sid))
    ids = []
    for i, t in enumerate(texts):
        role = session_pb2.ROLE_USER if i % 2 == 0 else session_pb2.ROLE_ASSISTANT
        ids.append(say(running, sid, t, role))
    return ids


def totals(running: Running, sid: str) -> tuple[int, int]:
    meta = running.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid))
    u = meta.llm_token_usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    return int(u.prompt_tokens), int(u.completion_tokens)


def result_usage(running: Running, task_id: str) -> tuple[int, int]:
    t = running.tasks.GetTask(task_pb2.GetTaskRequest(task_id=task_id))
    assert t.state == task_pb2.TASK_STATE_COMPLETED, t
    return int(t.result.token_usage.prompt_tokens), int(t.result.token_usage.completion_tokens)


def archive(running: Running, sid: str, index: int) -> session_pb2.Archive:
    return running.sessions.GetArchive(session_pb2.GetArchiveRequest(session_id=sid,
                                                                     index=index))


Category: TypeAlias = memory_pb2.MemoryCategory.ValueType


def memories(running: Running, category: Category = memory_pb2.MEMORY_CATEGORY_UNSPECIFIED
             ) -> list[memory_pb2.Memory]:
    resp = running.memories.ListMemories(memory_pb2.ListMemoriesRequest(
        category=category, page_size=100))
    return list(resp.memories)


def everything_visible(running: Running, sid: str, task_ids: list[str]) -> str:
    """Text of every task, event, error, archive, session and memory a client can read."""
    parts: list[str] = []
    for tid in task_ids:
        w = watch(running, tid)
        parts += [str(w.snapshot), *(str(e) for e in w.events)]
    parts.append(str(running.tasks.ListTasks(task_pb2.ListTasksRequest(session_id=sid))))
    parts.append(str(running.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid))))
    archives = running.sessions.ListArchives(session_pb2.ListArchivesRequest(session_id=sid))
    for a in archives.archives:
        parts.append(str(archive(running, sid, a.index)))
    parts += [str(m) for m in memories(running)]
    return "\n".join(parts)


def assert_key_only_in_auth_header(fake: FakeLLM) -> None:
    assert fake.received
    for rec in fake.received:
        assert rec.headers["authorization"] == f"Bearer {API_KEY}"
        others = {k: v for k, v in rec.headers.items() if k != "authorization"}
        assert API_KEY not in json.dumps(others)
        assert API_KEY not in rec.raw.decode()
        assert API_KEY not in rec.path


# ---------------------------------------------------------------------- happy path
def test_commit_with_llm(server_factory: ServerFactory, fake_llm: FakeLLM,
                         make_engine: EngineFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def extracted(rec: Received) -> list[dict[str, Any]]:
        first = rec.message_ids("user")[0]
        return [
            {"category": "profile", "key": "whatever", "content": "name: Alice",
             "source_message_ids": [first]},
            {"category": "preferences", "key": "Preferred Editor",
             "content": "The user prefers vim.", "source_message_ids": [first, "bogus-id"]},
            {"category": "tools", "key": "tool_grep", "content": "grep -r finds usages fast.",
             "source_message_ids": []},
        ]

    fake_llm.memories_fn = extracted
    running = server_factory(engine=make_engine())
    ids = session(running, "s1", "My name is Alice and I prefer vim.", "Noted, Alice.")
    task_id = commit(running, "s1")
    w = watch(running, task_id)
    assert w.last.kind == COMPLETED, w.events
    assert not w.of_kind(RETRYING)

    summary, extract = fake_llm.of("summary"), fake_llm.of("extract")
    assert len(summary) == 1 and len(extract) == 1
    for rec in fake_llm.received:
        assert rec.path == "/v1/chat/completions"
        assert rec.body["model"] == "test-model"
        assert rec.body["temperature"] == 0.0
    assert "response_format" not in summary[0].body
    rf = extract[0].body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["properties"]["memories"]["type"] == "array"
    assert summary[0].section("previous_overview").strip() == ""
    assert f"[{ids[0]}] user: My name is Alice and I prefer vim." in summary[0].first_user

    a = archive(running, "s1", 1)
    assert a.state == session_pb2.ARCHIVE_STATE_DONE
    for heading in ("## Overview", "## Historical context", "## New information",
                    "## Current archive analysis", "## Key user messages", "## Open loops",
                    "## Next step"):
        assert heading in a.overview
    assert '> "My name is Alice and I prefer vim."' in a.overview
    assert a.abstract == "The user and the agent talk about testing."
    # The archive's overview is what extraction was given.
    assert extract[0].section("overview").strip() == a.overview.strip()

    got = {m.category: m for m in memories(running)}
    assert set(got) == {memory_pb2.MEMORY_CATEGORY_PROFILE,
                        memory_pb2.MEMORY_CATEGORY_PREFERENCES, memory_pb2.MEMORY_CATEGORY_TOOLS}
    pref = got[memory_pb2.MEMORY_CATEGORY_PREFERENCES]
    assert pref.content == "The user prefers vim." and pref.space == "user"
    assert list(pref.source_message_ids) == [ids[0]]  # the invented id is dropped
    assert got[memory_pb2.MEMORY_CATEGORY_TOOLS].space == "agent"

    # Token totals: exactly what the server returned, in the task result and the session.
    returned = fake_llm.returned_usage()
    assert returned[0] > 0
    assert result_usage(running, task_id) == returned
    assert totals(running, "s1") == returned
    assert w.last.result.token_usage.prompt_tokens == returned[0]

    # The key: in the Authorization header, nowhere else.
    assert_key_only_in_auth_header(fake_llm)
    assert API_KEY not in everything_visible(running, "s1", [task_id])
    assert API_KEY not in caplog.text


def test_second_commit_gets_previous_overview(server_factory: ServerFactory,
                                              fake_llm: FakeLLM,
                                              make_engine: EngineFactory) -> None:
    n = {"i": 0}

    def numbered(rec: Received) -> str:
        n["i"] += 1
        return good_summary(rec, marker=f"marker-{n['i']}")

    fake_llm.summary_fn = numbered
    running = server_factory(engine=make_engine())
    session(running, "s1", "First we plan the trip to Lisbon.", "Sure.")
    t1 = commit(running, "s1")
    assert watch(running, t1).last.kind == COMPLETED
    first = archive(running, "s1", 1)
    assert "marker-1" in first.overview

    say(running, "s1", "Now book the hotel near the river.")
    t2 = commit(running, "s1")
    assert watch(running, t2).last.kind == COMPLETED
    second = archive(running, "s1", 2)

    s1, s2 = fake_llm.of("summary")
    _, e2 = fake_llm.of("extract")
    assert s1.section("previous_overview").strip() == ""
    assert s2.section("previous_overview").strip() == first.overview.strip()
    assert e2.section("previous_overview").strip() == first.overview.strip()
    assert e2.section("overview").strip() == second.overview.strip()
    assert "marker-2" in second.overview
    # The second archive's prompt holds only its own messages.
    assert "Lisbon" not in s2.section("messages")
    assert "Now book the hotel near the river." in s2.section("messages")
    assert "Historical context" in second.overview and "Carried forward" in second.overview

    returned = fake_llm.returned_usage()
    r1, r2 = result_usage(running, t1), result_usage(running, t2)
    assert (r1[0] + r2[0], r1[1] + r2[1]) == returned == totals(running, "s1")


# ---------------------------------------------------------------------- retries
def test_429_retry_after_then_500_then_success(server_factory: ServerFactory,
                                               fake_llm: FakeLLM,
                                               make_engine: EngineFactory) -> None:
    fake_llm.push("summary", Reply(429, headers={"Retry-After": "1"}, error="slow down"))
    fake_llm.push("extract", Reply(500, error="boom"))
    running = server_factory(engine=make_engine(max_retries=3))
    session(running, "s1", "Hello there, I like green tea.", "Hi!")
    task_id = commit(running, "s1")
    w = watch(running, task_id)
    assert w.last.kind == COMPLETED, w.events

    retrying = w.of_kind(RETRYING)
    assert [e.message for e in retrying] == [
        "retrying summarize, attempt 2 of 4, after 429",
        "retrying extract, attempt 2 of 4, after 500",
    ]
    assert [e.attempt for e in retrying] == [2, 2]
    assert [e.stage for e in retrying] == ["summarize", "extract"]

    s = fake_llm.of("summary")
    assert [r.reply.status for r in s if r.reply] == [429, 200]
    # Retry-After: 1 was honoured although the backoff base is 10 ms.
    assert s[1].received_at - s[0].received_at >= 0.9

    returned = fake_llm.returned_usage()
    assert result_usage(running, task_id) == returned == totals(running, "s1")


def test_timeout_is_retried(server_factory: ServerFactory, fake_llm: FakeLLM,
                            make_engine: EngineFactory) -> None:
    fake_llm.push("summary", Reply(delay=1.5))
    running = server_factory(engine=make_engine(timeout_seconds=0.4))
    session(running, "s1", "Please remember that the deadline is Friday.", "Will do.")
    task_id = commit(running, "s1")
    w = watch(running, task_id)
    assert w.last.kind == COMPLETED, w.events
    assert [e.message for e in w.of_kind(RETRYING)] == [
        "retrying summarize, attempt 2 of 4, after timeout"]
    # The reply that came after the client gave up is not counted.
    slow = fake_llm.of("summary")[0]
    assert slow.usage is None
    assert result_usage(running, task_id) == fake_llm.returned_usage() == totals(running, "s1")


def test_server_errors_exhaust_retries(server_factory: ServerFactory, fake_llm: FakeLLM,
                                       make_engine: EngineFactory) -> None:
    fake_llm.push("summary", *[Reply(503, error="overloaded") for _ in range(3)])
    running = server_factory(engine=make_engine(max_retries=2))
    session(running, "s1", "Hi.", "Hello.")
    task_id = commit(running, "s1")
    w = watch(running, task_id)
    assert w.last.kind == FAILED, w.events
    assert [e.message for e in w.of_kind(RETRYING)] == [
        "retrying summarize, attempt 2 of 3, after 503",
        "retrying summarize, attempt 3 of 3, after 503",
    ]
    assert w.last.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "HTTP 503" in w.last.error.message and "3 attempts" in w.last.error.message
    assert failure_reason(running, task_id) == "LLM_UNAVAILABLE"
    assert len(fake_llm.received) == 3
    meta = running.sessions.GetSession(session_pb2.GetSessionRequest(session_id="s1"))
    assert meta.commit_count == 0 and meta.llm_token_usage.total_tokens == 0


def test_401_fails_at_once_and_the_key_stays_hidden(
        server_factory: ServerFactory, fake_llm: FakeLLM, make_engine: EngineFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # A server that echoes the key it was given in its error text.
    fake_llm.push("summary", Reply(401, error=f"Incorrect API key provided: {API_KEY}"))
    running = server_factory(engine=make_engine())
    session(running, "s1", "Hi.", "Hello.")
    task_id = commit(running, "s1")
    w = watch(running, task_id)
    assert w.last.kind == FAILED, w.events
    assert not w.of_kind(RETRYING)
    assert len(fake_llm.received) == 1
    assert w.last.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "HTTP 401" in w.last.error.message and "API key" in w.last.error.message
    assert "[REDACTED]" in w.last.error.message
    assert failure_reason(running, task_id) == "LLM_AUTH"
    assert API_KEY not in everything_visible(running, "s1", [task_id])
    assert API_KEY not in caplog.text
    assert_key_only_in_auth_header(fake_llm)


def test_404_model_is_a_bad_request(server_factory: ServerFactory, fake_llm: FakeLLM,
                                    make_engine: EngineFactory) -> None:
    fake_llm.push("summary", Reply(404, error="model test-model not found"))
    running = server_factory(engine=make_engine())
    session(running, "s1", "Hi.", "Hello.")
    w = watch(running, commit(running, "s1"))
    assert w.last.kind == FAILED and not w.of_kind(RETRYING)
    assert "model test-model not found" in w.last.error.message
    assert failure_reason(running, w.snapshot.task_id) == "LLM_BAD_REQUEST"


# ---------------------------------------------------------------------- bad output
def test_garbage_json_is_repaired_once(server_factory: ServerFactory, fake_llm: FakeLLM,
                                       make_engine: EngineFactory) -> None:
    fake_llm.push("extract", Reply(content="Sure! Here are the memories: {oops"))
    fake_llm.memories_fn = lambda rec: [
        {"category": "entities", "key": "Project Atlas", "content": "Atlas is the user's app.",
         "source_message_ids": rec.message_ids("user")}]
    running = server_factory(engine=make_engine())
    session(running, "s1", "I work on project Atlas.", "Nice.")
    task_id = commit(running, "s1")
    w = watch(running, task_id)
    assert w.last.kind == COMPLETED, w.events

    first, repair = fake_llm.of("extract")
    assert not first.repair and repair.repair
    msgs = repair.body["messages"]
    assert msgs[-2] == {"role": "assistant", "content": "Sure! Here are the memories: {oops"}
    assert "not valid JSON" in msgs[-1]["content"]
    assert repair.body["response_format"]["type"] == "json_schema"

    (mem,) = memories(running, memory_pb2.MEMORY_CATEGORY_ENTITIES)
    assert mem.content == "Atlas is the user's app."
    # Both extraction calls were paid for and are counted.
    assert first.usage is not None and repair.usage is not None
    assert result_usage(running, task_id) == fake_llm.returned_usage() == totals(running, "s1")


def test_garbage_twice_fails_with_bad_output(server_factory: ServerFactory,
                                             fake_llm: FakeLLM, make_engine: EngineFactory) -> None:
    fake_llm.push("extract", Reply(content="not json"),
                  Reply(content=json.dumps({"memories": [{"category": "feelings"}]})))
    running = server_factory(engine=make_engine())
    session(running, "s1", "Hi.", "Hello.")
    task_id = commit(running, "s1")
    w = watch(running, task_id)
    assert w.last.kind == FAILED, w.events
    assert w.last.stage == "extract"
    assert w.last.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "unusable" in w.last.error.message and "feelings" in w.last.error.message
    assert failure_reason(running, task_id) == "LLM_BAD_OUTPUT"
    assert len(fake_llm.of("extract")) == 2  # one repair attempt, no more
    assert archive(running, "s1", 1).state == session_pb2.ARCHIVE_STATE_PENDING
    assert memories(running) == []


def test_summary_without_sections_is_repaired(server_factory: ServerFactory,
                                              fake_llm: FakeLLM,
                                              make_engine: EngineFactory) -> None:
    fake_llm.push("summary", Reply(content="The user said hi."))
    running = server_factory(engine=make_engine())
    session(running, "s1", "Hi.", "Hello.")
    w = watch(running, commit(running, "s1"))
    assert w.last.kind == COMPLETED, w.events
    _, repair = fake_llm.of("summary")
    assert repair.repair and "Overview" in repair.body["messages"][-1]["content"]
    assert "## Overview" in archive(running, "s1", 1).overview


def test_invented_quotes_are_dropped(server_factory: ServerFactory, fake_llm: FakeLLM,
                                     make_engine: EngineFactory) -> None:
    def quoting(rec: Received) -> str:
        base = good_summary(rec)
        return base.replace("## Key user messages\n",
                            '## Key user messages\n> "I never said this."\n'
                            '- \u201cthe release is on Monday\u201d\n')

    fake_llm.summary_fn = quoting
    running = server_factory(engine=make_engine())
    session(running, "s1", "Remember: the release is on Monday, not Tuesday.", "Got it.")
    w = watch(running, commit(running, "s1"))
    assert w.last.kind == COMPLETED
    ov = archive(running, "s1", 1).overview
    assert "I never said this" not in ov
    assert '> "the release is on Monday"' in ov
    assert '> "Remember: the release is on Monday, not Tuesday."' in ov


# ---------------------------------------------------------------------- memories
def test_restated_memories_update_instead_of_duplicating(
        server_factory: ServerFactory, fake_llm: FakeLLM, make_engine: EngineFactory,
        tmp_path: Path) -> None:
    facts: dict[str, list[dict[str, Any]]] = {"now": []}
    fake_llm.memories_fn = lambda rec: [
        dict(f, source_message_ids=rec.message_ids("user")) for f in facts["now"]]

    running = server_factory(engine=make_engine())
    facts["now"] = [
        {"category": "preferences", "key": "Preferred Editor", "content": "The user uses vim."},
        {"category": "profile", "key": "profile", "content": "name: Alice"},
    ]
    session(running, "s1", "I use vim. My name is Alice.", "Ok.")
    assert watch(running, commit(running, "s1")).last.kind == COMPLETED

    facts["now"] = [
        {"category": "preferences", "key": "  preferred-editor ",
         "content": "The user switched to neovim."},
        {"category": "profile", "key": "name", "content": "location: Berlin"},
        {"category": "profile", "key": "profile", "content": "name: Alice"},
    ]
    session(running, "s2", "I switched to neovim. I live in Berlin.", "Ok.")
    assert watch(running, commit(running, "s2")).last.kind == COMPLETED

    (pref,) = memories(running, memory_pb2.MEMORY_CATEGORY_PREFERENCES)
    assert pref.content == "The user switched to neovim."
    assert pref.source_session_id == "s2"
    (profile,) = memories(running, memory_pb2.MEMORY_CATEGORY_PROFILE)
    assert profile.content.splitlines() == ["name: Alice", "location: Berlin"]
    found = running.memories.SearchMemories(memory_pb2.SearchMemoriesRequest(query="neovim"))
    assert [r.memory.memory_id for r in found.results] == [pref.memory_id]

    # The same facts again, then again after a restart: still one of each.
    before = {m.memory_id for m in memories(running)}
    session(running, "s3", "Still neovim, still Berlin.", "Ok.")
    assert watch(running, commit(running, "s3")).last.kind == COMPLETED
    assert {m.memory_id for m in memories(running)} == before
    running.loop.run(running.app.stop(0.5))
    running.app._stopped_by_test = True  # type: ignore[attr-defined]
    again = server_factory(engine=make_engine())
    session(again, "s4", "Neovim and Berlin, as before.", "Ok.")
    assert watch(again, commit(again, "s4")).last.kind == COMPLETED
    assert {m.memory_id for m in memories(again)} == before
    assert len(memories(again, memory_pb2.MEMORY_CATEGORY_PROFILE)) == 1


# ---------------------------------------------------------------------- limits, modes
def test_concurrent_calls_are_bounded(server_factory: ServerFactory, fake_llm: FakeLLM,
                                      make_engine: EngineFactory) -> None:
    fake_llm.push("summary", *[Reply(delay=0.15) for _ in range(3)])
    running = server_factory(engine=make_engine(max_concurrency=1), worker_concurrency=4)
    tasks = []
    for sid in ("a", "b", "c"):
        session(running, sid, f"Session {sid} says hello.", "Hi.")
        tasks.append(commit(running, sid))
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda t: watch(running, t), tasks))
    assert all(w.last.kind == COMPLETED for w in results)
    assert fake_llm.max_in_flight == 1
    assert len(fake_llm.received) == 6


def test_json_mode_auto_steps_down(server_factory: ServerFactory, fake_llm: FakeLLM,
                                   make_engine: EngineFactory) -> None:
    fake_llm.push("extract", Reply(400, error="response_format json_schema is not supported"))
    running = server_factory(engine=make_engine(json_mode="auto"))
    session(running, "s1", "Hi.", "Hello.")
    assert watch(running, commit(running, "s1")).last.kind == COMPLETED
    say(running, "s1", "Again.")
    assert watch(running, commit(running, "s1")).last.kind == COMPLETED
    formats = [r.body.get("response_format", {}).get("type") for r in fake_llm.of("extract")]
    # Rejected json_schema, json_object worked and is used from then on.
    assert formats == ["json_schema", "json_object", "json_object"]


def test_json_mode_none_reads_fenced_json(server_factory: ServerFactory, fake_llm: FakeLLM,
                                          make_engine: EngineFactory) -> None:
    doc = {"memories": [{"category": "events", "key": "Launch Date",
                         "content": "The launch is on 2025-03-01.", "source_message_ids": []}]}
    fake_llm.push("extract", Reply(content="Here you go:\n```json\n" + json.dumps(doc) + "\n```"))
    running = server_factory(engine=make_engine(json_mode="none"))
    session(running, "s1", "We launch on 2025-03-01.", "Great.")
    assert watch(running, commit(running, "s1")).last.kind == COMPLETED
    assert "response_format" not in fake_llm.of("extract")[0].body
    (event,) = memories(running, memory_pb2.MEMORY_CATEGORY_EVENTS)
    assert event.content == "The launch is on 2025-03-01."


def test_key_from_file_wins(server_factory: ServerFactory, fake_llm: FakeLLM,
                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-from-env-0000000000")
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    engine = OpenAIEngine(llm_settings(fake_llm, api_key_file=str(key_file)), backoff=FAST)
    assert engine.secrets == (API_KEY,)
    running = server_factory(engine=engine)
    session(running, "s1", "Hi.", "Hello.")
    assert watch(running, commit(running, "s1")).last.kind == COMPLETED
    assert_key_only_in_auth_header(fake_llm)

