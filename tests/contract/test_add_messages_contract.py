"""The storage contract of batch appends (`Store.add_messages`) on every backend: all
or nothing, in order, and idempotent by client message id and by request id."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3

import asyncpg
import pytest
from sessiond.server.domain.errors import NotFound, RequestIdConflict
from sessiond.server.domain.values import Message
from sessiond.server.store.base import Store
from sessiond.server.store.postgres.store import PostgresStore
from sessiond.server.store.sqlite.store import SqliteStore

from tests.contract.conftest import Runner
from tests.contract.test_store_contract import ID, OTHER_USER, at, msg, plan, rkey


def cmsg(text: str, cid: str = "", t: float = 1.0) -> Message:
    return dataclasses.replace(msg(text, t), client_message_id=cid)


def test_batch_is_stored_in_order_with_client_ids(store: Store, run: Runner) -> None:
    async def body() -> None:
        await store.create_session(ID, "s1", at(0))
        await store.add_message(ID, "s1", msg("before"))
        batch = [cmsg("a", "c-1"), cmsg("b"), cmsg("c", "c-2")]
        out = await store.add_messages(ID, "s1", batch)
        assert [(r.message.id, r.message.seq, r.duplicate) for r in out] == \
            [(batch[0].id, 2, False), (batch[1].id, 3, False), (batch[2].id, 4, False)]
        live = await store.list_live_messages(ID, "s1", 0)
        assert [m.text() for m in live] == ["before", "a", "b", "c"]
        assert [m.client_message_id for m in live] == ["", "c-1", "", "c-2"]
        meta = await store.get_session(ID, "s1")
        assert meta is not None and meta.message_count == 4 and meta.live_message_count == 4

        # re-sent after a failure: the stored ids are not stored again
        again = [cmsg("a again", "c-1"), cmsg("new", "c-3"), cmsg("new twice", "c-3"),
                 cmsg("c again", "c-2")]
        out2 = await store.add_messages(ID, "s1", again)
        assert [r.duplicate for r in out2] == [True, False, True, True]
        assert out2[0].message.id == batch[0].id and out2[0].message.text() == "a"
        assert out2[0].message.seq == 2 and out2[3].message.id == batch[2].id
        assert out2[1].message.id == again[1].id and out2[1].message.seq == 5
        assert out2[2].message == out2[1].message  # the copy inside the batch
        live = await store.list_live_messages(ID, "s1", 0)
        assert [m.text() for m in live] == ["before", "a", "b", "c", "new"]
        meta = await store.get_session(ID, "s1")
        assert meta is not None and meta.message_count == 5

        # client ids are per session and per identity
        await store.create_session(ID, "s2", at(0))
        other = await store.add_messages(ID, "s2", [cmsg("a in s2", "c-1")])
        assert not other[0].duplicate and other[0].message.seq == 1
        await store.create_session(OTHER_USER, "s1", at(0))
        theirs = await store.add_messages(OTHER_USER, "s1", [cmsg("bob", "c-1")])
        assert not theirs[0].duplicate
        # an archived message still counts as stored
        await store.commit(plan("s1", "t1", 2))
        after = await store.add_messages(ID, "s1", [cmsg("a once more", "c-1")])
        assert after[0].duplicate and after[0].message.id == batch[0].id
        assert await store.list_live_messages(ID, "s1", 0) == []

    run(body())


def test_batch_is_all_or_nothing_and_replays(store: Store, run: Runner) -> None:
    async def body() -> None:
        with pytest.raises(NotFound):
            await store.add_messages(ID, "missing", [cmsg("x", "c-1")])
        await store.create_session(ID, "s1", at(0))
        # a message id taken twice makes the insert fail: nothing of the batch stays
        first = cmsg("one", "c-1")
        with pytest.raises(Exception):  # noqa: B017 - the backend's integrity error
            await store.add_messages(ID, "s1", [first, dataclasses.replace(cmsg("two"),
                                                                           id=first.id)])
        assert await store.list_live_messages(ID, "s1", 0) == []
        meta = await store.get_session(ID, "s1")
        assert meta is not None and meta.message_count == 0

        key = rkey("AddMessages", "r-1")
        batch = [cmsg("one", "c-1"), cmsg("one again", "c-1"), cmsg("two")]
        out = await store.add_messages(ID, "s1", batch, key)
        replay = await store.add_messages(ID, "s1", [cmsg("other")], key)
        assert replay == out
        with pytest.raises(RequestIdConflict):
            await store.add_messages(ID, "s1", batch, rkey("AddMessages", "r-1", b"x"))
        assert len(await store.list_live_messages(ID, "s1", 0)) == 2

    run(body())


def test_concurrent_batches_store_a_client_id_once(store: Store, run: Runner) -> None:
    async def body() -> None:
        await store.create_session(ID, "s1", at(0))
        outs = await asyncio.gather(*(store.add_messages(ID, "s1", [cmsg(f"copy {i}", "c-1")])
                                      for i in range(6)))
        assert sorted(o[0].duplicate for o in outs) == [False] + [True] * 5
        assert len({o[0].message.id for o in outs}) == 1
        assert len(await store.list_live_messages(ID, "s1", 0)) == 1

    run(body())


def test_the_client_id_index_holds_given_ids_only(store: Store, run: Runner) -> None:
    """Schema version 14: the unique index of client_message_id is partial (messages
    without one, most of them, have no entry to write), and still refuses a given id
    twice in a session."""
    async def index_predicate() -> str:
        if isinstance(store, SqliteStore):
            conn = sqlite3.connect(store.path)
            try:
                rows = conn.execute("PRAGMA index_list(messages)").fetchall()
                partial = {r[1]: (r[2], r[4]) for r in rows}["messages_client_id"]
                assert partial == (1, 1)  # unique, partial
                sql = conn.execute("SELECT sql FROM sqlite_master WHERE "
                                   "name='messages_client_id'").fetchone()[0]
            finally:
                conn.close()
            return str(sql)
        assert isinstance(store, PostgresStore)
        pg = await asyncpg.connect(store.dsn)
        try:
            return str(await pg.fetchval(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index "
                "WHERE indexrelid='messages_client_id'::regclass AND indisunique"))
        finally:
            await pg.close()

    async def body() -> None:
        await store.create_session(ID, "s1", at(0))
        await store.add_messages(ID, "s1", [cmsg("a", "c-1"), cmsg("b"), cmsg("c")])
        await store.add_message(ID, "s1", msg("d"))
        again = await store.add_messages(ID, "s1", [cmsg("a again", "c-1"), cmsg("e")])
        assert [r.duplicate for r in again] == [True, False]
        assert "client_message_id IS NOT NULL" in await index_predicate()

    run(body())
