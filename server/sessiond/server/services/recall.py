"""Recall: what an agent gets back for a question, within its character budget.

A lexical ranking (BM25 over the caller's own index entries) over every kind the
index holds, fused with a dense ranking (cosine similarity of the query's
embedding; a convex combination of normalised scores, domain/recall.py) when an
embedder is configured; episodes carry their
neighbouring turns when the budget allows; the caller's current session, when
named, contributes its newest completed overview and its own entries rank first
among equally good ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime

from sessiond.server.domain import rules, terms
from sessiond.server.domain.errors import FieldViolation, InvalidArgument
from sessiond.server.domain.limits import DEFAULT_LIMITS, Limits
from sessiond.server.domain.recall import (
    ALL_KINDS,
    CANDIDATES,
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_ITEMS,
    MAX_MAX_CHARS,
    MAX_MAX_ITEMS,
    NEIGHBOUR_HITS,
    RecallKind,
    RecallQuery,
    RecallResult,
    pack,
)
from sessiond.server.domain.values import Identity
from sessiond.server.embedders.base import Embedder, EmbedderError
from sessiond.server.observability import metrics
from sessiond.server.store.base import Store

log = logging.getLogger(__name__)

# A query's embedding must come within this long, or recall ranks lexically only.
QUERY_EMBED_SECONDS = 3.0
WARN_EVERY_SECONDS = 60.0
# A hit of the named session outranks another session's hit unless that one scores
# this much higher.
OWN_SESSION_BOOST = 1.25


class RecallService:
    def __init__(self, store: Store, embedder: Embedder | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.store = store
        self.embedder = embedder
        self.limits = limits
        self._warned_at = -WARN_EVERY_SECONDS

    async def _embed_query(self, query: str) -> tuple[tuple[float, ...], str]:
        """The query's vector, or none (lexical ranking only) when the embedder fails
        or is slow: recall still answers, and the log says why (at most once a minute)."""
        assert self.embedder is not None
        try:
            with metrics.embedding_call(self.embedder.model, "query", 1):
                async with asyncio.timeout(QUERY_EMBED_SECONDS):
                    vecs = await self.embedder.embed([query])
            return tuple(vecs[0]), self.embedder.model
        except (TimeoutError, EmbedderError) as exc:
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_SECONDS:
                self._warned_at = now
                log.warning("recall without dense ranking: the query embedding failed (%s)",
                            str(exc) or "timed out")
            return (), ""

    async def recall(self, identity: Identity, query: str, session_id: str = "",
                     max_chars: int = 0, max_items: int = 0,
                     kinds: Sequence[RecallKind] = (), since: datetime | None = None,
                     until: datetime | None = None) -> RecallResult:
        bad: list[FieldViolation] = []
        if not query.strip():
            bad.append(FieldViolation("query", "give at least one word"))
        elif len(query) > self.limits.query_chars:
            bad.append(FieldViolation("query", f"at most {self.limits.query_chars} characters"))
        if max_chars < 0 or max_chars > MAX_MAX_CHARS:
            bad.append(FieldViolation("max_chars", f"must be 0 (default {DEFAULT_MAX_CHARS}) "
                                                   f"to {MAX_MAX_CHARS}"))
        if max_items < 0 or max_items > MAX_MAX_ITEMS:
            bad.append(FieldViolation("max_items", f"must be 0 (default {DEFAULT_MAX_ITEMS}) "
                                                   f"to {MAX_MAX_ITEMS}"))
        if since is not None and until is not None and since >= until:
            bad.append(FieldViolation("until", "must be later than since"))
        if bad:
            raise InvalidArgument("invalid recall request", violations=bad)
        if session_id:
            rules.check_session_id(session_id)
        budget = max_chars or DEFAULT_MAX_CHARS
        limit = max_items or DEFAULT_MAX_ITEMS
        wanted = tuple(dict.fromkeys(kinds)) or ALL_KINDS
        overview = ""
        if session_id and RecallKind.OVERVIEW in wanted:
            latest = await self.store.latest_done_archive(identity, session_id)
            overview = latest.overview if latest is not None else ""
        vector, model = (await self._embed_query(query) if self.embedder is not None
                         else ((), ""))
        q = RecallQuery(tuple(terms.query_terms(query)), wanted, since, until,
                        max(CANDIDATES, 3 * limit), vector, model)
        hits = (await self.store.recall(identity, q, with_neighbours=NEIGHBOUR_HITS)
                if q.terms or q.vector else [])
        if session_id:
            hits.sort(key=lambda h: -h.score * (OWN_SESSION_BOOST
                                                if h.entry.session_id == session_id else 1.0))
            if overview:  # the overview returned on its own is not repeated as an item
                hits = [h for h in hits if not (h.entry.kind is RecallKind.OVERVIEW
                                                and overview.strip() in h.entry.text)]
        return pack(hits, overview, budget, limit)
