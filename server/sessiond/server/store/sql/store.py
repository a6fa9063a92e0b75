"""`SqlStore`: the `Store` contract over the SQL transactions of this package.

A backend subclass provides `_write` and `_read` (how a transaction runs on its
driver, and when its announcements are delivered) plus its lifecycle; every
operation below is the same for all backends.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sessiond.server.domain.autocommit import AutoCommitPolicy, SessionEvent
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
from sessiond.server.domain.limits import DEFAULT_LIMITS
from sessiond.server.domain.pages import Page
from sessiond.server.domain.recall import (
    EntryVector,
    RecallEntry,
    RecallHit,
    RecallKind,
    RecallQuery,
)
from sessiond.server.domain.rules import utcnow
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
from sessiond.server.store.base import Store
from sessiond.server.store.sql import (
    api_keys,
    autocommit,
    commit,
    imports,
    memories,
    memory_history,
    messages,
    recall,
    retention,
    session_events,
    sessions,
    stages,
    tasks,
    vectors,
)
from sessiond.server.store.sql import messages as msgs
from sessiond.server.store.sql.tx import Announce, Tx

T = TypeVar("T")
Op = Callable[[Tx], Coroutine[Any, Any, T]]


class SqlStore(Store):
    @abc.abstractmethod
    async def _write(self, op: Op[T]) -> T:
        """Run `op` in one read-write transaction; announce after it committed."""

    @abc.abstractmethod
    async def _read(self, op: Op[T]) -> T:
        """Run a read-only `op` (one snapshot, or single statements)."""

    def _announce(self, announce: Announce) -> None:
        self._emit_events(announce.events)
        for key in announce.pokes:
            self._emit_remote_event(key)
        if announce.work:
            self._emit_work()

    # -- sessions
    async def create_session(self, identity: Identity, session_id: str, now: datetime,
                             request: RequestKey | None = None) -> SessionMeta:
        return await self._write(lambda tx: sessions.create(tx, identity, session_id, now,
                                                            request, self.limits))

    async def get_session(self, identity: Identity, session_id: str) -> SessionMeta | None:
        return await self._read(lambda tx: sessions.get(tx, identity, session_id))

    async def ensure_session(self, identity: Identity, session_id: str,
                             now: datetime) -> SessionMeta:
        return await self._write(lambda tx: sessions.ensure(tx, identity, session_id, now,
                                                            self.limits))

    async def list_sessions(self, identity: Identity, page_size: int,
                            page_token: str) -> Page[SessionMeta]:
        return await self._read(lambda tx: sessions.list_page(tx, identity, page_size,
                                                              page_token))

    async def delete_session(self, identity: Identity, session_id: str, now: datetime) -> bool:
        return await self._write(lambda tx: sessions.delete(tx, identity, session_id, now))

    # -- messages and usage
    async def add_message(self, identity: Identity, session_id: str, message: Message,
                          request: RequestKey | None = None,
                          now: datetime | None = None) -> Message:
        return await self._write(lambda tx: messages.add(tx, identity, session_id, message,
                                                         request, self.limits,
                                                         self.auto_commit_default, now))

    async def add_messages(self, identity: Identity, session_id: str,
                           messages: Sequence[Message],
                           request: RequestKey | None = None,
                           now: datetime | None = None) -> list[AddedMessage]:
        return await self._write(lambda tx: msgs.add_batch(tx, identity, session_id, messages,
                                                           request, self.limits,
                                                           self.auto_commit_default, now))

    async def update_tool_part(self, identity: Identity, session_id: str, message_id: str,
                               tool_id: str, output: str, status: ToolStatus,
                               now: datetime,
                               max_bytes: int = DEFAULT_LIMITS.message_bytes) -> Message:
        return await self._write(lambda tx: messages.update_tool_part(
            tx, identity, session_id, message_id, tool_id, output, status, now, max_bytes,
            self.limits))

    async def list_live_messages(self, identity: Identity, session_id: str,
                                 newest: int = 0) -> list[Message]:
        return await self._read(lambda tx: messages.list_live(tx, identity, session_id, newest))

    async def record_usage(self, identity: Identity, session_id: str, usage: UsageRecord,
                           request: RequestKey | None = None) -> int:
        return await self._write(lambda tx: messages.record_usage(tx, identity, session_id,
                                                                  usage, request, self.limits))

    # -- auto-commit and the session feed
    async def update_session_config(self, identity: Identity, session_id: str,
                                    policy: AutoCommitPolicy | None,
                                    now: datetime) -> SessionMeta:
        return await self._write(lambda tx: autocommit.update_config(
            tx, identity, session_id, policy, now, self.auto_commit_default))

    async def idle_due_sessions(self, now: datetime, limit: int = 100
                                ) -> list[tuple[Identity, str]]:
        return await self._read(lambda tx: autocommit.idle_due(tx, now, limit))

    async def idle_commit(self, identity: Identity, session_id: str,
                          now: datetime) -> CommitOutcome | None:
        return await self._write(lambda tx: autocommit.idle_commit(
            tx, identity, session_id, now, self.auto_commit_default))

    async def list_session_events(self, identity: Identity, session_id: str,
                                  after_seq: int, limit: int = 1000) -> list[SessionEvent]:
        return await self._read(lambda tx: session_events.list_after(
            tx, identity, session_id, after_seq, limit))

    async def session_events_first_seq(self, identity: Identity, session_id: str) -> int:
        return await self._read(lambda tx: session_events.first_seq(tx, identity, session_id))

    # -- Phase 1 and archives
    async def commit(self, plan: CommitPlan, request: RequestKey | None = None) -> CommitOutcome:
        return await self._write(lambda tx: commit.commit(tx, plan, request))

    async def list_archives(self, identity: Identity, session_id: str, page_size: int,
                            page_token: str) -> Page[Archive]:
        return await self._read(lambda tx: commit.list_page(tx, identity, session_id,
                                                            page_size, page_token))

    async def get_archive(self, identity: Identity, session_id: str,
                          index: int) -> Archive | None:
        return await self._read(lambda tx: commit.get(tx, identity, session_id, index))

    async def archive_messages(self, identity: Identity, session_id: str,
                               index: int) -> list[Message]:
        return await self._read(lambda tx: commit.messages(tx, identity, session_id, index))

    async def archive_message_page(self, identity: Identity, session_id: str, index: int,
                                   after_seq: int, limit: int, max_chars: int
                                   ) -> tuple[list[Message], bool]:
        return await self._read(lambda tx: commit.message_page(
            tx, identity, session_id, index, after_seq, limit, max_chars))

    async def archive_usage(self, identity: Identity, session_id: str,
                            index: int) -> list[UsageRecord]:
        return await self._read(lambda tx: commit.usage(tx, identity, session_id, index))

    async def latest_done_archive(self, identity: Identity, session_id: str,
                                  before_index: int | None = None) -> Archive | None:
        return await self._read(lambda tx: commit.latest_done(tx, identity, session_id,
                                                              before_index))

    async def phase2_inputs(self, identity: Identity, session_id: str,
                            index: int) -> Phase2Inputs:
        return await self._read(lambda tx: commit.phase2_inputs(tx, identity, session_id,
                                                                index))

    # -- tasks
    async def get_task(self, task_id: str) -> Task | None:
        return await self._read(lambda tx: tasks.get(tx, task_id))

    async def list_tasks(self, identity: Identity, session_id: str, state: TaskState | None,
                         task_type: str, page_size: int, page_token: str) -> Page[Task]:
        return await self._read(lambda tx: tasks.list_page(
            tx, identity, session_id, state, task_type, page_size, page_token))

    async def list_events(self, task_id: str, after_seq: int,
                          limit: int = 1000) -> list[TaskEvent]:
        return await self._read(lambda tx: tasks.list_events(tx, task_id, after_seq, limit))

    async def request_cancel(self, task_id: str, now: datetime) -> Task:
        return await self._write(lambda tx: tasks.request_cancel(tx, task_id, now))

    async def retry_task(self, identity: Identity, task_id: str, now: datetime,
                         request: RequestKey | None = None, *,
                         automatic: bool = False) -> Task:
        return await self._write(lambda tx: tasks.retry(tx, identity, task_id, now, request,
                                                        automatic=automatic))

    async def auto_retry_candidates(self, codes: tuple[ErrorCode, ...], max_retries: int,
                                    limit: int = 100) -> list[Task]:
        return await self._read(lambda tx: tasks.failed_below(tx, codes, max_retries, limit))

    async def claim_task(self, worker_id: str, now: datetime, lease_until: datetime,
                         announce: bool = False,
                         max_running_per_identity: int = 0) -> Task | None:
        return await self._write(lambda tx: tasks.claim(tx, worker_id, now, lease_until,
                                                        announce, max_running_per_identity))

    async def claim_next_task(self, worker_id: str, now: datetime, lease_until: datetime,
                              announce: bool = False, max_running_per_identity: int = 0
                              ) -> tuple[Task | None, bool]:
        return await self._write(lambda tx: tasks.claim_next(
            tx, worker_id, now, lease_until, announce, max_running_per_identity))

    async def queue_stats(self) -> tuple[int, datetime | None]:
        return await self._read(tasks.queue_stats)

    async def renew_lease(self, task_id: str, worker_id: str, lease_until: datetime) -> bool:
        return await self._write(lambda tx: tasks.renew_lease(tx, task_id, worker_id,
                                                              lease_until))

    async def release_all_leases(self) -> int:
        return await self._write(tasks.release_all_leases)

    async def append_event(self, task_id: str, worker_id: str, event: NewEvent, stage: Stage,
                           now: datetime) -> TaskEvent:
        return await self._write(lambda tx: tasks.append_event(tx, task_id, worker_id, event,
                                                               stage, now))

    async def upsert_memories(self, task_id: str, worker_id: str,
                              candidates: Sequence[CandidateMemory],
                              now: datetime) -> MemoryCounts:
        return await self._write(lambda tx: stages.upsert_memories(tx, task_id, worker_id,
                                                                   candidates, now))

    async def complete_stage(self, task_id: str, worker_id: str, stage: Stage,
                             output: StageOutput, now: datetime,
                             next_stage: Stage | None = None) -> TaskEvent:
        return await self._write(lambda tx: stages.complete(tx, task_id, worker_id, stage,
                                                            output, now, next_stage))

    async def complete_stages(self, task_id: str, worker_id: str,
                              outputs: Sequence[tuple[Stage, StageOutput]], now: datetime,
                              next_stage: Stage | None = None,
                              finalize: bool = False) -> TaskEvent:
        return await self._write(lambda tx: stages.complete_many(
            tx, task_id, worker_id, outputs, now, next_stage, finalize))

    async def finalize_task(self, task_id: str, worker_id: str, now: datetime) -> TaskEvent:
        return await self._write(lambda tx: stages.finalize(tx, task_id, worker_id, now))

    async def fail_task(self, task_id: str, worker_id: str | None, error: TaskError,
                        now: datetime) -> TaskEvent:
        return await self._write(lambda tx: tasks.fail(tx, task_id, worker_id, error, now))

    async def cancel_task(self, task_id: str, worker_id: str, now: datetime) -> TaskEvent:
        return await self._write(lambda tx: tasks.cancel(tx, task_id, worker_id, now))

    async def task_memory_counts(self, task_id: str) -> MemoryCounts:
        return await self._read(lambda tx: stages.memory_counts(tx, task_id))

    async def active_count(self, uri: str) -> int:
        return await self._read(lambda tx: stages.active_count(tx, uri))

    async def session_relations(self, identity: Identity, session_id: str) -> list[str]:
        return await self._read(lambda tx: stages.relations(tx, identity, session_id))

    # -- memories
    async def list_memories(self, identity: Identity, category: MemoryCategory | None,
                            page_size: int, page_token: str) -> Page[Memory]:
        return await self._read(lambda tx: memories.list_page(tx, identity, category,
                                                              page_size, page_token))

    async def get_memory(self, identity: Identity, memory_id: str) -> Memory | None:
        return await self._read(lambda tx: memories.get(tx, identity, memory_id))

    async def search_memories(self, identity: Identity, query: str,
                              category: MemoryCategory | None,
                              limit: int) -> list[tuple[Memory, float]]:
        return await self._read(lambda tx: memories.search(tx, identity, query, category,
                                                           limit))

    async def delete_memory(self, identity: Identity, memory_id: str,
                            now: datetime | None = None) -> bool:
        at = now or utcnow()
        return await self._write(lambda tx: memories.delete(tx, identity, memory_id, at))

    # -- memory change history and archive reverts
    async def list_memory_changes(self, identity: Identity, session_id: str,
                                  archive_index: int, memory_id: str, page_size: int,
                                  page_token: str) -> Page[MemoryChange]:
        return await self._read(lambda tx: memory_history.list_page(
            tx, identity, session_id, archive_index, memory_id, page_size, page_token))

    async def request_revert(self, identity: Identity, session_id: str, index: int,
                             force: bool, task_id: str, now: datetime,
                             request: RequestKey | None = None) -> Task:
        return await self._write(lambda tx: memory_history.request(
            tx, identity, session_id, index, force, task_id, now, request))

    async def revert_targets(self, task: Task) -> list[MemoryImage]:
        return await self._read(lambda tx: memory_history.revert_targets(tx, task))

    async def apply_revert(self, task_id: str, worker_id: str,
                           vectors: Mapping[str, tuple[str, tuple[float, ...]]], model: str,
                           now: datetime) -> TaskEvent:
        return await self._write(lambda tx: memory_history.apply(tx, task_id, worker_id,
                                                                 vectors, model, now))

    async def session_uris(self, identity: Identity, session_id: str, after: str,
                           limit: int) -> list[tuple[str, int]]:
        return await self._read(lambda tx: memory_history.session_uris(tx, identity,
                                                                       session_id, after, limit))

    async def active_counts(self, uris: Sequence[str]) -> dict[str, int]:
        return await self._read(lambda tx: memory_history.active_counts(tx, uris))

    # -- retrieval index
    # Exact-scan cache of each identity's vectors (dense ranking); its size is set
    # by the app from --embedder-cache-mb.
    vector_cache_bytes = 512 * 1024 * 1024
    _vector_index: vectors.VectorIndex | None = None

    @property
    def vector_index(self) -> vectors.VectorIndex:
        if self._vector_index is None:
            self._vector_index = vectors.VectorIndex(self.vector_cache_bytes)
        return self._vector_index

    async def recall(self, identity: Identity, query: RecallQuery,
                     with_neighbours: int = 0) -> list[RecallHit]:
        index = self.vector_index if query.vector else None
        return await self._read(lambda tx: recall.recall(tx, identity, query, with_neighbours,
                                                         index))

    async def recall_entry_count(self, identity: Identity,
                                 kind: RecallKind | None = None) -> int:
        return await self._read(lambda tx: recall.entry_count(tx, identity, kind))

    async def index_entries(self, entries: Sequence[RecallEntry]) -> int:
        return await self._write(lambda tx: recall.insert_entries(tx, entries))

    async def archive_memory_entries(self, task: Task) -> list[RecallEntry]:
        return await self._read(lambda tx: recall.archive_memory_entries(tx, task))

    async def index_memory_entries(self, task: Task, entries: Sequence[RecallEntry]) -> int:
        return await self._write(lambda tx: recall.index_memory_entries(tx, task, entries))

    async def vectors_present(self, model: str, entry_ids: Sequence[str]) -> set[str]:
        return await self._read(lambda tx: vectors.present(tx, model, entry_ids))

    async def index_vectors(self, model: str, vecs: Sequence[EntryVector]) -> int:
        return await self._write(lambda tx: vectors.insert(tx, model, vecs))

    async def vector_count(self, identity: Identity, model: str) -> int:
        return await self._read(lambda tx: vectors.count(tx, identity, model))

    async def unindexed_archives(self, after: tuple[str, int], limit: int
                                 ) -> list[tuple[str, Identity, str, int]]:
        return await self._read(lambda tx: recall.unindexed_archives(tx, after, limit))

    async def unindexed_memories(self, after: str, limit: int) -> list[RecallEntry]:
        return await self._read(lambda tx: recall.unindexed_memories(tx, after, limit))

    async def missing_vectors(self, model: str, after: str, limit: int) -> list[RecallEntry]:
        return await self._read(lambda tx: recall.missing_vectors(tx, model, after, limit))

    async def count_missing_vectors(self, model: str) -> int:
        return await self._read(lambda tx: vectors.count_missing(tx, model))

    async def prune_vectors(self, model: str) -> int:
        return await self._write(lambda tx: vectors.prune(tx, model))

    # -- retention
    # -- imports
    async def import_session(self, session: ImportedSession) -> bool:
        return await self._write(lambda tx: imports.session(tx, session, self.limits))

    async def import_archive(self, archive: ImportedArchive, now: datetime) -> ArchiveImport:
        return await self._write(lambda tx: imports.archive(tx, archive, now))

    async def import_memory(self, memory: ImportedMemory) -> bool:
        return await self._write(lambda tx: imports.memory(tx, memory))

    async def sweep(self, now: datetime, completed_before: datetime, failed_before: datetime,
                    max_tasks: int, request_ids_before: datetime) -> SweepResult:
        return await self._write(lambda tx: retention.sweep(
            tx, completed_before, failed_before, max_tasks, request_ids_before))

    # -- API keys
    async def create_api_key(self, key: ApiKey) -> None:
        await self._write(lambda tx: api_keys.create(tx, key))

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        return await self._read(lambda tx: api_keys.get(tx, key_id))

    async def list_api_keys(self, account: str | None = None) -> list[ApiKey]:
        return await self._read(lambda tx: api_keys.list_all(tx, account))

    async def revoke_api_key(self, key_id: str, now: datetime) -> bool:
        return await self._write(lambda tx: api_keys.revoke(tx, key_id, now))
