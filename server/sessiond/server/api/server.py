"""Assembly of the gRPC server: servicers, health, reflection, options. The running
process (store, engines, worker, sweeps) is composed in `sessiond.server.app`."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sessiond.server.api.decoding import DecodeGuard
from sessiond.server.api.security import Security
from sessiond.server.api.server_info import ServerInfo, ServerServicer
from sessiond.server.api.servicers import MemoryServicer, SessionServicer, TaskServicer
from sessiond.server.config import Settings
from sessiond.server.services.commit import CommitService
from sessiond.server.services.history import HistoryService
from sessiond.server.services.memories import MemoryManager
from sessiond.server.services.recall import RecallService
from sessiond.server.services.session_watch import SessionWatcher
from sessiond.server.services.sessions import SessionManager
from sessiond.server.services.tasks import TaskManager
from sessiond.v1 import (
    memory_pb2,
    memory_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

SERVICE_NAMES = (
    session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name,
    server_pb2.DESCRIPTOR.services_by_name["ServerService"].full_name,
)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Off unless this is one of the processes of `serve --processes N` (they share
        # the port); otherwise a second server on a taken port must fail to bind.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
    ]


class Health:
    """SERVING / NOT_SERVING for every service (and the server as a whole)."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()

    async def set(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *SERVICE_NAMES):
            await self.servicer.set(name, status)

    async def enter_graceful_shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()


def build_server(settings: Settings, sessions: SessionManager, commits: CommitService,
                 tasks: TaskManager, memories: MemoryManager, recall: RecallService,
                 health_: Health, security: Security,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 info: ServerInfo | None = None,
                 history: HistoryService | None = None) -> tuple[grpc.aio.Server, int]:
    """The gRPC server with every servicer, health and reflection, behind the auth
    interceptor, bound (TLS or plaintext, not started); returns it and the port
    actually bound. `interceptors` (metrics, tracing) run before the auth one, so
    they see refused calls too; DecodeGuard answers undecodable requests with
    INVALID_ARGUMENT before any servicer sees them."""
    server = grpc.aio.server(interceptors=[*interceptors, security.interceptor, DecodeGuard()],
                             options=server_options(settings))
    history = history or HistoryService(sessions.store, sessions.limits)
    session_pb2_grpc.add_SessionServiceServicer_to_server(
        SessionServicer(sessions, commits, SessionWatcher(sessions, tasks), history), server)
    task_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(tasks), server)
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(
        MemoryServicer(memories, recall, history), server)
    if info is not None:
        server_pb2_grpc.add_ServerServiceServicer_to_server(ServerServicer(info), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_.servicer, server)
    if security.reflection:
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
    port = security.bind(server, settings.address)
    if port == 0:
        raise OSError(f"cannot listen on {settings.address}")
    return server, port
