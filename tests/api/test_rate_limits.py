"""Per-caller token-bucket rate limits over a real server: RESOURCE_EXHAUSTED with
ErrorInfo, RetryInfo and QuotaFailure; per identity with --auth none, per principal
with authentication; reads, writes and commits limited separately."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sessiond.server.config import RateLimitSettings
from sessiond.v1 import session_pb2, task_pb2

from tests.api.helpers import add
from tests.conftest import Running, ServerFactory
from tests.security.helpers import SECRET, bearer, jwt_auth, token

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo,
                                          error_details_pb2.QuotaFailure]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info, retry, quota = (error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo(),
                          error_details_pb2.QuotaFailure())
    found = set()
    for d in status.details:
        for msg in (info, retry, quota):
            if d.Is(msg.DESCRIPTOR):
                d.Unpack(msg)
                found.add(type(msg).__name__)
    assert found == {"ErrorInfo", "RetryInfo", "QuotaFailure"}, found
    return info, retry, quota


def _refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call()  # type: ignore[operator]
    assert exc.value.code() == EXHAUSTED, exc.value
    return exc.value


def _md(user: str) -> tuple[tuple[str, str], ...]:
    return (("x-sessiond-user", user),)


def test_writes_per_identity_with_retry_info(server_factory: ServerFactory) -> None:
    r = server_factory(rate_limits=RateLimitSettings(write=2.0, write_burst=3))
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s"),
                             metadata=_md("alice"))
    add(r.sessions, "s", "one", metadata=_md("alice"))
    add(r.sessions, "s", "two", metadata=_md("alice"))
    err = _refused(lambda: add(r.sessions, "s", "three", metadata=_md("alice")))
    info, retry, quota = _details(err)
    assert info.reason == "RATE_LIMITED" and info.domain == "sessiond.v1"
    assert info.metadata["limit"] == "write" and info.metadata["burst"] == "3"
    delay = retry.retry_delay.ToTimedelta().total_seconds()
    assert 0.05 < delay <= 0.5, delay  # 2 per second: a token within half a second
    assert quota.violations[0].subject == "identity default/alice/default"
    assert "write calls: 2/s, burst 3" == quota.violations[0].description
    assert "retry in" in (err.details() or "")
    # Reads are not limited, and another identity has buckets of its own.
    got = r.sessions.GetSession(session_pb2.GetSessionRequest(session_id="s"),
                                metadata=_md("alice"))
    assert got.message_count == 2  # the refused message was not stored
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s"),
                             metadata=_md("bob"))
    # After the advertised delay the same caller gets through again.
    time.sleep(delay)
    add(r.sessions, "s", "three", metadata=_md("alice"))


def test_commits_are_limited_as_phase2_submissions(server_factory: ServerFactory) -> None:
    r = server_factory(rate_limits=RateLimitSettings(commit=0.2, commit_burst=1))
    for sid in ("a", "b"):
        r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=sid))
        add(r.sessions, sid, "hello")
    first = r.sessions.Commit(session_pb2.CommitRequest(session_id="a"))
    assert first.task_id
    err = _refused(lambda: r.sessions.Commit(session_pb2.CommitRequest(session_id="b")))
    info, retry, _ = _details(err)
    assert info.metadata["limit"] == "commit"
    assert 4.0 < retry.retry_delay.ToTimedelta().total_seconds() <= 5.0
    # nothing was archived for the refused commit; other writes still pass
    assert r.sessions.GetSession(session_pb2.GetSessionRequest(session_id="b")).message_count == 1
    add(r.sessions, "b", "more")
    tasks = r.tasks.ListTasks(task_pb2.ListTasksRequest()).tasks
    assert [t.session_id for t in tasks] == ["a"]


def test_limits_are_per_principal_when_authenticated(server_factory: ServerFactory,
                                                     tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    r: Running = server_factory(auth=jwt_auth(secret_file=str(tmp_path / "secret")),
                                rate_limits=RateLimitSettings(read=1.0, read_burst=2))
    svc = bearer(token(sub="indexer", scope="read write act-as"))
    other = bearer(token(sub="other-service", scope="read write act-as"))

    def get(md: tuple[tuple[str, str], ...], user: str) -> session_pb2.Session:
        return r.sessions.GetSession(session_pb2.GetSessionRequest(session_id="x",
                                                                   auto_create=True),
                                     metadata=(*md, *_md(user)))

    def read(md: tuple[tuple[str, str], ...], user: str) -> object:
        return r.sessions.ListSessions(session_pb2.ListSessionsRequest(),
                                       metadata=(*md, *_md(user)))

    get(svc, "u1")  # a write (auto_create): not counted as a read
    read(svc, "u1")
    read(svc, "u2")  # acting for another user is the same principal: same bucket
    err = _refused(lambda: read(svc, "u3"))
    _, _, quota = _details(err)
    assert quota.violations[0].subject == "jwt indexer"
    read(other, "u1")  # another principal of the same account is not affected


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sessiond.server.cli import _parser, settings_from_args

    monkeypatch.setenv("SESSIOND_RATE_LIMIT_READ", "50")
    s = settings_from_args(_parser().parse_args([
        "serve", "--rate-limit-write", "5", "--rate-limit-write-burst", "10",
        "--rate-limit-commit", "0.5", "--workers-per-identity", "2"]))
    rl = s.rate_limits
    assert (rl.read, rl.read_burst, rl.write, rl.write_burst, rl.commit, rl.commit_burst) == \
        (50.0, 0, 5.0, 10, 0.5, 0)
    assert s.worker_per_identity == 2
    defaults = settings_from_args(_parser().parse_args(["serve"]))
    assert defaults.rate_limits.write == 0 and defaults.worker_per_identity == 4
