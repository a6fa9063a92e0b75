"""Validation rules and identifiers of the domain."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sessiond.server.domain.errors import FieldViolation, InvalidArgument
from sessiond.server.domain.values import ContextPart, Part, TextPart, ToolPart

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
REQUEST_ID_MAX = 128
MAX_PARTS = 256
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


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
    if not SESSION_ID_RE.match(session_id):
        raise InvalidArgument(
            f"{field} {session_id[:64]!r} is not valid",
            violations=[FieldViolation(field, "1-128 characters of letters, digits and ._:@-, "
                                              "starting with a letter or digit")])


def check_request_id(request_id: str) -> None:
    if len(request_id) > REQUEST_ID_MAX:
        raise InvalidArgument("request_id is too long",
                              violations=[FieldViolation("request_id",
                                                         f"at most {REQUEST_ID_MAX} characters")])


def check_parts(parts: Sequence[Part]) -> None:
    violations: list[FieldViolation] = []
    if not parts:
        violations.append(FieldViolation("parts", "a message needs at least one part"))
    if len(parts) > MAX_PARTS:
        violations.append(FieldViolation("parts", f"at most {MAX_PARTS} parts"))
    size = 0
    tool_ids: set[str] = set()
    for i, p in enumerate(parts):
        if isinstance(p, TextPart):
            size += len(p.text.encode())
        elif isinstance(p, ContextPart):
            if not p.uri:
                violations.append(FieldViolation(f"parts[{i}].context.uri", "must not be empty"))
            size += len(p.uri) + len(p.abstract.encode())
        elif isinstance(p, ToolPart):
            if not p.tool_id:
                violations.append(FieldViolation(f"parts[{i}].tool.tool_id",
                                                 "must not be empty"))
            elif p.tool_id in tool_ids:
                violations.append(FieldViolation(f"parts[{i}].tool.tool_id",
                                                 f"duplicate tool_id {p.tool_id!r}"))
            tool_ids.add(p.tool_id)
            size += len(p.input.encode()) + len(p.output.encode())
    if size > MAX_MESSAGE_BYTES:
        violations.append(FieldViolation("parts", f"at most {MAX_MESSAGE_BYTES} bytes in all"))
    if violations:
        raise InvalidArgument("message is not valid", violations=violations)


MAX_BATCH_MESSAGES = 1000
MAX_CLIENT_MESSAGE_ID = 128


def check_client_message_id(value: str, field: str = "client_message_id") -> None:
    if len(value) > MAX_CLIENT_MESSAGE_ID:
        raise InvalidArgument(f"{field} is too long", violations=[
            FieldViolation(field, f"at most {MAX_CLIENT_MESSAGE_ID} characters")])
    if value and (value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise InvalidArgument(f"{field} is not valid", violations=[
            FieldViolation(field, "no control characters, no leading or trailing spaces")])


def at_index(prefix: str, error: InvalidArgument) -> InvalidArgument:
    """The same error about the item `prefix` (e.g. "messages[3]") of a batch."""
    return InvalidArgument(f"{prefix} is not valid: {error.message}", reason=error.reason,
                           violations=[FieldViolation(f"{prefix}.{v.field}", v.description)
                                       for v in error.violations]
                           or [FieldViolation(prefix, error.message)])


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative",
                              violations=[FieldViolation("page_size", "must be >= 0")])
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)
