"""Each request to the LLM endpoint is a span under its engine call, in the Commit's
trace; a retry is an event of the engine span with its reason. Also the metrics of
engine calls, retries and tokens from the real OpenAI engine."""

from __future__ import annotations

from opentelemetry.trace import StatusCode
from sessiond.server.observability import metrics

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
