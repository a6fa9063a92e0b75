"""Encoding of domain values into storage columns, shared by every backend."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sessiond.server.domain.errors import ErrorCode
from sessiond.server.domain.values import (
    CommitResult,
    Identity,
    MemoryCategory,
    MemoryCounts,
    Part,
    SkillUse,
    TaskError,
    UsageRecord,
    part_from_dict,
    part_to_dict,
)

SEP = "\x1f"


def session_key(identity: Identity, session_id: str) -> str:
    """Internal primary key of a session: ids are unique per identity, not globally,
    so one identity can never learn that another's session id exists."""
    return SEP.join((identity.account, identity.user, identity.agent, session_id))


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def encode_parts(parts: Iterable[Part]) -> str:
    return dumps([part_to_dict(p) for p in parts])


def decode_parts(raw: str) -> tuple[Part, ...]:
    return tuple(part_from_dict(d) for d in json.loads(raw))


def encode_usage(rec: UsageRecord) -> tuple[str, str | None]:
    skill = None
    if rec.skill is not None:
        skill = dumps({"uri": rec.skill.uri, "input": rec.skill.input,
                       "output": rec.skill.output, "success": rec.skill.success})
    return dumps(list(rec.context_uris)), skill


def decode_usage(contexts: str, skill: str | None, created_at: datetime) -> UsageRecord:
    s = None
    if skill:
        d = json.loads(skill)
        s = SkillUse(uri=d["uri"], input=d.get("input", ""), output=d.get("output", ""),
                     success=bool(d.get("success", True)))
    return UsageRecord(context_uris=tuple(json.loads(contexts)), skill=s, created_at=created_at)


def encode_error(err: TaskError | None) -> str | None:
    if err is None:
        return None
    return dumps({"code": err.code.value, "message": err.message, "reason": err.reason})


def decode_error(raw: str | None) -> TaskError | None:
    if not raw:
        return None
    d = json.loads(raw)
    return TaskError(code=ErrorCode(d["code"]), message=d["message"], reason=d.get("reason", ""))


def encode_result(res: CommitResult | None) -> str | None:
    return None if res is None else dumps(res.as_dict())


def decode_result(raw: str | None) -> CommitResult | None:
    return None if not raw else CommitResult.from_dict(json.loads(raw))


def encode_counts(c: MemoryCounts) -> str:
    return dumps(c.as_dict())


def decode_counts(raw: str | None) -> MemoryCounts:
    return MemoryCounts.from_dict(json.loads(raw) if raw else None)


_WORD = re.compile(r"\w+", re.UNICODE)


def search_terms(query: str, limit: int = 16) -> list[str]:
    """Lower-cased word tokens of a free-text query (no operators reach the engine)."""
    return [w.lower() for w in _WORD.findall(query)][:limit]


def merge_content(category: MemoryCategory, old: str, new: str) -> str:
    """Profile is one merged record: new lines are appended when not already there.
    Other categories: the newer statement of the same fact replaces the older."""
    if category is not MemoryCategory.PROFILE:
        return new
    lines = [ln for ln in old.splitlines() if ln.strip()]
    for ln in new.splitlines():
        if ln.strip() and ln not in lines:
            lines.append(ln)
    return "\n".join(lines)


def clean_text(value: str) -> str:
    """Free text (summaries, memory keys and contents, event messages, uris) is stored
    with U+FFFD for NUL, on every backend: PostgreSQL TEXT cannot hold NUL. JSON
    columns are unaffected (the encoder escapes NUL)."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value
