"""The Phase 2 engine interface: what summarizes an archive and extracts memories.

Engines are stateless between calls and know nothing of storage or tasks. They report
retries through `RetryReporter` so watchers can see why a stage is slow.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sessiond.server.domain.commands import ExtractionResponse, SummaryResponse
from sessiond.server.domain.values import (
    Message,
    UsageRecord,
)


@dataclass(frozen=True, slots=True)
class SummaryRequest:
    session_id: str
    archive_index: int
    messages: Sequence[Message]
    # Overview of the newest COMPLETED earlier archive; "" when there is none.
    previous_overview: str
    usage: Sequence[UsageRecord] = ()


@dataclass(frozen=True, slots=True)
class ExtractionRequest:
    session_id: str
    archive_uri: str
    messages: Sequence[Message]
    previous_overview: str
    overview: str
    usage: Sequence[UsageRecord] = ()


# (attempt about to run, max attempts, reason of the last failure) -> recorded event
RetryReporter = Callable[[int, int, str], Awaitable[None]]


async def no_report(attempt: int, max_attempts: int, reason: str) -> None:
    return None


class EngineError(Exception):
    """A Phase 2 engine call failed for good. The message must be safe to show:
    no secrets, bounded length (see sanitize.py)."""

    def __init__(self, message: str, *, reason: str = "ENGINE_ERROR",
                 retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


class Phase2Engine(Protocol):
    name: str

    async def summarize(self, request: SummaryRequest,
                        report: RetryReporter = no_report) -> SummaryResponse: ...

    async def extract(self, request: ExtractionRequest,
                      report: RetryReporter = no_report) -> ExtractionResponse: ...

    async def aclose(self) -> None: ...


__all__ = ["EngineError", "ExtractionRequest", "ExtractionResponse", "Phase2Engine",
           "RetryReporter", "SummaryRequest", "SummaryResponse", "no_report"]
