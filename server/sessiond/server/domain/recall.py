"""Recall: the retrieval index's entries, a query, and the rules that turn scored
candidates into what an agent gets back within its character budget. No I/O here.

An entry is one thing a session produced, as the index keeps it: an archived message
(an episode), an archive's overview with its abstract, or a memory. Lexical scores
are Okapi BM25 over the caller's own entries (per-identity statistics), computed the
same way on every backend.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from sessiond.server.domain import terms
from sessiond.server.domain.values import Identity, Message, archive_uri

DEFAULT_MAX_CHARS = 4000
MAX_MAX_CHARS = 200_000
DEFAULT_MAX_ITEMS = 20
MAX_MAX_ITEMS = 200
# What the index keeps of one entry's text (and derives its terms from).
ENTRY_TEXT_CHARS = 4000
# BM25 parameters (Robertson/Sparck Jones; Lucene's and the benchmark baseline's).
BM25_K1 = 1.5
BM25_B = 0.75
# Candidates scored per query before de-duplication and packing.
CANDIDATES = 60
# Smallest useful remainder when the last item must be clipped to fit the budget.
MIN_CLIPPED_ITEM = 120
# The named session's overview may take at most this share of the budget when items
# also compete for it (measured: bench/recall.py, docs/retrieval.md).
OVERVIEW_SHARE = 0.10
# The best this many episode hits carry their neighbouring turns (the answer to a
# question is often the reply to the turn that matches it); later hits come alone,
# which leaves room for more distinct hits.
NEIGHBOUR_HITS = 5
# Fusion of the lexical and the dense ranking, measured on the LoCoMo dev split with
# the local embedder (bench/recall_tune.py, docs/retrieval.md): a convex combination
# of min-max normalised scores, lexical weight CONVEX_ALPHA, over the lexical
# candidates and the DENSE_CANDIDATES nearest entries. Reciprocal rank fusion
# (CONVEX_ALPHA = 0; constant RRF_K, dense weight DENSE_WEIGHT) measured 1-2 points
# lower on both measures.
RRF_K = 60
DENSE_WEIGHT = 1.0
DENSE_CANDIDATES = 20
# The kinds the dense ranking proposes (the lexical one proposes every kind asked for).
DENSE_KINDS: tuple[RecallKind, ...] = ()  # () = every kind
CONVEX_ALPHA = 0.5


class RecallKind(enum.StrEnum):
    MEMORY = "memory"
    OVERVIEW = "overview"
    MESSAGE = "message"


ALL_KINDS: tuple[RecallKind, ...] = tuple(RecallKind)


@dataclass(frozen=True, slots=True)
class RecallEntry:
    """One indexed thing, owned by `owner` (memories: their owner space)."""

    entry_id: str
    owner: Identity
    kind: RecallKind
    session_id: str
    archive_index: int
    position: int  # message seq (episodes); 0 otherwise
    message_ids: tuple[str, ...]
    memory_id: str
    time: datetime
    text: str
    # The text's index terms with their counts, and its length in terms; computed
    # once, where the entry is made (never inside a store transaction).
    term_counts: tuple[tuple[str, int], ...] = ()
    length: int = 0

    def with_terms(self) -> RecallEntry:
        tf, length = terms.term_frequencies(self.text)
        return replace(self, term_counts=tuple(sorted(tf.items())), length=length)


@dataclass(frozen=True, slots=True)
class EntryVector:
    """An entry's embedding (unit length) by the configured embedder."""

    entry: RecallEntry
    vector: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class RecallQuery:
    terms: tuple[str, ...]
    kinds: tuple[RecallKind, ...] = ALL_KINDS
    since: datetime | None = None
    until: datetime | None = None
    limit: int = CANDIDATES
    # The query's embedding and the model that made it (dense ranking); empty: none.
    vector: tuple[float, ...] = ()
    model: str = ""


