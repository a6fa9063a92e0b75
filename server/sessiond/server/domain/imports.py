"""What an import (`sessiond import-openviking`) hands to the store: sessions with
their metadata, archives with the state they had in the source, memories by key.

Every value is written at most once: a session by (identity, session id), an
archive by its index in the session, a message by its client message id (the
source's message id), a memory by (owner, category, key). A second import of the
same tree therefore writes nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from sessiond.server.domain.values import (
    Identity,
    MemoryCategory,
    MemoryCounts,
    Message,
    TaskError,
    TokenUsage,
)


class ImportedState(enum.StrEnum):
    """The state an archive had in the source. DONE: its Phase 2 finished (archive
    DONE, task COMPLETED); FAILED: it failed (archive PENDING, task FAILED, so
    `RetryTask` runs it again); PENDING: it never finished (task PENDING: the next
    server to start runs its Phase 2)."""

    DONE = "done"
    FAILED = "failed"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class ImportedSession:
    identity: Identity
    session_id: str
    created_at: datetime
    updated_at: datetime
    memories_extracted: MemoryCounts = field(default_factory=MemoryCounts)
    llm_token_usage: TokenUsage = field(default_factory=TokenUsage)
    last_commit_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ImportedArchive:
    """Archive `index` of a session. `messages` carry their source ids as
    `client_message_id`; `task_id` is the id of the task the import creates."""

    identity: Identity
    session_id: str
    index: int
    state: ImportedState
    messages: tuple[Message, ...]
    task_id: str
    created_at: datetime
    overview: str = ""
    abstract: str = ""
    completed_at: datetime | None = None
    error: TaskError | None = None


@dataclass(frozen=True, slots=True)
class ArchiveImport:
    """What the store did with an ImportedArchive: `created` False when the session
    had that archive index already; `duplicates` messages whose client id the
    session held already (not stored again)."""

    created: bool
    duplicates: int = 0


@dataclass(frozen=True, slots=True)
class ImportedMemory:
    """A memory of `owner` (see `values.memory_owner`), identified by `key`."""

    owner: Identity
    category: MemoryCategory
    key: str
    content: str
    source_session_id: str
    source_uri: str
    created_at: datetime
    updated_at: datetime
