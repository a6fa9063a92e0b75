"""Immutable domain values: sessions, messages, archives, tasks, events, memories."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sessiond.server.domain.autocommit import AutoCommitPolicy, CommitTrigger
from sessiond.server.domain.errors import ErrorCode

TASK_TYPE_COMMIT = "session_commit"
# Undo of one archive's memory changes (SessionService.RevertArchive).
TASK_TYPE_REVERT = "archive_revert"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a call acts for. Every session, task and memory belongs to one."""

    account: str = "default"
    user: str = "default"
    agent: str = "default"


class Role(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    TOOL = "tool"


class ContextType(enum.StrEnum):
    MEMORY = "memory"
    RESOURCE = "resource"
    SKILL = "skill"


class ToolStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ContextPart:
    uri: str
    context_type: ContextType
    abstract: str = ""


@dataclass(frozen=True, slots=True)
class ToolPart:
    tool_id: str
    tool_name: str = ""
    tool_uri: str = ""
    skill_uri: str = ""
    input: str = ""
    output: str = ""
    status: ToolStatus = ToolStatus.PENDING
    duration_ms: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


Part = TextPart | ContextPart | ToolPart


def part_to_dict(part: Part) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ContextPart):
        return {"type": "context", "uri": part.uri, "context_type": part.context_type.value,
                "abstract": part.abstract}
    return {"type": "tool", "tool_id": part.tool_id, "tool_name": part.tool_name,
            "tool_uri": part.tool_uri, "skill_uri": part.skill_uri, "input": part.input,
            "output": part.output, "status": part.status.value,
            "duration_ms": part.duration_ms, "prompt_tokens": part.prompt_tokens,
            "completion_tokens": part.completion_tokens}


def part_from_dict(d: dict[str, Any]) -> Part:
    kind = d.get("type")
    if kind == "text":
        return TextPart(text=d["text"])
    if kind == "context":
        return ContextPart(uri=d["uri"], context_type=ContextType(d["context_type"]),
                           abstract=d.get("abstract", ""))
    return ToolPart(tool_id=d["tool_id"], tool_name=d.get("tool_name", ""),
                    tool_uri=d.get("tool_uri", ""), skill_uri=d.get("skill_uri", ""),
                    input=d.get("input", ""), output=d.get("output", ""),
                    status=ToolStatus(d.get("status", "pending")),
                    duration_ms=int(d.get("duration_ms", 0)),
                    prompt_tokens=int(d.get("prompt_tokens", 0)),
                    completion_tokens=int(d.get("completion_tokens", 0)))


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    role: Role
    parts: tuple[Part, ...]
    created_at: datetime
    seq: int = 0
    # The client's own id, unique per session ("" when none was given).
    client_message_id: str = ""

    def text(self) -> str:
        """The message's text parts joined; what summaries and extraction read."""
        return "\n".join(p.text for p in self.parts if isinstance(p, TextPart))


class MemoryCategory(enum.StrEnum):
    PROFILE = "profile"
    PREFERENCES = "preferences"
    ENTITIES = "entities"
    EVENTS = "events"
    CASES = "cases"
    PATTERNS = "patterns"
    TOOLS = "tools"
    SKILLS = "skills"

    @property
    def space(self) -> str:
        """'user' for what describes the user, 'agent' for what the agent learned."""
        return "user" if self in USER_CATEGORIES else "agent"


USER_CATEGORIES = frozenset({MemoryCategory.PROFILE, MemoryCategory.PREFERENCES,
                             MemoryCategory.ENTITIES, MemoryCategory.EVENTS})
CATEGORIES: tuple[MemoryCategory, ...] = tuple(MemoryCategory)


@dataclass(frozen=True, slots=True)
class MemoryCounts:
    profile: int = 0
    preferences: int = 0
    entities: int = 0
    events: int = 0
    cases: int = 0
    patterns: int = 0
    tools: int = 0
    skills: int = 0

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, int]:
        return {c.value: int(getattr(self, c.value)) for c in CATEGORIES}

    def __add__(self, other: MemoryCounts) -> MemoryCounts:
        a, b = self.as_dict(), other.as_dict()
        return MemoryCounts(**{k: a[k] + b[k] for k in a})

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> MemoryCounts:
        d = d or {}
        return cls(**{c.value: int(d.get(c.value, 0)) for c in CATEGORIES})


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(self.prompt_tokens + other.prompt_tokens,
                          self.completion_tokens + other.completion_tokens)

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TokenUsage:
        d = d or {}
        return cls(int(d.get("prompt_tokens", 0)), int(d.get("completion_tokens", 0)))


