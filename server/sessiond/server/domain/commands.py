"""Commands the services hand to the store, and what the store answers: idempotency
keys, the Phase 1 plan and outcome, Phase 2 stage outputs, pages, sweep results."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from sessiond.server.domain.autocommit import CommitTrigger
from sessiond.server.domain.recall import EntryVector, RecallEntry
from sessiond.server.domain.values import (
    Archive,
    CandidateMemory,
    Identity,
    MemoryCounts,
    Message,
    Part,
    Role,
    Task,
    TokenUsage,
    UsageRecord,
)


@dataclass(frozen=True, slots=True)
class RequestKey:
    """AIP-155 idempotency key of a mutating call.

    The same (identity, method, request_id) with the same fingerprint replays the
    first result; with another fingerprint it raises `RequestIdConflict`.
    """

    identity: Identity
    method: str
    request_id: str
    fingerprint: str

    @staticmethod
    def fingerprint_of(payload: bytes) -> str:
        return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True, slots=True)
class NewMessage:
    """One message of an AddMessages request, before it gets an id."""

    role: Role
    parts: tuple[Part, ...]
    client_message_id: str = ""
    # The message's own time (imports, replays); None: the server's time.
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class AddedMessage:
    """One message of an append: the stored message, and whether its client id had
    been stored before (then nothing was stored and `message` is the earlier one)."""

    message: Message
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class CommitPlan:
    identity: Identity
    session_id: str
    keep_recent_count: int
    reject_if_running: bool
    task_id: str
    now: datetime
    # Opaque trace context of the Commit (W3C carrier as JSON; "" when tracing is off),
    # stored with the task so Phase 2 joins the same trace.
    trace_context: str = ""
    # A Commit call, or the auto-commit condition that made this commit.
    trigger: CommitTrigger = CommitTrigger.MANUAL


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """Phase 1 result. `archived` is False (and the rest None) when nothing was live."""

    archived: bool
    archive: Archive | None = None
    task: Task | None = None


# -- Phase 2 stage outputs: what an engine returns is what the store applies ---------
@dataclass(frozen=True, slots=True)
class SummaryResponse:
    overview: str
    abstract: str
    usage: TokenUsage = field(default_factory=TokenUsage)


@dataclass(frozen=True, slots=True)
class ExtractionResponse:
    candidates: tuple[CandidateMemory, ...]
    usage: TokenUsage = field(default_factory=TokenUsage)
    # Counts of the candidates the pipeline already wrote in batches of their own
    # (`Store.upsert_memories`): added to this last batch's counts.
    earlier: MemoryCounts = field(default_factory=MemoryCounts)


@dataclass(frozen=True, slots=True)
class RelationsOutput:
    uris: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ActiveCountsOutput:
    uris: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IndexOutput:
    """The archive's episodes and overview for the retrieval index (the store adds
    the memories the archive's extraction wrote)."""

    entries: tuple[RecallEntry, ...]
    # Their vectors (and those of the archive's memories) by embedder `model`.
    vectors: tuple[EntryVector, ...] = ()
    model: str = ""
    # Entries and vectors of the archive in all (earlier batches were written before).
    total_entries: int = 0
    total_vectors: int = 0


StageOutput = (SummaryResponse | ExtractionResponse | RelationsOutput | ActiveCountsOutput
               | IndexOutput)


@dataclass(frozen=True, slots=True)
class Phase2Inputs:
    """What a Phase 2 run reads before its stages, in one read: the archive's
    messages and usage records, and the overview of the newest earlier archive done."""

    messages: list[Message]
    usage: list[UsageRecord]
    previous_overview: str


@dataclass(frozen=True, slots=True)
class SweepResult:
    tasks_removed: int
    request_ids_removed: int
