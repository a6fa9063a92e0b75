"""Embedders for the retrieval index: `none` (lexical only), `openai`, `local`."""

from __future__ import annotations

from sessiond.server.config import EmbedderSettings
from sessiond.server.embedders.base import Embedder, EmbedderError

KINDS = ("none", "openai", "local")


def build_embedder(settings: EmbedderSettings) -> tuple[Embedder | None, tuple[str, ...]]:
    """The configured embedder (None for `none`) and the secrets never to show."""
    if settings.kind in ("", "none"):
        return None, ()
    if settings.kind == "openai":
        from sessiond.server.embedders.openai import OpenAIEmbedder

        emb = OpenAIEmbedder(settings)
        return emb, emb.secrets
    if settings.kind == "local":
        from sessiond.server.embedders.local import LocalEmbedder

        return LocalEmbedder(settings), ()
    raise ValueError(f"unknown embedder {settings.kind!r}: use one of {', '.join(KINDS)}")


__all__ = ["KINDS", "Embedder", "EmbedderError", "build_embedder"]
