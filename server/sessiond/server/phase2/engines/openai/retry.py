"""What a failed model call means: retry or not, after how long, and the final reason.

Retried: 408, 429, 5xx, timeouts and connection errors, with exponential backoff and
jitter, or the server's Retry-After (seconds or an HTTP date) on 429 and 503.
Not retried: every other 4xx (400, 401, 403, 404, 422, ...), and replies that are not
a chat completion.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import openai

# EngineError reasons (see pipeline.engine_code for the gRPC codes they map to).
RATE_LIMITED = "LLM_RATE_LIMITED"
UNAVAILABLE = "LLM_UNAVAILABLE"
TIMEOUT = "LLM_TIMEOUT"
AUTH = "LLM_AUTH"
BAD_REQUEST = "LLM_BAD_REQUEST"
BAD_OUTPUT = "LLM_BAD_OUTPUT"

RETRY_AFTER_STATUSES = frozenset({429, 503})
DETAIL_MAX = 200


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed call. `label` is what RETRYING events say ("429", "timeout")."""

    reason: str
    label: str
    retryable: bool
    status: int = 0
    retry_after: float | None = None
    detail: str = ""  # the server's own error text, unsanitized, clipped

    def message(self) -> str:
        """The final error's text (the caller redacts secrets)."""
        what = {
            RATE_LIMITED: "the model server kept rate-limiting requests (HTTP 429)",
            UNAVAILABLE: (f"the model server failed (HTTP {self.status})" if self.status
                          else "could not connect to the model server"),
            TIMEOUT: "the model server did not answer within the timeout",
            AUTH: (f"the model server refused the credentials (HTTP {self.status}); "
                   "check the API key"),
            BAD_REQUEST: (f"the model server rejected the request (HTTP {self.status}); "
                          "check the model name and base URL"),
            BAD_OUTPUT: "the model server's reply is not a chat completion",
        }[self.reason]
        return f"{what}: {self.detail}" if self.detail else what


class CallFailed(Exception):
    """Carries a `Failure` through tenacity; never leaves the engine."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.label)
        self.failure = failure


def retry_after_seconds(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds to wait from `Retry-After` (delta-seconds or HTTP date) or OpenAI's
    `retry-after-ms`; None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    raw = (headers.get("retry-after") or "").strip()
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _server_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    text = ""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            text = str(err.get("message") or "")
        elif isinstance(err, str):
            text = err
    elif isinstance(body, str):
        text = body
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "…"


def classify(exc: BaseException) -> Failure:
    """The Failure of an `openai` exception (anything else is not a call failure)."""
    if isinstance(exc, openai.APITimeoutError):
        return Failure(TIMEOUT, "timeout", True)
    if isinstance(exc, openai.APIConnectionError):
        return Failure(UNAVAILABLE, "connection error", True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = _server_detail(exc)
        after = (retry_after_seconds(exc.response.headers)
                 if status in RETRY_AFTER_STATUSES else None)
        if status == 429:
            return Failure(RATE_LIMITED, "429", True, status, after, detail)
        if status == 408:
            return Failure(TIMEOUT, "408", True, status, None, detail)
        if status >= 500:
            return Failure(UNAVAILABLE, str(status), True, status, after, detail)
        if status in (401, 403):
            return Failure(AUTH, str(status), False, status, None, detail)
        return Failure(BAD_REQUEST, str(status), False, status, None, detail)
    if isinstance(exc, openai.APIResponseValidationError):
        return Failure(BAD_OUTPUT, "invalid reply", False, exc.status_code)
    return Failure(BAD_OUTPUT, "invalid reply", False, 0, None, type(exc).__name__)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: attempt n (1-based, the one that failed)
    waits between half and all of min(max_delay, base * 2**(n-1)); a server's
    Retry-After replaces it, capped at retry_after_max."""

    base: float = 0.5
    max_delay: float = 20.0
    retry_after_max: float = 60.0

    def delay(self, failed_attempt: int, failure: Failure | None) -> float:
        if failure is not None and failure.retry_after is not None:
            return min(failure.retry_after, self.retry_after_max)
        ceiling = min(self.max_delay, self.base * 2 ** max(0, failed_attempt - 1))
        return random.uniform(ceiling / 2, ceiling)
