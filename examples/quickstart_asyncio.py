"""The worked example with asyncio: `grpc.aio` stubs on `aio_connect`, the watch with
`aio_watch_task`, and many sessions written concurrently.

    .venv/bin/python examples/quickstart_asyncio.py [host:port]

tests/test_examples.py runs it against a real server."""

from __future__ import annotations

import asyncio
import sys

from sessiond.client import aio_connect, aio_watch_task
from sessiond.v1 import memory_pb2, memory_pb2_grpc, session_pb2, session_pb2_grpc, task_pb2

TARGET = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"

CONVERSATION = [
    (session_pb2.ROLE_USER, "Hi, my name is Grace. I prefer detailed answers."),
    (session_pb2.ROLE_ASSISTANT, "Noted. What are we looking at?"),
    (session_pb2.ROLE_USER, "The nightly build of project Borealis fails with a disk full error."),
    (session_pb2.ROLE_ASSISTANT, "Prune the build cache before each run and retry."),
]


def text(t: str) -> list[session_pb2.Part]:
    return [session_pb2.Part(text=session_pb2.TextPart(text=t))]


async def converse(sessions: session_pb2_grpc.SessionServiceAsyncStub, sid: str) -> str:
    await sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid, auto_create=True))
    for role, line in CONVERSATION:  # in order within a session
        await sessions.AddMessage(session_pb2.AddMessageRequest(
            session_id=sid, role=role, parts=text(line)))
    reply = await sessions.Commit(session_pb2.CommitRequest(session_id=sid))
    return reply.task_id


async def main() -> None:
    async with aio_connect(TARGET) as channel:
        sessions = session_pb2_grpc.SessionServiceStub(channel)
        # Three sessions at once: the calls interleave on one channel.
        task_ids = await asyncio.gather(*(converse(sessions, f"async-demo-{i}") for i in range(3)))
        print("accepted", *task_ids)
        for task_id in task_ids:
            async for event in aio_watch_task(channel, task_id, timeout=60):
                print(task_id, event.seq, task_pb2.TaskEventKind.Name(event.kind), event.stage)
        meta = await sessions.GetSession(session_pb2.GetSessionRequest(session_id="async-demo-0"))
        print("memories:", meta.memories_extracted.total, "commits:", meta.commit_count)
        memories = memory_pb2_grpc.MemoryServiceStub(channel)
        answer = await memories.Recall(memory_pb2.RecallRequest(
            query="why does the Borealis build fail?", session_id="async-demo-0",
            max_chars=2000))
        for item in answer.items:
            print(memory_pb2.RecallKind.Name(item.kind), item.archive_uri, item.text)


if __name__ == "__main__":
    asyncio.run(main())
