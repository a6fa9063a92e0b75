"""What the retrieval index needs of an embedder: texts in, unit vectors out.

An embedder is named by a stable `model` string stored beside every vector it
made, so that vectors of another model are never compared with its queries
(`sessiond reindex` makes the missing ones after a change of model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from sessiond.server.phase2.engines.base import EngineError

# Texts per embedding call (the index stage and reindex batch by this).
DEFAULT_BATCH = 64
# Characters of one text sent to an embedder (entries are at most 4,000 already;
# a query is at most the query limit).
MAX_TEXT_CHARS = 4000


class EmbedderError(EngineError):
    """An embedding call failed for good. `reason` is an ErrorInfo-style reason
    (EMBEDDER_UNAVAILABLE, EMBEDDER_AUTH, ...); the message carries no secret. In
    Phase 2 it fails the `index` stage like an engine error (same codes)."""


class Embedder(Protocol):
    @property
    def model(self) -> str:
        """The stable name stored with each vector (e.g. "local:all-MiniLM-L6-v2")."""
        ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit-length vector per text, in order."""
        ...

    async def aclose(self) -> None: ...


def normalized(vector: Sequence[float]) -> list[float]:
    """`vector` scaled to unit length (cosine similarity becomes a dot product)."""
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if not math.isfinite(norm) or norm == 0.0:
        raise EmbedderError("the embedder returned a zero or non-finite vector",
                            reason="EMBEDDER_BAD_OUTPUT", retryable=False)
    return [x / norm for x in vector]


def clip_texts(texts: Sequence[str]) -> list[str]:
    """What is sent: each text clipped; empty texts as one space (APIs refuse "")."""
    return [(t[:MAX_TEXT_CHARS] if t.strip() else " ") for t in texts]
