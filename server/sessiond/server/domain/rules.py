"""Validation rules and identifiers of the domain."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sessiond.server.domain.errors import FieldViolation, InvalidArgument
from sessiond.server.domain.limits import DEFAULT_LIMITS, Limits, clip_echo
from sessiond.server.domain.values import ContextPart, Part, SkillUse, TextPart, ToolPart

SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_session_id() -> str:
    return f"ses_{uuid.uuid4().hex}"


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def new_task_id() -> str:
    return f"task_{uuid.uuid4().hex}"


def check_session_id(session_id: str, field: str = "session_id") -> None:
    if not session_id:
        raise InvalidArgument(f"{field} is required",
                              violations=[FieldViolation(field, "must not be empty")])
    if not SESSION_ID_RE.fullmatch(session_id):
        raise InvalidArgument(
            f"{field} {clip_echo(session_id)!r} is not valid",
            violations=[FieldViolation(field, "1-128 characters of letters, digits and ._:@-, "
                                              "starting with a letter or digit")])


def check_request_id(request_id: str, limits: Limits = DEFAULT_LIMITS) -> None:
    if len(request_id) > limits.request_id_chars:
        raise InvalidArgument("request_id is too long", violations=[
            FieldViolation("request_id", f"at most {limits.request_id_chars} characters")])


def _utf8(value: str) -> int:
    # A lone surrogate cannot come from protobuf; count it like the replacement it gets.
    return len(value.encode("utf-8", "replace"))


def part_bytes(part: Part) -> int:
    """The bytes a part counts against `Limits.message_bytes`: every string field."""
    if isinstance(part, TextPart):
        return _utf8(part.text)
    if isinstance(part, ContextPart):
        return _utf8(part.uri) + _utf8(part.abstract)
    return sum(_utf8(v) for v in (part.tool_id, part.tool_name, part.tool_uri,
                                  part.skill_uri, part.input, part.output))


def message_bytes(parts: Sequence[Part]) -> int:
    return sum(part_bytes(p) for p in parts)


# What a message adds on the wire beyond its string fields (id, role, seq, time,
# part framing and the tool part's numbers), counted generously.
MESSAGE_WIRE_OVERHEAD = 128
PART_WIRE_OVERHEAD = 64


def wire_bytes(parts: Sequence[Part]) -> int:
    """An upper bound of a stored message's size in a reply."""
    return MESSAGE_WIRE_OVERHEAD + message_bytes(parts) + PART_WIRE_OVERHEAD * len(parts)


def size_violation(size: int, limits: Limits, field: str = "parts") -> FieldViolation:
    return FieldViolation(field, f"at most {limits.message_bytes} bytes in all string fields "
                                 f"(got {size})")


def check_parts(parts: Sequence[Part], limits: Limits = DEFAULT_LIMITS) -> int:
    """Validate a message's parts; returns its size in bytes."""
    violations: list[FieldViolation] = []
    if not parts:
        violations.append(FieldViolation("parts", "a message needs at least one part"))
    if len(parts) > limits.message_parts:
        # Too many parts: say so once, without a violation per part.
        raise InvalidArgument("message is not valid", violations=[
            FieldViolation("parts", f"at most {limits.message_parts} parts (got {len(parts)})")])
    tool_ids: set[str] = set()
    for i, p in enumerate(parts):
        if isinstance(p, ContextPart):
            if not p.uri:
                violations.append(FieldViolation(f"parts[{i}].context.uri", "must not be empty"))
        elif isinstance(p, ToolPart):
            if not p.tool_id:
                violations.append(FieldViolation(f"parts[{i}].tool.tool_id",
                                                 "must not be empty"))
            elif p.tool_id in tool_ids:
                violations.append(FieldViolation(f"parts[{i}].tool.tool_id",
                                                 f"duplicate tool_id {clip_echo(p.tool_id)!r}"))
            tool_ids.add(p.tool_id)
    size = message_bytes(parts)
    if size > limits.message_bytes:
        violations.append(size_violation(size, limits))
    if violations:
        raise InvalidArgument("message is not valid", violations=violations)
    return size


def check_usage(context_uris: Sequence[str], skill: SkillUse | None,
                limits: Limits = DEFAULT_LIMITS) -> None:
    """A usage record is bounded like a message (its uris, skill input and output)."""
    bad = [FieldViolation(f"context_uris[{i}]", "must not be empty")
           for i, u in enumerate(context_uris) if not u.strip()]
    if len(context_uris) > limits.message_parts:
        bad = [FieldViolation("context_uris", f"at most {limits.message_parts} uris "
                                              f"(got {len(context_uris)})")]
    size = sum(_utf8(u) for u in context_uris)
    if skill is not None:
        size += _utf8(skill.uri) + _utf8(skill.input) + _utf8(skill.output)
    if size > limits.message_bytes:
        bad.append(FieldViolation("context_uris", f"at most {limits.message_bytes} bytes in "
                                                  f"all uris and the skill (got {size})"))
    if bad:
        raise InvalidArgument("usage is not valid", violations=bad)


MAX_BATCH_MESSAGES = 1000
MAX_CLIENT_MESSAGE_ID = 128


def check_client_message_id(value: str, field: str = "client_message_id") -> None:
    if len(value) > MAX_CLIENT_MESSAGE_ID:
        raise InvalidArgument(f"{field} is too long", violations=[
            FieldViolation(field, f"at most {MAX_CLIENT_MESSAGE_ID} characters")])
    if value and (value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise InvalidArgument(f"{field} is not valid", violations=[
            FieldViolation(field, "no control characters, no leading or trailing spaces")])


# How far ahead of the server's clock a message's own created_at may be.
CREATED_AT_SKEW = timedelta(minutes=5)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def check_created_at(value: datetime | None, now: datetime,
                     previous: datetime | None = None, field: str = "created_at") -> None:
    """A client-given message time: not before 1970, at most `CREATED_AT_SKEW` after
    `now`, and not before `previous` (the batch's message before it: times in one
    AddMessages batch must not decrease). None (unset) is always valid."""
    if value is None:
        return
    if value < EPOCH:
        why = "must not be before 1970-01-01T00:00:00Z"
    elif value > now + CREATED_AT_SKEW:
        why = (f"must not be more than {int(CREATED_AT_SKEW.total_seconds())} s after "
               "the server's time")
    elif previous is not None and value < previous:
        why = "must not be before the created_at of the batch's previous message"
    else:
        return
    raise InvalidArgument(f"{field} is not valid", violations=[FieldViolation(field, why)])


def at_index(prefix: str, error: InvalidArgument) -> InvalidArgument:
    """The same error about the item `prefix` (e.g. "messages[3]") of a batch."""
    return InvalidArgument(f"{prefix} is not valid: {error.message}", reason=error.reason,
                           violations=[FieldViolation(f"{prefix}.{v.field}", v.description)
                                       for v in error.violations]
                           or [FieldViolation(prefix, error.message)])


def page_size(requested: int, limits: Limits = DEFAULT_LIMITS) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative",
                              violations=[FieldViolation("page_size", "must be >= 0")])
    if requested == 0:
        return limits.default_page_size
    return min(requested, limits.max_page_size)
