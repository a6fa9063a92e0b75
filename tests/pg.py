"""Throw-away PostgreSQL databases for tests.

The server is expected on 127.0.0.1:5432, user `postgres`, trust authentication
(override with SESSIOND_TEST_PG_HOST / _PORT / _USER / _PASSWORD). `temporary_database`
creates a uniquely named database and drops it afterwards (`WITH (FORCE)`, so
connections a failing test leaked do not block the drop).

When the server cannot be reached the test is skipped, except on CI (`CI=true`),
where a missing database is a failure: the PostgreSQL half of the suite must run there.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

HOST = os.environ.get("SESSIOND_TEST_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("SESSIOND_TEST_PG_PORT", "5432"))
USER = os.environ.get("SESSIOND_TEST_PG_USER", "postgres")
PASSWORD = os.environ.get("SESSIOND_TEST_PG_PASSWORD", "")
ADMIN_DATABASES = ("postgres", "test")
CONNECT_TIMEOUT = 5.0


def dsn(database: str) -> str:
    auth = quote(USER, safe="")
    if PASSWORD:
        auth += ":" + quote(PASSWORD, safe="")
    return f"postgresql://{auth}@{HOST}:{PORT}/{quote(database, safe='')}"


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> None:
    """Skip the test (locally) or fail it (on CI): PostgreSQL is not reachable."""
    msg = f"PostgreSQL at {HOST}:{PORT} is not usable: {reason}"
    if _on_ci():
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


async def _admin_connect() -> Any:
    last: BaseException | None = None
    for db in ADMIN_DATABASES:
        try:
            return await asyncpg.connect(dsn(db), timeout=CONNECT_TIMEOUT)
        except asyncpg.InvalidCatalogNameError as exc:  # that admin db does not exist
            last = exc
    raise last if last is not None else RuntimeError("no admin database")


async def _create(name: str) -> None:
    conn = await _admin_connect()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop(name: str) -> None:
    conn = await _admin_connect()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def create_database(prefix: str = "sessiond_test") -> str:
    """Create a uniquely named database; return its name (skips/fails when unreachable)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_create(name))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        unavailable(f"{type(exc).__name__}: {exc}")
    return name


def drop_database(name: str) -> None:
    asyncio.run(_drop(name))


@contextmanager
def temporary_database(prefix: str = "sessiond_test") -> Iterator[str]:
    """Yield the DSN of a fresh database, dropped on exit."""
    name = create_database(prefix)
    try:
        yield dsn(name)
    finally:
        drop_database(name)


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A fresh, empty database for one test."""
    with temporary_database() as url:
        yield url


@pytest.fixture(scope="session")
def pg_session_dsn() -> Iterator[str]:
    """One empty database shared by a whole test session (tests clean up themselves)."""
    with temporary_database() as url:
        yield url
