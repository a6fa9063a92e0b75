"""mTLS: client certificates required, and (with --tls-client-identity) the identity
taken from the certificate's SAN URI, alone or together with a JWT."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from sessiond.client import aio_connect, connect
from sessiond.v1 import session_pb2, session_pb2_grpc

from tests.certs import CA, Pem
from tests.conftest import Running, ServerFactory
from tests.security.helpers import (
    SECRET,
    bearer,
    fails,
    get_session,
    jwt_auth,
    stubs,
    tls_settings,
    token,
)

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def _mtls_server(server_factory: ServerFactory, tmp_path: Path, ca: CA,
                 **kw: Any) -> Running:
    cert, key = ca.server().write(tmp_path / "tls", "server")
    (tmp_path / "tls" / "clients.pem").write_bytes(ca.pem)
    tls = tls_settings(cert, key, client_ca=str(tmp_path / "tls" / "clients.pem"),
                       client_identity=kw.pop("client_identity", False))
    return server_factory(tls=tls, **kw)


def _client(srv: Running, ca: CA, pem: Pem | None, **kw: Any) -> grpc.Channel:
    if pem is None:
        return connect(srv.target, root_certificates=ca.pem, **kw)
    return connect(srv.target, root_certificates=ca.pem, client_cert=pem.cert,
                   client_key=pem.key, **kw)


def test_client_certificate_is_required(server_factory: ServerFactory, tmp_path: Path) -> None:
    ca = CA()
    srv = _mtls_server(server_factory, tmp_path, ca)
    with _client(srv, ca, ca.client("svc")) as ch:
        assert get_session(stubs(ch)).session_id == "s1"
    with _client(srv, ca, None) as ch:  # no certificate: the handshake fails
        fails(lambda: get_session(stubs(ch)), grpc.StatusCode.UNAVAILABLE)
    with _client(srv, ca, CA().client("stranger")) as ch:  # signed by another CA
        fails(lambda: get_session(stubs(ch)), grpc.StatusCode.UNAVAILABLE)
    assert "mTLS" in srv.app.security.describe()


def test_identity_from_certificate_uri(server_factory: ServerFactory, tmp_path: Path) -> None:
    ca = CA()
    srv = _mtls_server(server_factory, tmp_path, ca, client_identity=True)
    alice = ca.client("alice", "sessiond://acme/alice")
    with _client(srv, ca, alice) as ch:
        s = stubs(ch)
        get_session(s, "a1")
        # the certificate fixes account and user: headers may repeat them, not change them
        get_session(s, "a1", (("x-sessiond-account", "acme"), ("x-sessiond-user", "alice")),
                    auto_create=False)
        err = fails(lambda: get_session(s, "a1", (("x-sessiond-user", "bob"),)), DENIED,
                    "IDENTITY_NOT_ALLOWED")
        assert "act-as" in (err.details() or "")
        fails(lambda: get_session(s, "a1", (("x-sessiond-account", "other"),)), DENIED,
              "IDENTITY_NOT_ALLOWED")
    # what alice created is acme/alice/default's, not default/default/default's
    with connect(srv.target, root_certificates=ca.pem, client_cert=alice.cert,
                 client_key=alice.key) as ch:
        listed = stubs(ch).sessions.ListSessions(session_pb2.ListSessionsRequest())
        assert [x.session_id for x in listed.sessions] == ["a1"]
    service = ca.client("svc", "sessiond://acme/indexer?scopes=read,write,act-as")
    with _client(srv, ca, service) as ch:
        s = stubs(ch)
        assert get_session(s, "a1", (("x-sessiond-user", "alice"),),
                           auto_create=False).session_id == "a1"
        fails(lambda: get_session(s, "a1", (("x-sessiond-account", "other"),)), DENIED)
    reader = ca.client("ro", "sessiond://acme/alice?scopes=read")
    with _client(srv, ca, reader) as ch:
        s = stubs(ch)
        assert get_session(s, "a1", auto_create=False).session_id == "a1"
        fails(lambda: get_session(s, "new"), DENIED, "SCOPE_MISSING")  # auto_create writes
    for pem in (ca.client("anon"), ca.client("two", "sessiond://a/x", "sessiond://b/y"),
                ca.client("bad", "sessiond://acme/a/b/c/d"), ca.client("sp", "spiffe://x/y")):
        with _client(srv, ca, pem) as ch:
            fails(partial(get_session, stubs(ch)), UNAUTH, "CLIENT_CERT_NO_IDENTITY")


def test_certificate_and_token_must_agree(server_factory: ServerFactory,
                                          tmp_path: Path) -> None:
    ca = CA()
    (tmp_path / "secret").write_bytes(SECRET)
    srv = _mtls_server(server_factory, tmp_path, ca, client_identity=True,
                       auth=jwt_auth(secret_file=str(tmp_path / "secret")))
    pem = ca.client("acme-svc", "sessiond://acme")
    with _client(srv, ca, pem) as ch:
        s = stubs(ch)
        fails(lambda: get_session(s), UNAUTH, "CREDENTIALS_MISSING")
        assert get_session(s, "t", bearer(token())).session_id == "t"
        fails(lambda: get_session(s, "t", bearer(token(sessiond_account="other"))), UNAUTH,
              "CLIENT_CERT_MISMATCH")
    with _client(srv, ca, pem, token=token()) as ch:  # call credentials over mTLS
        assert get_session(stubs(ch), "t", auto_create=False).session_id == "t"

    async def via_aio() -> tuple[str, int]:
        calls: list[int] = []

        def provider() -> str:
            calls.append(1)
            return token()

        async with aio_connect(srv.target, root_certificates=ca.pem, client_cert=pem.cert,
                               client_key=pem.key, token=provider) as ch:
            stub: Any = session_pb2_grpc.SessionServiceStub(ch)
            for _ in range(2):
                got = await stub.GetSession(session_pb2.GetSessionRequest(session_id="t"))
        return got.session_id, len(calls)

    assert asyncio.run(via_aio()) == ("t", 2)  # the provider is asked on every call


def test_spiffe_style_prefix(server_factory: ServerFactory, tmp_path: Path) -> None:
    ca = CA()
    cert, key = ca.server().write(tmp_path / "tls", "server")
    (tmp_path / "tls" / "clients.pem").write_bytes(ca.pem)
    srv = server_factory(tls=tls_settings(
        cert, key, client_ca=str(tmp_path / "tls" / "clients.pem"), client_identity=True,
        identity_uri_prefix="spiffe://example.org/sessiond/"))
    svid = ca.client("svid", "spiffe://example.org/sessiond/acme/indexer")
    with _client(srv, ca, svid) as ch:
        s = stubs(ch)
        get_session(s, "sp")
        fails(lambda: get_session(s, "sp", (("x-sessiond-user", "x"),)), DENIED,
              "IDENTITY_NOT_ALLOWED")
    for uri in ("sessiond://acme/indexer", "spiffe://example.org/other/acme"):
        with _client(srv, ca, ca.client("o", uri)) as ch:
            fails(partial(get_session, stubs(ch)), UNAUTH, "CLIENT_CERT_NO_IDENTITY")
