"""The retrieval index part of the storage contract, on every backend: what the
`index` stage writes, per-identity BM25 ranking, neighbours, filters, exactly-once
indexing across a crash, and removal with sessions and memories."""

from __future__ import annotations

import asyncio

from sessiond.server.domain import terms
from sessiond.server.domain.commands import (
    ActiveCountsOutput,
    ExtractionResponse,
    IndexOutput,
    RelationsOutput,
    SummaryResponse,
)
from sessiond.server.domain.recall import RecallHit, RecallKind, RecallQuery
from sessiond.server.domain.values import (
    CandidateMemory,
    Identity,
    MemoryCategory,
    Message,
    Role,
    Stage,
    Task,
    TextPart,
)
from sessiond.server.phase2.pipeline import archive_entries
from sessiond.server.store.base import Store

from tests.contract.conftest import Runner
from tests.contract.test_store_contract import ID, OTHER_AGENT, OTHER_USER, at

TURNS = [
    (Role.USER, "We adopted a puppy named Biscuit last weekend."),
    (Role.ASSISTANT, "Congratulations! What breed is Biscuit?"),
    (Role.USER, "A golden retriever, three months old."),
    (Role.ASSISTANT, "Golden retrievers love water; try the lake."),
    (Role.USER, "Next month I start a pottery class downtown."),
    (Role.ASSISTANT, "Pottery is relaxing. Which studio?"),
]


def q(text: str, **kw: object) -> RecallQuery:
    return RecallQuery(tuple(terms.query_terms(text)), **kw)  # type: ignore[arg-type]


async def commit_turns(store: Store, identity: Identity, sid: str, task_id: str, t: float,
                       turns: list[tuple[Role, str]] = TURNS) -> list[Message]:
    from sessiond.server.domain.commands import CommitPlan

    await store.ensure_session(identity, sid, at(t))
    out = [await store.add_message(identity, sid, Message(
        id=f"{sid}-{task_id}-{i}", role=role, parts=(TextPart(text),), created_at=at(t + i)))
        for i, (role, text) in enumerate(turns)]
    res = await store.commit(CommitPlan(identity, sid, 0, False, task_id, at(t + 10)))
    assert res.archived
    return out


async def run_stages(store: Store, task: Task, messages: list[Message], t: float,
                     stop_before_index: bool = False) -> None:
    w = task.lease_owner
    await store.complete_stage(task.task_id, w, Stage.SUMMARIZE,
                               SummaryResponse("Overview: a new dog and a pottery class",
                                               "dog and pottery"), at(t))
    await store.complete_stage(task.task_id, w, Stage.EXTRACT, ExtractionResponse((
        CandidateMemory(MemoryCategory.ENTITIES, "biscuit", "Biscuit: golden retriever puppy",
                        (messages[0].id, messages[2].id)),)), at(t))
    await store.complete_stage(task.task_id, w, Stage.RELATIONS, RelationsOutput(()), at(t))
    await store.complete_stage(task.task_id, w, Stage.ACTIVE_COUNTS, ActiveCountsOutput(()),
                               at(t))
    if stop_before_index:
        return
    await store.complete_stage(task.task_id, w, Stage.INDEX, IndexOutput(archive_entries(
        task, messages, "Overview: a new dog and a pottery class", "dog and pottery")), at(t))
    await store.finalize_task(task.task_id, w, at(t))


async def indexed(store: Store, identity: Identity = ID, sid: str = "s1",
                  task_id: str = "t1") -> list[Message]:
    messages = await commit_turns(store, identity, sid, task_id, 0)
    task = await store.claim_task("w", at(20), at(50))
    assert task is not None and task.task_id == task_id
    await run_stages(store, task, messages, 21)
    return messages


