"""AddMessages and client message ids over a real server: all or nothing, the index of
an invalid message named, duplicates answered with the stored message, replays."""

from __future__ import annotations

import grpc
import pytest
from sessiond.v1 import session_pb2

from tests.api.helpers import text_part
from tests.api.test_sessions import details
from tests.conftest import Running

S = session_pb2


def new(text: str, cid: str = "", role: S.Role.ValueType = S.ROLE_USER) -> S.NewMessage:
    return S.NewMessage(role=role, parts=[text_part(text)], client_message_id=cid)


def live(server: Running, sid: str) -> list[S.Message]:
    ctx = server.sessions.GetSessionContext(S.GetSessionContextRequest(session_id=sid))
    return list(ctx.current_messages)


def test_add_messages_in_order_with_duplicates(server: Running) -> None:
    server.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    reply = server.sessions.AddMessages(S.AddMessagesRequest(session_id="s1", messages=[
        new("Hi, I am Ada.", "m-1"), new("Hello Ada.", "m-2", S.ROLE_ASSISTANT), new("x")]))
    assert [(r.message.seq, r.duplicate) for r in reply.results] == \
        [(1, False), (2, False), (3, False)]
    assert [r.message.client_message_id for r in reply.results] == ["m-1", "m-2", ""]
    # the client re-sends after a lost reply, with one new message
    again = server.sessions.AddMessages(S.AddMessagesRequest(session_id="s1", messages=[
        new("Hi, I am Ada.", "m-1"), new("Hello Ada.", "m-2", S.ROLE_ASSISTANT),
        new("What now?", "m-3")]))
    assert [r.duplicate for r in again.results] == [True, True, False]
    assert [r.message.id for r in again.results[:2]] == \
        [r.message.id for r in reply.results[:2]]
    assert again.results[2].message.seq == 4
    assert [m.parts[0].text.text for m in live(server, "s1")] == \
        ["Hi, I am Ada.", "Hello Ada.", "x", "What now?"]
    # AddMessage honours the same ids
    one = server.sessions.AddMessage(S.AddMessageRequest(
        session_id="s1", role=S.ROLE_USER, parts=[text_part("What now?")],
        client_message_id="m-3"))
    assert one.duplicate and one.message.id == again.results[2].message.id
    fresh = server.sessions.AddMessage(S.AddMessageRequest(
        session_id="s1", role=S.ROLE_USER, parts=[text_part("Bye.")],
        client_message_id="m-4"))
    assert not fresh.duplicate and fresh.message.seq == 5
    meta = server.sessions.GetSession(S.GetSessionRequest(session_id="s1"))
    assert meta.message_count == 5


def test_an_invalid_message_stores_nothing_and_is_named(server: Running) -> None:
    server.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    bad_batches = [
        ([new("ok"), S.NewMessage(role=S.ROLE_USER), new("ok")], "messages[1].parts"),
        ([new("ok"), new("ok"), S.NewMessage(parts=[text_part("no role")])],
         "messages[2].role"),
        ([new("ok", "x" * 129)], "messages[0].client_message_id"),
        ([new("ok", "bad\nid")], "messages[0].client_message_id"),
        ([], "messages"),
        ([new("m")] * 1001, "messages"),
    ]
    for batch, field in bad_batches:
        with pytest.raises(grpc.RpcError) as err:
            server.sessions.AddMessages(S.AddMessagesRequest(session_id="s1", messages=batch))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, bad = details(err.value)
        assert bad is not None and bad.field_violations[0].field == field, bad
        assert len(str(err.value.details())) < 300
    assert live(server, "s1") == []
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.AddMessages(S.AddMessagesRequest(session_id="nope",
                                                         messages=[new("x")]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:  # another identity's session
        server.sessions.AddMessages(S.AddMessagesRequest(session_id="s1", messages=[new("x")]),
                                    metadata=(("x-sessiond-user", "mallory"),))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_add_messages_request_id_replays(server: Running) -> None:
    server.sessions.CreateSession(S.CreateSessionRequest(session_id="s1"))
    req = S.AddMessagesRequest(session_id="s1", request_id="batch-1",
                               messages=[new("one"), new("two")])
    first = server.sessions.AddMessages(req)
    replay = server.sessions.AddMessages(req)
    assert replay == first
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.AddMessages(S.AddMessagesRequest(session_id="s1", request_id="batch-1",
                                                         messages=[new("three")]))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(live(server, "s1")) == 2
