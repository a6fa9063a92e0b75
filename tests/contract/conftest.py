"""Fixtures of the storage contract suite: every test runs once per backend.

Tests are plain sync functions; `run` drives a coroutine to completion on the test's
own event loop (the loop the store was opened on). SQLite gets a fresh directory per
test; PostgreSQL shares one database per test session, emptied before every test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import pytest
from sessiond.server.store.base import Store
from sessiond.server.store.postgres.migrations import TABLES
from sessiond.server.store.postgres.store import PostgresStore
from sessiond.server.store.sqlite.store import SqliteStore

from tests.pg import temporary_database

T = TypeVar("T")
RUN_TIMEOUT = 60.0


class Runner(Protocol):
    def __call__(self, coro: Coroutine[Any, Any, T], /) -> T: ...


class StoreFactory(Protocol):
    def __call__(self, *, journal_cap: int = ...) -> Store: ...


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    pending = [t for t in asyncio.all_tasks(lp) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        lp.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    lp.run_until_complete(lp.shutdown_asyncgens())
    lp.close()


@pytest.fixture
def run(loop: asyncio.AbstractEventLoop) -> Runner:
    def runner(coro: Coroutine[Any, Any, T], /) -> T:
        return loop.run_until_complete(asyncio.wait_for(coro, RUN_TIMEOUT))

    return runner


@pytest.fixture(scope="session")
def pg_contract_dsn() -> Iterator[str]:
    """One database for the whole contract suite; `make_store` empties it per test."""
    with temporary_database("sessiond_contract") as url:
        yield url


async def truncate_all(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        if await conn.fetchval("SELECT to_regclass('sessions') IS NOT NULL"):
            await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, tmp_path: Path, run: Runner,
               request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """Open stores of the backend under test (closed at teardown). On SQLite every
    call is a separate file; on PostgreSQL all share the test's (emptied) database."""
    stores: list[Store] = []
    url = ""
    if backend == "postgres":
        url = request.getfixturevalue("pg_contract_dsn")
        run(truncate_all(url))

    def make(*, journal_cap: int = 10_000) -> Store:
        s: Store
        if backend == "sqlite":
            s = SqliteStore(tmp_path / f"sqlite{len(stores)}", synchronous="NORMAL",
                            journal_cap=journal_cap)
        else:
            s = PostgresStore(url, min_size=1, max_size=8, journal_cap=journal_cap)
        run(s.open())
        stores.append(s)
        return s

    yield make
    for s in stores:
        run(s.close())


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store()
