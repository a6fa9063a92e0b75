"""Shared fixtures: a real sessiond App on a free loopback port, in a background
event loop, reached through the generated stubs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from sessiond.server.app import App
from sessiond.server.config import Settings
from sessiond.server.embedders.base import Embedder
from sessiond.server.phase2.engines.base import Phase2Engine
from sessiond.server.store.base import Store
from sessiond.v1 import memory_pb2_grpc, session_pb2_grpc, task_pb2_grpc

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a thread; `run` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Running:
    app: App
    port: int
    channel: grpc.Channel
    sessions: session_pb2_grpc.SessionServiceStub
    tasks: task_pb2_grpc.TaskServiceStub
    memories: memory_pb2_grpc.MemoryServiceStub
    loop: LoopThread

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


ServerFactory = Callable[..., Running]


def fast_settings(data_dir: Path, **overrides: Any) -> Settings:
    s = Settings()
    s.address = "127.0.0.1:0"
    s.data_dir = data_dir
    s.poll_seconds = 0.2
    s.heartbeat_seconds = 0.5
    s.lease_seconds = 5.0
    s.shutdown_grace_seconds = 2.0
    s.sqlite_synchronous = "NORMAL"
    for k, v in overrides.items():
        setattr(s, k, v)
    return s


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def server_factory(tmp_path: Path, loop_thread: LoopThread) -> Iterator[ServerFactory]:
    """Start (and at teardown stop) Apps; call again with the same data_dir to restart."""
    started: list[Running] = []

    def start(data_dir: Path | None = None, store: Store | None = None,
              engine: Phase2Engine | None = None, embedder: Embedder | None = None,
              **overrides: Any) -> Running:
        settings = fast_settings(data_dir or tmp_path / "data", **overrides)
        app = loop_thread.run(_make_app(settings, store, engine, embedder))
        port = loop_thread.run(app.start())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        r = Running(app, port, channel, session_pb2_grpc.SessionServiceStub(channel),
                    task_pb2_grpc.TaskServiceStub(channel),
                    memory_pb2_grpc.MemoryServiceStub(channel), loop_thread)
        started.append(r)
        return r

    yield start
    for r in started:
        r.channel.close()
        if r.app.server is not None and not getattr(r.app, "_stopped_by_test", False):
            try:
                loop_thread.run(r.app.stop(0.5))
            except Exception:
                pass


async def _make_app(settings: Settings, store: Store | None, engine: Phase2Engine | None,
                    embedder: Embedder | None = None) -> App:
    return App(settings, store=store, engine=engine, embedder=embedder)


@pytest.fixture
def server(server_factory: ServerFactory) -> Running:
    return server_factory()
