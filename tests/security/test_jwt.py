"""--auth jwt over a real server: HS256 and JWKS (RS256/ES256, reloaded on change),
every rejection reason, scopes, act-as, health and reflection."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sessiond.client import RefreshingToken, connect
from sessiond.v1 import memory_pb2, session_pb2, task_pb2

from tests.api.helpers import add
from tests.conftest import Running, ServerFactory
from tests.security.helpers import (
    SECRET,
    bearer,
    error_info,
    fails,
    get_session,
    jwt_auth,
    stubs,
    token,
)

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
def hs_server(server_factory: ServerFactory, tmp_path: Path) -> Running:
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    return server_factory(auth=jwt_auth(secret_file=str(tmp_path / "secret")))


def test_token_rejections_have_reasons(hs_server: Running) -> None:
    s = stubs(hs_server.channel)
    now = int(time.time())
    fails(lambda: get_session(s), UNAUTH, "CREDENTIALS_MISSING")
    cases: list[tuple[tuple[tuple[str, str], ...], str]] = [
        (bearer(token(exp=now - 120)), "CREDENTIALS_EXPIRED"),
        (bearer(token(aud="someone-else")), "TOKEN_WRONG_AUDIENCE"),
        (bearer(token(iss="https://evil.test")), "TOKEN_WRONG_ISSUER"),
        (bearer(token(nbf=now + 600)), "TOKEN_NOT_YET_VALID"),
        (bearer(token(key=b"k" * 40)), "CREDENTIALS_INVALID"),  # other secret
        (bearer(token(exp=None)), "CREDENTIALS_INVALID"),  # exp is required
        (bearer(token(sessiond_account=None)), "CREDENTIALS_INVALID"),
        (bearer(token(sessiond_account="not valid!")), "CREDENTIALS_INVALID"),
        (bearer("not.a.jwt"), "CREDENTIALS_INVALID"),
        (bearer(token(key=None, alg="none")), "CREDENTIALS_INVALID"),  # unsigned
        ((("authorization", "Basic dXNlcjpwdw=="),), "CREDENTIALS_INVALID"),
    ]
    for md, why in cases:
        err = fails(partial(get_session, s, "x", md), UNAUTH, why)
        info = error_info(err)
        assert info.domain == "sessiond.v1"
        assert "eyJ" not in (err.details() or "")  # the token is never echoed
    # a token within the leeway is still accepted
    assert get_session(s, "ok", bearer(token(exp=now - 5))).session_id == "ok"


def test_scopes_map_rpcs(hs_server: Running) -> None:
    s = stubs(hs_server.channel)
    rw = bearer(token())
    get_session(s, "s", rw)
    add(s.sessions, "s", "I prefer tea.", metadata=rw)
    ro = bearer(token(scope="read"))
    assert get_session(s, "s", ro, auto_create=False).message_count == 1
    s.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=ro)
    s.memories.ListMemories(memory_pb2.ListMemoriesRequest(), metadata=ro)
    err = fails(lambda: add(s.sessions, "s", "no", metadata=ro), DENIED, "SCOPE_MISSING")
    assert error_info(err).metadata["required_scope"] == "write"
    fails(lambda: get_session(s, "new", ro), DENIED, "SCOPE_MISSING")  # auto_create writes
    fails(lambda: s.sessions.Commit(session_pb2.CommitRequest(session_id="s"), metadata=ro),
          DENIED, "SCOPE_MISSING")
    # history and usage read with `read`; a revert writes
    s.memories.ListMemoryChanges(memory_pb2.ListMemoryChangesRequest(), metadata=ro)
    s.sessions.GetSessionUsage(session_pb2.GetSessionUsageRequest(session_id="s"), metadata=ro)
    fails(lambda: s.sessions.RevertArchive(session_pb2.RevertArchiveRequest(
        session_id="s", index=1), metadata=ro), DENIED, "SCOPE_MISSING")
    wo = bearer(token(scope="write"))
    fails(lambda: s.sessions.ListSessions(session_pb2.ListSessionsRequest(), metadata=wo),
          DENIED, "SCOPE_MISSING")
    fails(lambda: s.memories.ListMemoryChanges(memory_pb2.ListMemoryChangesRequest(),
                                               metadata=wo), DENIED, "SCOPE_MISSING")
    none = bearer(token(scope=None))
    fails(lambda: get_session(s, "s", none, auto_create=False), DENIED, "SCOPE_MISSING")
    admin = bearer(token(scope=["admin"]))  # a list claim works too; admin covers all
    reply = s.sessions.Commit(session_pb2.CommitRequest(session_id="s"), metadata=admin)
    list(s.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id), metadata=ro,
                           timeout=20))
    fails(lambda: list(s.tasks.WatchTask(task_pb2.WatchTaskRequest(task_id=reply.task_id),
                                         metadata=wo, timeout=20)), DENIED, "SCOPE_MISSING")
    # UpdateSessionConfig writes; WatchSession reads
    policy = session_pb2.UpdateSessionConfigRequest(
        session_id="s", auto_commit=session_pb2.AutoCommitPolicy(max_messages=9))
    fails(lambda: s.sessions.UpdateSessionConfig(policy, metadata=ro), DENIED, "SCOPE_MISSING")
    assert s.sessions.UpdateSessionConfig(policy, metadata=rw).auto_commit.max_messages == 9
    watch = s.sessions.WatchSession(session_pb2.WatchSessionRequest(session_id="s"),
                                    metadata=ro, timeout=20)
    assert next(iter(watch)).snapshot.auto_commit.max_messages == 9
    watch.cancel()
    fails(lambda: next(iter(s.sessions.WatchSession(session_pb2.WatchSessionRequest(
        session_id="s"), metadata=wo, timeout=20))), DENIED, "SCOPE_MISSING")
    # unknown sessions stay NOT_FOUND for an authorized caller
    fails(lambda: get_session(s, "nope", ro, auto_create=False), grpc.StatusCode.NOT_FOUND)


def test_identity_binding_and_act_as(hs_server: Running) -> None:
    s = stubs(hs_server.channel)
    alice = bearer(token(sessiond_user="alice"))
    get_session(s, "a", alice)
    # an account-only token acts as user "default"; it cannot pick alice
    acct = bearer(token())
    fails(lambda: get_session(s, "a", (*acct, ("x-sessiond-user", "alice"))), DENIED,
          "IDENTITY_NOT_ALLOWED")
    fails(lambda: get_session(s, "a", acct, auto_create=False), grpc.StatusCode.NOT_FOUND)
    fails(lambda: get_session(s, "a", (*alice, ("x-sessiond-agent", "planner"))), DENIED,
          "IDENTITY_NOT_ALLOWED")
    svc = bearer(token(sub="indexer", scope="read write act-as"))
    as_alice = (*svc, ("x-sessiond-user", "alice"))
    assert get_session(s, "a", as_alice, auto_create=False).session_id == "a"
    get_session(s, "b", (*as_alice, ("x-sessiond-agent", "planner")))
    fails(lambda: get_session(s, "a", (*svc, ("x-sessiond-account", "other"))), DENIED,
          "IDENTITY_NOT_ALLOWED")
    # another account's token sees nothing of acme
    other = bearer(token(sessiond_account="globex", sessiond_user="alice"))
    fails(lambda: get_session(s, "a", other, auto_create=False), grpc.StatusCode.NOT_FOUND)


def test_duplicate_headers_are_invalid_in_every_mode(
        hs_server: Running, server_factory: ServerFactory, tmp_path: Path) -> None:
    tok = bearer(token(scope="read write act-as"))
    dups = [(("x-sessiond-user", "a"), ("x-sessiond-user", "b")),
            (("x-sessiond-account", "acme"), ("x-sessiond-account", "acme")),
            (("x-sessiond-agent", "x"), ("x-sessiond-agent", "y"))]
    for srv, md in ((hs_server, tok), (server_factory(tmp_path / "open"), ())):
        s = stubs(srv.channel)
        for dup in dups:
            fails(partial(get_session, s, "d", (*md, *dup)),
                  grpc.StatusCode.INVALID_ARGUMENT, "DUPLICATE_METADATA")
    fails(lambda: get_session(stubs(hs_server.channel), "d", (*tok, *tok)),
          grpc.StatusCode.INVALID_ARGUMENT, "DUPLICATE_METADATA")


def _reflect(channel: grpc.Channel, md: tuple[tuple[str, str], ...] = ()) -> list[str]:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=md,
        timeout=10)
    return [svc.name for r in replies for svc in r.list_services_response.service]


def test_health_is_open_and_reflection_follows_the_setting(
        hs_server: Running, server_factory: ServerFactory, tmp_path: Path) -> None:
    health: Any = health_pb2_grpc.HealthStub(hs_server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    fails(lambda: _reflect(hs_server.channel), UNAUTH, "CREDENTIALS_MISSING")
    assert "sessiond.v1.SessionService" in _reflect(hs_server.channel, bearer(token()))
    secret = str(tmp_path / "secret")
    off = server_factory(tmp_path / "off", auth=jwt_auth(secret_file=secret, reflection="off"))
    fails(lambda: _reflect(off.channel, bearer(token())), grpc.StatusCode.UNIMPLEMENTED)
    on = server_factory(tmp_path / "on", auth=jwt_auth(secret_file=secret, reflection="on"))
    assert "sessiond.v1.TaskService" in _reflect(on.channel)


def _jwks(*keys: tuple[str, Any]) -> str:
    out = []
    for kid, key in keys:
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk["alg"] = "RS256"
        else:
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk["alg"] = "ES256"
        out.append({**jwk, "kid": kid, "use": "sig"})
    return json.dumps({"keys": out})


def test_jwks_rs256_es256_and_rotation(server_factory: ServerFactory, tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "jwks.json"
    jwks.write_text(_jwks(("r1", rsa_key), ("e1", ec_key)))
    srv = server_factory(auth=jwt_auth(jwks_file=str(jwks)))
    s = stubs(srv.channel)
    assert get_session(s, "r", bearer(token(rsa_key, "RS256", "r1"))).session_id == "r"
    assert get_session(s, "e", bearer(token(ec_key, "ES256", "e1"))).session_id == "e"
    fails(lambda: get_session(s, "x", bearer(token(rsa_key, "RS256", "nope"))), UNAUTH,
          "CREDENTIALS_INVALID")
    # the HS256 secret trick (public key as HMAC secret) is refused: the key decides the alg
    fails(lambda: get_session(s, "x", bearer(token(SECRET, "HS256", "r1"))), UNAUTH,
          "CREDENTIALS_INVALID")
    # rotate: a new key replaces r1 in the file; picked up without a restart
    rsa2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks.write_text(_jwks(("r2", rsa2), ("e1", ec_key)))
    deadline = time.monotonic() + 10
    new_tok = bearer(token(rsa2, "RS256", "r2"))
    while True:
        try:
            get_session(s, "r2", new_tok)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    fails(lambda: get_session(s, "x", bearer(token(rsa_key, "RS256", "r1", exp=int(
        time.time()) + 299))), UNAUTH, "CREDENTIALS_INVALID")


def test_client_token_provider_refreshes(hs_server: Running) -> None:
    issued: list[float] = []

    def fetch() -> tuple[str, float]:
        exp = time.time() + 2
        issued.append(exp)
        return token(exp=int(exp)), exp

    provider = RefreshingToken(fetch, margin=1.0)
    with connect(hs_server.target, token=provider, plaintext_loopback=True) as ch:
        s = stubs(ch)
        get_session(s, "p")
        get_session(s, "p", auto_create=False)
        assert len(issued) == 1  # cached while fresh
        time.sleep(1.2)
        get_session(s, "p", auto_create=False)
        assert len(issued) == 2  # refreshed before it expired
    with pytest.raises(ValueError, match="needs TLS"):
        connect(hs_server.target, token=provider)

    def broken() -> str:
        raise RuntimeError("identity provider down")

    with connect(hs_server.target, token=broken, plaintext_loopback=True) as ch:
        with pytest.raises(grpc.RpcError) as err:  # the call fails; nothing is sent
            get_session(stubs(ch), "p", auto_create=False)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "identity provider down" in (err.value.details() or "")


def test_identity_claims_must_match_whole(hs_server: Running) -> None:
    """A name ending in a newline is not a valid account (full match, issue 11)."""
    s = stubs(hs_server.channel)
    for bad in ("acme\n", "acme\nother"):
        fails(partial(get_session, s, md=bearer(token(sessiond_account=bad))),
              UNAUTH, "CREDENTIALS_INVALID")
    get_session(s, md=bearer(token()))
