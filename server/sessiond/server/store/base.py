"""The storage contract. SQLite and PostgreSQL adapters implement it; one test suite
(tests/contract) proves both.

Pages follow `domain/pages.py`: a method returns `Page(items, next_token)` and takes
the token of the previous page ("" for the first); tokens are opaque to callers.

Every method is one atomic transaction: when it returns, its writes are durable;
when it raises, it wrote nothing. Methods taking an `Identity` treat rows of another
identity as absent. Store errors are domain errors (`sessiond.server.domain.errors`);
an unreachable database raises `Unavailable`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime

from sessiond.server.domain.autocommit import OFF, AutoCommitPolicy, SessionEvent
from sessiond.server.domain.commands import (
    AddedMessage,
    CommitOutcome,
    CommitPlan,
    Phase2Inputs,
    RequestKey,
    StageOutput,
    SweepResult,
)
from sessiond.server.domain.errors import ErrorCode
from sessiond.server.domain.history import MemoryChange, MemoryImage
from sessiond.server.domain.imports import (
    ArchiveImport,
    ImportedArchive,
    ImportedMemory,
    ImportedSession,
)
from sessiond.server.domain.limits import DEFAULT_LIMITS, Limits
from sessiond.server.domain.pages import Page
from sessiond.server.domain.recall import (
    EntryVector,
    RecallEntry,
    RecallHit,
    RecallKind,
    RecallQuery,
)
from sessiond.server.domain.values import (
    ApiKey,
    Archive,
    CandidateMemory,
    Identity,
    Memory,
    MemoryCategory,
    MemoryCounts,
    Message,
    NewEvent,
    SessionMeta,
    Stage,
    Task,
    TaskError,
    TaskEvent,
    TaskState,
    ToolStatus,
    UsageRecord,
)

# A listener the store calls (on the event loop) after it commits journal events.
EventListener = Callable[[Sequence[TaskEvent]], None]
# Called when new runnable work may exist (a commit, a finished task).
WorkListener = Callable[[], None]
# Called with a task id when ANOTHER process appended journal events for it
# (PostgreSQL LISTEN/NOTIFY); watchers of that task re-read the journal.
RemoteEventListener = Callable[[str], None]


# "" (the default): a write made for a call. Else the key of a background writer
# (Phase 2 sets its task's identity); a store with a single writer orders writes
# fairly by it (SQLite: calls first, then background keys round-robin).
WRITE_KEY: ContextVar[str] = ContextVar("sessiond_write_key", default="")


@contextlib.contextmanager
def background_writes(key: str) -> Iterator[None]:
    """Store writes made in this context are background writes of `key`."""
    token = WRITE_KEY.set(key or "background")
    try:
        yield
    finally:
        WRITE_KEY.reset(token)


# Writes made in a `relaxed_commits()` context (the Phase 2 worker's, by default) may
# be acknowledged before they are flushed to disk: a power loss or OS crash (not a
# process crash) can undo the last of them, which Phase 2 then simply redoes (its
# stages are idempotent). Bounded: SQLite flushes them within RELAXED_FLUSH_SECONDS,
# PostgreSQL (synchronous_commit=off) within 3 x wal_writer_delay. Writes made for a
# call are always durable when acknowledged.
RELAXED: ContextVar[bool] = ContextVar("sessiond_relaxed_commits", default=False)
RELAXED_FLUSH_SECONDS = 0.2


@contextlib.contextmanager
def relaxed_commits(on: bool = True) -> Iterator[None]:
    """Store writes made in this context may commit without waiting for the disk."""
    token = RELAXED.set(on)
    try:
        yield
    finally:
        RELAXED.reset(token)


class Store(abc.ABC):
    """Durable state of sessiond: sessions, messages, usage, archives, tasks, task
    events, memories, relations, active counts and idempotency keys."""

    def __init__(self) -> None:
        # The quotas the store enforces inside its transactions (live messages and
        # bytes per session, sessions per identity); the App sets the configured ones.
        self.limits: Limits = DEFAULT_LIMITS
        # The auto-commit policy of sessions without their own (`--auto-commit-*`).
        self.auto_commit_default: AutoCommitPolicy = OFF
        self._event_listeners: list[EventListener] = []
        self._work_listeners: list[WorkListener] = []
        self._remote_listeners: list[RemoteEventListener] = []

    # -- lifecycle -----------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and verify the schema (SQLite creates/migrates its own file)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise `Unavailable` when the database cannot serve a query now."""

    @property
    def single_process(self) -> bool:
        """True when no other process can share this store (leases may be reset at start)."""
        return False

    # -- notification (in-process; adapters may add cross-process wake-ups) ---------
    def add_event_listener(self, fn: EventListener) -> None:
        self._event_listeners.append(fn)

    def add_work_listener(self, fn: WorkListener) -> None:
        self._work_listeners.append(fn)

    def add_remote_event_listener(self, fn: RemoteEventListener) -> None:
        self._remote_listeners.append(fn)

    def _emit_remote_event(self, task_id: str) -> None:
        for fn in self._remote_listeners:
            fn(task_id)

    def _emit_events(self, events: Sequence[TaskEvent]) -> None:
        if events:
            for fn in self._event_listeners:
                fn(events)

    def _emit_work(self) -> None:
        for fn in self._work_listeners:
            fn()

    # -- sessions ------------------------------------------------------------------
    @abc.abstractmethod
    async def create_session(self, identity: Identity, session_id: str, now: datetime,
                             request: RequestKey | None = None) -> SessionMeta:
        """Insert a session. Ids are unique per identity: `AlreadyExists` when this
        identity already has a session with that id; `QuotaExceeded` when it holds
        `limits.sessions_per_identity` sessions."""

    @abc.abstractmethod
    async def get_session(self, identity: Identity, session_id: str) -> SessionMeta | None: ...

    @abc.abstractmethod
    async def ensure_session(self, identity: Identity, session_id: str,
                             now: datetime) -> SessionMeta:
        """Return the identity's session, creating it when missing. Another identity's
        session with the same id is a different session and is not touched."""

    @abc.abstractmethod
    async def list_sessions(self, identity: Identity, page_size: int,
                            page_token: str) -> Page[SessionMeta]:
        """The identity's sessions ascending by id, from the page token on."""

    @abc.abstractmethod
    async def delete_session(self, identity: Identity, session_id: str, now: datetime) -> bool:
        """Delete the session, its messages, usage, archives and relations; unfinished
        tasks end CANCELLED (with their terminal event). False when absent."""

    # -- messages and usage ----------------------------------------------------------
    @abc.abstractmethod
    async def add_message(self, identity: Identity, session_id: str, message: Message,
                          request: RequestKey | None = None,
                          now: datetime | None = None) -> Message:
        """Append to the live buffer; the returned message carries its `seq`.
        A replayed request returns the originally stored message. `QuotaExceeded`
        when the live buffer holds `limits.live_messages_per_session` messages or
        would exceed `limits.live_bytes_per_session` bytes. `now` (default: the
        message's created_at, which a client may set) is when the append happens:
        updated_at, the idle auto-commit trigger, the feed event. A live buffer that
        passes a count trigger of the session's auto-commit policy (else
        `auto_commit_default`) is committed in the same transaction."""

    @abc.abstractmethod
    async def add_messages(self, identity: Identity, session_id: str,
                           messages: Sequence[Message],
                           request: RequestKey | None = None,
                           now: datetime | None = None) -> list[AddedMessage]:
        """Append `messages` in order in one transaction (all or none), one result per
        message. A `client_message_id` is unique per session: a message whose client id
        is already stored (or appears earlier in the batch) is not stored again; its
        result is the stored message with `duplicate`. A replayed request returns the
        original results. `NotFound` when the session is absent. `now` and auto-commit
        as in `add_message` (default `now`: the last message's created_at)."""

    @abc.abstractmethod
    async def update_tool_part(self, identity: Identity, session_id: str, message_id: str,
                               tool_id: str, output: str, status: ToolStatus,
                               now: datetime,
                               max_bytes: int = DEFAULT_LIMITS.message_bytes) -> Message:
        """`NotFound` when the session, live message or tool part is missing;
        `InvalidArgument` when the message would exceed `max_bytes` (all string
        fields, `rules.message_bytes`)."""

    @abc.abstractmethod
    async def list_live_messages(self, identity: Identity, session_id: str,
                                 newest: int = 0) -> list[Message]:
        """Live messages in append order; only the newest `newest` when > 0."""

    @abc.abstractmethod
    async def record_usage(self, identity: Identity, session_id: str, usage: UsageRecord,
                           request: RequestKey | None = None) -> int:
        """Persist usage for the next commit; returns pending usage records."""

    # -- auto-commit and the session feed ---------------------------------------------
    @abc.abstractmethod
    async def update_session_config(self, identity: Identity, session_id: str,
                                    policy: AutoCommitPolicy | None,
                                    now: datetime) -> SessionMeta:
        """Set the session's own auto-commit policy (None: back to
        `auto_commit_default`), record CONFIG_CHANGED and re-arm the idle trigger; a
        live buffer that already passes a count trigger is committed in the same
        transaction. `NotFound` when the session does not exist."""

    @abc.abstractmethod
    async def idle_due_sessions(self, now: datetime, limit: int = 100
                                ) -> list[tuple[Identity, str]]:
        """Sessions whose idle auto-commit is due at `now`."""

    @abc.abstractmethod
    async def idle_commit(self, identity: Identity, session_id: str,
                          now: datetime) -> CommitOutcome | None:
        """Fire the idle auto-commit of the session when it is still due: exactly once
        whichever process calls (the claim and the commit are one transaction).
        None when not due (any more) or nothing to archive."""

    @abc.abstractmethod
    async def list_session_events(self, identity: Identity, session_id: str,
                                  after_seq: int, limit: int = 1000) -> list[SessionEvent]:
        """The session feed's events with seq > after_seq, oldest first."""

    @abc.abstractmethod
    async def session_events_first_seq(self, identity: Identity, session_id: str) -> int:
        """The oldest kept number of the session's feed (0 when empty)."""

    # -- commit (Phase 1) ------------------------------------------------------------
    @abc.abstractmethod
    async def commit(self, plan: CommitPlan, request: RequestKey | None = None) -> CommitOutcome:
        """Phase 1 in one transaction, serialized per session: move the live messages
        (all but the newest keep_recent_count) and pending usage into archive N+1,
        update metadata, create the PENDING task with its CREATED event (seq 1).
        `Aborted` when reject_if_running and an earlier task of the session is not
        terminal. A replayed request returns the original outcome."""

    # -- archives --------------------------------------------------------------------
    @abc.abstractmethod
    async def list_archives(self, identity: Identity, session_id: str, page_size: int,
                            page_token: str) -> Page[Archive]:
        """Archives ascending by index; `NotFound` when the session is absent."""

    @abc.abstractmethod
    async def get_archive(self, identity: Identity, session_id: str,
                          index: int) -> Archive | None: ...

    @abc.abstractmethod
    async def archive_messages(self, identity: Identity, session_id: str,
                               index: int) -> list[Message]: ...

    @abc.abstractmethod
    async def archive_message_page(self, identity: Identity, session_id: str, index: int,
                                   after_seq: int, limit: int, max_chars: int
                                   ) -> tuple[list[Message], bool]:
        """One page of an archive's messages with seq > `after_seq`, oldest first: at
        most `limit` (0: any number), and beyond the first only while the stored size
        of their parts stays within `max_chars`; plus whether more follow."""

    @abc.abstractmethod
    async def archive_usage(self, identity: Identity, session_id: str,
                            index: int) -> list[UsageRecord]: ...

    @abc.abstractmethod
    async def latest_done_archive(self, identity: Identity, session_id: str,
                                  before_index: int | None = None) -> Archive | None:
        """Newest archive in state DONE (with index < before_index when given)."""

    @abc.abstractmethod
    async def phase2_inputs(self, identity: Identity, session_id: str,
                            index: int) -> Phase2Inputs:
        """Archive `index`'s messages and usage and the overview of the newest archive
        DONE before it, read together (one round trip)."""

    # -- tasks: reading ----------------------------------------------------------------
    @abc.abstractmethod
    async def get_task(self, task_id: str) -> Task | None: ...

    @abc.abstractmethod
    async def list_tasks(self, identity: Identity, session_id: str, state: TaskState | None,
                         task_type: str, page_size: int, page_token: str) -> Page[Task]:
        """Newest first (created_at, then task_id descending)."""

    @abc.abstractmethod
    async def list_events(self, task_id: str, after_seq: int, limit: int = 1000) -> list[TaskEvent]:
        """Journal events with seq > after_seq, ascending."""

    # -- tasks: control ----------------------------------------------------------------
    @abc.abstractmethod
    async def request_cancel(self, task_id: str, now: datetime) -> Task:
        """PENDING and not leased: CANCELLED at once (terminal event). RUNNING: the
        cancel flag is set (CANCEL_REQUESTED event); the worker stops at the next
        stage boundary. Terminal: unchanged. `NotFound` when absent."""

    @abc.abstractmethod
    async def retry_task(self, identity: Identity, task_id: str, now: datetime,
                         request: RequestKey | None = None, *,
                         automatic: bool = False) -> Task:
        """A FAILED or CANCELLED session_commit task of `identity` back to PENDING with
        a RETRIED event (finished stages and their token usage kept, error and cancel
        flag cleared, `retries` + 1). `NotFound` when absent or another identity's;
        `FailedPrecondition` in any other state or when its archive is gone or not
        PENDING. A replayed `request` returns the task as it is now.

        Order: the claim runs a task only when every lower-index task of its session
        is terminal and no other task of the session is RUNNING, so a retried archive
        runs before later archives that have not started and after those running."""

    @abc.abstractmethod
    async def auto_retry_candidates(self, codes: tuple[ErrorCode, ...], max_retries: int,
                                    limit: int = 100) -> list[Task]:
        """FAILED tasks whose error code is one of `codes`, with fewer than
        `max_retries` retries and their archive still PENDING; oldest failure first."""

    # -- tasks: the worker side; every write checks the caller still holds the lease
    @abc.abstractmethod
    async def claim_task(self, worker_id: str, now: datetime, lease_until: datetime,
                         announce: bool = False,
                         max_running_per_identity: int = 0) -> Task | None:
        """Lease a runnable task: PENDING or RUNNING with an expired lease, whose
        session has no earlier (lower archive index) unfinished task. Fair across
        identities: a task of the identity with the fewest tasks running under a live
        lease first, then the oldest; none of an identity that already runs
        `max_running_per_identity` tasks (0: no cap). Marks it RUNNING, attempts += 1,
        appends a STARTED event. With `announce` (and no cancel requested) the same
        transaction appends STAGE_STARTED for the first stage not done. None when
        nothing is runnable."""

    @abc.abstractmethod
    async def claim_next_task(self, worker_id: str, now: datetime, lease_until: datetime,
                              announce: bool = False, max_running_per_identity: int = 0
                              ) -> tuple[Task | None, bool]:
        """`claim_task`, and whether another task was runnable besides the one
        claimed (a hint: claiming again may still find none)."""

    @abc.abstractmethod
    async def queue_stats(self) -> tuple[int, datetime | None]:
        """(PENDING tasks, created_at of the oldest of them or None): the queue gauges."""

    @abc.abstractmethod
    async def renew_lease(self, task_id: str, worker_id: str, lease_until: datetime) -> bool: ...

    @abc.abstractmethod
    async def release_all_leases(self) -> int:
        """Expire every lease (single-process stores at start-up)."""

    @abc.abstractmethod
    async def append_event(self, task_id: str, worker_id: str, event: NewEvent, stage: Stage,
                           now: datetime) -> TaskEvent:
        """Append a non-terminal event and set the task's current stage."""

    @abc.abstractmethod
    async def upsert_memories(self, task_id: str, worker_id: str,
                              candidates: Sequence[CandidateMemory],
                              now: datetime) -> MemoryCounts:
        """Merge a batch of the extract stage's candidates into their owners' memories
        in a transaction of its own, while `worker_id` holds the lease (`LeaseLost`
        if not); nothing once the extract stage is done. The counts of the batch; the
        stage's last batch goes with `complete_stage` (`ExtractionResponse.earlier`
        carries these counts). Merging is idempotent, so a batch written again after a
        crash changes nothing more."""

    @abc.abstractmethod
    async def complete_stage(self, task_id: str, worker_id: str, stage: Stage,
                             output: StageOutput, now: datetime,
                             next_stage: Stage | None = None) -> TaskEvent:
        """Apply a stage's durable writes, add its token usage to the task, mark the
        stage done and append STAGE_COMPLETED, all at once; returns that event.
        With `next_stage` the same transaction also crosses the stage boundary: when a
        cancel was requested the task ends CANCELLED (terminal event), otherwise
        STAGE_STARTED is appended for `next_stage`; the last event appended is
        returned. A stage already done is not applied again (returns the journal tail)."""

    @abc.abstractmethod
    async def complete_stages(self, task_id: str, worker_id: str,
                              outputs: Sequence[tuple[Stage, StageOutput]], now: datetime,
                              next_stage: Stage | None = None,
                              finalize: bool = False) -> TaskEvent:
        """`complete_stage` for several consecutive stages in one transaction, each
        crossing into the next (`next_stage` after the last), then with `finalize`
        `finalize_task`; stops at the first boundary where a cancel ends the task.
        The journal is the same as with one call per stage. Returns the last event
        appended (the journal tail when there was nothing to do)."""

    @abc.abstractmethod
    async def finalize_task(self, task_id: str, worker_id: str, now: datetime) -> TaskEvent:
        """Exactly once per archive: archive DONE (first/last message ids), session
        commit_count/last_commit_at/memory counts/token usage, task COMPLETED with
        its `CommitResult`, terminal event."""

    @abc.abstractmethod
    async def fail_task(self, task_id: str, worker_id: str | None, error: TaskError,
                        now: datetime) -> TaskEvent:
        """Task FAILED (terminal event). Archive stays PENDING."""

    @abc.abstractmethod
    async def cancel_task(self, task_id: str, worker_id: str, now: datetime) -> TaskEvent:
        """A running task stops at a stage boundary: CANCELLED (terminal event)."""

    # -- Phase 2 read helpers --------------------------------------------------------
    @abc.abstractmethod
    async def task_memory_counts(self, task_id: str) -> MemoryCounts:
        """Per-category memories the task's extraction stage wrote (0 before it)."""

    @abc.abstractmethod
    async def active_count(self, uri: str) -> int: ...

    @abc.abstractmethod
    async def session_relations(self, identity: Identity, session_id: str) -> list[str]: ...

    # -- memories ----------------------------------------------------------------------
    @abc.abstractmethod
    async def list_memories(self, identity: Identity, category: MemoryCategory | None,
                            page_size: int, page_token: str) -> Page[Memory]:
        """The caller's memories (user space of its user, agent space of its agent),
        ascending by memory_id."""

    @abc.abstractmethod
    async def get_memory(self, identity: Identity, memory_id: str) -> Memory | None: ...

    @abc.abstractmethod
    async def search_memories(self, identity: Identity, query: str,
                              category: MemoryCategory | None,
                              limit: int) -> list[tuple[Memory, float]]:
        """Full-text search, best first; higher score is better."""

    @abc.abstractmethod
    async def delete_memory(self, identity: Identity, memory_id: str,
                            now: datetime | None = None) -> bool:
        """Delete one of the caller's memories (recorded as a `deleted` change)."""

    # -- memory change history and archive reverts ---------------------------------------
    @abc.abstractmethod
    async def list_memory_changes(self, identity: Identity, session_id: str,
                                  archive_index: int, memory_id: str, page_size: int,
                                  page_token: str) -> Page[MemoryChange]:
        """The caller's memory changes, oldest first (by seq); optionally only those
        of one of its sessions, one archive of it (index > 0), or one memory."""

    @abc.abstractmethod
    async def request_revert(self, identity: Identity, session_id: str, index: int,
                             force: bool, task_id: str, now: datetime,
                             request: RequestKey | None = None) -> Task:
        """Queue the revert of an archive as a PENDING archive_revert task, after
        checking that the archive's Phase 2 ended, that it was not reverted already,
        and (unless `force`) that no later change touched its memories
        (`RevertConflict`)."""

    @abc.abstractmethod
    async def revert_targets(self, task: Task) -> list[MemoryImage]:
        """The before-images the revert task will restore (to embed beforehand)."""

    @abc.abstractmethod
    async def apply_revert(self, task_id: str, worker_id: str,
                           vectors: Mapping[str, tuple[str, tuple[float, ...]]], model: str,
                           now: datetime) -> TaskEvent:
        """The revert in one transaction: conflicts checked again under the memories'
        locks (FAILED without force), before-images restored, `reverted` changes
        recorded, retrieval entries and given vectors written, task COMPLETED."""

    @abc.abstractmethod
    async def session_uris(self, identity: Identity, session_id: str, after: str,
                           limit: int) -> list[tuple[str, int]]:
        """(uri, active count) of the session's relations with uri > `after`, by uri,
        at most `limit`."""

    @abc.abstractmethod
    async def active_counts(self, uris: Sequence[str]) -> dict[str, int]:
        """The active counts of `uris` (absent: never counted)."""

    # -- retrieval index -----------------------------------------------------------------
    @abc.abstractmethod
    async def recall(self, identity: Identity, query: RecallQuery,
                     with_neighbours: int = 0) -> list[RecallHit]:
        """The caller's best `query.limit` index entries by BM25 (statistics over the
        caller's own entries), best first; the first `with_neighbours` episode hits
        carry the turns right before and after them in their archive."""

    @abc.abstractmethod
    async def recall_entry_count(self, identity: Identity,
                                 kind: RecallKind | None = None) -> int:
        """How many index entries (of `kind`) the caller can recall."""

    @abc.abstractmethod
    async def index_entries(self, entries: Sequence[RecallEntry]) -> int:
        """Add entries that are not indexed yet (reindexing); returns how many were new."""

    @abc.abstractmethod
    async def archive_memory_entries(self, task: Task) -> list[RecallEntry]:
        """The entries of the memories `task`'s archive wrote or merged into, as the
        memories read now (what its index stage will write)."""

    @abc.abstractmethod
    async def index_memory_entries(self, task: Task, entries: Sequence[RecallEntry]) -> int:
        """Write `entries` (memory entries from `archive_memory_entries`, with their
        terms) ahead of the index stage's last transaction, replacing their memories'
        entries; an entry whose memory changed since it was read is not written.
        Idempotent. Returns the number written."""

    @abc.abstractmethod
    async def vectors_present(self, model: str, entry_ids: Sequence[str]) -> set[str]:
        """Which of `entry_ids` have a vector of `model` already."""

    @abc.abstractmethod
    async def index_vectors(self, model: str, vectors: Sequence[EntryVector]) -> int:
        """Store vectors of `model` for entries that exist and have none of it yet;
        returns how many were new."""

    @abc.abstractmethod
    async def vector_count(self, identity: Identity, model: str) -> int:
        """How many vectors of `model` the caller's entries have."""

    @abc.abstractmethod
    async def unindexed_archives(self, after: tuple[str, int], limit: int
                                 ) -> list[tuple[str, Identity, str, int]]:
        """(cursor key, owner, session_id, index) of completed archives without index
        entries, in a stable order after the cursor `after` (start: ("", -1))."""

    @abc.abstractmethod
    async def unindexed_memories(self, after: str, limit: int) -> list[RecallEntry]:
        """Entries for memories with none, by memory id after `after` (start: "")."""

    @abc.abstractmethod
    async def missing_vectors(self, model: str, after: str, limit: int) -> list[RecallEntry]:
        """Entries with no vector of `model`, by entry id after `after` (start: "")."""

    @abc.abstractmethod
    async def count_missing_vectors(self, model: str) -> int: ...

    @abc.abstractmethod
    async def prune_vectors(self, model: str) -> int:
        """Remove the vectors of every model but `model`; returns how many."""

    # -- imports (`sessiond import-openviking`) -------------------------------------------
    @abc.abstractmethod
    async def import_session(self, session: ImportedSession) -> bool:
        """Create the session with the given metadata; False (nothing written) when its
        identity has that session id already. `QuotaExceeded` past
        `limits.sessions_per_identity`."""

    @abc.abstractmethod
    async def import_archive(self, archive: ImportedArchive, now: datetime) -> ArchiveImport:
        """Write archive `archive.index` of an existing session with its messages and a
        task in the imported state (DONE: archive DONE + task COMPLETED; FAILED:
        archive PENDING + task FAILED; PENDING: archive and task PENDING, runnable).
        Nothing when the session has that index already; messages whose client id the
        session holds are left out. `NotFound` when the session is absent."""

    @abc.abstractmethod
    async def import_memory(self, memory: ImportedMemory) -> bool:
        """Insert a memory unless its owner has one with that category and key."""

    # -- retention ---------------------------------------------------------------------
    @abc.abstractmethod
    async def sweep(self, now: datetime, completed_before: datetime, failed_before: datetime,
                    max_tasks: int, request_ids_before: datetime) -> SweepResult:
        """Remove terminal tasks (and their journals) finished before the cut-offs
        (FAILED: failed_before; COMPLETED/CANCELLED: completed_before), then the
        oldest terminal tasks beyond max_tasks, and idempotency keys older than
        request_ids_before. Archives and memories are never removed."""

    # -- API keys ----------------------------------------------------------------------
    @abc.abstractmethod
    async def create_api_key(self, key: ApiKey) -> None:
        """Store a new key record (its hash, never the key); AlreadyExists when the
        key id is taken."""

    @abc.abstractmethod
    async def get_api_key(self, key_id: str) -> ApiKey | None:
        """The key record, revoked and expired ones included; None when unknown."""

    @abc.abstractmethod
    async def list_api_keys(self, account: str | None = None) -> list[ApiKey]:
        """Every key record (of `account`), by account, then creation time."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: str, now: datetime) -> bool:
        """Mark the key revoked at `now`; False when unknown or already revoked."""


__all__ = ["EventListener", "RemoteEventListener", "Store", "WorkListener"]
