"""Each request to the LLM endpoint is a span under its engine call, in the Commit's
trace; a retry is an event of the engine span with its reason. Also the metrics of
engine calls, retries and tokens from the real OpenAI engine, and JSON log lines
with the task, session and trace ids."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.trace import StatusCode
from sessiond.server.observability import metrics
from sessiond.server.observability.logs import JsonFormatter

from tests.conftest import ServerFactory
from tests.llm.conftest import EngineFactory, commit, watch
from tests.llm.fake_openai import FakeLLM, Reply
from tests.llm.test_service_openai import session
from tests.observability.spans import ids, named, one, parent_id, recording


def test_llm_requests_are_spans_of_the_commit_trace(server_factory: ServerFactory,
                                                    fake_llm: FakeLLM,
                                                    make_engine: EngineFactory) -> None:
    fake_llm.push("summary", Reply(500, error="boom"))
    metrics.enable(True)
    retries0 = metrics.ENGINE_RETRIES.labels("openai", "summarize", "http_500")._value.get()
    tokens0 = metrics.ENGINE_TOKENS.labels("openai", "summarize", "prompt")._value.get()
    try:
        with recording() as spans:
            running = server_factory(engine=make_engine(max_retries=3))
            session(running, "s1", "Hello there, I like green tea.", "Hi!")
            task_id = commit(running, "s1")
            assert watch(running, task_id).last.kind == 7  # COMPLETED
            got = spans.get_finished_spans()
    finally:
        metrics.enable(False)
    trace_id = ids(one(got, "/sessiond.v1.SessionService/Commit"))[0]
    engine = one(got, "engine summarize")
    calls = [s for s in named(got, "llm chat.completions") if parent_id(s) == ids(engine)[1]]
    assert len(calls) == 2  # the 500, then the success
    assert calls[0].status.status_code is StatusCode.ERROR
    assert calls[1].status.status_code is not StatusCode.ERROR
    assert all(ids(s)[0] == trace_id for s in calls)
    assert calls[1].attributes is not None
    assert calls[1].attributes["gen_ai.request.model"] == "test-model"
    assert int(calls[1].attributes["gen_ai.usage.input_tokens"]) > 0  # type: ignore[arg-type]
    retry = [e for e in engine.events if e.name == "retry"]
    assert len(retry) == 1 and retry[0].attributes is not None
    assert retry[0].attributes["sessiond.reason"] == "500"
    extract_calls = [s for s in named(got, "llm chat.completions")
                     if parent_id(s) == ids(one(got, "engine extract"))[1]]
    assert len(extract_calls) >= 1
    assert metrics.ENGINE_RETRIES.labels("openai", "summarize", "http_500")._value.get() \
        == retries0 + 1
    assert metrics.ENGINE_TOKENS.labels("openai", "summarize", "prompt")._value.get() > tokens0


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def test_phase2_log_lines_have_task_session_and_trace_ids(
        server_factory: ServerFactory, fake_llm: FakeLLM, make_engine: EngineFactory,
        json_lines: Lines) -> None:
    fake_llm.push("summary", Reply(503, error="overloaded"))
    with recording() as spans:
        running = server_factory(engine=make_engine(max_retries=3))
        session(running, "logged", "Hello there, I like green tea.", "Hi!")
        task_id = commit(running, "logged")
        watch(running, task_id)
        got = spans.get_finished_spans()
    trace_id = f"{ids(one(got, '/sessiond.v1.SessionService/Commit'))[0]:032x}"
    records = [json.loads(line) for line in json_lines.lines]
    retry = [r for r in records if "model call failed (503)" in r["message"]]
    assert len(retry) == 1, records
    line = retry[0]
    assert line["level"] == "WARNING" and line["logger"].startswith("sessiond.")
    assert line["task_id"] == task_id and line["session_id"] == "logged"
    assert line["trace_id"] == trace_id and len(line["span_id"]) == 16
    assert line["time"].endswith("Z")