@dataclass(frozen=True, slots=True)
class RecallHit:
    """A scored entry; `before`/`after` are the neighbouring turns of an episode."""

    entry: RecallEntry
    score: float
    before: tuple[RecallEntry, ...] = ()
    after: tuple[RecallEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class RecallItem:
    kind: RecallKind
    text: str
    score: float
    session_id: str
    archive_uri: str
    message_ids: tuple[str, ...]
    memory_id: str
    time: datetime


@dataclass(frozen=True, slots=True)
class RecallResult:
    latest_archive_overview: str
    items: tuple[RecallItem, ...] = field(default_factory=tuple)


def fuse(rankings: Sequence[Sequence[RecallHit]], limit: int, k: int = RRF_K,
         weights: Sequence[float] = ()) -> list[RecallHit]:
    """Weighted reciprocal rank fusion (Cormack et al., 2009): each entry scores the
    sum of weight / (k + rank) over the rankings it appears in (weights default to
    1); best first (ties: the order of first appearance). The hit object kept is
    the first one seen."""
    scores: dict[str, float] = {}
    first: dict[str, RecallHit] = {}
    for n, ranking in enumerate(rankings):
        weight = weights[n] if n < len(weights) else 1.0
        for rank, hit in enumerate(ranking, start=1):
            key = hit.entry.entry_id
            scores[key] = scores.get(key, 0.0) + weight / (k + rank)
            first.setdefault(key, hit)
    order = sorted(first, key=lambda key: -scores[key])
    return [replace(first[key], score=scores[key]) for key in order[:limit]]


def fuse_convex(lexical: Sequence[RecallHit], dense: Sequence[RecallHit], limit: int,
                alpha: float) -> list[RecallHit]:
    """Convex combination of min-max normalised scores (Bruch et al., 2023): an
    entry scores alpha * lexical + (1 - alpha) * dense, each normalised over its own
    candidate list (absent from a list: 0); best first."""
    def norm(hits: Sequence[RecallHit]) -> dict[str, float]:
        if not hits:
            return {}
        hi, lo = max(h.score for h in hits), min(h.score for h in hits)
        span = hi - lo
        return {h.entry.entry_id: (h.score - lo) / span if span > 0 else 1.0 for h in hits}

    lex, den = norm(lexical), norm(dense)
    first: dict[str, RecallHit] = {}
    for h in (*lexical, *dense):
        first.setdefault(h.entry.entry_id, h)
    scores = {key: alpha * lex.get(key, 0.0) + (1 - alpha) * den.get(key, 0.0)
              for key in first}
    order = sorted(first, key=lambda key: -scores[key])
    return [replace(first[key], score=scores[key]) for key in order[:limit]]


def entry_id(kind: RecallKind, *parts: str) -> str:
    """A stable id: indexing the same thing twice writes the same row (idempotent)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()
    return f"{kind.value[:3]}_{digest}"


def message_entry(owner: Identity, skey: str, session_id: str, archive_index: int,
                  message: Message) -> RecallEntry | None:
    """The episode of an archived message: its role and text (None when it has none)."""
    text = message.text().strip()
    if not text:
        return None
    text = f"{message.role.value}: {text}"[:ENTRY_TEXT_CHARS]
    return RecallEntry(entry_id(RecallKind.MESSAGE, skey, message.id), owner,
                       RecallKind.MESSAGE, session_id, archive_index, message.seq,
                       (message.id,), "", message.created_at, text).with_terms()


def overview_entry(owner: Identity, skey: str, session_id: str, archive_index: int,
                   abstract: str, overview: str, message_ids: tuple[str, ...],
                   time: datetime) -> RecallEntry | None:
    text = "\n".join(t for t in (abstract.strip(), overview.strip()) if t)
    if not text:
        return None
    return RecallEntry(entry_id(RecallKind.OVERVIEW, skey, str(archive_index)), owner,
                       RecallKind.OVERVIEW, session_id, archive_index, 0, message_ids, "",
                       time, text[:ENTRY_TEXT_CHARS]).with_terms()


def bm25_idf(n_docs: int, df: int) -> float:
    """BM25's idf with the +1 inside the log (never negative), as Lucene uses it."""
    return math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))


def _item_text(turns: list[RecallEntry]) -> tuple[str, tuple[str, ...]]:
    ids = tuple(dict.fromkeys(i for t in turns for i in t.message_ids))
    return "\n".join(t.text for t in turns), ids


def pack(hits: list[RecallHit], overview: str, max_chars: int,
         max_items: int) -> RecallResult:
    """Best first, de-duplicated, within `max_chars` (overview included).

    Each episode is offered with its
    neighbouring turns when they fit, alone otherwise; a turn already returned is
    never returned again; the last item is clipped to the remaining budget rather
    than dropped when a useful part of it fits.
    """
    budget = max(0, max_chars)
    if overview:
        cap = budget if not hits else max(0, int(budget * OVERVIEW_SHARE))
        overview = clip(overview, cap)
    left = budget - len(overview)
    items: list[RecallItem] = []
    seen_ids: set[str] = set()
    seen_text: set[str] = set()
    for hit in hits:
        if len(items) >= max_items or left <= 0:
            break
        entry = hit.entry
        if entry.kind is RecallKind.MESSAGE and entry.message_ids[0] in seen_ids:
            continue
        if (entry.kind is RecallKind.MEMORY and entry.message_ids
                and seen_ids.issuperset(entry.message_ids)):
            continue  # derived from turns already returned whole
        key = " ".join(entry.text.lower().split())
        if key in seen_text:
            continue
        # Neighbouring turns (episodes only) already returned elsewhere are not repeated.
        text, ids = _item_text([t for t in (*hit.before, entry, *hit.after)
                                if t is entry or t.message_ids[0] not in seen_ids])
        if len(text) > left:
            text, ids = _item_text([entry])
        if len(text) > left:
            if left < MIN_CLIPPED_ITEM:
                break
            text = clip(text, left)
        seen_text.add(key)
        if entry.kind is RecallKind.MESSAGE:
            seen_ids.update(ids)
        left -= len(text)
        uri = (archive_uri(entry.session_id, entry.archive_index)
               if entry.kind is not RecallKind.MEMORY else "")
        items.append(RecallItem(entry.kind, text, hit.score, entry.session_id, uri, ids,
                                entry.memory_id, entry.time))
    return RecallResult(overview, tuple(items))


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, at a word boundary when one is near."""
    if len(text) <= limit:
        return text
    if limit <= 1:
        return text[:max(0, limit)]
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space >= limit * 0.8:
        cut = cut[:space]
    return cut + "…"
