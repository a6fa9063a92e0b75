"""--auth none is loopback-only unless explicitly opened, and says so at start."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from sessiond.client import connect
from sessiond.server.auth.policy import AuthSettings, is_loopback

from tests.certs import CA
from tests.conftest import Running, ServerFactory
from tests.faults.harness import FAST_ARGS, ServerProcess, free_port
from tests.security.helpers import SECRET, get_session, jwt_auth, stubs, tls_settings, token


def test_loopback_detection() -> None:
    for a in ("127.0.0.1:1", "127.1.2.3:0", "[::1]:5", "localhost:9", "unix:/tmp/s"):
        assert is_loopback(a), a
    for a in ("0.0.0.0:1", "[::]:1", "10.0.0.1:1", "example.com:1", ":50051"):
        assert not is_loopback(a), a


def test_auth_none_refuses_remote_addresses(server_factory: ServerFactory,
                                            tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without authentication"):
        server_factory(tmp_path / "a", address="0.0.0.0:0")
    opened = server_factory(tmp_path / "b", address="0.0.0.0:0",
                            auth=AuthSettings(allow_unauthenticated_remote=True))
    assert get_session(stubs(opened.channel)).session_id == "s1"
    assert "remote callers allowed" in opened.app.security.describe()
    (tmp_path / "secret").write_bytes(SECRET)
    server_factory(tmp_path / "c", address="0.0.0.0:0",
                   auth=jwt_auth(secret_file=str(tmp_path / "secret")))
    ca = CA()
    cert, key = ca.server().write(tmp_path / "tls", "server")
    (tmp_path / "tls" / "ca.pem").write_bytes(ca.pem)
    mtls = server_factory(tmp_path / "d", address="0.0.0.0:0", tls=tls_settings(
        cert, key, client_ca=str(tmp_path / "tls" / "ca.pem"), client_identity=True))
    pem = ca.client("x", "sessiond://acme")
    with connect(mtls.target, root_certificates=ca.pem, client_cert=pem.cert,
                 client_key=pem.key) as ch:
        assert get_session(stubs(ch)).session_id == "s1"


def test_serve_says_it_is_unauthenticated(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", extra_args=[*FAST_ARGS, "--log-level", "INFO"])
    proc.start()
    try:
        with grpc.insecure_channel(proc.target) as ch:
            assert get_session(stubs(ch)).session_id == "s1"
        assert "auth none: calls are NOT authenticated" in proc.log_tail()
        assert "loopback only" in proc.log_tail()
    finally:
        proc.close()
    out = subprocess.run([sys.executable, "-m", "sessiond.server.cli", "serve", "--address",
                          f"0.0.0.0:{free_port()}", "--data-dir", str(tmp_path / "d2")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert "--allow-unauthenticated-remote" in out.stderr


def _outward_ip() -> str | None:
    """An address of this machine that is not loopback (None if there is none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
        except OSError:
            return None
        ip = str(s.getsockname()[0])
    return None if ip.startswith("127.") else ip


def test_credentials_are_not_sent_in_plaintext(server_factory: ServerFactory,
                                               tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        connect("127.0.0.1:1", api_key="sessiond_x")
    with pytest.raises(ValueError, match="not both"):
        connect("127.0.0.1:1", api_key="a", token="b", tls=True)
    ip = _outward_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    (tmp_path / "secret").write_bytes(SECRET)
    srv = server_factory(address="0.0.0.0:0", auth=jwt_auth(secret_file=str(tmp_path / "secret")))
    with connect(f"127.0.0.1:{srv.port}", token=token(), plaintext_loopback=True) as ch:
        assert get_session(stubs(ch)).session_id == "s1"
    # the same server through a non-loopback address: gRPC's local credentials refuse
    # to connect, so the token never leaves in plaintext
    with connect(f"{ip}:{srv.port}", token=token(), plaintext_loopback=True) as ch:
        with pytest.raises(grpc.RpcError) as err:
            get_session(stubs(ch), "s1", auto_create=False)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"{ip}:{srv.port}") as plain:  # reachable without a token
        with pytest.raises(grpc.RpcError) as err:
            get_session(stubs(plain))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_every_rpc_has_a_scope() -> None:
    """A new RPC must be classified in api/authz.SCOPES (else it needs admin)."""
    from sessiond.server.api.authz import SCOPES
    from sessiond.v1 import memory_pb2, server_pb2, session_pb2, task_pb2

    methods = {f"/{svc.full_name}/{m.name}"
               for mod in (session_pb2, task_pb2, memory_pb2, server_pb2)
               for svc in mod.DESCRIPTOR.services_by_name.values() for m in svc.methods}
    assert methods == set(SCOPES)


def test_auth_none_ignores_a_proxys_authorization_header(server: Running) -> None:
    s = stubs(server.channel)
    assert get_session(s, "p", (("authorization", "Basic dXNlcjpwdw=="),)).session_id == "p"
    assert get_session(s, "p", (("authorization", "Bearer whatever"),),
                       auto_create=False).session_id == "p"
