"""Helpers of the security tests: servers with TLS/auth settings, stubs over any
channel, the ErrorInfo reason of a failed call, tokens."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sessiond.server.auth.policy import AuthSettings
from sessiond.server.auth.tokens import JwtSettings
from sessiond.server.config import TlsSettings
from sessiond.v1 import memory_pb2_grpc, session_pb2, session_pb2_grpc, task_pb2_grpc

ISSUER = "https://issuer.test"
AUDIENCE = "sessiond-test"
SECRET = b"s" * 40


@dataclass
class Stubs:
    sessions: session_pb2_grpc.SessionServiceStub
    tasks: task_pb2_grpc.TaskServiceStub
    memories: memory_pb2_grpc.MemoryServiceStub


def stubs(channel: grpc.Channel) -> Stubs:
    return Stubs(session_pb2_grpc.SessionServiceStub(channel),
                 task_pb2_grpc.TaskServiceStub(channel),
                 memory_pb2_grpc.MemoryServiceStub(channel))


def reason(err: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call ("" when it has none)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo")


def fails(call: Callable[[], Any], code: grpc.StatusCode, why: str = "") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    if why:
        assert reason(err) == why, (reason(err), err.details())
    return err


class HasSessions(Protocol):
    @property
    def sessions(self) -> session_pb2_grpc.SessionServiceStub: ...


def get_session(s: HasSessions, sid: str = "s1", md: tuple[tuple[str, str], ...] = (),
                auto_create: bool = True) -> session_pb2.Session:
    return s.sessions.GetSession(session_pb2.GetSessionRequest(
        session_id=sid, auto_create=auto_create), metadata=md, timeout=10)


def jwt_auth(reflection: str = "authenticated", **jwt_overrides: Any) -> AuthSettings:
    j = JwtSettings(issuer=ISSUER, audience=AUDIENCE, **jwt_overrides)
    return AuthSettings(mode="jwt", jwt=j, reflection=reflection)


def token(key: Any = SECRET, alg: str = "HS256", kid: str | None = None,
          **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300,
                            "sub": "tester", "sessiond_account": "acme", "scope": "read write"}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": kid} if kid else None
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


def tls_settings(cert: Any, key: Any, **kw: Any) -> TlsSettings:
    return TlsSettings(cert=str(cert), key=str(key), **kw)
