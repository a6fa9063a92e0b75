"""ServerService: which sessiond this is (version, API, schema, engine, store kind, and
the process that answered)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import grpc
from sessiond.server.api.errors import unary
from sessiond.v1 import server_pb2, server_pb2_grpc


@dataclass(frozen=True, slots=True)
class ServerInfo:
    version: str
    schema_version: int
    engine: str
    store: str  # "sqlite" or "postgresql"


class ServerServicer(server_pb2_grpc.ServerServiceServicer):
    def __init__(self, info: ServerInfo) -> None:
        self.reply = server_pb2.GetServerInfoResponse(
            version=info.version, api="sessiond.v1", schema_version=info.schema_version,
            engine=info.engine, store=info.store, process_id=os.getpid())

    @unary
    async def GetServerInfo(self, request: server_pb2.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext[Any, Any]
                            ) -> server_pb2.GetServerInfoResponse:
        return self.reply