@dataclass(frozen=True, slots=True)
class SessionMeta:
    identity: Identity
    session_id: str
    created_at: datetime
    updated_at: datetime
    message_count: int = 0
    live_message_count: int = 0
    archive_count: int = 0
    commit_count: int = 0
    memories_extracted: MemoryCounts = field(default_factory=MemoryCounts)
    last_commit_at: datetime | None = None
    llm_token_usage: TokenUsage = field(default_factory=TokenUsage)
    # The session's own auto-commit policy; None: the server default applies
    # (`SessionManager` fills in the effective one, see `auto_commit_inherited`).
    auto_commit: AutoCommitPolicy | None = None
    auto_commit_inherited: bool = True
    # Newest number of the session's event feed (WatchSession).
    last_event_seq: int = 0


@dataclass(frozen=True, slots=True)
class SkillUse:
    uri: str
    input: str = ""
    output: str = ""
    success: bool = True


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """Contexts and skill a session used, waiting for (or frozen into) an archive."""

    context_uris: tuple[str, ...]
    skill: SkillUse | None
    created_at: datetime

    def used_uris(self) -> list[str]:
        uris = list(self.context_uris)
        if self.skill is not None and self.skill.uri:
            uris.append(self.skill.uri)
        return uris


class ArchiveState(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"


def archive_uri(session_id: str, index: int) -> str:
    return f"sessiond://sessions/{session_id}/archives/{index:06d}"


@dataclass(frozen=True, slots=True)
class Archive:
    session_id: str
    index: int
    state: ArchiveState
    task_id: str
    message_count: int
    created_at: datetime
    overview: str = ""
    abstract: str = ""
    first_message_id: str = ""
    last_message_id: str = ""
    completed_at: datetime | None = None

    @property
    def uri(self) -> str:
        return archive_uri(self.session_id, self.index)


class TaskState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


class Stage(enum.StrEnum):
    """Phase 2 stages, in the order they run."""

    QUEUED = "queued"
    SUMMARIZE = "summarize"
    EXTRACT = "extract"
    RELATIONS = "relations"
    ACTIVE_COUNTS = "active_counts"
    INDEX = "index"
    FINALIZE = "finalize"
    # The one stage of an archive_revert task.
    REVERT = "revert"


PIPELINE: tuple[Stage, ...] = (Stage.SUMMARIZE, Stage.EXTRACT, Stage.RELATIONS,
                               Stage.ACTIVE_COUNTS, Stage.INDEX, Stage.FINALIZE)


def next_stage_after(done: Stage) -> Stage:
    """The stage Phase 2 runs after `done` (FINALIZE is the last)."""
    if done is Stage.QUEUED:
        return PIPELINE[0]
    return PIPELINE[min(PIPELINE.index(done) + 1, len(PIPELINE) - 1)]


class EventKind(enum.StrEnum):
    CREATED = "created"
    STARTED = "started"
    STAGE_STARTED = "stage_started"
    STAGE_COMPLETED = "stage_completed"
    RETRYING = "retrying"
    CANCEL_REQUESTED = "cancel_requested"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # A FAILED or CANCELLED task put back to PENDING; the journal goes on.
    RETRIED = "retried"

    @property
    def terminal(self) -> bool:
        return self in (EventKind.COMPLETED, EventKind.FAILED, EventKind.CANCELLED)


@dataclass(frozen=True, slots=True)
class TaskError:
    """A google.rpc.Status-shaped error: a code, a safe message and a stable reason."""

    code: ErrorCode
    message: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RevertSummary:
    """What a completed revert did: memories deleted (the archive created them),
    restored to their earlier content, recreated (deleted since), left alone (already
    as the before-image, or their key taken by another memory), and how many
    conflicting later changes `force` overrode."""

    deleted: int = 0
    restored: int = 0
    recreated: int = 0
    unchanged: int = 0
    conflicts_overridden: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"deleted": self.deleted, "restored": self.restored,
                "recreated": self.recreated, "unchanged": self.unchanged,
                "conflicts_overridden": self.conflicts_overridden}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> RevertSummary:
        return cls(**{k: int(d.get(k, 0)) for k in cls().as_dict()})

    def describe(self) -> str:
        return (f"{self.deleted} deleted, {self.restored} restored, {self.recreated} "
                f"recreated, {self.unchanged} unchanged"
                + (f", {self.conflicts_overridden} conflicting changes overridden"
                   if self.conflicts_overridden else ""))


