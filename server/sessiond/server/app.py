"""The composition root: one sessiond process. Builds the store and the Phase 2 engine
from `Settings`, the services, the worker and the gRPC server (`api/server.py`), and
runs the background loops (retention sweeps, store health)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from sessiond.server.api.security import Security
from sessiond.server.api.server import Health, build_server
from sessiond.server.api.server_info import ServerInfo
from sessiond.server.config import Settings
from sessiond.server.domain.rules import utcnow
from sessiond.server.embedders import build_embedder
from sessiond.server.embedders.base import Embedder
from sessiond.server.observability import metrics, tracing
from sessiond.server.phase2.autoretry import AutoRetry
from sessiond.server.phase2.engines.base import Phase2Engine
from sessiond.server.phase2.engines.offline import OfflineEngine
from sessiond.server.phase2.worker import Phase2Worker
from sessiond.server.redact import redact_text, redact_url
from sessiond.server.services.autocommit import IdleCommitter
from sessiond.server.services.commit import CommitService
from sessiond.server.services.hub import EventHub
from sessiond.server.services.memories import MemoryManager
from sessiond.server.services.recall import RecallService
from sessiond.server.services.sessions import SessionManager
from sessiond.server.services.tasks import TaskManager
from sessiond.server.store.base import Store
from sessiond.server.store.sql.schema import SCHEMA_VERSION
from sessiond.server.store.sql.store import SqlStore
from sessiond.server.version import version

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a background task's exception as seen (no 'never retrieved' warning)."""
    if not task.cancelled():
        task.exception()


def build_store(settings: Settings) -> Store:
    if settings.store in ("", "sqlite"):
        from sessiond.server.store.sqlite.store import SqliteStore

        return SqliteStore(settings.data_dir, synchronous=settings.sqlite_synchronous)
    if settings.store.startswith(("postgresql://", "postgres://")):
        from sessiond.server.store.postgres.store import PostgresStore

        return PostgresStore(settings.store, min_size=settings.pg_pool_min,
                             max_size=settings.pg_pool_max, channel=settings.pg_channel)
    raise ValueError(f"unknown store {redact_url(settings.store)!r}: use 'sqlite' or a "
                     "postgresql:// URL")


def build_engine(settings: Settings) -> tuple[Phase2Engine, tuple[str, ...]]:
    """The Phase 2 engine and the secrets that must never appear in task errors."""
    if settings.engine == "offline":
        return OfflineEngine(), ()
    if settings.engine == "openai":
        from sessiond.server.phase2.engines.openai import build_llm_engine

        return build_llm_engine(settings.llm)
    raise ValueError(f"unknown engine {settings.engine!r}: use 'offline' or 'openai'")


