"""The archive_revert task: restore the before-images of one archive's memory changes.

The revert has one stage (`revert`) and one write transaction (`Store.apply_revert`):
the conflict check under the memories' locks, the restored memories, their history
records and retrieval entries, and the task's completion commit together, so a
crash before it leaves nothing done (the task runs again after the restart) and a
crash after it leaves nothing to do. With an embedder, the restored memories'
vectors are made before that transaction and written in it.
"""

from __future__ import annotations

import logging

from sessiond.server import failpoints
from sessiond.server.domain.errors import ErrorCode, LeaseLost, NotFound, Unavailable
from sessiond.server.domain.history import memory_entry
from sessiond.server.domain.rules import utcnow
from sessiond.server.domain.values import Task, TaskError
from sessiond.server.embedders.base import Embedder
from sessiond.server.observability import logs, metrics
from sessiond.server.phase2.engines.base import EngineError
from sessiond.server.phase2.pipeline import engine_code, fail_task
from sessiond.server.phase2.sanitize import sanitize
from sessiond.server.store.base import Store

log = logging.getLogger(__name__)
EMBED_BATCH = 64


class ArchiveReverter:
    def __init__(self, store: Store, worker_id: str, embedder: Embedder | None = None,
                 secrets: tuple[str, ...] = ()) -> None:
        self.store = store
        self.worker_id = worker_id
        self.embedder = embedder
        self.secrets = secrets

    async def run(self, task: Task) -> bool:
        """Run the revert; False when it stopped for a store outage (hand it back)."""
        with logs.bind(task_id=task.task_id, session_id=task.session_id):
            try:
                if task.cancel_requested:
                    await self.store.cancel_task(task.task_id, self.worker_id, utcnow())
                    metrics.record_task_finished("cancelled")
                    return True
                failpoints.hit("revert.before")
                vectors = await self._vectors(task)
                failpoints.hit("revert.embedded")
                ev = await self.store.apply_revert(task.task_id, self.worker_id, vectors,
                                                   self.embedder.model if self.embedder
                                                   else "", utcnow())
                metrics.record_task_finished(ev.state.value)
                failpoints.hit("revert.after")
                return True
            except LeaseLost:
                log.warning("stopped the revert %s: lease lost or task ended", task.task_id)
                return True
            except Unavailable as exc:
                log.warning("revert %s paused, store unavailable: %s", task.task_id, exc)
                return False
            except EngineError as exc:
                await self._fail(task, TaskError(engine_code(exc),
                                                 sanitize(str(exc), self.secrets),
                                                 reason=exc.reason))
                return True
            except NotFound as exc:
                await self._fail(task, TaskError(ErrorCode.NOT_FOUND, exc.message,
                                                 reason=exc.reason))
                return True
            except Exception as exc:
                log.exception("revert %s failed", task.task_id)
                await self._fail(task, TaskError(
                    ErrorCode.INTERNAL, sanitize(f"{type(exc).__name__}: {exc}", self.secrets),
                    reason="INTERNAL"))
                return True

    async def _vectors(self, task: Task) -> dict[str, tuple[str, tuple[float, ...]]]:
        """memory id -> (entry text, vector) of each memory the revert will write
        whose entry has no vector yet."""
        if self.embedder is None:
            return {}
        entries = [memory_entry(t) for t in await self.store.revert_targets(task)]
        have = await self.store.vectors_present(self.embedder.model,
                                                [e.entry_id for e in entries])
        todo = [e for e in entries if e.entry_id not in have and e.text.strip()]
        out: dict[str, tuple[str, tuple[float, ...]]] = {}
        for start in range(0, len(todo), EMBED_BATCH):
            chunk = todo[start:start + EMBED_BATCH]
            vecs = await self.embedder.embed([e.text for e in chunk])
            out.update({e.memory_id: (e.text, tuple(v))
                        for e, v in zip(chunk, vecs, strict=True)})
        return out

    async def _fail(self, task: Task, error: TaskError) -> None:
        await fail_task(self.store, self.worker_id, task, error)
