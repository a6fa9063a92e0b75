"""TLS on the listening port: certificates made by the test, reloaded on file change
and on SIGHUP while open connections (and a running WatchTask stream) carry on."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from sessiond.client import connect
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import GatedEngine, add
from tests.certs import CA
from tests.conftest import ServerFactory
from tests.faults.harness import FAST_ARGS, ServerProcess
from tests.security.helpers import fails, get_session, stubs, tls_settings


def _can_connect(target: str, roots: bytes) -> bool:
    with connect(target, root_certificates=roots) as ch:
        try:
            get_session(stubs(ch), "probe")
            return True
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            return False


def _wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_tls_serves_and_refuses_plaintext(server_factory: ServerFactory,
                                          tmp_path: Path) -> None:
    ca = CA()
    cert, key = ca.server().write(tmp_path / "tls", "server")
    srv = server_factory(tls=tls_settings(cert, key))
    with connect(srv.target, root_certificates=ca.pem) as ch:
        assert get_session(stubs(ch)).session_id == "s1"
    with connect(srv.target) as plain:  # plaintext client to a TLS port
        fails(lambda: get_session(stubs(plain)), grpc.StatusCode.UNAVAILABLE)
    other = CA()  # a client that does not trust the server's CA
    assert not _can_connect(srv.target, other.pem)
    assert "TLS" in srv.app.security.describe()


def test_certificate_rotation_keeps_open_connections(server_factory: ServerFactory,
                                                     tmp_path: Path) -> None:
    old_ca, new_ca = CA("old CA"), CA("new CA")
    cert, key = old_ca.server().write(tmp_path / "tls", "server")
    engine = GatedEngine()
    srv = server_factory(engine=engine, tls=tls_settings(cert, key, reload_seconds=0.2))
    ch = connect(srv.target, root_certificates=old_ca.pem)
    s = stubs(ch)
    get_session(s, "rot")
    add(s.sessions, "rot", "I prefer tea.")
    task_id = s.sessions.Commit(session_pb2.CommitRequest(session_id="rot")).task_id
    watch = s.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=task_id), timeout=60)
    first = next(watch)
    assert first.WhichOneof("kind") in ("snapshot", "event", "heartbeat")
    assert engine.entered.wait(10)

    # rotate: write the new pair (the poll loop picks it up)
    new = new_ca.server("rotated")
    (tmp_path / "tls" / "server.key").write_bytes(new.key)
    (tmp_path / "tls" / "server.crt").write_bytes(new.cert)
    _wait_for(lambda: _can_connect(srv.target, new_ca.pem))
    assert srv.app.security.tls is not None and srv.app.security.tls.reloads == 1
    assert not _can_connect(srv.target, old_ca.pem)  # new handshakes use the new cert

    # the connection made before the rotation is still up: the stream goes on
    beats = [next(watch) for _ in range(2)]
    assert all(b.WhichOneof("kind") for b in beats)
    assert get_session(s, "rot", auto_create=False).session_id == "rot"
    engine.release()
    kinds = [i.event.kind for i in watch if i.WhichOneof("kind") == "event"]
    assert kinds[-1] == task_pb2.TASK_EVENT_KIND_COMPLETED
    ch.close()


def test_broken_new_files_keep_the_old_certificate(server_factory: ServerFactory,
                                                   tmp_path: Path) -> None:
    ca = CA()
    cert, key = ca.server().write(tmp_path / "tls", "server")
    srv = server_factory(tls=tls_settings(cert, key, reload_seconds=3600))
    other = CA().server()
    cert.write_bytes(other.cert)  # a certificate whose key is not in the key file
    srv.app.reload()  # what SIGHUP does
    assert srv.app.security.tls is not None and srv.app.security.tls.reloads == 0
    assert _can_connect(srv.target, ca.pem)
    key.write_bytes(b"not a key")
    srv.app.reload()
    assert _can_connect(srv.target, ca.pem)


def test_sighup_reloads_a_running_server(tmp_path: Path) -> None:
    old_ca, new_ca = CA("old CA"), CA("new CA")
    cert, key = old_ca.server().write(tmp_path / "tls", "server")
    creds = grpc.ssl_channel_credentials(old_ca.pem)
    proc = ServerProcess(tmp_path / "data", credentials=creds, extra_args=[
        *FAST_ARGS, "--tls-cert", str(cert), "--tls-key", str(key),
        "--tls-reload-seconds", "3600"])
    proc.start()
    try:
        with connect(proc.target, root_certificates=old_ca.pem) as ch:
            s = stubs(ch)
            get_session(s, "before")
            new = new_ca.server()
            key.write_bytes(new.key)
            cert.write_bytes(new.cert)
            time.sleep(0.3)
            assert not _can_connect(proc.target, new_ca.pem)  # no poll: waits for SIGHUP
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGHUP)
            _wait_for(lambda: _can_connect(proc.target, new_ca.pem))
            assert proc.alive()
            assert get_session(s, "before", auto_create=False).session_id == "before"
    finally:
        proc.close()


def test_tls_flags_must_be_complete(server_factory: ServerFactory, tmp_path: Path) -> None:
    ca = CA()
    cert, _ = ca.server().write(tmp_path / "tls", "server")
    with pytest.raises(ValueError, match="go together"):
        server_factory(tls=tls_settings(cert, ""))
