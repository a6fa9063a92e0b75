"""The offline engine's rule-based extraction: cue words in any case, names kept as
written, and nothing invented from sentences that only look alike."""

from __future__ import annotations

from datetime import UTC, datetime

from sessiond.server.domain.values import MemoryCategory, Message, Role, TextPart
from sessiond.server.phase2.engines.base import ExtractionRequest
from sessiond.server.phase2.engines.offline import OfflineEngine


def profile_of(*texts: str) -> str:
    msgs = [Message(id=f"m{i}", role=Role.USER, parts=(TextPart(t),),
                    created_at=datetime(2026, 1, 1, tzinfo=UTC), seq=i + 1)
            for i, t in enumerate(texts)]
    out = OfflineEngine().extract_now(ExtractionRequest("s", "uri", msgs, "", ""))
    return "\n".join(c.content for c in out.candidates if c.category is MemoryCategory.PROFILE)


def test_profile_cues_match_in_any_case() -> None:
    profile = profile_of("My name is Ada Lovelace.", "i work at Analytical Engines.",
                         "I LIVE IN London these days.", "Call me Ada.")
    assert "Ada Lovelace" in profile
    assert "Analytical Engines" in profile
    assert "London" in profile


def test_names_must_be_capitalised() -> None:
    assert "tired" not in profile_of("my name is tired of this")
