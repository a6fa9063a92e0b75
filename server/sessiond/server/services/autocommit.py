"""The idle auto-commit scanner: every process looks for sessions whose idle trigger
is due and fires it through the store, whose claim makes each fire exactly once
however many replicas scan (`Store.idle_commit`). Count triggers need no scanner:
they commit inside the append's transaction."""

from __future__ import annotations

import asyncio
import logging

from sessiond.server import failpoints
from sessiond.server.domain.errors import NotFound, SessiondError
from sessiond.server.domain.rules import utcnow
from sessiond.server.store.base import Store

log = logging.getLogger(__name__)


class IdleCommitter:
    def __init__(self, store: Store, *, interval_seconds: float = 1.0,
                 batch: int = 100) -> None:
        self.store = store
        self.interval_seconds = interval_seconds
        self.batch = batch

    async def run_once(self) -> int:
        """Fire every idle trigger due now; how many sessions this process committed."""
        now = utcnow()
        fired = 0
        for identity, session_id in await self.store.idle_due_sessions(now, self.batch):
            failpoints.hit("autocommit.idle.before_write")
            try:
                outcome = await self.store.idle_commit(identity, session_id, now)
            except NotFound:
                continue  # deleted meanwhile
            if outcome is not None and outcome.archived and outcome.task is not None:
                failpoints.hit("autocommit.idle.after_write")
                fired += 1
                log.info("auto-commit (idle) of session %s: task %s", session_id,
                         outcome.task.task_id)
        return fired

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except SessiondError as exc:
                log.warning("idle auto-commit scan failed: %s", exc)
            except Exception:
                log.exception("idle auto-commit scan failed")
            await asyncio.sleep(self.interval_seconds)
