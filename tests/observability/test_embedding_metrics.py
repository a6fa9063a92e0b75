"""Embedding metrics over HTTP from a real server with the `openai` embedder against
a loopback /v1/embeddings: requests by call and outcome, texts, reported tokens,
retries and errors by reason."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sessiond.server.embedders.openai import OpenAIEmbedder
from sessiond.v1 import memory_pb2, task_pb2

from tests.conftest import ServerFactory
from tests.embedders.fake_embeddings import FakeEmbeddings, Scripted
from tests.embedders.test_openai_embedder import FAST, KEY, KEY_ENV, converse, settings
from tests.observability.spans import ids, named, one, parent_id, recording
from tests.observability.test_metrics import local, observed, scrape, value


@pytest.fixture
def fake() -> Iterator[FakeEmbeddings]:
    f = FakeEmbeddings().start()
    yield f
    f.stop()


def test_embedding_calls_tokens_retries_and_errors(server_factory: ServerFactory,
                                                   fake: FakeEmbeddings,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    base = local()
    embedder = OpenAIEmbedder(settings(fake, max_retries=2), backoff=FAST)
    srv = server_factory(embedder=embedder, observe=observed())
    fake.script.append(Scripted(429))  # the index stage's first request: one retry
    assert converse(srv).state == task_pb2.TASK_STATE_COMPLETED
    # every text once: the 429'd request's texts were sent again
    indexed = len(fake.texts) - len(fake.received[0].body["input"])
    requests = len(fake.received) - 1
    srv.memories.Recall(memory_pb2.RecallRequest(query="canine"))
    fake.script.append(Scripted(401))  # not retried: the query ranks lexically instead
    srv.memories.Recall(memory_pb2.RecallRequest(query="pottery"))
    s = scrape(srv)

    def v(name: str, **labels: str) -> float:
        return value(s, name, base, **labels)

    assert requests >= 1 and indexed >= 5
    assert v("sessiond_embedding_calls_total", embedder="openai", call="index",
             outcome="ok") == requests
    assert v("sessiond_embedding_texts_total", embedder="openai", call="index") == indexed
    assert v("sessiond_embedding_retries_total", embedder="openai",
             reason="EMBEDDER_RATE_LIMITED") == 1
    assert v("sessiond_embedding_calls_total", embedder="openai", call="query",
             outcome="ok") == 1
    assert v("sessiond_embedding_calls_total", embedder="openai", call="query",
             outcome="error") == 1
    assert v("sessiond_embedding_errors_total", embedder="openai", call="query",
             reason="EMBEDDER_AUTH") == 1
    # the fake reports 1 token per successful request
    assert v("sessiond_embedding_tokens_total", embedder="openai") == requests + 1
    for name, rows in s.items():
        if name.startswith("sessiond_embedding"):
            for labels, _ in rows:
                assert set(labels) <= {"embedder", "call", "outcome", "reason"}, labels


def test_each_index_embedding_request_is_an_embed_span(server_factory: ServerFactory,
                                                       fake: FakeEmbeddings,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    with recording() as spans:
        srv = server_factory(embedder=OpenAIEmbedder(settings(fake), backoff=FAST))
        assert converse(srv).state == task_pb2.TASK_STATE_COMPLETED
        got = spans.get_finished_spans()
    index = one(got, "stage index")
    embeds = named(got, "embed")
    assert embeds and len(embeds) == len(fake.received)
    for s in embeds:
        assert parent_id(s) == ids(index)[1]
        assert s.attributes is not None and s.attributes["sessiond.embedder"] == "openai"