def test_index_stage_indexes_every_kind(store: Store, run: Runner) -> None:
    async def body() -> None:
        messages = await indexed(store)
        # 6 episodes, 1 overview, 1 memory (user space: visible to the user's agents)
        assert await store.recall_entry_count(ID) == 8
        assert await store.recall_entry_count(ID, RecallKind.MESSAGE) == 6
        assert await store.recall_entry_count(OTHER_AGENT, RecallKind.MEMORY) == 1
        assert await store.recall_entry_count(OTHER_AGENT, RecallKind.MESSAGE) == 0
        hits = await store.recall(ID, q("what breed is the puppy Biscuit"))
        assert hits and hits[0].score > 0
        kinds = {h.entry.kind for h in hits}
        assert kinds == {RecallKind.MESSAGE, RecallKind.MEMORY}
        best = next(h for h in hits if h.entry.kind is RecallKind.MESSAGE)
        assert best.entry.message_ids in {(messages[0].id,), (messages[1].id,)}
        mem = next(h for h in hits if h.entry.kind is RecallKind.MEMORY)
        assert mem.entry.memory_id and mem.entry.message_ids == (messages[0].id,
                                                                 messages[2].id)
        ov = await store.recall(ID, q("pottery dog overview"), )
        assert any(h.entry.kind is RecallKind.OVERVIEW and h.entry.archive_index == 1
                   for h in ov)
        # stemming: "adopting" meets "adopted"
        adopt = await store.recall(ID, q("adopting"))
        assert adopt[0].entry.message_ids == (messages[0].id,)
    run(body())


def test_bm25_ranks_rarer_terms_and_shorter_entries_higher(store: Store, run: Runner) -> None:
    async def body() -> None:
        turns = [(Role.USER, "tea tea tea and cake"), (Role.USER, "tea"),
                 (Role.USER, "coffee and a very long story about many other things entirely"),
                 (Role.USER, "coffee")]
        messages = await commit_turns(store, ID, "s1", "t1", 0, turns)
        task = await store.claim_task("w", at(20), at(50))
        assert task is not None
        await store.complete_stage("t1", "w", Stage.INDEX,
                                   IndexOutput(archive_entries(task, messages, "", "")), at(21))
        hits = await store.recall(ID, q("coffee"), )
        assert [h.entry.message_ids[0] for h in hits] == [messages[3].id, messages[2].id]
        assert hits[0].score > hits[1].score
        hits = await store.recall(ID, q("tea"))
        assert hits[0].entry.message_ids[0] == messages[0].id  # tf saturates, still wins
    run(body())


def test_neighbours_and_filters(store: Store, run: Runner) -> None:
    async def body() -> None:
        messages = await indexed(store)
        hits = await store.recall(ID, q("golden retriever three months"), with_neighbours=1)
        top = hits[0]
        assert top.entry.message_ids == (messages[2].id,)
        assert [b.message_ids for b in top.before] == [(messages[1].id,)]
        assert [a.message_ids for a in top.after] == [(messages[3].id,)]
        only = await store.recall(ID, q("golden retriever", kinds=(RecallKind.MEMORY,)))
        assert {h.entry.kind for h in only} == {RecallKind.MEMORY}
        # episodes carry their message's time: turns 0..5 at seconds 0..5
        late = await store.recall(ID, q("golden retriever", kinds=(RecallKind.MESSAGE,),
                                        since=at(3)))
        assert [h.entry.message_ids for h in late] == [(messages[3].id,)]
        early = await store.recall(ID, q("golden retriever", kinds=(RecallKind.MESSAGE,),
                                         until=at(3)))
        assert [h.entry.message_ids for h in early] == [(messages[2].id,)]
        assert await store.recall(ID, q("zeppelin")) == []
        assert await store.recall(ID, RecallQuery(())) == []
    run(body())


