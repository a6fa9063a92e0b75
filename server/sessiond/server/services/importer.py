"""`sessiond import-openviking`: write what `services/openviking.py` read into the
store, then index it for Recall (the `sessiond reindex` passes).

Idempotent: sessions, archives, messages and memories are each written at most
once (see `domain/imports.py`), so a second run imports nothing and reports what
it found already present. Nothing here is all-or-nothing across the tree: each
session, archive, batch of live messages and memory is its own transaction, so an
interrupted import is finished by running it again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sessiond.server.domain import rules
from sessiond.server.domain.errors import NotFound, QuotaExceeded
from sessiond.server.domain.imports import ImportedArchive, ImportedMemory, ImportedSession
from sessiond.server.domain.values import memory_owner
from sessiond.server.embedders.base import DEFAULT_BATCH, Embedder
from sessiond.server.services.openviking import OvSession, OvTree, Skip
from sessiond.server.services.reindex import Reindexer, ReindexReport
from sessiond.server.store.base import Store

# (what, done so far, total or 0)
Progress = Callable[[str, int, int], None]


@dataclass
class ImportReport:
    dry_run: bool = False
    sessions: int = 0
    sessions_present: int = 0
    archives: Counter[str] = field(default_factory=Counter)  # by imported state
    archives_present: int = 0
    live_messages: int = 0
    archived_messages: int = 0
    duplicate_messages: int = 0
    memories: int = 0
    memories_present: int = 0
    index: ReindexReport = field(default_factory=ReindexReport)
    skipped: list[Skip] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "sessions": {"imported": self.sessions, "present": self.sessions_present},
            "archives": {"done": self.archives["done"], "failed": self.archives["failed"],
                         "pending": self.archives["pending"],
                         "present": self.archives_present},
            "messages": {"live": self.live_messages, "archived": self.archived_messages,
                         "duplicates": self.duplicate_messages},
            "memories": {"imported": self.memories, "present": self.memories_present},
            "index": {"archives": self.index.archives, "entries": self.index.entries,
                      "memories": self.index.memories, "vectors": self.index.vectors},
            "skipped": [{"path": s.path, "reason": s.reason, "detail": s.detail}
                        for s in self.skipped],
            "skipped_by_reason": dict(sorted(Counter(s.reason for s in self.skipped).items())),
        }


class OpenVikingImporter:
    def __init__(self, store: Store, embedder: Embedder | None = None,
                 batch_size: int = DEFAULT_BATCH) -> None:
        self.store = store
        self.embedder = embedder
        self.batch_size = batch_size

    async def run(self, tree: OvTree, progress: Progress = lambda *_: None,
                  dry_run: bool = False) -> ImportReport:
        report = ImportReport(dry_run=dry_run, skipped=list(tree.skipped))
        progress("sessions", 0, len(tree.sessions))
        for n, s in enumerate(tree.sessions, 1):
            if dry_run:
                await self._preview(s, report)
            else:
                await self._session(s, report)
            progress("sessions", n, len(tree.sessions))
        progress("memories", 0, len(tree.memories))
        for n, m in enumerate(tree.memories, 1):
            if dry_run:
                report.memories += 1
            elif await self.store.import_memory(ImportedMemory(
                    owner=memory_owner(m.identity, m.category), category=m.category,
                    key=m.key, content=m.content, source_session_id="",
                    source_uri=f"openviking:{m.path}", created_at=m.modified,
                    updated_at=m.modified)):
                report.memories += 1
            else:
                report.memories_present += 1
            progress("memories", n, len(tree.memories))
        if not dry_run:
            report.index = await Reindexer(self.store, self.embedder, self.batch_size).run(
                lambda what, done, total: progress(f"index {what}", done, total))
        return report

    async def _preview(self, s: OvSession, report: ImportReport) -> None:
        """--dry-run: what the store holds already; nothing is written."""
        if await self.store.get_session(s.identity, s.session_id) is None:
            report.sessions += 1
            report.archives.update(a.state.value for a in s.archives)
            report.archived_messages += sum(len(a.messages) for a in s.archives)
            report.live_messages += len(s.live)
            return
        report.sessions_present += 1
        for a in s.archives:
            if await self.store.get_archive(s.identity, s.session_id, a.index) is None:
                report.archives[a.state.value] += 1
                report.archived_messages += len(a.messages)
            else:
                report.archives_present += 1
        live = {m.client_message_id for m in
                await self.store.list_live_messages(s.identity, s.session_id)}
        fresh = [m for m in s.live if m.client_message_id not in live]
        report.live_messages += len(fresh)
        report.duplicate_messages += len(s.live) - len(fresh)

    async def _session(self, s: OvSession, report: ImportReport) -> None:
        try:
            created = await self.store.import_session(ImportedSession(
                identity=s.identity, session_id=s.session_id, created_at=s.created_at,
                updated_at=s.updated_at, memories_extracted=s.memories_extracted,
                llm_token_usage=s.llm_token_usage, last_commit_at=s.last_commit_at))
        except QuotaExceeded as exc:
            report.skipped.append(Skip(s.path, "quota", exc.message))
            return
        if created:
            report.sessions += 1
        else:
            report.sessions_present += 1
        for a in s.archives:
            try:
                done = await self.store.import_archive(ImportedArchive(
                    identity=s.identity, session_id=s.session_id, index=a.index,
                    state=a.state, messages=tuple(a.messages), task_id=rules.new_task_id(),
                    created_at=a.created_at or s.created_at, overview=a.overview,
                    abstract=a.abstract, completed_at=a.completed_at, error=a.error),
                    rules.utcnow())
            except NotFound as exc:  # the session was deleted meanwhile
                report.skipped.append(Skip(a.path, "session_gone", exc.message))
                return
            report.duplicate_messages += done.duplicates
            if done.created:
                report.archives[a.state.value] += 1
                report.archived_messages += len(a.messages) - done.duplicates
            else:
                report.archives_present += 1
        for start in range(0, len(s.live), rules.MAX_BATCH_MESSAGES):
            batch = s.live[start:start + rules.MAX_BATCH_MESSAGES]
            try:
                added = await self.store.add_messages(s.identity, s.session_id, batch)
            except QuotaExceeded as exc:
                report.skipped.append(Skip(
                    f"{s.path}/messages.jsonl", "quota",
                    f"{len(batch)} live messages from #{start + 1}: {exc.message}"))
                continue
            dup = sum(1 for r in added if r.duplicate)
            report.live_messages += len(added) - dup
            report.duplicate_messages += dup
