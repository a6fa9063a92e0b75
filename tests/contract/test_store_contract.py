"""The storage contract (`sessiond.server.store.base.Store`), run against every backend.

Each test gets a fresh, empty store. Times are synthetic (`at(seconds)`), so lease
expiry and retention cut-offs are exact.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from sessiond.server.domain.commands import (
    ActiveCountsOutput,
    CommitOutcome,
    CommitPlan,
    ExtractionResponse,
    IndexOutput,
    RelationsOutput,
    RequestKey,
    StageOutput,
    SummaryResponse,
)
from sessiond.server.domain.errors import (
    Aborted,
    AlreadyExists,
    ErrorCode,
    FailedPrecondition,
    InvalidArgument,
    LeaseLost,
    NotFound,
    QuotaExceeded,
    RequestIdConflict,
)
from sessiond.server.domain.limits import Limits
from sessiond.server.domain.values import (
    ArchiveState,
    CandidateMemory,
    EventKind,
    Identity,
    Memory,
    MemoryCategory,
    MemoryCounts,
    Message,
    NewEvent,
    Role,
    SkillUse,
    Stage,
    Task,
    TaskError,
    TaskEvent,
    TaskState,
    TextPart,
    TokenUsage,
    ToolPart,
    ToolStatus,
    UsageRecord,
)
from sessiond.server.store import codec
from sessiond.server.store.base import Store

from tests.contract.conftest import Runner, StoreFactory

ID = Identity("acme", "alice", "assistant")
OTHER_USER = Identity("acme", "bob", "assistant")
OTHER_AGENT = Identity("acme", "alice", "coder")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0
NO_USAGE = TokenUsage()

_ids = itertools.count(1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def msg(text: str = "hello", t: float = 0.0, *, tools: Sequence[ToolPart] = (),
        role: Role = Role.USER) -> Message:
    return Message(id=f"msg_{next(_ids):06d}", role=role, parts=(TextPart(text), *tools),
                   created_at=at(t))


def plan(session_id: str, task_id: str, t: float, *, keep: int = 0, reject: bool = False,
         identity: Identity = ID) -> CommitPlan:
    return CommitPlan(identity=identity, session_id=session_id, keep_recent_count=keep,
                      reject_if_running=reject, task_id=task_id, now=at(t))


def rkey(method: str, request_id: str, payload: bytes = b"same",
         identity: Identity = ID) -> RequestKey:
    return RequestKey(identity, method, request_id, RequestKey.fingerprint_of(payload))


async def session_with(store: Store, sid: str, n: int, *, t: float = 0.0,
                       identity: Identity = ID) -> list[Message]:
    await store.create_session(identity, sid, at(t))
    return [await store.add_message(identity, sid, msg(f"{sid} message {i}", t))
            for i in range(n)]


async def committed(store: Store, sid: str, task_id: str, t: float, *, n: int = 1,
                    keep: int = 0, identity: Identity = ID) -> CommitOutcome:
    """Add n messages to (a possibly new) session and commit them."""
    await store.ensure_session(identity, sid, at(t))
    for i in range(n):
        await store.add_message(identity, sid, msg(f"{sid} {task_id} {i}", t))
    out = await store.commit(plan(sid, task_id, t, keep=keep, identity=identity))
    assert out.archived and out.task is not None
    return out


async def claim(store: Store, worker: str, t: float) -> Task:
    task = await store.claim_task(worker, at(t), at(t + LEASE))
    assert task is not None, "expected a runnable task"
    return task


async def run_pipeline(store: Store, task_id: str, worker: str, t: float, *,
                       candidates: Sequence[CandidateMemory] = (),
                       usage: TokenUsage = NO_USAGE,
                       uris: Sequence[str] = ()) -> TaskEvent:
    """Complete every Phase 2 stage of a claimed task and finalize it."""
    await store.complete_stage(task_id, worker, Stage.SUMMARIZE,
                               SummaryResponse(f"overview {task_id}", f"abstract {task_id}", usage),
                               at(t))
    await store.complete_stage(task_id, worker, Stage.EXTRACT,
                               ExtractionResponse(tuple(candidates)), at(t))
    await store.complete_stage(task_id, worker, Stage.RELATIONS, RelationsOutput(tuple(uris)),
                               at(t))
    await store.complete_stage(task_id, worker, Stage.ACTIVE_COUNTS,
                               ActiveCountsOutput(tuple(uris)), at(t))
    await store.complete_stage(task_id, worker, Stage.INDEX, IndexOutput(()), at(t))
    return await store.finalize_task(task_id, worker, at(t))


def cand(category: MemoryCategory, key: str, content: str,
         *ids: str) -> CandidateMemory:
    return CandidateMemory(category=category, key=key, content=content,
                           source_message_ids=tuple(ids))


# ---------------------------------------------------------------------------- sessions
def test_session_crud_and_paging(store: Store, run: Runner) -> None:
    async def body() -> None:
        meta = await store.create_session(ID, "s1", at(1))
        assert (meta.identity, meta.session_id) == (ID, "s1")
        assert meta.created_at == at(1) and meta.updated_at == at(1)
        assert (meta.message_count, meta.live_message_count, meta.archive_count,
                meta.commit_count) == (0, 0, 0, 0)
        assert meta.last_commit_at is None and meta.llm_token_usage == TokenUsage()
        assert meta.memories_extracted == MemoryCounts()
        assert await store.get_session(ID, "s1") == meta
        with pytest.raises(AlreadyExists):
            await store.create_session(ID, "s1", at(2))
        assert await store.ensure_session(ID, "s1", at(3)) == meta
        created = await store.ensure_session(ID, "s0", at(4))
        assert created.session_id == "s0" and created.created_at == at(4)
        for sid in ("s4", "s2", "s3", "S9", "s10"):
            await store.create_session(ID, sid, at(5))
        # ascending by id in code-point order, keyset paging
        page1 = await store.list_sessions(ID, 3, "")
        assert [m.session_id for m in page1.items] == ["S9", "s0", "s1"]
        page2 = await store.list_sessions(ID, 3, page1.next_token)
        assert [m.session_id for m in page2.items] == ["s10", "s2", "s3"]
        page3 = await store.list_sessions(ID, 3, page2.next_token)
        assert [m.session_id for m in page3.items] == ["s4"] and page3.next_token == ""
        assert (await store.list_sessions(ID, 3, "s4")).items == []
        assert await store.delete_session(ID, "s1", at(6)) is True
        assert await store.get_session(ID, "s1") is None
        assert await store.delete_session(ID, "s1", at(6)) is False
        with pytest.raises(NotFound):
            await store.add_message(ID, "s1", msg())
        # a deleted id can be created again, empty
        again = await store.create_session(ID, "s1", at(7))
        assert again.message_count == 0 and again.created_at == at(7)

    run(body())


def test_identity_isolation(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1, n=2)
        await store.add_message(ID, "s1", msg("live"))
        for other in (OTHER_USER, OTHER_AGENT):
            assert await store.get_session(other, "s1") is None
            assert (await store.list_sessions(other, 10, "")).items == []
            with pytest.raises(NotFound):
                await store.add_message(other, "s1", msg())
            with pytest.raises(NotFound):
                await store.list_live_messages(other, "s1")
            with pytest.raises(NotFound):
                await store.record_usage(other, "s1", UsageRecord(("u",), None, at(1)))
            with pytest.raises(NotFound):
                await store.commit(plan("s1", f"t-{other.user}-{other.agent}", 2,
                                        identity=other))
            with pytest.raises(NotFound):
                await store.list_archives(other, "s1", 10, "")
            assert await store.get_archive(other, "s1", 1) is None
            assert await store.archive_messages(other, "s1", 1) == []
            assert await store.latest_done_archive(other, "s1") is None
            assert (await store.list_tasks(other, "", None, "", 10, "")).items == []
            assert await store.delete_session(other, "s1", at(3)) is False
        # ids are per identity: another identity's "s1" is a separate session
        mine = await store.create_session(OTHER_USER, "s1", at(4))
        assert mine.identity == OTHER_USER and mine.message_count == 0
        assert await store.list_live_messages(OTHER_USER, "s1") == []
        assert len(await store.list_live_messages(ID, "s1")) == 1
        assert (await store.get_session(ID, "s1")) is not None

    run(body())


# ---------------------------------------------------------------------------- messages
def test_add_message_sequence(store: Store, run: Runner) -> None:
    async def body() -> None:
        with pytest.raises(NotFound):
            await store.add_message(ID, "nope", msg())
        await store.create_session(ID, "s1", at(0))
        added = [await store.add_message(ID, "s1", msg(f"m{i}", i)) for i in range(5)]
        assert [m.seq for m in added] == [1, 2, 3, 4, 5]
        live = await store.list_live_messages(ID, "s1")
        assert live == added
        assert live[0].text() == "m0" and live[0].created_at == at(0)
        assert await store.list_live_messages(ID, "s1", newest=2) == added[3:]
        assert await store.list_live_messages(ID, "s1", newest=50) == added
        meta = await store.get_session(ID, "s1")
        assert meta is not None
        assert (meta.message_count, meta.live_message_count) == (5, 5)
        assert meta.updated_at == at(4)
        # seq keeps counting across commits
        await store.commit(plan("s1", "t1", 10))
        nxt = await store.add_message(ID, "s1", msg("after", 11))
        assert nxt.seq == 6
        meta = await store.get_session(ID, "s1")
        assert meta is not None
        assert (meta.message_count, meta.live_message_count) == (6, 1)
        with pytest.raises(NotFound):
            await store.list_live_messages(ID, "nope")

    run(body())


def test_update_tool_part(store: Store, run: Runner) -> None:
    async def body() -> None:
        await store.create_session(ID, "s1", at(0))
        tools = (ToolPart("call_1", tool_name="search", input="q"),
                 ToolPart("call_2", tool_name="fetch"))
        m = await store.add_message(ID, "s1", msg("using tools", tools=tools,
                                                  role=Role.ASSISTANT))
        out = await store.update_tool_part(ID, "s1", m.id, "call_2", "page body",
                                           ToolStatus.COMPLETED, at(5))
        assert out.id == m.id and out.seq == m.seq
        assert out.parts[0] == TextPart("using tools")
        assert out.parts[1] == tools[0]
        assert out.parts[2] == ToolPart("call_2", tool_name="fetch", output="page body",
                                        status=ToolStatus.COMPLETED)
        assert (await store.list_live_messages(ID, "s1")) == [out]
        meta = await store.get_session(ID, "s1")
        assert meta is not None and meta.updated_at == at(5)
        with pytest.raises(NotFound) as e1:
            await store.update_tool_part(ID, "nope", m.id, "call_1", "", ToolStatus.ERROR, at(6))
        assert e1.value.reason == "SESSION_NOT_FOUND"
        with pytest.raises(NotFound) as e2:
            await store.update_tool_part(ID, "s1", "msg_missing", "call_1", "",
                                         ToolStatus.ERROR, at(6))
        assert e2.value.reason == "MESSAGE_NOT_FOUND"
        with pytest.raises(NotFound) as e3:
            await store.update_tool_part(ID, "s1", m.id, "call_9", "", ToolStatus.ERROR, at(6))
        assert e3.value.reason == "TOOL_PART_NOT_FOUND"
        with pytest.raises(NotFound):
            await store.update_tool_part(OTHER_USER, "s1", m.id, "call_1", "",
                                         ToolStatus.ERROR, at(6))
        await store.commit(plan("s1", "t1", 7))
        with pytest.raises(FailedPrecondition) as e4:
            await store.update_tool_part(ID, "s1", m.id, "call_1", "late", ToolStatus.COMPLETED,
                                         at(8))
        assert e4.value.reason == "MESSAGE_ARCHIVED"
        assert (await store.archive_messages(ID, "s1", 1)) == [out]

    run(body())


def test_record_usage(store: Store, run: Runner) -> None:
    async def body() -> None:
        with pytest.raises(NotFound):
            await store.record_usage(ID, "nope", UsageRecord(("a",), None, at(0)))
        await session_with(store, "s1", 1)
        u1 = UsageRecord(("sessiond://r/1", "sessiond://r/2"), None, at(1))
        u2 = UsageRecord((), SkillUse("sessiond://skill/x", "in", "out", False), at(2))
        assert await store.record_usage(ID, "s1", u1) == 1
        assert await store.record_usage(ID, "s1", u2) == 2
        meta = await store.get_session(ID, "s1")
        assert meta is not None and meta.updated_at == at(2)
        await store.commit(plan("s1", "t1", 3))
        assert await store.archive_usage(ID, "s1", 1) == [u1, u2]
        assert await store.record_usage(ID, "s1", u1) == 1  # pending again from zero
        await store.add_message(ID, "s1", msg())
        await store.commit(plan("s1", "t2", 4))
        assert await store.archive_usage(ID, "s1", 2) == [u1]
        assert await store.archive_usage(ID, "s1", 3) == []

    run(body())


# ---------------------------------------------------------------------------- commit
def test_commit_archives_and_keeps_recent(store: Store, run: Runner) -> None:
    async def body() -> None:
        with pytest.raises(NotFound):
            await store.commit(plan("nope", "t0", 0))
        await store.create_session(ID, "s1", at(0))
        empty = await store.commit(plan("s1", "t-empty", 1))
        assert empty == CommitOutcome(archived=False)
        assert await store.get_task("t-empty") is None
        msgs = [await store.add_message(ID, "s1", msg(f"m{i}", 2)) for i in range(5)]
        # keeping more than there is archives nothing
        assert (await store.commit(plan("s1", "t-keep", 3, keep=9))).archived is False
        assert (await store.commit(plan("s1", "t-keep5", 3, keep=5))).archived is False
        out = await store.commit(plan("s1", "t1", 4, keep=2))
        assert out.archived and out.archive is not None and out.task is not None
        arch, task = out.archive, out.task
        assert (arch.session_id, arch.index, arch.state, arch.task_id) == \
            ("s1", 1, ArchiveState.PENDING, "t1")
        assert arch.message_count == 3 and arch.created_at == at(4)
        assert (arch.first_message_id, arch.last_message_id) == (msgs[0].id, msgs[2].id)
        assert arch.completed_at is None and arch.overview == ""
        assert (task.task_id, task.state, task.stage, task.archive_index) == \
            ("t1", TaskState.PENDING, Stage.QUEUED, 1)
        assert (task.identity, task.session_id, task.attempts, task.last_seq) == \
            (ID, "s1", 0, 1)
        assert task.created_at == at(4) and task.done_stage is Stage.QUEUED
        assert task.archive_uri == arch.uri
        assert await store.get_task("t1") == task
        assert await store.get_archive(ID, "s1", 1) == arch
        events = await store.list_events("t1", 0)
        assert [(e.seq, e.kind, e.state) for e in events] == \
            [(1, EventKind.CREATED, TaskState.PENDING)]
        assert await store.archive_messages(ID, "s1", 1) == msgs[:3]
        assert await store.list_live_messages(ID, "s1") == msgs[3:]
        meta = await store.get_session(ID, "s1")
        assert meta is not None
        assert (meta.archive_count, meta.live_message_count, meta.message_count,
                meta.commit_count) == (1, 2, 5, 0)
        assert meta.updated_at == at(4)
        # the next commit takes the rest: archive 2
        extra = await store.add_message(ID, "s1", msg("m5", 5))
        out2 = await store.commit(plan("s1", "t2", 6))
        assert out2.archive is not None and out2.archive.index == 2
        assert out2.archive.message_count == 3
        assert await store.archive_messages(ID, "s1", 2) == [*msgs[3:], extra]
        assert await store.list_live_messages(ID, "s1") == []
        # every message is in exactly one place
        everywhere = [m.id for i in (1, 2) for m in await store.archive_messages(ID, "s1", i)]
        assert everywhere == [m.id for m in [*msgs, extra]]
        assert [a.index for a in (await store.list_archives(ID, "s1", 10, "")).items] == [1, 2]
        assert [a.index for a in (await store.list_archives(ID, "s1", 1, "")).items] == [1]
        assert [a.index for a in (await store.list_archives(ID, "s1", 10, "1")).items] == [2]
        assert (await store.list_archives(ID, "s1", 10, "2")).items == []
        assert await store.get_archive(ID, "s1", 3) is None

    run(body())


def test_commit_reject_if_running(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        await store.add_message(ID, "s1", msg("more"))
        with pytest.raises(Aborted) as exc:
            await store.commit(plan("s1", "t2", 2, reject=True))
        assert exc.value.reason == "COMMIT_IN_PROGRESS"
        assert exc.value.metadata["task_id"] == "t1"
        assert await store.get_task("t2") is None
        assert len(await store.list_live_messages(ID, "s1")) == 1  # nothing moved
        # without the flag the commit queues behind the running one
        queued = await store.commit(plan("s1", "t2", 3))
        assert queued.archive is not None and queued.archive.index == 2
        await store.request_cancel("t1", at(4))
        await store.add_message(ID, "s1", msg("again"))
        with pytest.raises(Aborted):  # t2 is still pending
            await store.commit(plan("s1", "t3", 5, reject=True))
        await store.request_cancel("t2", at(6))
        ok = await store.commit(plan("s1", "t3", 7, reject=True))
        assert ok.archive is not None and ok.archive.index == 3

    run(body())


def test_idempotent_replay(store: Store, run: Runner) -> None:
    async def body() -> None:
        k = rkey("CreateSession", "r1")
        first = await store.create_session(ID, "s1", at(1), k)
        assert await store.create_session(ID, "s1", at(2), k) == first
        with pytest.raises(RequestIdConflict):
            await store.create_session(ID, "s1", at(2), rkey("CreateSession", "r1", b"other"))
        # keys are scoped per identity and per method
        await store.create_session(OTHER_USER, "s1", at(2),
                                   rkey("CreateSession", "r1", identity=OTHER_USER))

        km = rkey("AddMessage", "m1")
        m = await store.add_message(ID, "s1", msg("once", 3), km)
        again = await store.add_message(ID, "s1", msg("twice", 4), km)
        assert again == m and again.text() == "once"
        with pytest.raises(RequestIdConflict):
            await store.add_message(ID, "s1", msg("x"), rkey("AddMessage", "m1", b"diff"))
        assert [x.id for x in await store.list_live_messages(ID, "s1")] == [m.id]

        ku = rkey("RecordUsage", "u1")
        rec = UsageRecord(("a",), None, at(5))
        assert await store.record_usage(ID, "s1", rec, ku) == 1
        assert await store.record_usage(ID, "s1", rec, ku) == 1
        with pytest.raises(RequestIdConflict):
            await store.record_usage(ID, "s1", rec, rkey("RecordUsage", "u1", b"d"))

        kc = rkey("Commit", "c1")
        out = await store.commit(plan("s1", "t1", 6), kc)
        await store.add_message(ID, "s1", msg("later", 7))
        replay = await store.commit(plan("s1", "t-other", 8), kc)
        assert replay.archived and replay.archive == out.archive
        assert replay.task is not None and out.task is not None
        assert replay.task.task_id == "t1"
        assert await store.get_task("t-other") is None
        assert len(await store.list_live_messages(ID, "s1")) == 1
        with pytest.raises(RequestIdConflict):
            await store.commit(plan("s1", "t9", 9), rkey("Commit", "c1", b"d"))
        # an empty commit replays as empty even when messages arrived since
        await store.create_session(ID, "s2", at(9))
        ke = rkey("Commit", "c2")
        assert (await store.commit(plan("s2", "t-e", 9), ke)).archived is False
        await store.add_message(ID, "s2", msg())
        assert (await store.commit(plan("s2", "t-e2", 10), ke)).archived is False
        assert await store.get_task("t-e2") is None

    run(body())


def test_concurrent_replays_store_once(store: Store, run: Runner) -> None:
    async def body() -> None:
        await store.create_session(ID, "s1", at(0))
        k = rkey("AddMessage", "same")
        results = await asyncio.gather(*(store.add_message(ID, "s1", msg(f"m{i}"), k)
                                         for i in range(6)))
        assert len({r.id for r in results}) == 1
        assert len(await store.list_live_messages(ID, "s1")) == 1
        kc = rkey("Commit", "same")
        outs = await asyncio.gather(*(store.commit(plan("s1", f"t{i}", 1), kc)
                                      for i in range(4)))
        assert len({o.task.task_id for o in outs if o.task is not None}) == 1
        assert len((await store.list_archives(ID, "s1", 10, "")).items) == 1

    run(body())


def test_concurrent_commits_one_session(store: Store, run: Runner) -> None:
    async def body() -> None:
        await store.create_session(ID, "s1", at(0))
        n = 12

        async def writer(i: int) -> tuple[list[str], CommitOutcome]:
            ids = [(await store.add_message(ID, "s1", msg(f"w{i}-{j}", i))).id
                   for j in range(2)]
            return ids, await store.commit(plan("s1", f"t{i:02d}", i))

        results = await asyncio.gather(*(writer(i) for i in range(n)))
        written = {mid for ids, _ in results for mid in ids}
        assert len(written) == 2 * n
        indexes = sorted(o.archive.index for _, o in results if o.archive is not None)
        assert indexes == list(range(1, len(indexes) + 1))
        assert indexes, "at least one commit archived something"
        seen: list[Message] = []
        for i in indexes:
            part = await store.archive_messages(ID, "s1", i)
            arch = await store.get_archive(ID, "s1", i)
            assert arch is not None and arch.message_count == len(part) > 0
            seen.extend(part)
        live = await store.list_live_messages(ID, "s1")
        seqs = [m.seq for m in [*seen, *live]]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # ordered, no dupes
        assert {m.id for m in [*seen, *live]} == written  # nothing lost
        meta = await store.get_session(ID, "s1")
        assert meta is not None and meta.archive_count == len(indexes)
        assert meta.live_message_count == len(live)
        tasks = (await store.list_tasks(ID, "s1", None, "", 100, "")).items
        assert sorted(t.archive_index for t in tasks) == indexes

    run(body())


# ---------------------------------------------------------------------------- archives
def test_latest_done_archive(store: Store, run: Runner) -> None:
    async def body() -> None:
        assert await store.latest_done_archive(ID, "s1") is None
        for i in (1, 2, 3):
            await committed(store, "s1", f"t{i}", i)
        assert await store.latest_done_archive(ID, "s1") is None
        t1 = await claim(store, "w", 10)
        assert t1.task_id == "t1"
        await run_pipeline(store, "t1", "w", 11)
        assert await claim(store, "w", 12) == await store.get_task("t2")
        await store.fail_task("t2", "w", TaskError(ErrorCode.INTERNAL, "boom", "ENGINE"), at(13))
        await claim(store, "w", 14)
        await run_pipeline(store, "t3", "w", 15)
        latest = await store.latest_done_archive(ID, "s1")
        assert latest is not None and latest.index == 3 and latest.state is ArchiveState.DONE
        assert latest.overview == "overview t3" and latest.abstract == "abstract t3"
        assert latest.completed_at == at(15)
        before3 = await store.latest_done_archive(ID, "s1", before_index=3)
        assert before3 is not None and before3.index == 1  # archive 2 failed: skipped
        assert await store.latest_done_archive(ID, "s1", before_index=1) is None
        a2 = await store.get_archive(ID, "s1", 2)
        assert a2 is not None and a2.state is ArchiveState.PENDING

    run(body())


# ---------------------------------------------------------------------------- tasks
def test_claim_order_and_lease_expiry(store: Store, run: Runner) -> None:
    async def body() -> None:
        assert await store.claim_task("w1", at(0), at(LEASE)) is None
        await committed(store, "a", "ta1", 1)
        await committed(store, "a", "ta2", 2)
        await committed(store, "b", "tb1", 3)
        t = await claim(store, "w1", 10)
        assert (t.task_id, t.state, t.attempts, t.lease_owner) == \
            ("ta1", TaskState.RUNNING, 1, "w1")
        assert t.lease_expires_at == at(10 + LEASE) and t.started_at == at(10)
        ev = (await store.list_events("ta1", 1))[0]
        assert (ev.seq, ev.kind, ev.attempt, ev.state) == \
            (2, EventKind.STARTED, 1, TaskState.RUNNING)
        # ta2 waits for ta1 (same session, lower archive): tb1 is next
        assert (await claim(store, "w2", 11)).task_id == "tb1"
        assert await store.claim_task("w3", at(12), at(12 + LEASE)) is None
        # w1's lease expires: another worker takes ta1 over
        late = 10 + LEASE + 1
        again = await claim(store, "w3", late)
        assert (again.task_id, again.attempts, again.lease_owner) == ("ta1", 2, "w3")
        assert again.started_at == at(10)
        started = (await store.list_events("ta1", 2))[0]
        assert started.kind is EventKind.STARTED and started.attempt == 2
        assert "resumed" in started.message
        with pytest.raises(LeaseLost):
            await store.append_event("ta1", "w1", NewEvent(EventKind.STAGE_STARTED),
                                     Stage.SUMMARIZE, at(late))
        assert not await store.renew_lease("ta1", "w1", at(late + 100))
        assert await store.renew_lease("ta1", "w3", at(late + 100))
        # tb1 (w2) expired too but ta1 is renewed: only tb1 is claimable
        t2 = await claim(store, "w4", late + 1)
        assert t2.task_id == "tb1"
        assert await store.claim_task("w5", at(late + 2), at(late + 40)) is None
        await run_pipeline(store, "ta1", "w3", late + 3)
        assert (await claim(store, "w5", late + 4)).task_id == "ta2"

    run(body())


def test_concurrent_claims_take_distinct_tasks(store: Store, run: Runner) -> None:
    async def body() -> None:
        for i in range(4):
            await committed(store, f"s{i}", f"t{i}", i)
        got = await asyncio.gather(*(store.claim_task(f"w{i}", at(10), at(40))
                                     for i in range(7)))
        ids = [t.task_id for t in got if t is not None]
        assert sorted(ids) == ["t0", "t1", "t2", "t3"]
        assert got.count(None) == 3

    run(body())


def test_release_all_leases(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        await claim(store, "w1", 2)
        assert await store.release_all_leases() == 1
        t = await store.get_task("t1")
        assert t is not None and t.lease_owner == "" and t.lease_expires_at is None
        assert t.state is TaskState.RUNNING
        again = await claim(store, "w2", 3)
        assert (again.task_id, again.attempts) == ("t1", 2)
        assert await store.release_all_leases() == 1
        assert await store.release_all_leases() == 0

    run(body())


def test_worker_writes_check_the_lease(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        with pytest.raises(LeaseLost):  # pending, nobody holds it
            await store.append_event("t1", "w1", NewEvent(EventKind.STAGE_STARTED),
                                     Stage.SUMMARIZE, at(2))
        await claim(store, "w1", 2)
        summary = SummaryResponse("o", "a")
        for call in (
            store.append_event("t1", "w2", NewEvent(EventKind.STAGE_STARTED), Stage.SUMMARIZE,
                               at(3)),
            store.complete_stage("t1", "w2", Stage.SUMMARIZE, summary, at(3)),
            store.finalize_task("t1", "w2", at(3)),
            store.fail_task("t1", "w2", TaskError(ErrorCode.INTERNAL, "x"), at(3)),
            store.cancel_task("t1", "w2", at(3)),
        ):
            with pytest.raises(LeaseLost):
                await call
        assert not await store.renew_lease("t1", "w2", at(100))
        assert await store.renew_lease("t1", "w1", at(100))
        t = await store.get_task("t1")
        assert t is not None and t.lease_expires_at == at(100) and t.last_seq == 2
        ev = await store.append_event("t1", "w1", NewEvent(EventKind.STAGE_STARTED, "go", 1),
                                      Stage.SUMMARIZE, at(4))
        assert (ev.seq, ev.kind, ev.stage, ev.message, ev.attempt, ev.state) == \
            (3, EventKind.STAGE_STARTED, Stage.SUMMARIZE, "go", 1, TaskState.RUNNING)
        t = await store.get_task("t1")
        assert t is not None and t.stage is Stage.SUMMARIZE and t.last_seq == 3
        with pytest.raises(NotFound):
            await store.append_event("nope", "w1", NewEvent(EventKind.STAGE_STARTED),
                                     Stage.SUMMARIZE, at(4))
        assert await store.get_task("nope") is None

    run(body())


def test_claim_can_announce_the_first_stage_not_done(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1, n=2)
        task = await store.claim_task("w1", at(1), at(1 + LEASE), announce=True)
        assert task is not None and task.stage is Stage.SUMMARIZE and task.last_seq == 3
        evs = await store.list_events("t1", 1)
        assert [(e.kind, e.stage) for e in evs] == [(EventKind.STARTED, Stage.QUEUED),
                                                    (EventKind.STAGE_STARTED, Stage.SUMMARIZE)]
        await store.complete_stage("t1", "w1", Stage.SUMMARIZE, SummaryResponse("o", "a"), at(2))
        # the lease runs out; the next claim resumes and announces the stage after
        again = await store.claim_task("w2", at(2 + LEASE + 1), at(3 + 2 * LEASE),
                                       announce=True)
        assert again is not None and again.stage is Stage.EXTRACT and again.attempts == 2

    run(body())


def test_complete_stage_announces_the_next_stage_unless_cancelled(store: Store,
                                                                  run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1, n=2)
        await claim(store, "w", 2)
        ev = await store.complete_stage("t1", "w", Stage.SUMMARIZE, SummaryResponse("o", "a"),
                                        at(3), next_stage=Stage.EXTRACT)
        assert (ev.kind, ev.stage, ev.seq) == (EventKind.STAGE_STARTED, Stage.EXTRACT, 4)
        tail = await store.list_events("t1", 2)
        assert [(e.seq, e.kind, e.stage) for e in tail] == [
            (3, EventKind.STAGE_COMPLETED, Stage.SUMMARIZE),
            (4, EventKind.STAGE_STARTED, Stage.EXTRACT)]
        t = await store.get_task("t1")
        assert t is not None and t.stage is Stage.EXTRACT and t.last_seq == 4
        await store.request_cancel("t1", at(4))
        last = await store.complete_stage("t1", "w", Stage.EXTRACT, ExtractionResponse(()), at(5),
                                          next_stage=Stage.RELATIONS)
        kinds = [e.kind for e in await store.list_events("t1", 4)]
        assert kinds == [EventKind.CANCEL_REQUESTED, EventKind.STAGE_COMPLETED,
                         EventKind.CANCELLED]
        assert last.kind is EventKind.CANCELLED and last.state is TaskState.CANCELLED
        t = await store.get_task("t1")
        assert t is not None and t.state is TaskState.CANCELLED and t.lease_owner == ""
        arch = await store.get_archive(ID, "s1", 1)
        assert arch is not None and arch.state.value == "pending"

    run(body())


def test_complete_stage_is_applied_once(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1, n=2)
        await claim(store, "w", 2)
        usage = TokenUsage(100, 20)
        ev1 = await store.complete_stage("t1", "w", Stage.SUMMARIZE,
                                         SummaryResponse("first", "abs", usage), at(3))
        assert (ev1.kind, ev1.stage, ev1.seq) == (EventKind.STAGE_COMPLETED, Stage.SUMMARIZE, 3)
        ev1b = await store.complete_stage("t1", "w", Stage.SUMMARIZE,
                                          SummaryResponse("second", "abs2", usage), at(4))
        assert ev1b == ev1
        arch = await store.get_archive(ID, "s1", 1)
        assert arch is not None and arch.overview == "first"
        t = await store.get_task("t1")
        assert t is not None and t.token_usage == usage and t.done_stage is Stage.SUMMARIZE
        cands = (cand(MemoryCategory.PROFILE, "profile", "Name: Alice"),
                 cand(MemoryCategory.CASES, "k", "case"))
        extract = ExtractionResponse(cands, TokenUsage(7, 3))
        ev2 = await store.complete_stage("t1", "w", Stage.EXTRACT, extract, at(5))
        assert await store.complete_stage("t1", "w", Stage.EXTRACT, extract, at(6)) == ev2
        # an earlier stage after a later one is not applied either
        assert await store.complete_stage("t1", "w", Stage.SUMMARIZE,
                                          SummaryResponse("third", "x", usage), at(6)) == ev2
        assert len((await store.list_memories(ID, None, 100, "")).items) == 2
        counts = await store.task_memory_counts("t1")
        assert counts == MemoryCounts(profile=1, cases=1)
        t = await store.get_task("t1")
        assert t is not None and t.token_usage == TokenUsage(107, 23)
        assert t.last_seq == 4
        await store.complete_stage("t1", "w", Stage.RELATIONS,
                                   RelationsOutput(("u2", "u1", "u2")), at(7))
        await store.complete_stage("t1", "w", Stage.RELATIONS, RelationsOutput(("u3",)), at(7))
        assert await store.session_relations(ID, "s1") == ["u1", "u2"]
        await store.complete_stage("t1", "w", Stage.ACTIVE_COUNTS,
                                   ActiveCountsOutput(("u1", "u2", "u1")), at(8))
        await store.complete_stage("t1", "w", Stage.ACTIVE_COUNTS,
                                   ActiveCountsOutput(("u1",)), at(8))
        assert (await store.active_count("u1"), await store.active_count("u2"),
                await store.active_count("u3")) == (1, 1, 0)
        done = await store.finalize_task("t1", "w", at(9))
        assert done.kind is EventKind.COMPLETED and done.state is TaskState.COMPLETED
        assert done.result is not None
        assert done.result.token_usage == TokenUsage(107, 23)
        assert done.result.memories_extracted == counts
        assert done.result.active_count_updated == 2
        assert done.result.archive_uri == arch.uri
        # finalize is exactly once: a second call fails and counts nothing twice
        with pytest.raises(LeaseLost):
            await store.finalize_task("t1", "w", at(10))
        task = await store.get_task("t1")
        assert task is not None
        assert (task.state, task.done_stage, task.lease_owner) == \
            (TaskState.COMPLETED, Stage.FINALIZE, "")
        assert task.finished_at == at(9) and task.result == done.result
        assert task.lease_expires_at is None
        meta = await store.get_session(ID, "s1")
        assert meta is not None
        assert (meta.commit_count, meta.llm_token_usage, meta.memories_extracted) == \
            (1, TokenUsage(107, 23), counts)
        assert meta.last_commit_at == at(9)
        arch = await store.get_archive(ID, "s1", 1)
        assert arch is not None and arch.state is ArchiveState.DONE
        assert arch.completed_at == at(9)
        # a completed task is never claimed again
        assert await store.claim_task("w2", at(1000), at(1100)) is None
        # a second archive of the session adds up
        await committed(store, "s1", "t2", 20)
        await claim(store, "w", 21)
        await run_pipeline(store, "t2", "w", 22, usage=TokenUsage(1, 1),
                           candidates=(cand(MemoryCategory.EVENTS, "e", "went home"),))
        meta = await store.get_session(ID, "s1")
        assert meta is not None and meta.commit_count == 2
        assert meta.llm_token_usage == TokenUsage(108, 24)
        assert meta.memories_extracted == MemoryCounts(profile=1, cases=1, events=1)

    run(body())


def test_fail_task(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        await committed(store, "s1", "t2", 2)
        await claim(store, "w", 3)
        err = TaskError(code=ErrorCode.UNAVAILABLE, message="LLM unavailable",
                        reason="LLM_UNAVAILABLE")
        ev = await store.fail_task("t1", "w", err, at(4))
        assert (ev.kind, ev.state, ev.error, ev.seq) == \
            (EventKind.FAILED, TaskState.FAILED, err, 3)
        t = await store.get_task("t1")
        assert t is not None and t.state is TaskState.FAILED and t.error == err
        assert t.finished_at == at(4) and t.lease_owner == ""
        # terminal: failing again (without a worker) appends nothing
        again = await store.fail_task("t1", None, TaskError(ErrorCode.INTERNAL, "other"), at(5))
        assert again == ev
        assert [e.seq for e in await store.list_events("t1", 0)] == [1, 2, 3]
        arch = await store.get_archive(ID, "s1", 1)
        assert arch is not None and arch.state is ArchiveState.PENDING
        meta = await store.get_session(ID, "s1")
        assert meta is not None and meta.commit_count == 0
        # the failed task no longer blocks the next archive
        assert (await claim(store, "w", 6)).task_id == "t2"
        # fail without a worker: an operator failing a pending task
        await committed(store, "s2", "t3", 7)
        ev3 = await store.fail_task("t3", None, err, at(8))
        assert ev3.kind is EventKind.FAILED
        with pytest.raises(NotFound):
            await store.fail_task("nope", None, err, at(8))

    run(body())


def test_request_cancel(store: Store, run: Runner) -> None:
    async def body() -> None:
        with pytest.raises(NotFound):
            await store.request_cancel("nope", at(0))
        await committed(store, "s1", "t1", 1)
        seen: list[TaskEvent] = []
        store.add_event_listener(seen.extend)
        t = await store.request_cancel("t1", at(2))
        assert t.state is TaskState.CANCELLED and t.cancel_requested
        assert t.finished_at == at(2) and t.error is not None
        assert [e.kind for e in seen] == [EventKind.CANCELLED]
        assert (await store.list_events("t1", 1))[0].kind is EventKind.CANCELLED
        assert await store.claim_task("w", at(3), at(30)) is None
        # terminal: unchanged
        assert await store.request_cancel("t1", at(4)) == t
        assert len(seen) == 1
        # running: flag + event; the worker stops at the next boundary
        await committed(store, "s1", "t2", 5)
        await claim(store, "w", 6)
        seen.clear()
        r = await store.request_cancel("t2", at(7))
        assert r.state is TaskState.RUNNING and r.cancel_requested
        assert [e.kind for e in seen] == [EventKind.CANCEL_REQUESTED]
        r2 = await store.request_cancel("t2", at(8))
        assert r2 == r and len(seen) == 1  # asked once
        ev = await store.cancel_task("t2", "w", at(9))
        assert (ev.kind, ev.state) == (EventKind.CANCELLED, TaskState.CANCELLED)
        done = await store.get_task("t2")
        assert done is not None and done.state is TaskState.CANCELLED
        assert done.finished_at == at(9) and done.lease_owner == ""
        assert [e.kind for e in await store.list_events("t2", 0)] == [
            EventKind.CREATED, EventKind.STARTED, EventKind.CANCEL_REQUESTED,
            EventKind.CANCELLED]

    run(body())


def test_delete_session_cancels_open_tasks(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        await committed(store, "s1", "t2", 2)
        await committed(store, "s2", "t3", 3)
        await claim(store, "w", 4)  # t1 running
        work: list[int] = []
        store.add_work_listener(lambda: work.append(1))
        assert await store.delete_session(ID, "s1", at(5))
        assert work
        for tid in ("t1", "t2"):
            t = await store.get_task(tid)
            assert t is not None and t.state is TaskState.CANCELLED
            assert t.error is not None and t.error.reason == "SESSION_DELETED"
            last = (await store.list_events(tid, 0))[-1]
            assert last.kind is EventKind.CANCELLED and last.seq == t.last_seq
        with pytest.raises(LeaseLost):
            await store.complete_stage("t1", "w", Stage.SUMMARIZE, SummaryResponse("o", "a"),
                                       at(6))
        assert await store.get_archive(ID, "s1", 1) is None
        assert await store.archive_messages(ID, "s1", 1) == []
        t3 = await store.get_task("t3")
        assert t3 is not None and t3.state is TaskState.PENDING
        assert (await claim(store, "w", 7)).task_id == "t3"

    run(body())


def test_list_tasks(store: Store, run: Runner) -> None:
    async def body() -> None:
        for i in range(5):
            await committed(store, "s1" if i % 2 == 0 else "s2", f"t{i}", i)
        await committed(store, "s3", "t5", 4)  # same created_at as t4: task_id breaks ties
        page = await store.list_tasks(ID, "", None, "", 2, "")
        assert [t.task_id for t in page.items] == ["t5", "t4"] and page.next_token
        page2 = await store.list_tasks(ID, "", None, "", 2, page.next_token)
        assert [t.task_id for t in page2.items] == ["t3", "t2"]
        page3 = await store.list_tasks(ID, "", None, "", 2, page2.next_token)
        assert [t.task_id for t in page3.items] == ["t1", "t0"] and page3.next_token == ""
        s1 = await store.list_tasks(ID, "s1", None, "", 10, "")
        assert [t.task_id for t in s1.items] == ["t4", "t2", "t0"]
        await store.request_cancel("t2", at(10))
        cancelled = await store.list_tasks(ID, "", TaskState.CANCELLED, "", 10, "")
        assert [t.task_id for t in cancelled.items] == ["t2"]
        by_type = await store.list_tasks(ID, "", None, "session_commit", 10, "")
        assert len(by_type.items) == 6
        assert (await store.list_tasks(ID, "", None, "other_type", 10, "")).items == []
        assert (await store.list_tasks(OTHER_AGENT, "", None, "", 10, "")).items == []

    run(body())


# ---------------------------------------------------------------------------- journal
def test_journal_numbering(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        await claim(store, "w", 2)
        for st in (Stage.SUMMARIZE, Stage.EXTRACT):
            await store.append_event("t1", "w", NewEvent(EventKind.STAGE_STARTED), st, at(3))
        await run_pipeline(store, "t1", "w", 4)
        events = await store.list_events("t1", 0)
        t = await store.get_task("t1")
        assert t is not None
        assert [e.seq for e in events] == list(range(1, t.last_seq + 1))
        assert t.first_seq == 1 and events[-1].kind is EventKind.COMPLETED
        paged: list[TaskEvent] = []
        after = 0
        while batch := await store.list_events("t1", after, limit=3):
            assert len(batch) <= 3
            paged.extend(batch)
            after = batch[-1].seq
        assert paged == events
        assert await store.list_events("t1", t.last_seq) == []
        assert await store.list_events("nope", 0) == []

    run(body())


def test_journal_cap(make_store: StoreFactory, run: Runner) -> None:
    store = make_store(journal_cap=5)

    async def body() -> None:
        await committed(store, "s1", "t1", 1)
        await claim(store, "w", 2)
        for i in range(8):
            await store.append_event("t1", "w", NewEvent(EventKind.STAGE_STARTED, f"e{i}"),
                                     Stage.SUMMARIZE, at(3))
        t = await store.get_task("t1")
        assert t is not None and (t.first_seq, t.last_seq) == (6, 10)
        assert [e.seq for e in await store.list_events("t1", 0)] == [6, 7, 8, 9, 10]
        assert [e.seq for e in await store.list_events("t1", 7)] == [8, 9, 10]
        await run_pipeline(store, "t1", "w", 4)
        t = await store.get_task("t1")
        assert t is not None and t.last_seq == 16 and t.first_seq == 12
        assert [e.seq for e in await store.list_events("t1", 0)] == [12, 13, 14, 15, 16]

    run(body())


def test_event_listeners_run_after_commit(store: Store, run: Runner) -> None:
    async def body() -> None:
        lp = asyncio.get_running_loop()
        seen: list[TaskEvent] = []
        checks: list[asyncio.Task[list[int]]] = []
        work: list[int] = []

        async def visible(task_id: str) -> list[int]:
            return [e.seq for e in await store.list_events(task_id, 0)]

        def on_events(events: Sequence[TaskEvent]) -> None:
            seen.extend(events)
            checks.append(lp.create_task(visible(events[-1].task_id)))

        store.add_event_listener(on_events)
        store.add_work_listener(lambda: work.append(1))
        await committed(store, "s1", "t1", 1)
        assert [(e.task_id, e.seq, e.kind) for e in seen] == [("t1", 1, EventKind.CREATED)]
        assert work == [1]
        # what the listener saw is already durable and readable
        assert await checks[0] == [1]
        await claim(store, "w", 2)
        assert seen[-1].kind is EventKind.STARTED and seen[-1].seq == 2
        # a write that fails announces nothing
        n = len(seen)
        with pytest.raises(LeaseLost):
            await store.append_event("t1", "other", NewEvent(EventKind.STAGE_STARTED),
                                     Stage.SUMMARIZE, at(3))
        assert len(seen) == n
        await run_pipeline(store, "t1", "w", 4)
        assert [e.seq for e in seen] == list(range(1, 9))
        final = seen[-1]
        assert final.kind is EventKind.COMPLETED and final.result is not None
        assert len(work) == 1  # nothing else is pending: finishing announces no work
        for c in checks:
            assert (await c)[-1] >= 1
        assert await checks[-1] == list(range(1, 9))

    run(body())


# ---------------------------------------------------------------------------- memories
def test_memories_upsert_and_merge(store: Store, run: Runner) -> None:
    async def body() -> None:
        out1 = await committed(store, "s1", "t1", 1)
        await claim(store, "w", 2)
        await run_pipeline(store, "t1", "w", 3, candidates=(
            cand(MemoryCategory.PROFILE, "profile", "Name: Alice\nCity: Paris", "m1"),
            cand(MemoryCategory.PREFERENCES, "drink", "likes tea", "m1"),
            cand(MemoryCategory.PREFERENCES, "drink", "likes coffee (dup, ignored)", "m9"),
            cand(MemoryCategory.CASES, "printer", "restarting fixed the printer", "m2"),
        ))
        assert await store.task_memory_counts("t1") == \
            MemoryCounts(profile=1, preferences=1, cases=1)
        before = {m.category: m for m in (await store.list_memories(ID, None, 100, "")).items}
        assert set(before) == {MemoryCategory.PROFILE, MemoryCategory.PREFERENCES,
                               MemoryCategory.CASES}
        assert before[MemoryCategory.PREFERENCES].content == "likes tea"
        prof = before[MemoryCategory.PROFILE]
        assert prof.identity == Identity("acme", "alice", "")  # user space
        assert before[MemoryCategory.CASES].identity == ID  # agent space
        assert prof.source_session_id == "s1" and prof.source_message_ids == ("m1",)
        assert out1.archive is not None and prof.source_archive_uri == out1.archive.uri
        assert prof.created_at == prof.updated_at == at(3)

        await committed(store, "s1", "t2", 10)
        assert await store.task_memory_counts("t2") == MemoryCounts()
        await claim(store, "w", 11)
        await run_pipeline(store, "t2", "w", 12, candidates=(
            cand(MemoryCategory.PROFILE, "profile", "City: Paris\nJob: engineer", "m3"),
            cand(MemoryCategory.PREFERENCES, "drink", "likes coffee now", "m4"),
            cand(MemoryCategory.EVENTS, "trip", "flew to Rome", "m4"),
        ))
        after = {m.category: m for m in (await store.list_memories(ID, None, 100, "")).items}
        assert len(after) == 4  # same keys updated, not duplicated
        p2 = after[MemoryCategory.PROFILE]
        assert p2.memory_id == prof.memory_id
        assert p2.content == "Name: Alice\nCity: Paris\nJob: engineer"
        assert p2.source_message_ids == ("m1", "m3")
        assert p2.created_at == at(3) and p2.updated_at == at(12)
        pref = after[MemoryCategory.PREFERENCES]
        assert pref.memory_id == before[MemoryCategory.PREFERENCES].memory_id
        assert pref.content == "likes coffee now"
        assert await store.get_memory(ID, p2.memory_id) == p2
        # user-space memories are shared by the user's agents; agent space is not
        mine = {m.category for m in (await store.list_memories(OTHER_AGENT, None, 100, "")).items}
        assert mine == {MemoryCategory.PROFILE, MemoryCategory.PREFERENCES,
                        MemoryCategory.EVENTS}
        assert await store.get_memory(OTHER_AGENT, after[MemoryCategory.CASES].memory_id) \
            is None
        assert (await store.list_memories(OTHER_USER, None, 100, "")).items == []
        assert await store.get_memory(OTHER_USER, p2.memory_id) is None
        meta = await store.get_session(ID, "s1")
        assert meta is not None
        assert meta.memories_extracted == MemoryCounts(profile=2, preferences=2, cases=1,
                                                       events=1)

    run(body())


async def _seed_memories(store: Store) -> dict[str, Memory]:
    await committed(store, "s1", "t1", 1)
    await claim(store, "w", 2)
    await run_pipeline(store, "t1", "w", 3, candidates=(
        cand(MemoryCategory.PREFERENCES, "drink", "Alice prefers green tea over black coffee"),
        cand(MemoryCategory.ENTITIES, "dog", "Alice has a dog named Rex who likes tea"),
        cand(MemoryCategory.EVENTS, "trip", "Alice went to Paris by train"),
        cand(MemoryCategory.CASES, "tea-bug", "green screen bug fixed by a driver update"),
        cand(MemoryCategory.TOOLS, "kettle", "kettle tool boils water"),
    ))
    return {m.content.split()[1] if m.content.startswith("Alice") else m.content.split()[0]: m
            for m in (await store.list_memories(ID, None, 100, "")).items}


def test_search_memories(store: Store, run: Runner) -> None:
    async def body() -> None:
        mems = await _seed_memories(store)
        hits = await store.search_memories(ID, "Green TEA?", None, 10)
        contents = [m.content for m, _ in hits]
        assert contents[0] == mems["prefers"].content  # both terms: best
        assert set(contents) == {mems["prefers"].content, mems["has"].content,
                                 mems["green"].content}
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] > scores[-1]
        assert [m.content for m, _ in await store.search_memories(ID, "green tea", None, 1)] \
            == [mems["prefers"].content]
        only = await store.search_memories(ID, "tea", MemoryCategory.ENTITIES, 10)
        assert [m.memory_id for m, _ in only] == [mems["has"].memory_id]
        assert [m.memory_id for m, _ in await store.search_memories(ID, "paris", None, 10)] \
            == [mems["went"].memory_id]
        assert await store.search_memories(ID, "unicorn", None, 10) == []
        assert await store.search_memories(ID, "?! ...", None, 10) == []
        assert await store.search_memories(ID, 'tea" OR "x', None, 10)  # no syntax leaks
        # visibility: user space is shared with the user's agents, agent space is not
        other_agent = {m.content for m, _ in
                       await store.search_memories(OTHER_AGENT, "green tea water", None, 10)}
        assert other_agent == {mems["prefers"].content, mems["has"].content}
        assert await store.search_memories(OTHER_USER, "tea", None, 10) == []

    run(body())


def test_list_and_delete_memories(store: Store, run: Runner) -> None:
    async def body() -> None:
        mems = await _seed_memories(store)
        ids = sorted(m.memory_id for m in mems.values())
        page1 = await store.list_memories(ID, None, 2, "")
        page2 = await store.list_memories(ID, None, 2, page1.next_token)
        page3 = await store.list_memories(ID, None, 2, page2.next_token)
        assert [m.memory_id for m in [*page1.items, *page2.items, *page3.items]] == ids
        assert page3.next_token == ""
        prefs = (await store.list_memories(ID, MemoryCategory.PREFERENCES, 10, "")).items
        assert [m.memory_id for m in prefs] == [mems["prefers"].memory_id]
        victim = mems["has"].memory_id
        assert await store.delete_memory(OTHER_USER, victim) is False
        assert await store.delete_memory(OTHER_AGENT, mems["kettle"].memory_id) is False
        assert await store.delete_memory(ID, victim) is True
        assert await store.delete_memory(ID, victim) is False
        assert await store.get_memory(ID, victim) is None
        assert victim not in {m.memory_id for m, _ in
                              await store.search_memories(ID, "dog tea", None, 10)}
        # user-space memories can be deleted by another agent of the same user
        assert await store.delete_memory(OTHER_AGENT, mems["went"].memory_id) is True
        assert len((await store.list_memories(ID, None, 100, "")).items) == 3

    run(body())


# ---------------------------------------------------------------------------- retention
def test_sweep_retention(store: Store, run: Runner) -> None:
    async def body() -> None:
        await store.create_session(ID, "keyed", at(10), rkey("CreateSession", "old"))
        await store.add_message(ID, "keyed", msg("x", 30), rkey("AddMessage", "new"))
        for i in range(1, 6):
            await committed(store, f"s{i}", f"t{i}", i)
        await claim(store, "w", 50)
        await run_pipeline(store, "t1", "w", 100, candidates=(
            cand(MemoryCategory.EVENTS, "e", "kept forever"),))
        await claim(store, "w", 100)
        await store.fail_task("t2", "w", TaskError(ErrorCode.INTERNAL, "x"), at(100))
        await store.request_cancel("t3", at(100))
        await claim(store, "w", 800)
        await run_pipeline(store, "t4", "w", 900)
        # t5 stays pending: open tasks are never removed
        res = await store.sweep(at(1000), completed_before=at(500), failed_before=at(50),
                                max_tasks=100, request_ids_before=at(20))
        assert (res.tasks_removed, res.request_ids_removed) == (2, 1)
        assert await store.get_task("t1") is None and await store.get_task("t3") is None
        assert await store.list_events("t1", 0) == []
        for tid in ("t2", "t4", "t5"):
            assert await store.get_task(tid) is not None
        a1 = await store.get_archive(ID, "s1", 1)
        assert a1 is not None and a1.state is ArchiveState.DONE  # archives stay
        assert len((await store.list_memories(ID, None, 10, "")).items) == 1  # memories stay
        # the old key is gone (a new request may reuse it); the newer one still replays
        again = await store.create_session(ID, "keyed2", at(1001), rkey("CreateSession", "old"))
        assert again.session_id == "keyed2"
        with pytest.raises(RequestIdConflict):
            await store.add_message(ID, "keyed", msg(), rkey("AddMessage", "new", b"other"))
        # beyond max_tasks: the oldest finished go first, open ones never
        res2 = await store.sweep(at(1000), at(0), at(0), max_tasks=2,
                                 request_ids_before=at(0))
        assert res2.tasks_removed == 1 and await store.get_task("t2") is None
        res3 = await store.sweep(at(1000), at(0), at(0), max_tasks=0,
                                 request_ids_before=at(0))
        assert res3.tasks_removed == 1 and await store.get_task("t4") is None
        t5 = await store.get_task("t5")
        assert t5 is not None and t5.state is TaskState.PENDING
        res4 = await store.sweep(at(1000), at(2000), at(2000), max_tasks=0,
                                 request_ids_before=at(0))
        assert res4.tasks_removed == 0
        assert (await claim(store, "w", 2000)).task_id == "t5"

    run(body())


def test_ping(store: Store, run: Runner) -> None:
    run(store.ping())


def _nul(value: str) -> str:
    """PostgreSQL stores NUL in free text as U+FFFD; SQLite keeps it. Both compare equal
    after mapping U+FFFD back."""
    return value.replace("\ufffd", "\x00")


def test_nul_characters_are_accepted(store: Store, run: Runner) -> None:
    async def body() -> None:
        await store.create_session(ID, "s1", at(0))
        m = await store.add_message(ID, "s1", msg("a\x00b", tools=(ToolPart("c", input="\x00"),)))
        assert (await store.list_live_messages(ID, "s1")) == [m]  # JSON-encoded: exact
        await store.update_tool_part(ID, "s1", m.id, "c", "out\x00", ToolStatus.COMPLETED, at(1))
        await store.record_usage(ID, "s1", UsageRecord(("u\x00",), None, at(1)))
        await store.commit(plan("s1", "t1", 2))
        await claim(store, "w", 3)
        ev = await store.append_event("t1", "w", NewEvent(EventKind.STAGE_STARTED, "go\x00"),
                                      Stage.SUMMARIZE, at(4))
        assert _nul(ev.message) == "go\x00"
        await run_pipeline(store, "t1", "w", 5, uris=("sessiond://x\x00",), candidates=(
            cand(MemoryCategory.EVENTS, "k\x00", "met Bob\x00 at noon"),))
        arch = await store.get_archive(ID, "s1", 1)
        assert arch is not None and arch.overview == "overview t1"
        parts = (await store.archive_messages(ID, "s1", 1))[0].parts
        assert parts[1] == ToolPart("c", input="\x00", output="out\x00",
                                    status=ToolStatus.COMPLETED)
        assert await store.archive_usage(ID, "s1", 1) == [UsageRecord(("u\x00",), None, at(1))]
        events = await store.list_events("t1", 0)
        assert _nul(events[2].message) == "go\x00"
        [mem] = (await store.list_memories(ID, None, 10, "")).items
        assert _nul(mem.content) == "met Bob\x00 at noon"
        assert [m for m, _ in await store.search_memories(ID, "bob", None, 5)] == [mem]
        assert [_nul(u) for u in await store.session_relations(ID, "s1")] == ["sessiond://x\x00"]
        assert await store.active_count("sessiond://x\x00") == 1
        with pytest.raises(FailedPrecondition):
            await store.update_tool_part(ID, "s1", m.id, "c", "", ToolStatus.ERROR, at(6))

    run(body())



def test_page_tokens(store: Store, run: Runner) -> None:
    async def body() -> None:
        for i in range(3):
            await committed(store, f"s{i}", f"t{i}", i)
        with pytest.raises(InvalidArgument):
            await store.list_tasks(ID, "", None, "", 10, "garbage")
        far_future = await store.list_tasks(ID, "", None, "", 10, "1e300|t")
        assert [t.task_id for t in far_future.items] == ["t2", "t1", "t0"]
        assert (await store.list_tasks(ID, "", None, "", 10, "-1e300|t")).items == []
        token = f"{at(1).timestamp()!r}|t1"
        assert [t.task_id for t in (await store.list_tasks(ID, "", None, "", 10, token)).items] \
            == ["t0"]

    run(body())


def test_archive_message_pages(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "pg", "tp", 1, n=5)
        whole = await store.archive_messages(ID, "pg", 1)
        assert await store.archive_message_page(ID, "pg", 1, 0, 0, 10**9) == (whole, False)
        first, more = await store.archive_message_page(ID, "pg", 1, 0, 2, 10**9)
        assert first == whole[:2] and more
        rest, more = await store.archive_message_page(ID, "pg", 1, first[-1].seq, 0, 10**9)
        assert rest == whole[2:] and not more
        # a character budget smaller than one message still returns one
        one, more = await store.archive_message_page(ID, "pg", 1, 0, 0, 1)
        assert one == whole[:1] and more
        size = len(codec.encode_parts(whole[0].parts))
        two, more = await store.archive_message_page(ID, "pg", 1, 0, 0, 2 * size)
        assert two == whole[:2] and more
        assert await store.archive_message_page(ID, "pg", 1, whole[-1].seq, 0, 10) == ([], False)
        assert await store.archive_message_page(OTHER_USER, "pg", 1, 0, 0, 10) == ([], False)

    run(body())


def test_live_and_session_quotas(store: Store, run: Runner) -> None:
    async def body() -> None:
        store.limits = Limits(live_messages_per_session=2, live_bytes_per_session=20,
                              message_bytes=10, sessions_per_identity=2)
        try:
            await store.ensure_session(ID, "qa", at(1))
            await store.add_message(ID, "qa", msg("0123456789"))  # 10 bytes
            with pytest.raises(QuotaExceeded) as err:
                await store.add_message(ID, "qa", msg("01234567890"))  # 21 > 20
            assert err.value.reason == "LIVE_BYTES_QUOTA"
            await store.add_message(ID, "qa", msg("abc"))
            with pytest.raises(QuotaExceeded) as err:
                await store.add_message(ID, "qa", msg("d"))
            assert err.value.reason == "LIVE_MESSAGES_QUOTA"
            with pytest.raises(NotFound):
                await store.add_message(ID, "missing", msg("d"))
            out = await store.commit(plan("qa", "tq", 2, keep=1))
            assert out.archived
            await store.add_message(ID, "qa", msg("0123456789"))  # 3 + 10 live now
            await store.ensure_session(ID, "qb", at(3))
            with pytest.raises(QuotaExceeded) as err:
                await store.create_session(ID, "qc", at(3))
            assert err.value.reason == "SESSIONS_QUOTA"
            assert (await store.ensure_session(ID, "qb", at(4))).session_id == "qb"
            await store.create_session(OTHER_USER, "qc", at(3))
        finally:
            store.limits = Limits()

    run(body())


def test_finishing_announces_work_only_when_some_waits(store: Store, run: Runner) -> None:
    async def body() -> None:
        work: list[int] = []
        store.add_work_listener(lambda: work.append(1))
        await committed(store, "s1", "t1", 1)
        await committed(store, "s1", "t2", 2)  # waits for t1 (archive order)
        assert len(work) == 2
        first, more = await store.claim_next_task("w", at(3), at(3 + LEASE))
        assert first is not None and first.task_id == "t1" and more  # t2 is pending
        nothing, more = await store.claim_next_task("w", at(3), at(3 + LEASE))
        assert nothing is None and not more
        await run_pipeline(store, "t1", "w", 4)
        assert len(work) == 3  # t2 may run now
        second, more = await store.claim_next_task("w", at(5), at(5 + LEASE))
        assert second is not None and second.task_id == "t2" and not more
        await run_pipeline(store, "t2", "w", 6)
        assert len(work) == 3  # nothing waits

    run(body())


def test_complete_stages_in_one_call_writes_the_same_journal(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "a", "ta", 1, n=2)
        await committed(store, "b", "tb", 1, n=2)
        await claim(store, "w", 2)
        await claim(store, "w", 2)
        cand = (CandidateMemory(MemoryCategory.PREFERENCES, "tea", "likes green tea",
                                ("m",)),)
        def outputs_of(task_id: str) -> list[tuple[Stage, StageOutput]]:
            return [
                (Stage.SUMMARIZE, SummaryResponse(f"overview {task_id}", "abstract", NO_USAGE)),
                (Stage.EXTRACT, ExtractionResponse(cand)),
                (Stage.RELATIONS, RelationsOutput(("ctx://x",))),
                (Stage.ACTIVE_COUNTS, ActiveCountsOutput(("ctx://x",))),
                (Stage.INDEX, IndexOutput(())),
            ]

        # The reference: one transaction per stage, each crossing into the next.
        stages = outputs_of("ta")
        for i, (stage, out) in enumerate(stages):
            following = stages[i + 1][0] if i + 1 < len(stages) else Stage.FINALIZE
            await store.complete_stage("ta", "w", stage, out, at(3), next_stage=following)
        await store.finalize_task("ta", "w", at(3))
        outputs = outputs_of("tb")
        last = await store.complete_stages("tb", "w", outputs, at(3), next_stage=Stage.FINALIZE,
                                           finalize=True)
        assert last.kind is EventKind.COMPLETED
        one = [(e.seq, e.kind, e.stage, e.state, e.message.replace("task ta", "task tb"))
               for e in await store.list_events("ta", 0)]
        many = [(e.seq, e.kind, e.stage, e.state, e.message)
                for e in await store.list_events("tb", 0)]
        assert many == one and len(many) == 13
        ta, tb = await store.get_task("ta"), await store.get_task("tb")
        assert ta is not None and tb is not None
        assert tb.state is TaskState.COMPLETED and tb.memory_counts == ta.memory_counts
        arch = await store.get_archive(ID, "b", 1)
        assert arch is not None and arch.overview == "overview tb"
        assert await store.active_count("ctx://x") == 2
        with pytest.raises(LeaseLost):  # finished: nothing more is written
            await store.complete_stages("tb", "w", outputs[:2], at(4))

    run(body())


def test_complete_stages_stops_at_a_cancelled_boundary(store: Store, run: Runner) -> None:
    async def body() -> None:
        await committed(store, "a", "ta", 1)
        await claim(store, "w", 2)
        await store.request_cancel("ta", at(2.5))
        last = await store.complete_stages(
            "ta", "w", [(Stage.SUMMARIZE, SummaryResponse("o", "a", NO_USAGE)),
                        (Stage.EXTRACT, ExtractionResponse(()))], at(3),
            next_stage=Stage.RELATIONS)
        assert last.kind is EventKind.CANCELLED and "after summarize" in last.message
        task = await store.get_task("ta")
        assert task is not None and task.state is TaskState.CANCELLED
        assert task.done_stage is Stage.SUMMARIZE

        # Stages already done are skipped (a redo after a crash), the rest applied.
        await committed(store, "b", "tb", 4)
        await claim(store, "w", 5)
        await store.complete_stage("tb", "w", Stage.SUMMARIZE,
                                   SummaryResponse("o", "a", NO_USAGE), at(5),
                                   next_stage=Stage.EXTRACT)
        before = (await store.get_task("tb"))
        assert before is not None
        last = await store.complete_stages(
            "tb", "w", [(Stage.SUMMARIZE, SummaryResponse("o", "a", NO_USAGE)),
                        (Stage.EXTRACT, ExtractionResponse(()))], at(6),
            next_stage=Stage.RELATIONS)
        assert last.seq == before.last_seq + 2 and last.stage is Stage.RELATIONS

    run(body())
