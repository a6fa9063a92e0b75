from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sessiond.v1 import session_pb2

from tests.api.helpers import add, text_part
from tests.conftest import Running, ServerFactory


def details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo | None,
                                          error_details_pb2.BadRequest | None]:
    st = rpc_status.from_call(err)  # type: ignore[arg-type]
    info = bad = None
    for d in st.details if st else []:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
    return info, bad


def test_get_session_missing_is_not_found_unless_auto_create(server: Running) -> None:
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.GetSession(session_pb2.GetSessionRequest(session_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    info, _ = details(err.value)
    assert info is not None and info.reason == "SESSION_NOT_FOUND" and info.domain == "sessiond.v1"
    s = server.sessions.GetSession(session_pb2.GetSessionRequest(session_id="nope",
                                                                 auto_create=True))
    assert s.session_id == "nope" and s.message_count == 0


def test_create_duplicate_and_server_chosen_id(server: Running) -> None:
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="a"))
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="a"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    s = server.sessions.CreateSession(session_pb2.CreateSessionRequest())
    assert s.session_id.startswith("ses_")


def test_invalid_input_gets_field_violations(server: Running) -> None:
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="bad id!"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = details(err.value)
    assert bad is not None and bad.field_violations[0].field == "session_id"
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="s"))
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.AddMessage(session_pb2.AddMessageRequest(session_id="s",
                                                                 parts=[text_part("x")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # role missing
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.AddMessage(session_pb2.AddMessageRequest(
            session_id="s", role=session_pb2.ROLE_USER))
    _, bad = details(err.value)
    assert bad is not None and bad.field_violations[0].field == "parts"
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.Commit(session_pb2.CommitRequest(session_id="s", keep_recent_count=-1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.ListSessions(session_pb2.ListSessionsRequest(page_token="%%%"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_add_message_to_missing_session_is_not_found(server: Running) -> None:
    with pytest.raises(grpc.RpcError) as err:
        add(server.sessions, "missing", "hi")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_sessions_pages_and_delete(server: Running) -> None:
    for i in range(5):
        server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id=f"s{i}"))
    seen: list[str] = []
    token = ""
    while True:
        page = server.sessions.ListSessions(session_pb2.ListSessionsRequest(page_size=2,
                                                                            page_token=token))
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"s{i}" for i in range(5)]
    server.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id="s1"))
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.GetSession(session_pb2.GetSessionRequest(session_id="s1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id="s1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_messages_parts_and_tool_update(server: Running) -> None:
    server.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="t"))
    msg = server.sessions.AddMessage(session_pb2.AddMessageRequest(
        session_id="t", role=session_pb2.ROLE_ASSISTANT, parts=[
            text_part("let me look"),
            session_pb2.Part(context=session_pb2.ContextPart(
                uri="mem://a", context_type=session_pb2.CONTEXT_TYPE_MEMORY, abstract="A")),
            session_pb2.Part(tool=session_pb2.ToolPart(
                tool_id="call1", tool_name="grep", skill_uri="skill://search", input='{"q":1}',
                status=session_pb2.TOOL_STATUS_RUNNING))])).message
    assert msg.id.startswith("msg_") and msg.seq == 1
    upd = server.sessions.UpdateToolPart(session_pb2.UpdateToolPartRequest(
        session_id="t", message_id=msg.id, tool_id="call1", output="found",
        status=session_pb2.TOOL_STATUS_COMPLETED))
    tool = upd.parts[2].tool
    assert tool.output == "found" and tool.status == session_pb2.TOOL_STATUS_COMPLETED
    assert tool.input == '{"q":1}' and upd.parts[1].context.uri == "mem://a"
    with pytest.raises(grpc.RpcError) as err:
        server.sessions.UpdateToolPart(session_pb2.UpdateToolPartRequest(
            session_id="t", message_id=msg.id, tool_id="nope", output="x",
            status=session_pb2.TOOL_STATUS_ERROR))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    ctx = server.sessions.GetSessionContext(session_pb2.GetSessionContextRequest(session_id="t"))
    assert ctx.current_messages[0].parts[2].tool.output == "found"


def test_record_usage_persists_across_restart(server_factory: ServerFactory,
                                             tmp_path: Path) -> None:
    data = tmp_path / "d"
    r = server_factory(data_dir=data)
    r.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="u"))
    n = r.sessions.RecordUsage(session_pb2.RecordUsageRequest(
        session_id="u", context_uris=["res://doc1"],
        skill=session_pb2.SkillUsage(uri="skill://x", input="i", output="o", success=True)))
    assert n.pending_usage_count == 1
    r.loop.run(r.app.stop(0.5))
    r.app._stopped_by_test = True  # type: ignore[attr-defined]
    r2 = server_factory(data_dir=data)
    n2 = r2.sessions.RecordUsage(session_pb2.RecordUsageRequest(session_id="u",
                                                                context_uris=["res://doc2"]))
    assert n2.pending_usage_count == 2
    with pytest.raises(grpc.RpcError) as err:
        r2.sessions.RecordUsage(session_pb2.RecordUsageRequest(session_id="u"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
