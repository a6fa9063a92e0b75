"""One paging scheme for every List RPC.

A store answers a page request with the items and `next_token`: an opaque cursor
(the key of the last item; "" on the last page). The API layer only wraps it
(base64url) and unwraps it; a token the store cannot read is `BAD_PAGE_TOKEN`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from sessiond.server.domain.errors import FieldViolation, InvalidArgument
from sessiond.server.domain.limits import PAGE_TOKEN_CHARS, clip_echo

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str = ""


# Index cursors are positive 64-bit integers; anything longer is not one we made.
MAX_INDEX_DIGITS = 18
MAX_TOKEN_CHARS = PAGE_TOKEN_CHARS


def bad_token(token: str) -> InvalidArgument:
    return InvalidArgument(f"page_token {clip_echo(token)!r} is not valid",
                           reason="BAD_PAGE_TOKEN", violations=[FieldViolation(
                               "page_token", "pass back a next_page_token unchanged")])


def check_token(token: str, max_chars: int = MAX_TOKEN_CHARS) -> str:
    """A decoded page token the stores may bind: bounded, printable (no NUL or other
    control characters, which no key the server hands out contains)."""
    if len(token) > max_chars or not token.isprintable():
        raise bad_token(token)
    return token


def page_of(rows: Sequence[R], size: int, cursor: Callable[[R], str],
            item: Callable[[R], T]) -> Page[T]:
    """A page of `size` items from up to size+1 rows (one more tells a next page
    exists); `cursor` is the token of the last row shown."""
    shown = rows[:size]
    token = cursor(shown[-1]) if len(rows) > size and shown else ""
    return Page([item(r) for r in shown], token)


def index_cursor(token: str) -> int:
    """Cursor of archive pages: the last index (0 = from the start)."""
    if not token:
        return 0
    # str.isdigit() accepts "²" and other digits int() rejects: ASCII digits only.
    if not (token.isascii() and token.isdigit()) or len(token) > MAX_INDEX_DIGITS:
        raise bad_token(token)
    return int(token)


def task_cursor(created_at: float, task_id: str) -> str:
    return f"{created_at!r}|{task_id}"


def read_task_cursor(token: str) -> tuple[float, str] | None:
    """(created_at epoch, task_id) of a task page token; None when it orders before
    nothing (NaN)."""
    try:
        created, tid = token.split("|", 1)
        value = float(created)
    except ValueError as exc:
        raise bad_token(token) from exc
    return None if math.isnan(value) else (value, tid)
