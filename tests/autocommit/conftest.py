"""A real server on the backend under test (SQLite, or PostgreSQL in a throw-away
database) for the auto-commit and WatchSession tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sessiond.server.store.base import Store
from sessiond.server.store.postgres.store import PostgresStore

from tests.conftest import Running, ServerFactory
from tests.pg import temporary_database

Start = Any


class _NoDatabase:
    def __enter__(self) -> str:
        return ""

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def start(request: pytest.FixtureRequest, server_factory: ServerFactory,
          tmp_path: Path) -> Iterator[Start]:
    """`start(**settings)`: a server on the backend under test."""
    with (temporary_database("sessiond_autocommit") if request.param == "postgres"
          else _NoDatabase()) as url:
        made: list[Running] = []

        def make(**overrides: Any) -> Running:
            store: Store | None = PostgresStore(url, min_size=1, max_size=4) if url else None
            overrides.setdefault("auto_commit_scan_seconds", 0.2)
            made.append(server_factory(store=store, data_dir=tmp_path / "data", **overrides))
            return made[-1]

        yield make
        for r in made:  # before the database is dropped
            if not getattr(r.app, "_stopped_by_test", False):
                r.loop.run(r.app.stop(0.5))
                r.app._stopped_by_test = True  # type: ignore[attr-defined]
