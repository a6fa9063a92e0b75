"""The Phase 2 worker: claims runnable tasks from the store, runs them with a renewed
lease, resumes what a crash left behind, and stops at stage boundaries on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from datetime import timedelta

from sessiond.server.domain.errors import SessiondError
from sessiond.server.domain.rules import utcnow
from sessiond.server.domain.values import TASK_TYPE_REVERT, Task
from sessiond.server.embedders.base import Embedder
from sessiond.server.phase2.engines.base import Phase2Engine
from sessiond.server.phase2.gate import FairGate, bind, shorten_switch_interval
from sessiond.server.phase2.pipeline import Phase2Pipeline
from sessiond.server.phase2.revert import ArchiveReverter
from sessiond.server.store.base import Store, background_writes, relaxed_commits

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Phase2Worker:
    def __init__(self, store: Store, engine: Phase2Engine, *, concurrency: int = 4,
                 lease_seconds: float = 30.0, poll_seconds: float = 1.0,
                 secrets: tuple[str, ...] = (), worker_id: str | None = None,
                 embedder: Embedder | None = None, per_identity: int = 0,
                 relaxed: bool = True, cpu_slots: int = 1) -> None:
        self.store = store
        self.engine = engine
        self.concurrency = concurrency
        # Tasks one identity may run at once (0: no cap); see Store.claim_task.
        self.per_identity = per_identity
        # Whether the worker's writes may commit before they reach the disk (a power
        # loss can undo the last of them, and they are redone; store.base.RELAXED).
        self.relaxed = relaxed
        # Phase 2's CPU-bound work (engine calls, index entries, writes) holds one of
        # `cpu_slots` slots, granted fairly by identity (phase2/gate.py); 0: no gate.
        # Its threads: one per running task can wait at a checkpoint, plus spares.
        self.gate = (FairGate(cpu_slots, threads=max(64, 2 * concurrency))
                     if cpu_slots > 0 else None)
        self.lease = timedelta(seconds=lease_seconds)
        self.poll_seconds = poll_seconds
        self.worker_id = worker_id or new_worker_id()
        self._stopping = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self.pipeline = Phase2Pipeline(store, engine, self.worker_id,
                                       should_stop=lambda: self._stopping, secrets=secrets,
                                       embedder=embedder,
                                       cancel_poll_seconds=poll_seconds)
        self.reverter = ArchiveReverter(store, self.worker_id, embedder, secrets)
        store.add_work_listener(self.wake)

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        if self.gate is not None:
            shorten_switch_interval()  # gate threads yield the GIL to the loop promptly
        if self.store.single_process:
            released = await self.store.release_all_leases()
            if released:
                log.info("resuming %d unfinished Phase 2 task(s) left by the last run", released)
        self._loop_task = asyncio.create_task(self._loop(), name="phase2-worker")

    async def _loop(self) -> None:
        with relaxed_commits(self.relaxed):  # the claims; tasks inherit the context
            await self._claim_loop()

    async def _claim_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                while len(self._running) < self.concurrency and not self._stopping:
                    now = utcnow()
                    task, more = await self.store.claim_next_task(
                        self.worker_id, now, now + self.lease, announce=True,
                        max_running_per_identity=self.per_identity)
                    if task is not None:
                        self._running[task.task_id] = asyncio.create_task(
                            self._run(task), name=f"phase2-{task.task_id}")
                    if not more:
                        break  # new work wakes the loop (or the poll finds it)
            except SessiondError as exc:
                log.warning("claiming Phase 2 work failed: %s", exc)
            except Exception:
                log.exception("claiming Phase 2 work failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)

    async def _run(self, task: Task) -> None:
        ident = task.identity
        key = f"{ident.account}/{ident.user}/{ident.agent}"
        with background_writes(key), bind(self.gate, key):
            await self._run_task(task)

    async def _run_task(self, task: Task) -> None:
        renew = asyncio.create_task(self._renew(task.task_id))
        try:
            try:
                if task.task_type == TASK_TYPE_REVERT:
                    finished = await self.reverter.run(task)
                else:
                    finished = (await self.pipeline.run(task, announced=True)).finished
            finally:
                # Stop renewing first, so no renewal in flight can land after the hand-back.
                renew.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renew
            if not finished:
                # Shutdown or store outage: hand the task back now instead of making
                # another worker wait for the lease to expire.
                with contextlib.suppress(Exception):
                    await self.store.renew_lease(task.task_id, self.worker_id,
                                                 utcnow() - timedelta(seconds=1))
        finally:
            full = len(self._running) >= self.concurrency
            self._running.pop(task.task_id, None)
            if full:
                self._wake.set()  # a slot is free: claim what waited for one

    async def _renew(self, task_id: str) -> None:
        interval = max(self.lease.total_seconds() / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await self.store.renew_lease(task_id, self.worker_id, utcnow() + self.lease)
            except Exception as exc:
                log.warning("renewing the lease of %s failed: %s", task_id, exc)
                continue
            if not ok:
                return

    @property
    def running(self) -> int:
        return len(self._running)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; running tasks stop at their next stage boundary."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._running:
            _, pending = await asyncio.wait(list(self._running.values()), timeout=grace)
            for t in pending:
                t.cancel()
        if self.gate is not None:
            self.gate.close()
