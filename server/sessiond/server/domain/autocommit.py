"""Auto-commit policies and the session event feed (WatchSession): pure values and
rules, no I/O.

A policy commits a session's live buffer by itself when, after an append, the buffer
holds at least `max_messages` messages or at least `max_tokens` estimated tokens, or
when no message was appended for `idle_seconds`. The newest `keep_recent_count`
messages stay live. 0 turns a trigger off; a policy with every trigger off is off.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sessiond.server.domain.errors import FieldViolation, InvalidArgument

if TYPE_CHECKING:  # values imports this module
    from datetime import datetime

    from sessiond.server.domain.values import Role, TaskEvent

# Bounds of a policy's values (a larger value is INVALID_ARGUMENT).
MAX_POLICY_MESSAGES = 1_000_000
MAX_POLICY_TOKENS = 1_000_000_000
MAX_POLICY_IDLE_SECONDS = 30 * 24 * 3600
# Estimated tokens of a live buffer: its message bytes (UTF-8 of every string field,
# the same count as the live_bytes quota) divided by this, rounded up.
BYTES_PER_TOKEN = 4


class CommitTrigger(enum.StrEnum):
    """Why a commit happened: a Commit call, or which auto-commit condition."""

    MANUAL = "manual"
    MESSAGES = "messages"
    TOKENS = "tokens"
    IDLE = "idle"

    @property
    def automatic(self) -> bool:
        return self is not CommitTrigger.MANUAL


def estimated_tokens(live_bytes: int) -> int:
    return (max(0, live_bytes) + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


@dataclass(frozen=True, slots=True)
class AutoCommitPolicy:
    max_messages: int = 0
    max_tokens: int = 0
    idle_seconds: int = 0
    keep_recent_count: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.max_messages or self.max_tokens or self.idle_seconds)

    def due(self, live_count: int, live_bytes: int) -> CommitTrigger | None:
        """The count trigger the live buffer passes now (messages before tokens), or
        None; never when no message would be archived (keep_recent_count)."""
        if live_count <= self.keep_recent_count:
            return None
        if self.max_messages and live_count >= self.max_messages:
            return CommitTrigger.MESSAGES
        if self.max_tokens and estimated_tokens(live_bytes) >= self.max_tokens:
            return CommitTrigger.TOKENS
        return None

    def validate(self, prefix: str = "auto_commit") -> AutoCommitPolicy:
        """This policy, or INVALID_ARGUMENT naming every bad field."""
        bad: list[FieldViolation] = []
        for name, top in (("max_messages", MAX_POLICY_MESSAGES),
                          ("max_tokens", MAX_POLICY_TOKENS),
                          ("idle_seconds", MAX_POLICY_IDLE_SECONDS),
                          ("keep_recent_count", MAX_POLICY_MESSAGES)):
            value = getattr(self, name)
            if value < 0 or value > top:
                bad.append(FieldViolation(f"{prefix}.{name}", f"must be 0..{top} (0: off)"))
        if not bad and self.max_messages and self.keep_recent_count >= self.max_messages:
            bad.append(FieldViolation(f"{prefix}.keep_recent_count",
                                      "must be below max_messages, or nothing is archived"))
        if bad:
            raise InvalidArgument("auto-commit policy is not valid", violations=bad)
        return self


OFF = AutoCommitPolicy()


class SessionEventKind(enum.StrEnum):
    MESSAGE_APPENDED = "message_appended"
    COMMIT_ACCEPTED = "commit_accepted"
    TASK_EVENT = "task_event"
    CONFIG_CHANGED = "config_changed"


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One numbered event of a session's feed (seq = 1, 2, 3, ... per session)."""

    session_id: str
    seq: int
    kind: SessionEventKind
    time: datetime
    # MESSAGE_APPENDED
    message_id: str = ""
    message_seq: int = 0
    role: Role | None = None
    client_message_id: str = ""
    # COMMIT_ACCEPTED and TASK_EVENT
    task_id: str = ""
    # COMMIT_ACCEPTED
    archive_index: int = 0
    archived_messages: int = 0
    trigger: CommitTrigger | None = None
    # TASK_EVENT: the task's journal event (None when no longer kept by the task)
    task_seq: int = 0
    task_event: TaskEvent | None = None
    # CONFIG_CHANGED: the session's effective policy, and whether it is the server's
    auto_commit: AutoCommitPolicy | None = None
    auto_commit_inherited: bool = False