class App:
    """One sessiond process."""

    def __init__(self, settings: Settings, store: Store | None = None,
                 engine: Phase2Engine | None = None,
                 embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else build_store(settings)
        self._store_kind = type(self.store).__name__
        self.store.auto_commit_default = settings.auto_commit
        if isinstance(self.store, SqlStore):
            self.store.vector_cache_bytes = settings.embedder.cache_mb * 1024 * 1024
        if settings.observe.metrics_address:
            # Time every store operation (sessiond_store_operation_duration_seconds).
            self.store = cast(Store, metrics.TimedStore(self.store))
        secrets: tuple[str, ...] = ()
        if engine is None:
            engine, secrets = build_engine(settings)
        self.engine = engine
        if embedder is None:
            embedder, more = build_embedder(settings.embedder)
            secrets += more
        self.embedder = embedder
        self.hub = EventHub()
        self.store.add_event_listener(self.hub.publish)
        self.store.add_remote_event_listener(self.hub.poke)
        limits = settings.limits
        limits.validate()
        self.store.limits = limits
        self.sessions = SessionManager(self.store, limits)
        self.commits = CommitService(self.store, limits)
        self.memories = MemoryManager(self.store, limits)
        self.recall = RecallService(self.store, self.embedder, limits)
        # A single-process store publishes every event in-process, so idle watches only
        # need the polling fallback (a store read) at heartbeat pace.
        watch_poll = (max(settings.poll_seconds, settings.heartbeat_seconds)
                      if self.store.single_process else settings.poll_seconds)
        self.tasks = TaskManager(self.store, self.hub,
                                 heartbeat_seconds=settings.heartbeat_seconds,
                                 poll_seconds=watch_poll, limits=limits)
        self.worker = Phase2Worker(self.store, self.engine,
                                   concurrency=settings.worker_concurrency,
                                   lease_seconds=settings.lease_seconds,
                                   poll_seconds=settings.poll_seconds, secrets=secrets,
                                   embedder=self.embedder,
                                   per_identity=settings.worker_per_identity,
                                   relaxed=settings.phase2_sync == "relaxed",
                                   cpu_slots=settings.phase2_cpu_slots)
        self.auto_retry = (AutoRetry(self.store, max_retries=settings.auto_retry_max,
                                     backoff_seconds=settings.auto_retry_backoff_seconds,
                                     backoff_max_seconds=settings.auto_retry_backoff_max_seconds,
                                     interval_seconds=settings.auto_retry_interval_seconds)
                           if settings.auto_retry_failed else None)
        self.idle_commits = IdleCommitter(self.store,
                                          interval_seconds=settings.auto_commit_scan_seconds)
        self.security = Security(settings, self.store)
        self.health = Health()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._background: list[asyncio.Task[None]] = []
        self._serving = False
        self._metrics_http: Any = None
        self.metrics_port = 0

    async def start(self) -> int:
        await self.store.open()
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.settings.observe.otel_exporter != "none":
            tracing.configure(self.settings.observe)
        interceptors.extend(tracing.server_interceptors())
        if self.settings.observe.metrics_address:
            self._metrics_http, self.metrics_port = metrics.serve(
                self.settings.observe.metrics_address)
            interceptors.append(metrics.MetricsInterceptor())
        server, self.port = build_server(self.settings, self.sessions, self.commits,
                                         self.tasks, self.memories, self.recall, self.health,
                                         self.security, interceptors, self.info())
        await server.start()
        self.server = server
        await self.worker.start()
        await self._set_serving(True)
        self._background.append(asyncio.create_task(self._sweep_loop(), name="retention"))
        self._background.append(asyncio.create_task(self._health_loop(), name="store-health"))
        self._background.extend(self.security.background())
        if self._metrics_http is not None:
            self._background.append(asyncio.create_task(self._queue_gauges_loop(),
                                                        name="queue-gauges"))
        self._background.append(asyncio.create_task(self.idle_commits.run(),
                                                    name="idle-auto-commit"))
        if self.auto_retry is not None:
            self._background.append(asyncio.create_task(self.auto_retry.run(),
                                                        name="auto-retry"))
        host = self.settings.address.rsplit(":", 1)[0]
        log.info("sessiond listening on %s:%d (store %s, engine %s, embedder %s; %s)", host,
                 self.port, self._store_kind, self.engine.name,
                 self.embedder.model if self.embedder is not None else "none",
                 self.security.describe())
        return self.port

    def info(self) -> ServerInfo:
        """What GetServerInfo answers."""
        store = "sqlite" if self.settings.store in ("", "sqlite") else "postgresql"
        return ServerInfo(version=version(), schema_version=SCHEMA_VERSION,
                          engine=self.engine.name, store=store)

    def reload(self) -> None:
        """SIGHUP: re-read TLS certificates and token keys (open connections stay)."""
        self.security.reload()

    async def _set_serving(self, serving: bool) -> None:
        self._serving = serving
        await self.health.set(serving)

    async def _health_loop(self) -> None:
        # The ping runs as its own task and is not cancelled on timeout: on a silent
        # network a cancelled asyncpg query unwinds only at its own timeouts (10-15 s),
        # and asyncio.wait_for would wait for that. A ping still pending counts as a
        # failure; no second one starts until it ends.
        probe: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(2.0)
                if probe is None or probe.done():
                    probe = asyncio.create_task(self.store.ping(), name="store-ping")
                    probe.add_done_callback(_retrieve)
                done, _ = await asyncio.wait({probe}, timeout=5.0)
                ok = bool(done) and not probe.cancelled() and probe.exception() is None
                if ok != self._serving:
                    log.warning("store %s; health %s", "is back" if ok else "unreachable",
                                "SERVING" if ok else "NOT_SERVING")
                    await self._set_serving(ok)
        finally:
            if probe is not None:
                probe.cancel()

    async def sweep_once(self) -> int:
        s, now = self.settings, utcnow()
        res = await self.store.sweep(
            now, now - timedelta(hours=s.completed_retention_hours),
            now - timedelta(hours=s.failed_retention_hours), s.max_stored_tasks,
            now - timedelta(hours=s.request_id_retention_hours))
        if res.tasks_removed or res.request_ids_removed:
            log.info("retention removed %d task(s), %d request id(s)", res.tasks_removed,
                     res.request_ids_removed)
        return res.tasks_removed

    async def _queue_gauges_loop(self) -> None:
        while True:
            try:
                depth, oldest = await self.store.queue_stats()
                age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
                metrics.set_queue(depth, age)
            except Exception as exc:
                log.warning("reading the queue gauges failed: %s", exc)
            await asyncio.sleep(self.settings.observe.metrics_interval_seconds)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception as exc:
                log.warning("retention sweep failed: %s", redact_text(str(exc)))
            await asyncio.sleep(self.settings.sweep_interval_seconds)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, end watches with UNAVAILABLE, let
        in-flight RPCs finish within the grace period, stop Phase 2 at a stage
        boundary (resumed on the next start), close the store."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        self.tasks.close_watches()
        for t in self._background:
            t.cancel()
        stop_server = (self.server.stop(grace) if self.server is not None
                       else asyncio.sleep(0))
        await asyncio.gather(stop_server, self.worker.stop(grace))
        await self.engine.aclose()
        if self.embedder is not None:
            await self.embedder.aclose()
        await self.store.close()
        tracing.shutdown()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
            metrics.enable(False)