def test_neighbours_of_several_hits_come_from_each_hits_own_archive(store: Store,
                                                                     run: Runner) -> None:
    async def body() -> None:
        by_id = {m.id: i for sid, task in (("s1", "t1"), ("s2", "t2"))
                 for i, m in enumerate(await indexed(store, sid=sid, task_id=task))}
        hits = await store.recall(ID, q("Biscuit golden retriever pottery lake studio"),
                                  with_neighbours=5)
        messages = [h for h in hits if h.entry.kind is RecallKind.MESSAGE]
        assert {h.entry.session_id for h in hits[:5]} == {"s1", "s2"}
        assert len([h for h in hits[:5] if h.entry.kind is RecallKind.MESSAGE]) >= 4
        for rank, hit in enumerate(hits):
            if hit.entry.kind is not RecallKind.MESSAGE or rank >= 5:
                assert hit.before == () and hit.after == ()
                continue
            (mid,) = hit.entry.message_ids
            sid, i = hit.entry.session_id, by_id[mid]
            task = "t1" if sid == "s1" else "t2"
            assert [b.message_ids for b in hit.before] == (
                [(f"{sid}-{task}-{i - 1}",)] if i > 0 else [])
            assert [a.message_ids for a in hit.after] == (
                [(f"{sid}-{task}-{i + 1}",)] if i < len(TURNS) - 1 else [])
            assert all(x.session_id == sid for x in (*hit.before, *hit.after))
        assert len(messages) > 5
    run(body())


def test_recall_is_isolated_per_identity(store: Store, run: Runner) -> None:
    async def body() -> None:
        await indexed(store)
        assert await store.recall(OTHER_USER, q("puppy Biscuit golden retriever")) == []
        other = await store.recall(OTHER_AGENT, q("puppy Biscuit golden retriever"))
        assert {h.entry.kind for h in other} == {RecallKind.MEMORY}  # user-space only
        # another user's entries do not change this user's statistics or scores
        before = [(h.entry.entry_id, round(h.score, 9))
                  for h in await store.recall(ID, q("golden retriever puppy"))]
        await indexed(store, OTHER_USER, "s1", "t9")
        after = [(h.entry.entry_id, round(h.score, 9))
                 for h in await store.recall(ID, q("golden retriever puppy"))]
        assert before == after
    run(body())


def test_bm25_statistics_follow_deletions(store: Store, run: Runner) -> None:
    """N and the average length BM25 uses are the identity's current entries: after a
    session is deleted, the scores are those of an identity that never had it."""
    async def body() -> None:
        other_turns = [(Role.USER, "A long note about golden sunsets over the harbour "
                        "and retriever training at the lake every single morning"),
                       (Role.ASSISTANT, "Sunsets and training, noted.")]
        plan = {"t1": (ID, "s1", TURNS), "t2": (ID, "s2", other_turns),
                "t3": (OTHER_USER, "s1", TURNS)}
        stored = {t: await commit_turns(store, who, sid, t, 0, turns)
                  for t, (who, sid, turns) in plan.items()}
        for i in range(len(plan)):
            task = await store.claim_task("w", at(20 + i), at(50 + i))
            assert task is not None
            await store.complete_stage(task.task_id, "w", Stage.INDEX, IndexOutput(
                archive_entries(task, stored[task.task_id], "", "")), at(21 + i))
        query = q("golden retriever lake months")
        with_s2 = [round(h.score, 9) for h in await store.recall(ID, query)]
        assert await store.delete_session(ID, "s2", at(60))
        mine = [(h.entry.message_ids[0].split("-")[-1], round(h.score, 9))
                for h in await store.recall(ID, query)]
        reference = [(h.entry.message_ids[0].split("-")[-1], round(h.score, 9))
                     for h in await store.recall(OTHER_USER, query)]
        assert mine == reference and len(mine) >= 2
        assert [s for _, s in mine] != with_s2[:len(mine)]
    run(body())


def test_index_after_a_crash_writes_nothing_twice(store: Store, run: Runner) -> None:
    async def body() -> None:
        messages = await commit_turns(store, ID, "s1", "t1", 0)
        task = await store.claim_task("w1", at(20), at(25))
        assert task is not None
        await run_stages(store, task, messages, 21, stop_before_index=True)
        out = IndexOutput(archive_entries(task, messages, "o", "a"))
        await store.complete_stage("t1", "w1", Stage.INDEX, out, at(22))
        # w1 dies before finalize; w2 takes the task over after the lease and redoes it
        task2 = await store.claim_task("w2", at(40), at(70))
        assert task2 is not None and task2.done_stage is Stage.INDEX
        await store.complete_stage("t1", "w2", Stage.INDEX, out, at(41))  # already done
        assert await store.index_entries(out.entries) == 0  # ids are deterministic
        await store.finalize_task("t1", "w2", at(42))
        assert await store.recall_entry_count(ID) == 6 + 1 + 1
    run(body())


