"""Index terms of a text: what the recall index stores and what a query is matched on.

Lower-cased alphanumeric tokens (Unicode letters and digits), English stop words
removed, each reduced to its Snowball (Porter 2) stem, so "painting", "painted" and
"paints" meet. The same function runs at index and at query time on every backend,
which is what makes ranking identical on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from functools import lru_cache

import snowballstemmer  # type: ignore[import-untyped]

_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)
MAX_TERM_CHARS = 64  # longer tokens (hashes, base64 blobs) are cut: bounded index rows

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for
from further had has have having he her here hers herself him himself his how i if in
into is it its itself just me more most my myself no nor not now of off on once only or
other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up
very was we were what when where which while who whom why will with would you your
yours yourself yourselves s t d ll m re ve y o don didn doesn isn wasn weren aren
""".split())

# A Snowball stemmer keeps the word it works on in the object: one per thread (index
# terms are made in worker threads, queries on the event loop).
_local = threading.local()


@lru_cache(maxsize=65536)
def _stem(token: str) -> str:
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = snowballstemmer.stemmer("english")
    stem: str = stemmer.stemWord(token)
    return stem


def tokens(text: str) -> list[str]:
    """The index terms of `text`, in order, repeats kept."""
    out: list[str] = []
    for match in _TOKEN.finditer(text.lower()):
        tok = match.group()
        if tok in STOP_WORDS:
            continue
        out.append(_stem(tok[:MAX_TERM_CHARS]))
    return out


def term_frequencies(text: str) -> tuple[Counter[str], int]:
    """Each distinct term with its count, and the document length in terms."""
    toks = tokens(text)
    return Counter(toks), len(toks)


def query_terms(text: str, limit: int = 32) -> list[str]:
    """The distinct terms of a query, first occurrence first, at most `limit`."""
    return list(dict.fromkeys(tokens(text)))[:limit]
