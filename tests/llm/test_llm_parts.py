"""The LLM engine's parts without the service: settings, retry policy, prompts, and
reading replies."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx2
import openai
import pytest
from sessiond.server.app import build_engine
from sessiond.server.config import LLMSettings, Settings
from sessiond.server.domain.values import MemoryCategory, Message, Role, TextPart
from sessiond.server.phase2.engines.base import EngineError, SummaryRequest
from sessiond.server.phase2.engines.offline import _section
from sessiond.server.phase2.engines.openai import (
    Backoff,
    OpenAIEngine,
    build_llm_engine,
    read_api_key,
)
from sessiond.server.phase2.engines.openai.prompts import (
    EXTRACTION_PROMPT,
    EXTRACTION_SCHEMA,
    SUMMARY_PROMPT,
    load_prompt,
    load_schema,
    parse_template,
    render_messages,
)
from sessiond.server.phase2.engines.openai.retry import classify, retry_after_seconds
from sessiond.server.phase2.engines.openai.schema import (
    BadOutput,
    candidates_from,
    normalize_key,
    parse_json_reply,
    validate,
)
from sessiond.server.phase2.engines.openai.summary import SECTIONS, parse_summary, verified_quotes

from tests.llm.conftest import API_KEY, FAST, KEY_ENV, llm_settings
from tests.llm.fake_openai import FakeLLM, Reply

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def msg(mid: str, role: Role, text: str) -> Message:
    return Message(mid, role, (TextPart(text),), NOW)


# ---------------------------------------------------------------------- settings
def test_build_needs_base_url_and_model() -> None:
    with pytest.raises(ValueError, match="--llm-base-url"):
        build_llm_engine(LLMSettings(model="m"))
    with pytest.raises(ValueError, match="--llm-model"):
        build_llm_engine(LLMSettings(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(ValueError, match="http"):
        build_llm_engine(LLMSettings(base_url="127.0.0.1:9", model="m"))
    with pytest.raises(ValueError, match="json_mode"):
        build_llm_engine(LLMSettings(base_url="http://h/v1", model="m", json_mode="xml"))
    with pytest.raises(ValueError, match="concurrency"):
        build_llm_engine(LLMSettings(base_url="http://h/v1", model="m", max_concurrency=0))


def test_build_returns_the_key_as_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, f"  {API_KEY}\n")
    engine, secrets = build_llm_engine(LLMSettings(base_url="https://u:pw-secret@h/v1",
                                                   model="m", api_key_env=KEY_ENV))
    assert secrets == (API_KEY, "pw-secret")
    assert engine.name == "openai" and engine.max_attempts == 6
    asyncio.run(engine.aclose())


def test_the_service_builds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    settings = Settings(engine="openai")
    with pytest.raises(ValueError, match="--llm-base-url"):
        build_engine(settings)
    settings.llm = LLMSettings(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)
    engine, secrets = build_engine(settings)
    assert isinstance(engine, OpenAIEngine) and secrets == (API_KEY,)
    asyncio.run(engine.aclose())


def test_key_file_wins_and_errors_are_clear(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv(KEY_ENV, "from-env")
    s = LLMSettings(base_url="http://h/v1", model="m", api_key_env=KEY_ENV)
    assert read_api_key(s) == "from-env"
    f = tmp_path / "key"
    f.write_text("from-file\n")
    s.api_key_file = str(f)
    assert read_api_key(s) == "from-file"
    f.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_api_key(s)
    s.api_key_file = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot read"):
        read_api_key(s)
    monkeypatch.delenv(KEY_ENV)
    s.api_key_file = ""
    assert read_api_key(s) == ""  # local servers: no key, no secret
    engine, secrets = build_llm_engine(s)
    assert secrets == ()
    asyncio.run(engine.aclose())


# ---------------------------------------------------------------------- retry policy
def _status_error(status: int, headers: dict[str, str] | None = None,
                  body: object = None) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://h/v1/chat/completions")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    cls = {400: openai.BadRequestError, 401: openai.AuthenticationError,
           403: openai.PermissionDeniedError, 404: openai.NotFoundError,
           422: openai.UnprocessableEntityError, 429: openai.RateLimitError}.get(
        status, openai.InternalServerError)
    return cls("error", response=response, body=body)


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "1.5"}) == 1.5
    date = format_datetime(NOW + timedelta(seconds=7), usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=NOW) == 7.0
    past = format_datetime(NOW - timedelta(seconds=7), usegmt=True)
    assert retry_after_seconds({"retry-after": past}, now=NOW) == 0.0
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


@pytest.mark.parametrize(("status", "reason", "retryable"), [
    (429, "LLM_RATE_LIMITED", True), (500, "LLM_UNAVAILABLE", True),
    (502, "LLM_UNAVAILABLE", True), (503, "LLM_UNAVAILABLE", True),
    (408, "LLM_TIMEOUT", True), (400, "LLM_BAD_REQUEST", False),
    (401, "LLM_AUTH", False), (403, "LLM_AUTH", False), (404, "LLM_BAD_REQUEST", False),
    (422, "LLM_BAD_REQUEST", False),
])
def test_classify_status(status: int, reason: str, retryable: bool) -> None:
    f = classify(_status_error(status, {"Retry-After": "2"}))
    assert (f.reason, f.retryable, f.label) == (reason, retryable, str(status))
    assert f.retry_after == (2.0 if status in (429, 503) else None)


def test_classify_transport() -> None:
    request = httpx2.Request("POST", "http://h/v1/chat/completions")
    t = classify(openai.APITimeoutError(request=request))
    c = classify(openai.APIConnectionError(request=request))
    assert (t.reason, t.label, t.retryable) == ("LLM_TIMEOUT", "timeout", True)
    assert (c.reason, c.label, c.retryable) == ("LLM_UNAVAILABLE", "connection error", True)


def test_server_detail_is_kept_short() -> None:
    f = classify(_status_error(400, body={"error": {"message": "x" * 1000}}))
    assert f.detail.startswith("xxx") and len(f.detail) <= 200


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    b = Backoff(base=0.1, max_delay=0.35, retry_after_max=5.0)
    waits = [b.delay(1, None) for _ in range(50)]
    assert all(0.05 <= w <= 0.1 for w in waits) and len(set(waits)) > 1
    assert all(0.1 <= b.delay(2, None) <= 0.2 for _ in range(20))
    assert all(0.175 <= b.delay(6, None) <= 0.35 for _ in range(20))
    slow = classify(_status_error(429, {"Retry-After": "30"}))
    assert b.delay(1, slow) == 5.0
    assert b.delay(1, classify(_status_error(429, {"Retry-After": "0.2"}))) == 0.2


def test_connection_refused_is_retried_then_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    engine = OpenAIEngine(LLMSettings(base_url=url, model="m", max_retries=2,
                                      timeout_seconds=2), api_key=API_KEY, backoff=FAST)
    reports: list[tuple[int, int, str]] = []

    async def report(attempt: int, max_attempts: int, reason: str) -> None:
        reports.append((attempt, max_attempts, reason))

    async def run() -> None:
        try:
            await engine.summarize(SummaryRequest("s", 1, [msg("m1", Role.USER, "hi")], ""),
                                   report)
        finally:
            await engine.aclose()

    with pytest.raises(EngineError) as err:
        asyncio.run(run())
    assert err.value.reason == "LLM_UNAVAILABLE"
    assert reports == [(2, 3, "connection error"), (3, 3, "connection error")]


def test_semaphore_is_shared_by_calls(fake_llm: FakeLLM) -> None:
    fake_llm.push("summary", *[Reply(delay=0.1) for _ in range(4)])
    engine = OpenAIEngine(llm_settings(fake_llm, max_concurrency=2), api_key=API_KEY,
                          backoff=FAST)

    async def run() -> None:
        reqs = [SummaryRequest(f"s{i}", 1, [msg("m1", Role.USER, "hi")], "") for i in range(4)]
        await asyncio.gather(*(engine.summarize(r) for r in reqs))
        await engine.aclose()

    asyncio.run(run())
    assert fake_llm.max_in_flight == 2


# ---------------------------------------------------------------------- prompts
def test_prompts_are_versioned_files_with_all_fields() -> None:
    summary = load_prompt(*SUMMARY_PROMPT)
    extraction = load_prompt(*EXTRACTION_PROMPT)
    assert (summary.id, extraction.id) == ("archive_summary.v1", "memory_extraction.v1")
    system, user = summary.render(session_id="s", archive_index="1", message_count="2",
                                  previous_overview="PREV", messages="MSGS")
    for title in SECTIONS:
        assert f"## {title}" in system
    assert "ABSTRACT:" in system and "PREV" in user and "MSGS" in user
    assert "$" not in system + user
    with pytest.raises(KeyError):
        summary.render(session_id="s")
    system, user = extraction.render(schema="{SCHEMA}", session_id="s", archive_uri="u",
                                     previous_overview="PREV", overview="THIS",
                                     messages="MSGS")
    assert "{SCHEMA}" in system and "PREV" in user and "THIS" in user
    for category in MemoryCategory:
        assert f"- {category.value}:" in system


def test_template_format_is_checked() -> None:
    t = parse_template("x", 3, "<!-- notes -->\n=== user ===\nHello $who, $$5")
    assert t.system is None and t.id == "x.v3"
    assert t.render(who="you") == ("", "Hello you, $5")
    with pytest.raises(ValueError, match="no === user ==="):
        parse_template("x", 1, "=== system ===\nonly system")
    with pytest.raises(ValueError, match="before the first"):
        parse_template("x", 1, "stray\n=== user ===\nhi")


def test_schema_enum_is_the_categories() -> None:
    schema = load_schema(*EXTRACTION_SCHEMA)
    item = schema["properties"]["memories"]["items"]
    assert item["properties"]["category"]["enum"] == [c.value for c in MemoryCategory]
    assert sorted(item["required"]) == sorted(item["properties"])  # strict-mode ready


def test_render_messages_clips_long_archives() -> None:
    msgs = [msg(f"m{i}", Role.USER, f"message number {i} " + "x" * 500) for i in range(100)]
    text = render_messages(msgs, budget=5000)
    assert len(text) <= 5200
    assert "[m0] user: message number 0" in text and "[m99] user:" in text
    assert "messages omitted" in text


# ---------------------------------------------------------------------- replies
def test_json_reply_forms() -> None:
    assert parse_json_reply('{"a": 1}') == {"a": 1}
    assert parse_json_reply('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_reply('Here:\n{"a": 1}\nDone.') == {"a": 1}
    with pytest.raises(BadOutput, match="not valid JSON"):
        parse_json_reply("{oops")
    with pytest.raises(BadOutput, match="empty"):
        parse_json_reply("  ")


def test_validator_reports_paths() -> None:
    schema = load_schema(*EXTRACTION_SCHEMA)
    assert validate({"memories": []}, schema) == []
    errors = validate({"memories": [{"category": "moods", "key": 3, "content": "c",
                                     "source_message_ids": [], "extra": 1}], "x": 0}, schema)
    assert "$: unexpected property 'x'" in errors
    assert "$.memories[0]: unexpected property 'extra'" in errors
    assert any(e.startswith('$.memories[0].category: "moods" is not one of') for e in errors)
    assert "$.memories[0].key: expected string, got integer" in errors
    assert validate([], schema) == ["$: expected object, got array"]
    assert validate(True, {"type": "integer"}) == ["$: expected integer, got boolean"]


def test_keys_are_normalised_and_merged() -> None:
    assert normalize_key("  Preferred Editor ") == "preferred_editor"
    assert normalize_key("preferred-editor") == normalize_key("PREFERRED__editor")
    schema = load_schema(*EXTRACTION_SCHEMA)
    doc = {"memories": [
        {"category": "profile", "key": "name", "content": "name: Alice",
         "source_message_ids": ["m1"]},
        {"category": "profile", "key": "city", "content": "location: Berlin",
         "source_message_ids": ["m2", "nope"]},
        {"category": "preferences", "key": "Editor", "content": "vim",
         "source_message_ids": ["m1"]},
        {"category": "preferences", "key": " editor", "content": "neovim",
         "source_message_ids": ["m2"]},
        {"category": "events", "key": "", "content": "Launch on Monday",
         "source_message_ids": []},
        {"category": "events", "key": "x", "content": "   ", "source_message_ids": []},
    ]}
    got = candidates_from(doc, schema, {"m1", "m2"})
    by = {(c.category, c.key): c for c in got}
    assert len(got) == 3
    profile = by[(MemoryCategory.PROFILE, "profile")]
    assert profile.content == "name: Alice\nlocation: Berlin"
    assert profile.source_message_ids == ("m1", "m2")
    pref = by[(MemoryCategory.PREFERENCES, "editor")]
    assert pref.content == "neovim" and pref.source_message_ids == ("m1", "m2")
    assert (MemoryCategory.EVENTS, "launch_on_monday") in by
    with pytest.raises(BadOutput, match="does not match the schema"):
        candidates_from({"memories": [{}]}, schema, set())


def _summary(**replace: str) -> str:
    body = {t: f"text of {t}" for t in SECTIONS}
    body.update(replace)
    return "\n\n".join(f"## {t}\n{b}" for t, b in body.items())


def test_summary_is_rebuilt_with_canonical_headings() -> None:
    reply = ("```markdown\n# My title\n**ABSTRACT:** Short line.\n\n"
             + _summary().replace("## Open loops", "### 6. Open Loops:") + "\n```")
    overview, abstract = parse_summary(reply, session_id="s", archive_index=2,
                                       user_texts=[], strict=True)
    assert abstract == "Short line."
    assert overview.startswith("# Session s: archive 2\n\n## Overview\ntext of Overview")
    assert "My title" not in overview and "ABSTRACT" not in overview
    assert _section(overview, "Open loops") == "text of Open loops"  # offline parser reads it
    assert _section(overview, "Key user messages") == "- none"  # no verbatim quote


def test_summary_checks() -> None:
    partial = "## Overview\nThe user asked about tea. More.\n\n## Next step\n- reply"
    with pytest.raises(BadOutput, match="lacks the required sections: Historical context"):
        parse_summary(partial, session_id="s", archive_index=1, user_texts=[])
    overview, abstract = parse_summary(partial, session_id="s", archive_index=1,
                                       user_texts=[], strict=False)
    assert abstract == "The user asked about tea."  # derived from the Overview
    assert _section(overview, "Open loops") == "- none"
    with pytest.raises(BadOutput, match="no '## Overview'"):
        parse_summary(_summary(Overview=""), session_id="s", archive_index=1,
                      user_texts=[], strict=False)


def test_quotes_must_be_verbatim() -> None:
    users = ["I'd like   the report by Friday, please.\nAnd in PDF."]
    body = "\n".join([
        '> "I\u2019d like the report by Friday, please."',  # typographic apostrophe
        '- "the report by Friday, please. And in PDF."',  # across a line break
        '> "I\'d like … in PDF."',  # a marked cut
        '> "I want it by Monday."',  # invented
        "- none",
    ])
    assert verified_quotes(body, users) == [
        '> "I\'d like the report by Friday, please."',
        '> "the report by Friday, please. And in PDF."',
        '> "I\'d like … in PDF."',
    ]


def test_reply_without_choices_is_bad_output(fake_llm: FakeLLM) -> None:
    fake_llm.push("summary", Reply(raw=b"<html>not an API</html>",
                                   headers={"Content-Type": "text/html"}))
    engine = OpenAIEngine(llm_settings(fake_llm), api_key=API_KEY, backoff=FAST)

    async def run() -> None:
        try:
            await engine.summarize(SummaryRequest("s", 1, [msg("m1", Role.USER, "hi")], ""))
        finally:
            await engine.aclose()

    with pytest.raises(EngineError) as err:
        asyncio.run(run())
    assert err.value.reason == "LLM_BAD_OUTPUT" and "base URL" in str(err.value)
    assert len(fake_llm.received) == 1
    assert json.loads(fake_llm.received[0].raw)["model"] == "test-model"
