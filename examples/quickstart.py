"""The README's worked example, as a file: `.venv/bin/python examples/quickstart.py`
with a server on 127.0.0.1:50051 (`python3 tools/dev.py serve`).

tests/test_examples.py checks that this file holds the README's code verbatim and
runs it against a real server."""

from sessiond.client import connect, watch_task
from sessiond.v1 import session_pb2, session_pb2_grpc, task_pb2

channel = connect("127.0.0.1:50051")  # retries, keepalive, request ids, identity
sessions = session_pb2_grpc.SessionServiceStub(channel)

sessions.GetSession(session_pb2.GetSessionRequest(session_id="demo", auto_create=True))
for role, text in [
    (session_pb2.ROLE_USER, "Hi, my name is Ada. I prefer short answers."),
    (session_pb2.ROLE_ASSISTANT, "Noted. What are we working on?"),
    (session_pb2.ROLE_USER, "The deploy of project Atlas fails with a timeout error."),
    (session_pb2.ROLE_ASSISTANT, "Raise the health-check timeout to 30 s and redeploy."),
]:
    sessions.AddMessage(session_pb2.AddMessageRequest(
        session_id="demo", role=role,
        parts=[session_pb2.Part(text=session_pb2.TextPart(text=text))]))

reply = sessions.Commit(session_pb2.CommitRequest(session_id="demo"))
print("accepted", reply.task_id, reply.archive_uri)

for event in watch_task(channel, reply.task_id):  # resumes by itself if the stream breaks
    print(event.seq, task_pb2.TaskEventKind.Name(event.kind), event.stage, event.message)

meta = sessions.GetSession(session_pb2.GetSessionRequest(session_id="demo"))
print("memories:", meta.memories_extracted.total, "commits:", meta.commit_count)
ctx = sessions.GetSessionContext(session_pb2.GetSessionContextRequest(session_id="demo"))
print(ctx.latest_archive_overview)

from sessiond.v1 import memory_pb2, memory_pb2_grpc

memories = memory_pb2_grpc.MemoryServiceStub(channel)
answer = memories.Recall(memory_pb2.RecallRequest(
    query="why did the Atlas deploy fail?", session_id="demo", max_chars=2000))
for item in answer.items:  # archived turns (with neighbours), memories, overviews
    print(memory_pb2.RecallKind.Name(item.kind), item.archive_uri, item.text)
