"""The `openai` embedder over a real server: Phase 2 embeds every index entry through
a loopback /v1/embeddings, Recall fuses the dense ranking with BM25, retries follow
the LLM engine's policy, failures are precise, the key goes nowhere but the
Authorization header, and `sessiond reindex` fills in what is missing."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.rpc import error_details_pb2
from sessiond.server.cli import main as cli_main
from sessiond.server.config import EmbedderSettings
from sessiond.server.embedders.openai import OpenAIEmbedder
from sessiond.server.phase2.engines.openai import Backoff
from sessiond.v1 import memory_pb2, session_pb2, task_pb2

from tests.api.helpers import add
from tests.conftest import Running, ServerFactory
from tests.embedders.fake_embeddings import FakeEmbeddings, Scripted

KEY = "emb-key-5c1d9e7a3b2f4e6d"
KEY_ENV = "SESSIOND_TEST_EMBEDDER_KEY"
FAST = Backoff(base=0.01, max_delay=0.05, retry_after_max=2.0)
TURNS = [
    (session_pb2.ROLE_USER, "We adopted a puppy named Biscuit last weekend."),
    (session_pb2.ROLE_ASSISTANT, "Congratulations! How is Biscuit settling in?"),
    (session_pb2.ROLE_USER, "Next month I start a pottery class downtown."),
    (session_pb2.ROLE_ASSISTANT, "Pottery is relaxing. Which studio?"),
]


@pytest.fixture
def fake() -> Iterator[FakeEmbeddings]:
    f = FakeEmbeddings().start()
    yield f
    f.stop()


def settings(fake: FakeEmbeddings, **kw: object) -> EmbedderSettings:
    s = EmbedderSettings(kind="openai", base_url=fake.base_url, model="fake-embed",
                         api_key_env=KEY_ENV, timeout_seconds=2.0, max_retries=3)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


@pytest.fixture
def embedder(fake: FakeEmbeddings, monkeypatch: pytest.MonkeyPatch) -> OpenAIEmbedder:
    monkeypatch.setenv(KEY_ENV, KEY)
    return OpenAIEmbedder(settings(fake), backoff=FAST)


def converse(server: Running, sid: str = "s1") -> task_pb2.Task:
    s = server.sessions
    s.CreateSession(session_pb2.CreateSessionRequest(session_id=sid))
    for role, text in TURNS:
        add(s, sid, text, role)
    reply = s.Commit(session_pb2.CommitRequest(session_id=sid))
    list(server.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id), timeout=20))
    return server.tasks.GetTask(task_pb2.GetTaskRequest(task_id=reply.task_id))


def recall(server: Running, query: str) -> memory_pb2.RecallResponse:
    resp: memory_pb2.RecallResponse = server.memories.Recall(
        memory_pb2.RecallRequest(query=query, kinds=[memory_pb2.RECALL_KIND_MESSAGE]))
    return resp


def counts(server: Running, model: str) -> tuple[int, int]:
    from sessiond.server.domain.values import Identity

    ident = Identity("default", "default", "default")
    store = server.app.store
    return (server.loop.run(store.recall_entry_count(ident)),
            server.loop.run(store.vector_count(ident, model)))


def test_phase2_embeds_every_entry_and_recall_finds_meaning(
        server_factory: ServerFactory, fake: FakeEmbeddings,
        embedder: OpenAIEmbedder) -> None:
    server = server_factory(embedder=embedder)
    task = converse(server)
    assert task.state == task_pb2.TASK_STATE_COMPLETED
    entries, vectors = counts(server, embedder.model)
    assert entries >= 5 and vectors == entries  # 4 episodes, overview, memories
    # "canine" is in no turn: only the dense ranking can find the puppy turn
    resp = recall(server, "canine")
    assert resp.items and "puppy" in resp.items[0].text
    # the key travels in the Authorization header only
    assert fake.received
    for seen in fake.received:
        assert seen.headers["authorization"] == f"Bearer {KEY}"
        assert KEY not in seen.raw.decode()
        assert seen.body["model"] == "fake-embed"
    assert embedder.model == "openai:fake-embed"


def test_without_an_embedder_meaning_alone_finds_nothing(server_factory: ServerFactory
                                                         ) -> None:
    server = server_factory()
    assert converse(server).state == task_pb2.TASK_STATE_COMPLETED
    assert not recall(server, "canine").items
    assert recall(server, "puppy").items


def test_retryable_failures_are_retried(server_factory: ServerFactory, fake: FakeEmbeddings,
                                        embedder: OpenAIEmbedder) -> None:
    fake.script.extend([Scripted(500), Scripted(429, {"retry-after": "0"}), Scripted(503)])
    server = server_factory(embedder=embedder)
    task = converse(server)
    assert task.state == task_pb2.TASK_STATE_COMPLETED
    assert counts(server, embedder.model)[1] > 0


def test_refused_credentials_fail_the_index_stage_precisely(
        server_factory: ServerFactory, fake: FakeEmbeddings, embedder: OpenAIEmbedder) -> None:
    fake.default = Scripted(401)
    server = server_factory(embedder=embedder)
    task = converse(server)
    assert task.state == task_pb2.TASK_STATE_FAILED
    assert task.stage == "index"
    assert task.error.code == 9  # FAILED_PRECONDITION: the configuration must change
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in task.error.details)
    assert info.reason == "EMBEDDER_AUTH"
    assert KEY not in str(task)
    assert len(fake.received) == 1  # 401 is not retried


def test_bad_replies_are_not_accepted(server_factory: ServerFactory, fake: FakeEmbeddings,
                                      embedder: OpenAIEmbedder) -> None:
    fake.default = Scripted(200, raw=json.dumps({"data": [{"embedding": [0.0, 0.0]}]}
                                                ).encode())
    server = server_factory(embedder=embedder)
    task = converse(server)
    assert task.state == task_pb2.TASK_STATE_FAILED
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in task.error.details)
    assert info.reason == "EMBEDDER_BAD_OUTPUT"


def test_recall_falls_back_to_words_when_the_embedder_is_down(
        server_factory: ServerFactory, fake: FakeEmbeddings, embedder: OpenAIEmbedder,
        caplog: pytest.LogCaptureFixture) -> None:
    server = server_factory(embedder=embedder)
    assert converse(server).state == task_pb2.TASK_STATE_COMPLETED
    fake.default = Scripted(500)
    resp = recall(server, "puppy Biscuit")
    assert resp.items and "puppy" in resp.items[0].text
    assert "without dense ranking" in caplog.text
    assert KEY not in caplog.text


def test_reindex_backfills_entries_and_vectors(server_factory: ServerFactory,
                                               fake: FakeEmbeddings, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    server = server_factory(data_dir=data)
    assert converse(server).state == task_pb2.TASK_STATE_COMPLETED
    entries, _ = counts(server, "openai:fake-embed")
    server.loop.run(server.app.stop(0.5))
    server.app._stopped_by_test = True  # type: ignore[attr-defined]
    # as archived before the retrieval index existed: no entries at all
    db = sqlite3.connect(data / "sessiond.sqlite3")
    with db:
        for table in ("recall_vectors", "recall_terms", "recall_entries"):
            db.execute(f"DELETE FROM {table}")
    db.close()
    monkeypatch.setenv(KEY_ENV, KEY)
    args = ["reindex", "--data-dir", str(data), "--embedder", "openai",
            "--embedder-base-url", fake.base_url, "--embedder-model", "fake-embed",
            "--embedder-api-key-env", KEY_ENV, "--json"]
    assert cli_main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["archives"] == 1 and first["vectors"] == entries
    assert first["entries"] + first["memories"] == entries
    # idempotent: a second run finds nothing to do
    assert cli_main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second == {"archives": 0, "entries": 0, "memories": 0, "vectors": 0, "pruned": 0}
    # a new embedder model: every entry gets a vector of it; --prune drops the old ones
    assert cli_main([*args[:-1], "--embedder-dimensions", "32", "--prune", "--json"]) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["vectors"] == entries and third["pruned"] == entries
    assert KEY not in json.dumps([first, second, third])
    restarted = server_factory(data_dir=data, embedder=OpenAIEmbedder(
        settings(fake, dimensions=32), backoff=FAST))
    assert "puppy" in recall(restarted, "canine").items[0].text
