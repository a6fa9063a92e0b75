"""The automatic retry of failed Phase 2 tasks (`--auto-retry-failed`, off by default):
FAILED tasks whose error is passing (UNAVAILABLE, DEADLINE_EXCEEDED) are put back to
PENDING with exponential backoff, at most `max_retries` times each. The retry itself is
the store's (`Store.retry_task`, the same transaction as RetryTask), so with several
replicas a task is retried once however many of them see it due."""

from __future__ import annotations

import asyncio
import logging

from sessiond.server.domain import transitions as tr
from sessiond.server.domain.errors import FailedPrecondition, NotFound, SessiondError
from sessiond.server.domain.rules import utcnow
from sessiond.server.store.base import Store

log = logging.getLogger(__name__)


class AutoRetry:
    def __init__(self, store: Store, *, max_retries: int = 3, backoff_seconds: float = 30.0,
                 backoff_max_seconds: float = 900.0, interval_seconds: float = 5.0) -> None:
        if max_retries < 1:
            raise ValueError("--auto-retry-max must be at least 1")
        if backoff_seconds <= 0 or backoff_max_seconds < backoff_seconds:
            raise ValueError("--auto-retry-backoff must be > 0 and at most "
                             "--auto-retry-backoff-max")
        self.store = store
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.interval_seconds = interval_seconds

    async def run_once(self) -> int:
        """Retry every task that is due now; how many were retried."""
        now = utcnow()
        retried = 0
        for task in await self.store.auto_retry_candidates(tr.AUTO_RETRY_CODES,
                                                           self.max_retries):
            if not tr.auto_retry_due(task, now, self.max_retries, self.backoff_seconds,
                                     self.backoff_max_seconds):
                continue
            try:
                await self.store.retry_task(task.identity, task.task_id, now, automatic=True)
            except (FailedPrecondition, NotFound):
                continue  # another replica or a client retried it, or it is gone
            retried += 1
            log.info("automatic retry %d of task %s (%s)", task.retries + 1, task.task_id,
                     task.error.reason if task.error else "")
        return retried

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except SessiondError as exc:
                log.warning("automatic retry of failed tasks failed: %s", exc)
            except Exception:
                log.exception("automatic retry of failed tasks failed")
            await asyncio.sleep(self.interval_seconds)