def test_deleting_removes_entries(store: Store, run: Runner) -> None:
    async def body() -> None:
        await indexed(store)
        mem = next(h for h in await store.recall(ID, q("Biscuit golden retriever"))
               if h.entry.kind is RecallKind.MEMORY)
        assert await store.delete_memory(ID, mem.entry.memory_id)
        assert await store.recall_entry_count(ID, RecallKind.MEMORY) == 0
        assert await store.delete_session(ID, "s1", at(60))
        assert await store.recall_entry_count(ID) == 0
        assert await store.recall(ID, q("Biscuit golden retriever")) == []
    run(body())


def test_a_memory_merged_later_is_reindexed(store: Store, run: Runner) -> None:
    async def body() -> None:
        await indexed(store)
        turns = [(Role.USER, "Biscuit learned to sit today")]
        messages = await commit_turns(store, ID, "s1", "t2", 100, turns)
        task = await store.claim_task("w", at(120), at(150))
        assert task is not None and task.task_id == "t2"
        await store.complete_stage("t2", "w", Stage.EXTRACT, ExtractionResponse((
            CandidateMemory(MemoryCategory.ENTITIES, "biscuit", "Biscuit: can sit on command",
                            (messages[0].id,)),)), at(121))
        await store.complete_stage("t2", "w", Stage.INDEX,
                                   IndexOutput(archive_entries(task, messages, "", "")), at(122))
        mems = [h for h in await store.recall(ID, q("Biscuit sit command"))
                if h.entry.kind is RecallKind.MEMORY]
        assert len(mems) == 1 and "sit on command" in mems[0].entry.text
    run(body())


def test_terms_are_the_same_from_many_threads() -> None:
    """Index terms are made in worker threads at once: the stemmer must not be shared
    (a shared Snowball stemmer garbles words or raises IndexError under threads)."""
    import random
    import sys
    from concurrent.futures import ThreadPoolExecutor

    rnd = random.Random(5)
    suffixes = ("ational", "izing", "fulness", "ically", "ations", "ed", "ousness")
    texts = [" ".join("".join(rnd.choice("abcdefghijklmnoprstu") for _ in range(6))
                      + rnd.choice(suffixes) for _ in range(3000)) for _ in range(8)]
    want = [terms.tokens(t) for t in texts]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        terms._stem.cache_clear()  # every thread stems for real
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(terms.tokens, texts))
    finally:
        sys.setswitchinterval(old)
    assert got == want


async def _postings(store: Store, entry_ids: list[str]) -> int:
    """Postings stored for these entries (read through the store's own transaction)."""
    marks = ",".join("?" * len(entry_ids))
    op = lambda tx: tx.fetchval(  # noqa: E731
        f"SELECT COUNT(*) FROM recall_terms WHERE entry_id IN ({marks})", *entry_ids)
    return int(await store._read(op))  # type: ignore[attr-defined]


