"""PostgreSQL-only guarantees: several replicas (stores) on one database, cross-process
wake-ups through LISTEN/NOTIFY, schema versioning and connection failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import asyncpg
import pytest
from sessiond.server.domain.commands import CommitOutcome
from sessiond.server.domain.errors import FailedPrecondition, Unavailable
from sessiond.server.domain.values import EventKind, TaskState
from sessiond.server.store.base import Store
from sessiond.server.store.postgres import migrations
from sessiond.server.store.postgres.store import PostgresStore

from tests.contract.conftest import Runner
from tests.contract.test_store_contract import ID, at, claim, committed, msg, plan, run_pipeline
from tests.pg import temporary_database

pytestmark = pytest.mark.postgres

StoreMaker = Callable[..., PostgresStore]


@pytest.fixture
def db() -> Iterator[str]:
    with temporary_database("sessiond_replicas") as url:
        yield url


@pytest.fixture
def replicas(db: str, run: Runner) -> Iterator[StoreMaker]:
    """Open PostgresStores on the test's database (closed at teardown)."""
    opened: list[PostgresStore] = []

    def make(**kwargs: object) -> PostgresStore:
        s = PostgresStore(db, min_size=1, max_size=6, **kwargs)  # type: ignore[arg-type]
        run(s.open())
        opened.append(s)
        return s

    yield make
    for s in opened:
        run(s.close())


