"""The asyncio helpers against a real in-process sessiond. The client runs on its own
loop (asyncio.run in the test thread); the server on the fixture's loop thread."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from sessiond.client import (
    Identity,
    ResumePolicy,
    TaskCancelled,
    TaskFailed,
    WatchTimeout,
    aio_connect,
    aio_wait_for_task,
    aio_watch_task,
)
from sessiond.v1 import task_pb2, task_pb2_grpc

from tests.client.fakes import GatedEngine, start_commit
from tests.conftest import Running, ServerFactory

QUICK = ResumePolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.3)
# Reconnect quickly after the server comes back (gRPC's default first backoff is 1 s).
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 300)]
COMPLETED = task_pb2.TASK_EVENT_KIND_COMPLETED


def _stop(running: Running) -> None:
    running.loop.run(running.app.stop(0))
    running.app._stopped_by_test = True  # type: ignore[attr-defined]


def test_aio_watch_resumes_across_server_restart(server_factory: ServerFactory,
                                                 tmp_path: Path) -> None:
    engine = GatedEngine()
    data = tmp_path / "data"
    first = server_factory(data_dir=data, engine=engine)
    port = first.port
    task_id = start_commit(first.sessions)
    assert engine.entered.wait(5)
    restarted: list[Running] = []

    def restart_later() -> None:
        time.sleep(0.3)  # the client meets a dead port for a while
        engine.gate.set()
        restarted.append(server_factory(data_dir=data, engine=engine,
                                        address=f"127.0.0.1:{port}"))

    async def scenario() -> tuple[list[task_pb2.TaskEvent], int]:
        async with aio_connect(f"127.0.0.1:{port}", options=RECONNECT) as channel:
            watch = aio_watch_task(channel, task_id, resume=QUICK, timeout=15)
            events: list[task_pb2.TaskEvent] = []
            restart: asyncio.Task[None] | None = None
            async for ev in watch:
                events.append(ev)
                if restart is None and ev.stage == "summarize":
                    # Phase 2 is stuck in summarize: kill the server under the watch.
                    await asyncio.to_thread(_stop, first)
                    restart = asyncio.create_task(asyncio.to_thread(restart_later))
            assert restart is not None
            await restart
            return events, watch.resumes

    events, resumes = asyncio.run(scenario())
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert events[-1].kind == COMPLETED and resumes >= 1
    # The server's own journal agrees with what the client saw, event for event.
    [second] = restarted
    journal = [r.event for r in second.tasks.WatchTask(
        task_pb2.WatchTaskRequest(task_id=task_id), timeout=10) if r.HasField("event")]
    assert [(e.seq, e.kind, e.stage) for e in journal] == [
        (e.seq, e.kind, e.stage) for e in events]


def test_aio_wait_for_task_completed(server: Running) -> None:
    task_id = start_commit(server.sessions)

    async def run() -> task_pb2.Task:
        async with aio_connect(server.target) as channel:
            return await aio_wait_for_task(channel, task_id, timeout=10,
                                           raise_on_failure=True)

    task = asyncio.run(run())
    assert task.task_id == task_id and task.state == task_pb2.TASK_STATE_COMPLETED
    assert task.result.memories_extracted.total > 0 and task.HasField("finished_at")


def test_aio_wait_for_task_failed(server_factory: ServerFactory) -> None:
    engine = GatedEngine(fail=True)
    engine.gate.set()
    running = server_factory(engine=engine)
    task_id = start_commit(running.sessions)

    async def run() -> tuple[task_pb2.Task, TaskFailed]:
        async with aio_connect(running.target) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            task = await aio_wait_for_task(stub, task_id, timeout=10)
            with pytest.raises(TaskFailed) as info:
                await aio_wait_for_task(stub, task_id, timeout=10, raise_on_failure=True)
            return task, info.value

    task, err = asyncio.run(run())
    assert task.state == task_pb2.TASK_STATE_FAILED  # default: returned, not raised
    assert err.task == task and "summarizer exploded" in err.status.message


def test_aio_wait_for_task_cancelled_and_watch_timeout(server_factory: ServerFactory) -> None:
    engine = GatedEngine()
    running = server_factory(engine=engine)
    task_id = start_commit(running.sessions)
    assert engine.entered.wait(5)

    async def run() -> TaskCancelled:
        async with aio_connect(running.target) as channel:
            with pytest.raises(WatchTimeout) as timed_out:
                async for _ in aio_watch_task(channel, task_id, timeout=0.5):
                    pass
            assert timed_out.value.last_seq >= 3
            stub = task_pb2_grpc.TaskServiceStub(channel)
            waiter = asyncio.create_task(
                aio_wait_for_task(stub, task_id, timeout=10, raise_on_failure=True))
            await stub.CancelTask(task_pb2.CancelTaskRequest(task_id=task_id))
            engine.gate.set()  # the stage finishes; the cancel is honoured at its end
            with pytest.raises(TaskCancelled) as info:
                await waiter
            return info.value

    err = asyncio.run(run())
    assert err.task.state == task_pb2.TASK_STATE_CANCELLED and err.task.cancel_requested


def test_aio_identity_isolation(server: Running) -> None:
    async def run() -> None:
        async with aio_connect(server.target, identity=Identity("acme", "bob", "bot")) as ch:
            task_id = await _aio_commit(ch)
            assert (await aio_wait_for_task(ch, task_id, timeout=10)).state == \
                task_pb2.TASK_STATE_COMPLETED
        async with aio_connect(server.target, identity=Identity("acme", "eve", "bot")) as ch:
            with pytest.raises(grpc.RpcError) as info:
                async for _ in aio_watch_task(ch, task_id, resume=QUICK):
                    pass
            assert info.value.code() is grpc.StatusCode.NOT_FOUND

    asyncio.run(run())


async def _aio_commit(channel: grpc.aio.Channel) -> str:
    from sessiond.v1 import session_pb2, session_pb2_grpc

    stub = session_pb2_grpc.SessionServiceStub(channel)
    await stub.CreateSession(session_pb2.CreateSessionRequest(session_id="mine"))
    await stub.AddMessage(session_pb2.AddMessageRequest(
        session_id="mine", role=session_pb2.ROLE_USER,
        parts=[session_pb2.Part(text=session_pb2.TextPart(text="I prefer green tea."))]))
    reply = await stub.Commit(session_pb2.CommitRequest(session_id="mine"))
    return reply.task_id


def test_aio_watch_task_cancel_and_early_close(server_factory: ServerFactory) -> None:
    engine = GatedEngine()
    running = server_factory(engine=engine)
    task_id = start_commit(running.sessions)
    assert engine.entered.wait(5)

    async def run() -> tuple[list[int], task_pb2.TaskEvent]:
        async with aio_connect(running.target) as channel:
            seen: list[int] = []
            three = asyncio.Event()

            async def consume() -> None:
                async for ev in aio_watch_task(channel, task_id):
                    seen.append(ev.seq)
                    if len(seen) == 3:
                        three.set()

            consumer = asyncio.create_task(consume())
            await asyncio.wait_for(three.wait(), 5)
            consumer.cancel()  # asyncio cancellation passes through the resume policy
            with pytest.raises(asyncio.CancelledError):
                await consumer

            async with aio_watch_task(channel, task_id, after_seq=1) as watch:
                first = await watch.__anext__()
            with pytest.raises(StopAsyncIteration):
                await watch.__anext__()
            engine.gate.set()
            return seen, first

    seen, first = asyncio.run(run())
    assert seen == [1, 2, 3] and first.seq == 2