def test_postings_written_apart_rank_as_if_written_together(store: Store, run: Runner) -> None:
    """Postings are keyed by when they were written (SQLite appends each term's new
    postings): entries indexed by separate transactions, long apart, score and rank
    exactly as the same entries indexed in one."""
    async def body() -> None:
        turns2 = [(Role.USER, "Biscuit chewed the golden lead at the lake"),
                  (Role.ASSISTANT, "Retriever puppies chew everything for months.")]
        for who, apart in ((ID, True), (OTHER_USER, False)):
            m1 = await commit_turns(store, who, "s1", f"t1-{who.user}", 0)
            m2 = await commit_turns(store, who, "s2", f"t2-{who.user}", 1, turns2)
            t1 = await store.claim_task("w", at(20), at(50))
            t2 = await store.claim_task("w", at(20), at(50))
            assert t1 is not None and t2 is not None
            e1, e2 = archive_entries(t1, m1, "", ""), archive_entries(t2, m2, "", "")
            if apart:
                assert await store.index_entries(e2) == len(e2)
                await asyncio.sleep(0.01)
                assert await store.index_entries(e1) == len(e1)
            else:
                assert await store.index_entries((*e1, *e2)) == len(e1) + len(e2)
        query = q("golden retriever puppy Biscuit lake months")

        def ranked(hits: list[RecallHit]) -> list[tuple[str, str, float]]:
            return [(h.entry.session_id, h.entry.text, round(h.score, 9)) for h in hits]

        apart_hits = ranked(await store.recall(ID, query))
        assert len(apart_hits) >= 6 and {s for s, _, _ in apart_hits} == {"s1", "s2"}
        assert apart_hits == ranked(await store.recall(OTHER_USER, query))
    run(body())


async def _biscuit_learns_to_sit(store: Store) -> tuple[Task, list[Message]]:
    """A second archive (task t2) whose extraction merges a new text into the
    "biscuit" memory; its index stage is the caller's to run."""
    turns = [(Role.USER, "Biscuit learned to sit today")]
    messages = await commit_turns(store, ID, "s1", "t2", 100, turns)
    task = await store.claim_task("w", at(120), at(150))
    assert task is not None
    await store.complete_stage("t2", "w", Stage.EXTRACT, ExtractionResponse((
        CandidateMemory(MemoryCategory.ENTITIES, "biscuit", "Biscuit: can sit on command",
                        (messages[0].id,)),)), at(121))
    return task, messages


def test_a_replaced_memory_entry_leaves_no_postings(store: Store, run: Runner) -> None:
    """A memory merged again gets a new entry; the old entry's postings and the
    deleted memory's go with it, however many of the identity's postings exist."""
    async def body() -> None:
        await indexed(store)
        (old,) = [h.entry for h in await store.recall(ID, q("Biscuit golden retriever"))
                  if h.entry.kind is RecallKind.MEMORY]
        assert await _postings(store, [old.entry_id]) > 0
        task, messages = await _biscuit_learns_to_sit(store)
        await store.complete_stage("t2", "w", Stage.INDEX,
                                   IndexOutput(archive_entries(task, messages, "", "")), at(122))
        (new,) = [h.entry for h in await store.recall(ID, q("Biscuit sit command"))
                  if h.entry.kind is RecallKind.MEMORY]
        assert new.entry_id != old.entry_id and new.memory_id == old.memory_id
        assert await _postings(store, [old.entry_id]) == 0
        assert await _postings(store, [new.entry_id]) == len(new.with_terms().term_counts)
        assert await store.recall_entry_count(ID, RecallKind.MEMORY) == 1
        assert await store.delete_memory(ID, new.memory_id)
        assert await _postings(store, [new.entry_id]) == 0
        assert await store.recall_entry_count(ID, RecallKind.MESSAGE) == 7  # untouched
    run(body())


def test_memory_search_follows_updates_and_deletes(store: Store, run: Runner) -> None:
    """The full-text index of memories holds each memory once, with its current text."""
    async def body() -> None:
        await indexed(store)
        (mem, _), = await store.search_memories(ID, "golden retriever", None, 10)
        await _biscuit_learns_to_sit(store)
        assert await store.search_memories(ID, "golden retriever", None, 10) == []
        hits = await store.search_memories(ID, "Biscuit sit", None, 10)
        assert [(m.memory_id, m.content) for m, _ in hits] == [
            (mem.memory_id, "Biscuit: can sit on command")]
        assert await store.delete_memory(ID, mem.memory_id)
        assert await store.search_memories(ID, "Biscuit sit", None, 10) == []
    run(body())