async def eventually(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_two_replicas_commit_one_session(replicas: StoreMaker, run: Runner) -> None:
    a, b = replicas(), replicas()

    async def body() -> None:
        await a.create_session(ID, "s1", at(0))

        async def writer(store: Store, i: int) -> tuple[list[str], CommitOutcome]:
            ids = [(await store.add_message(ID, "s1", msg(f"{i}-{j}", i))).id for j in range(3)]
            return ids, await store.commit(plan("s1", f"t{i:02d}", i))

        results = await asyncio.gather(*(writer(a if i % 2 else b, i) for i in range(16)))
        written = {m for ids, _ in results for m in ids}
        indexes = sorted(o.archive.index for _, o in results if o.archive is not None)
        assert indexes and indexes == list(range(1, len(indexes) + 1))
        seqs: list[int] = []
        ids: set[str] = set()
        for i in indexes:
            part = await b.archive_messages(ID, "s1", i)
            assert part
            seqs += [m.seq for m in part]
            ids |= {m.id for m in part}
        live = await a.list_live_messages(ID, "s1")
        seqs += [m.seq for m in live]
        ids |= {m.id for m in live}
        assert seqs == list(range(1, 16 * 3 + 1))  # ordered, no gaps, no duplicates
        assert ids == written
        meta = await b.get_session(ID, "s1")
        assert meta is not None and meta.archive_count == len(indexes)
        # each archive runs after the previous one, whichever replica claims it
        order: list[int] = []
        for n in range(len(indexes)):
            worker = a if n % 2 else b
            task = await claim(worker, f"w{n}", 100 + n)
            order.append(task.archive_index)
            other = b if n % 2 else a
            assert await other.claim_task("x", at(100 + n), at(200 + n)) is None
            await run_pipeline(worker, task.task_id, f"w{n}", 100 + n)
        assert order == indexes

    run(body())


def test_notifications_reach_other_replicas(replicas: StoreMaker, run: Runner) -> None:
    a, b = replicas(), replicas()
    remote_a: list[str] = []
    remote_b: list[str] = []
    work_b: list[int] = []
    local_a: list[int] = []
    a.add_remote_event_listener(remote_a.append)
    b.add_remote_event_listener(remote_b.append)
    b.add_work_listener(lambda: work_b.append(1))
    a.add_event_listener(lambda evs: local_a.extend(e.seq for e in evs))

    async def body() -> None:
        await committed(a, "s1", "t1", 1)
        await eventually(lambda: "t1" in remote_b and bool(work_b))
        assert local_a == [1]
        # B runs the task: A's watchers hear of every event B journals
        task = await claim(b, "w", 2)
        await run_pipeline(b, task.task_id, "w", 3)
        await eventually(lambda: remote_a.count("t1") >= 7)
        events = await a.list_events("t1", 0)
        assert events[-1].kind is EventKind.COMPLETED
        # a store does not hear its own writes as remote ones
        await asyncio.sleep(0.2)
        assert remote_a.count("t1") == 7  # B's seven transactions, not A's own commit
        assert remote_b.count("t1") == 1  # A's commit, not B's own writes
        assert local_a == [1]

    run(body())


def test_replicas_claim_distinct_tasks(replicas: StoreMaker, run: Runner) -> None:
    stores = [replicas() for _ in range(3)]

    async def body() -> None:
        for i in range(9):
            await committed(stores[i % 3], f"s{i}", f"t{i}", i)
        got = await asyncio.gather(*(stores[i % 3].claim_task(f"w{i}", at(50), at(80))
                                     for i in range(15)))
        claimed = [t.task_id for t in got if t is not None]
        assert sorted(claimed) == [f"t{i}" for i in range(9)]
        for tid in claimed:
            t = await stores[0].get_task(tid)
            assert t is not None and t.state is TaskState.RUNNING and t.attempts == 1

    run(body())


def test_listen_connection_and_pool_recover(replicas: StoreMaker, db: str, run: Runner) -> None:
    a = replicas()
    b = replicas(listen_check_seconds=0.2)
    remote_b: list[str] = []
    b.add_remote_event_listener(remote_b.append)

    async def kill_backends() -> int:
        conn = await asyncpg.connect(db, timeout=5)
        try:
            return int(await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name = 'sessiond'"))
        finally:
            await conn.close()

    async def body() -> None:
        await committed(a, "s1", "t1", 1)
        await eventually(lambda: "t1" in remote_b)
        assert await kill_backends() >= 4  # both pools and both LISTEN connections
        await asyncio.sleep(0.3)
        # the pools reconnect lazily; a health check at most sees one failure
        for s in (a, b):
            try:
                await s.ping()
            except Unavailable:
                await s.ping()
        # the LISTEN connection comes back by itself: B hears A again
        deadline = time.monotonic() + 5
        for i in range(2, 1000):
            await committed(a, f"s{i}", f"t{i}", i)
            await asyncio.sleep(0.1)
            if f"t{i}" in remote_b:
                break
            assert time.monotonic() < deadline, "B did not hear A after reconnecting"

    run(body())


def test_schema_checks_and_migrations(db: str, run: Runner) -> None:
    async def scenario() -> None:
        bare = PostgresStore(db, min_size=1, max_size=2, auto_migrate=False)
        with pytest.raises(FailedPrecondition) as e1:
            await bare.open()
        assert e1.value.reason == "SCHEMA_NOT_MIGRATED"
        # replicas migrating at once: one applies, the others find nothing to do
        outcomes = await asyncio.gather(*(migrations.migrate_url(db) for _ in range(4)))
        assert sorted(outcomes) == [(0, migrations.SCHEMA_VERSION)] + \
            [(migrations.SCHEMA_VERSION, migrations.SCHEMA_VERSION)] * 3
        assert await migrations.migrate_url(db) == (migrations.SCHEMA_VERSION,) * 2
        ok = PostgresStore(db, min_size=1, max_size=2, auto_migrate=False)
        await ok.open()
        await ok.ping()
        await ok.close()
        conn = await asyncpg.connect(db, timeout=5)
        try:
            await conn.execute("INSERT INTO schema_version (version, description) "
                               "VALUES ($1, 'from the future')", migrations.SCHEMA_VERSION + 1)
            newer = PostgresStore(db, min_size=1, max_size=2)
            with pytest.raises(FailedPrecondition) as e2:
                await newer.open()
            assert e2.value.reason == "SCHEMA_TOO_NEW"
            with pytest.raises(FailedPrecondition) as e3:
                await migrations.migrate_url(db)
            assert e3.value.reason == "SCHEMA_TOO_NEW"
            await conn.execute("DELETE FROM schema_version")
            older = PostgresStore(db, min_size=1, max_size=2)
            with pytest.raises(FailedPrecondition) as e4:
                await older.open()
            assert e4.value.reason == "SCHEMA_NOT_MIGRATED"
        finally:
            await conn.close()

    run(scenario())


def test_auto_migrate_only_an_empty_database(run: Runner) -> None:
    with temporary_database("sessiond_unversioned") as url:
        async def scenario() -> None:
            conn = await asyncpg.connect(url, timeout=5)
            try:
                await conn.execute("CREATE TABLE sessions (skey text)")
            finally:
                await conn.close()
            s = PostgresStore(url, min_size=1, max_size=2)
            with pytest.raises(FailedPrecondition) as exc:
                await s.open()
            assert exc.value.reason == "SCHEMA_NOT_MIGRATED"

        run(scenario())
    with temporary_database("sessiond_fresh") as url:
        async def fresh() -> None:
            stores = [PostgresStore(url, min_size=1, max_size=2) for _ in range(3)]
            await asyncio.gather(*(s.open() for s in stores))  # concurrent first starts
            for s in stores:
                await s.ping()
                await s.close()

        run(fresh())


def test_unreachable_database_is_unavailable(run: Runner) -> None:
    async def scenario() -> None:
        started = time.monotonic()
        s = PostgresStore("postgresql://postgres@127.0.0.1:1/nothing", min_size=1, max_size=2,
                          connect_timeout=2)
        with pytest.raises(Unavailable):
            await s.open()
        with pytest.raises(Unavailable):
            await migrations.migrate_url("postgresql://postgres@127.0.0.1:1/nothing")
        assert time.monotonic() - started < 5

    run(scenario())


def test_closed_store_is_unavailable(replicas: StoreMaker, run: Runner) -> None:
    s = replicas()
    run(s.close())
    with pytest.raises(Unavailable):
        run(s.ping())
    with pytest.raises(Unavailable):
        run(s.create_session(ID, "x", at(0)))


class _Proxy:
    """A TCP proxy in front of PostgreSQL that a test can take down and bring back."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


def test_outage_is_unavailable_and_the_store_recovers(db: str, run: Runner) -> None:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(db)
    proxy = _Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    run(proxy.up())
    via_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    writer = PostgresStore(db, min_size=1, max_size=2)
    flaky = PostgresStore(via_proxy, min_size=2, max_size=4, connect_timeout=2,
                          listen_check_seconds=0.2)
    remote: list[str] = []
    flaky.add_remote_event_listener(remote.append)

    async def scenario() -> None:
        await writer.open()
        await flaky.open()
        try:
            await flaky.ping()
            await proxy.down()
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await flaky.ping()
            with pytest.raises(Unavailable):
                await flaky.create_session(ID, "during", at(0))
            with pytest.raises(Unavailable):
                await flaky.get_session(ID, "during")
            assert time.monotonic() - started < 3  # fails fast, no hanging
            await proxy.up()
            # the pool reconnects by itself
            deadline = time.monotonic() + 5
            while True:
                try:
                    await flaky.ping()
                    break
                except Unavailable:
                    assert time.monotonic() < deadline, "pool did not recover"
                    await asyncio.sleep(0.1)
            await flaky.create_session(ID, "after", at(1))
            assert await writer.get_session(ID, "after") is not None
            # and so does the LISTEN connection
            deadline = time.monotonic() + 5
            for i in range(1000):
                await committed(writer, f"s{i}", f"t{i}", i)
                await asyncio.sleep(0.1)
                if f"t{i}" in remote:
                    break
                assert time.monotonic() < deadline, "LISTEN did not reconnect"
        finally:
            await flaky.close()
            await writer.close()
            await proxy.down()

    run(scenario())


def test_missing_database_is_a_failed_precondition(db: str, run: Runner) -> None:
    missing = db.rsplit("/", 1)[0] + "/sessiond_no_such_database"
    with pytest.raises(FailedPrecondition) as exc:
        run(PostgresStore(missing, min_size=1, max_size=1).open())
    assert exc.value.reason == "DATABASE_REJECTED"
    with pytest.raises(FailedPrecondition) as exc2:
        run(migrations.migrate_url(missing))
    assert exc2.value.reason == "DATABASE_REJECTED"


def test_relaxed_writes_commit_without_waiting_for_the_wal_flush(
        replicas: StoreMaker, run: Runner) -> None:
    """Phase 2's writes (made under relaxed_commits) run with synchronous_commit off,
    for their own transaction only; every other write keeps the server's setting."""
    from sessiond.server.store.base import relaxed_commits
    from sessiond.server.store.sql.tx import Tx

    store = replicas()

    async def setting(tx: Tx) -> str:
        return str(await tx.fetchval("SELECT current_setting('synchronous_commit')"))

    async def body() -> tuple[str, str, str]:
        before = await store._write(setting)
        with relaxed_commits():
            relaxed = await store._write(setting)
        after = await store._write(setting)
        return before, relaxed, after

    before, relaxed, after = run(body())
    assert relaxed == "off"
    assert before == after == "on"
