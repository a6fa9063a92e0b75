"""`sessiond reindex`: bring the retrieval index up to date with the store.

Three passes, each resumable and idempotent (entry ids are deterministic and every
pass asks the store only for what is still missing, so a run that is interrupted,
or run twice, writes nothing twice):
1. archives completed before the index existed get their episode and overview
   entries;
2. memories without an entry get one;
3. with an embedder, every entry without a vector of the configured model gets one
   (after a change of embedder: all of them); `prune` then removes the vectors of
   other models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from sessiond.server.domain.recall import EntryVector, RecallEntry
from sessiond.server.embedders.base import DEFAULT_BATCH, Embedder
from sessiond.server.observability import metrics
from sessiond.server.phase2.pipeline import archive_entries_of
from sessiond.server.store.base import Store

# (pass name, done so far, total known or 0)
Progress = Callable[[str, int, int], None]
ARCHIVES_PER_READ = 50
ROWS_PER_READ = 256


@dataclass
class ReindexReport:
    archives: int = 0
    entries: int = 0
    memories: int = 0
    vectors: int = 0
    pruned: int = 0


def _with_terms(entries: list[RecallEntry]) -> list[RecallEntry]:
    return [e.with_terms() for e in entries]


class Reindexer:
    def __init__(self, store: Store, embedder: Embedder | None,
                 batch_size: int = DEFAULT_BATCH) -> None:
        self.store = store
        self.embedder = embedder
        self.batch_size = max(1, batch_size)

    async def run(self, progress: Progress = lambda *_: None,
                  prune: bool = False) -> ReindexReport:
        report = ReindexReport()
        await self._archives(report, progress)
        await self._memories(report, progress)
        if self.embedder is not None:
            await self._vectors(self.embedder, report, progress)
        if prune:
            model = self.embedder.model if self.embedder is not None else ""
            report.pruned = await self.store.prune_vectors(model)
        return report

    async def _archives(self, report: ReindexReport, progress: Progress) -> None:
        after: tuple[str, int] = ("", -1)
        while batch := await self.store.unindexed_archives(after, ARCHIVES_PER_READ):
            for key, owner, session_id, index in batch:
                after = (key, index)
                archive = await self.store.get_archive(owner, session_id, index)
                if archive is None:  # deleted meanwhile
                    continue
                messages = await self.store.archive_messages(owner, session_id, index)
                entries = await asyncio.to_thread(archive_entries_of, owner, session_id,
                                                  index, messages, archive.overview,
                                                  archive.abstract)
                report.entries += await self.store.index_entries(entries)
                report.archives += 1
            progress("archives", report.archives, 0)

    async def _memories(self, report: ReindexReport, progress: Progress) -> None:
        after = ""
        while batch := await self.store.unindexed_memories(after, ROWS_PER_READ):
            after = batch[-1].memory_id
            with_terms = await asyncio.to_thread(_with_terms, batch)
            report.memories += await self.store.index_entries(with_terms)
            progress("memories", report.memories, 0)

    async def _vectors(self, embedder: Embedder, report: ReindexReport,
                       progress: Progress) -> None:
        model = embedder.model
        total = await self.store.count_missing_vectors(model)
        progress("vectors", 0, total)
        after = ""
        while batch := await self.store.missing_vectors(model, after, ROWS_PER_READ):
            after = batch[-1].entry_id
            todo = [e for e in batch if e.text.strip()]
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                with metrics.embedding_call(model, "reindex", len(chunk)):
                    vecs = await embedder.embed([e.text for e in chunk])
                report.vectors += await self.store.index_vectors(
                    model, [EntryVector(e, tuple(v)) for e, v in zip(chunk, vecs, strict=True)])
            progress("vectors", report.vectors, total)
