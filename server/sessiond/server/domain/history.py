"""Memory change history and archive reverts, as values and pure decisions.

Every change of a memory (a Phase 2 merge, a DeleteMemory, a revert) is recorded
with the memory's image before and after it, in the transaction of the change.
Reverting an archive restores, for each memory the archive's Phase 2 changed, the
image before the archive's first change of it. A *later* change of such a memory
(another archive, a user's DeleteMemory) is a conflict: the revert would undo it
too. Changes of an archive that was itself reverted since, and those revert
records, cancel out and are no conflict.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sessiond.server.domain.recall import RecallEntry, RecallKind, entry_id
from sessiond.server.domain.values import (
    TASK_TYPE_REVERT,
    Identity,
    Memory,
    MemoryCategory,
    RevertSummary,
    archive_uri,
)

__all__ = [
    "TASK_TYPE_REVERT",
    "ChangeOp",
    "MemoryChange",
    "MemoryImage",
    "RevertPlan",
    "RevertStep",
    "RevertSummary",
    "memory_entry",
    "plan_revert",
]

# Conflicting changes listed in a FAILED_PRECONDITION (the rest is counted).
MAX_LISTED_CONFLICTS = 20


class ChangeOp(enum.StrEnum):
    CREATED = "created"    # Phase 2 created the memory
    UPDATED = "updated"    # Phase 2 merged into it
    DELETED = "deleted"    # DeleteMemory
    REVERTED = "reverted"  # an archive revert restored its before-image

    @property
    def by_archive(self) -> bool:
        """A change an archive's Phase 2 made (what a revert undoes)."""
        return self in (ChangeOp.CREATED, ChangeOp.UPDATED)


@dataclass(frozen=True, slots=True)
class MemoryImage:
    """A memory as it was at one moment (its full row, owner included)."""

    memory_id: str
    owner: Identity  # agent '' for user-space memories
    category: MemoryCategory
    key: str
    content: str
    source_session_id: str
    source_archive_uri: str
    source_message_ids: tuple[str, ...]
    created_at: datetime
    updated_at: datetime

    def memory(self) -> Memory:
        return Memory(memory_id=self.memory_id, identity=self.owner, category=self.category,
                      content=self.content, source_session_id=self.source_session_id,
                      source_archive_uri=self.source_archive_uri,
                      source_message_ids=self.source_message_ids, created_at=self.created_at,
                      updated_at=self.updated_at)

    def same_as(self, other: MemoryImage | None) -> bool:
        return other is not None and (
            self.content, self.source_session_id, self.source_archive_uri,
            self.source_message_ids) == (other.content, other.source_session_id,
                                         other.source_archive_uri, other.source_message_ids)


@dataclass(frozen=True, slots=True)
class MemoryChange:
    change_id: str
    seq: int
    memory_id: str
    owner: Identity
    actor_agent: str
    category: MemoryCategory
    key: str
    op: ChangeOp
    created_at: datetime
    session_id: str = ""       # '' for a DeleteMemory
    archive_index: int = 0     # 0 for a DeleteMemory
    task_id: str = ""          # the Phase 2 or revert task ('' for a DeleteMemory)
    before: MemoryImage | None = None
    after: MemoryImage | None = None

    @property
    def archive_uri(self) -> str:
        return archive_uri(self.session_id, self.archive_index) if self.session_id else ""

    @property
    def source(self) -> tuple[str, str, int]:
        """The archive a change belongs to (actor agent, session, index)."""
        return (self.actor_agent, self.session_id, self.archive_index)

    def describe(self) -> str:
        where = (f"{self.archive_uri} (task {self.task_id})" if self.session_id
                 else "DeleteMemory")
        return f"{self.op.value} by {where}"


@dataclass(frozen=True, slots=True)
class RevertStep:
    """Bring one memory to `target` (None: the memory must not exist)."""

    memory_id: str
    owner: Identity
    category: MemoryCategory
    key: str
    target: MemoryImage | None


@dataclass(frozen=True, slots=True)
class RevertPlan:
    steps: tuple[RevertStep, ...]
    conflicts: tuple[MemoryChange, ...]


def plan_revert(archive_changes: Sequence[MemoryChange],
                later: Sequence[MemoryChange]) -> RevertPlan:
    """The steps that undo `archive_changes` (one archive's Phase 2 changes, by seq)
    and the conflicts among `later` (changes of the same memories with a higher seq
    than the archive's first change of them, by seq, any source)."""
    first: dict[str, MemoryChange] = {}
    last_seq: dict[str, int] = {}
    own: set[str] = set()
    for c in archive_changes:
        first.setdefault(c.memory_id, c)
        last_seq[c.memory_id] = max(last_seq.get(c.memory_id, 0), c.seq)
        own.add(c.change_id)
    # Sources reverted since: their changes and the revert records cancel out.
    reverted = {(c.memory_id, c.source) for c in later if c.op is ChangeOp.REVERTED}
    conflicts = [c for c in later
                 if c.memory_id in last_seq and c.seq > last_seq[c.memory_id]
                 and c.change_id not in own
                 and (c.memory_id, c.source) not in reverted]
    steps = tuple(RevertStep(c.memory_id, c.owner, c.category, c.key,
                             None if c.op is ChangeOp.CREATED else c.before)
                  for c in first.values())
    return RevertPlan(steps, tuple(conflicts))


def memory_entry(image: MemoryImage) -> RecallEntry:
    """The retrieval entry of a memory image (as `recall` indexes a memory row)."""
    return RecallEntry(
        entry_id(RecallKind.MEMORY, image.memory_id, str(image.updated_at.timestamp())),
        image.owner, RecallKind.MEMORY, image.source_session_id, 0, 0,
        image.source_message_ids, image.memory_id, image.updated_at,
        f"{image.category.value}: {image.content}")