@dataclass(frozen=True, slots=True)
class CommitResult:
    """The outcome of a completed task: a session_commit's Phase 2, or (with
    `revert` set) an archive_revert."""

    archive_uri: str
    memories_extracted: MemoryCounts = field(default_factory=MemoryCounts)
    active_count_updated: int = 0
    token_usage: TokenUsage = field(default_factory=TokenUsage)
    revert: RevertSummary | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"archive_uri": self.archive_uri,
                               "memories_extracted": self.memories_extracted.as_dict(),
                               "active_count_updated": self.active_count_updated,
                               "token_usage": self.token_usage.as_dict()}
        if self.revert is not None:
            out["revert"] = self.revert.as_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CommitResult:
        rev = d.get("revert")
        return cls(archive_uri=d.get("archive_uri", ""),
                   memories_extracted=MemoryCounts.from_dict(d.get("memories_extracted")),
                   active_count_updated=int(d.get("active_count_updated", 0)),
                   token_usage=TokenUsage.from_dict(d.get("token_usage")),
                   revert=RevertSummary.from_dict(rev) if rev is not None else None)


@dataclass(frozen=True, slots=True)
class Task:
    task_id: str
    identity: Identity
    session_id: str
    archive_index: int
    state: TaskState
    stage: Stage
    created_at: datetime
    updated_at: datetime
    task_type: str = TASK_TYPE_COMMIT
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: CommitResult | None = None
    error: TaskError | None = None
    attempts: int = 0
    last_seq: int = 0
    first_seq: int = 1
    cancel_requested: bool = False
    # Stage whose durable writes are done; Phase 2 resumes after it.
    done_stage: Stage = Stage.QUEUED
    # Token usage of finished stages (counted once: written with the stage's result).
    token_usage: TokenUsage = field(default_factory=TokenUsage)
    lease_owner: str = ""
    lease_expires_at: datetime | None = None
    # What the extraction and active-counts stages wrote (for the final result).
    memory_counts: MemoryCounts = field(default_factory=MemoryCounts)
    active_count_updated: int = 0
    # The Commit's trace context (opaque to the domain; see CommitPlan.trace_context).
    trace_context: str = ""
    # Times RetryTask (or the automatic retry) put the task back to PENDING.
    retries: int = 0
    # archive_revert: restore the before-images even over conflicting later changes.
    revert_force: bool = False
    # What made the commit: a Commit call or an auto-commit condition.
    trigger: CommitTrigger = CommitTrigger.MANUAL

    @property
    def archive_uri(self) -> str:
        return archive_uri(self.session_id, self.archive_index)


@dataclass(frozen=True, slots=True)
class TaskEvent:
    task_id: str
    seq: int
    kind: EventKind
    time: datetime
    state: TaskState
    stage: Stage
    message: str = ""
    attempt: int = 0
    result: CommitResult | None = None
    error: TaskError | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append; the store numbers it."""

    kind: EventKind
    message: str = ""
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class Memory:
    memory_id: str
    identity: Identity
    category: MemoryCategory
    content: str
    source_session_id: str
    source_archive_uri: str
    source_message_ids: tuple[str, ...]
    created_at: datetime
    updated_at: datetime

    @property
    def space(self) -> str:
        return self.category.space


@dataclass(frozen=True, slots=True)
class CandidateMemory:
    """What extraction proposes; the store merges it into an owner's memories.

    `key` identifies the fact: a candidate with the key of an existing memory of the
    same owner and category updates that memory instead of adding another.
    """

    category: MemoryCategory
    key: str
    content: str
    source_message_ids: tuple[str, ...] = ()


def memory_owner(identity: Identity, category: MemoryCategory) -> Identity:
    """User-space memories are shared by all agents of a user; agent-space are not."""
    if category.space == "user":
        return Identity(identity.account, identity.user, "")
    return identity


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored API key: never the key itself, only the SHA-256 of it (`secret_hash`).
    `user`/`agent` None: not bound. `scopes`: names of auth.principal.Scope."""

    key_id: str
    secret_hash: str
    account: str
    user: str | None
    agent: str | None
    scopes: tuple[str, ...]
    name: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
