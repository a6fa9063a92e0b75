"""Reading the archive-summary reply into the stored overview and abstract.

The overview is rebuilt with canonical `## ` headings in a fixed order, so the
offline engine's section parser (and clients) read LLM and offline overviews alike.
Lines of "Key user messages" that are not verbatim user text are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sessiond.server.phase2.engines.openai.schema import BadOutput

SECTIONS: tuple[str, ...] = (
    "Overview",
    "Historical context",
    "New information",
    "Current archive analysis",
    "Key user messages",
    "Open loops",
    "Next step",
)
ABSTRACT_MAX = 200
QUOTE_MAX = 600

_ABSTRACT = re.compile(r"^\s*[*_]*abstract[*_]*\s*:[*_]*\s*(.*?)\s*$", re.I | re.M)
_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(.*?)\n?\s*```\s*$", re.S)
_HEADING = re.compile(
    r"^[ \t]*#{1,4}[ \t]*(?:\d+[.)][ \t]*)?[*_]*(?P<title>[^\n#*_:]+?)[*_]*[ \t]*:?[ \t]*$",
    re.M)
_CANON = {s.lower(): s for s in SECTIONS}
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


def _norm(text: str) -> str:
    return " ".join(text.translate(_QUOTES).split())


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def split_sections(text: str) -> dict[str, str]:
    """Canonical section title -> body, for the headings found (case-insensitive,
    '#'-level, numbering and a trailing ':' tolerated). Other headings stay in the
    body of the section they are in."""
    found: list[tuple[str, int, int]] = []
    for m in _HEADING.finditer(text):
        canon = _CANON.get(" ".join(m.group("title").split()).lower())
        if canon is not None:
            found.append((canon, m.start(), m.end()))
    out: dict[str, str] = {}
    for i, (canon, _, end) in enumerate(found):
        stop = found[i + 1][1] if i + 1 < len(found) else len(text)
        if canon not in out:
            out[canon] = text[end:stop].strip()
    return out


def _quote_text(line: str) -> str:
    s = line.strip()
    s = re.sub(r"^(?:[>*\-\u2022]|\d+[.)])\s*", "", s)
    s = re.sub(r"^>\s*", "", s).strip()
    s = s.translate(_QUOTES)
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1]
    return s.strip()


def verified_quotes(body: str, user_texts: Sequence[str]) -> list[str]:
    """The lines of `body` that quote user text verbatim (whitespace and typographic
    quotes aside; '…' or '...' may mark cuts), rendered as `> "text"`."""
    haystack = [_norm(t) for t in user_texts]
    kept: list[str] = []
    for line in body.splitlines():
        quote = _quote_text(line)
        if not quote or quote.lower().strip(".") in ("none", "(none)", "n/a"):
            continue
        fragments = [f.strip() for f in re.split(r"…|\.\.\.", _norm(quote)) if f.strip()]
        if fragments and any(all(f in h for f in fragments) for h in haystack):
            kept.append(f'> "{_clip(quote, QUOTE_MAX)}"')
    return list(dict.fromkeys(kept))


def parse_summary(text: str, *, session_id: str, archive_index: int,
                  user_texts: Sequence[str], strict: bool = True) -> tuple[str, str]:
    """(overview, abstract) of a summary reply.

    Raises BadOutput when the Overview section is missing or empty, and, if `strict`,
    when any other required section is missing. Not strict (after the repair attempt),
    missing sections are written as "- none".
    """
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    abstract = ""
    m = _ABSTRACT.search(text)
    if m is not None:
        abstract = m.group(1).strip()
        text = text[: m.start()] + text[m.end():]
    sections = split_sections(text)
    missing = [s for s in SECTIONS if s not in sections]
    if not sections.get("Overview", "").strip():
        raise BadOutput("the reply has no '## Overview' section with the one-sentence "
                        "overview" + (f"; missing sections: {', '.join(missing)}"
                                      if missing else ""))
    if missing and strict:
        raise BadOutput(f"the reply lacks the required sections: {', '.join(missing)} "
                        "(each must start with a '## ' heading line)")
    quotes = verified_quotes(sections.get("Key user messages", ""), user_texts)
    lines = [f"# Session {session_id}: archive {archive_index}"]
    for title in SECTIONS:
        body = sections.get(title, "").strip()
        if title == "Key user messages":
            body = "\n".join(quotes)
        lines += ["", f"## {title}", body or "- none"]
    overview = "\n".join(lines) + "\n"
    if not abstract:
        first = " ".join(sections["Overview"].split())
        sentence = re.match(r"(.+?[.!?])(\s|$)", first)
        abstract = sentence.group(1) if sentence else first
    return overview, _clip(abstract.strip("*_ "), ABSTRACT_MAX)
