"""Dense vectors of the retrieval index, on every backend: stored once per entry and
model, ranked by cosine similarity over the caller's own vectors (fused with BM25),
filtered like lexical hits, removed with their entries, and found by reindex."""

from __future__ import annotations

import math

from sessiond.server.domain import recall as rules
from sessiond.server.domain.recall import EntryVector, RecallHit, RecallKind, RecallQuery
from sessiond.server.domain.values import Stage
from sessiond.server.store.base import Store

from tests.contract.conftest import Runner
from tests.contract.test_recall_contract import commit_turns, indexed, q, run_stages
from tests.contract.test_store_contract import ID, OTHER_AGENT, OTHER_USER, at

MODEL = "test:axes"
DIM = 8


def axis(i: int, j: int | None = None) -> tuple[float, ...]:
    """A unit vector along axis i (or halfway between axes i and j)."""
    v = [0.0] * DIM
    v[i] = 1.0
    if j is not None:
        v[j] = 1.0
    n = math.sqrt(sum(x * x for x in v))
    return tuple(x / n for x in v)


async def embed_all(store: Store, model: str = MODEL) -> dict[str, tuple[float, ...]]:
    """Give every entry a vector: the i-th missing entry (by id) along axis i % DIM."""
    entries = await store.missing_vectors(model, "", 1000)
    vecs = {e.entry_id: axis(i % DIM) for i, e in enumerate(entries)}
    n = await store.index_vectors(model, [EntryVector(e, vecs[e.entry_id]) for e in entries])
    assert n == len(entries)
    return vecs


def dense(vector: tuple[float, ...], **kw: object) -> RecallQuery:
    return RecallQuery((), vector=vector, model=MODEL, **kw)  # type: ignore[arg-type]


def test_vectors_are_stored_once_and_ranked_by_similarity(store: Store, run: Runner) -> None:
    async def body() -> None:
        await indexed(store)
        vecs = await embed_all(store)
        assert len(vecs) == 8 and await store.vector_count(ID, MODEL) == 8
        entries = await store.missing_vectors("other:model", "", 1000)
        assert len(entries) == 8 and await store.count_missing_vectors(MODEL) == 0
        # a redo writes nothing
        again = [EntryVector(e, axis(0)) for e in entries]
        assert await store.index_vectors(MODEL, again) == 0
        assert await store.vectors_present(MODEL, list(vecs)) == set(vecs)
        # dense only (no query terms): the entry along the query's axis first
        target = next(i for i, v in vecs.items() if v == axis(3))
        hits = await store.recall(ID, dense(axis(3)))
        assert hits[0].entry.entry_id == target
        assert hits[0].score > hits[-1].score
        # vectors of another model never answer this model's queries
        other = RecallQuery((), vector=axis(3), model="other:model")
        assert await store.recall(ID, other) == []
    run(body())


def test_dense_ranking_is_fused_with_bm25(store: Store, run: Runner) -> None:
    async def body() -> None:
        await indexed(store)
        vecs = await embed_all(store)
        pottery = next(h for h in await store.recall(ID, q("pottery class"))
                       if h.entry.kind is RecallKind.MESSAGE)
        lexical = await store.recall(ID, q("adopted puppy"))
        assert pottery.entry.entry_id not in {h.entry.entry_id for h in lexical}
        best = lexical[0].entry.entry_id
        # the words find the puppy; the vector points at the pottery turn, which no
        # word matches: fused, it is found all the same, scored by the dense ranking
        # alone (normalised 1, weight 1 - alpha)
        fused = await store.recall(ID, RecallQuery(q("adopted puppy").terms,
                                                   vector=vecs[pottery.entry.entry_id],
                                                   model=MODEL))
        found = {h.entry.entry_id: h.score for h in fused}
        alpha = rules.CONVEX_ALPHA
        assert math.isclose(found[pottery.entry.entry_id], 1 - alpha)
        assert found[best] >= alpha  # first by words (normalised 1)
        # both rankings agree: that entry scores 1 and beats every other
        agreed = await store.recall(ID, RecallQuery(q("adopted puppy").terms,
                                                    vector=vecs[best], model=MODEL))
        assert agreed[0].entry.entry_id == best
        assert math.isclose(agreed[0].score, 1.0)
        assert all(h.score < 1.0 for h in agreed[1:])
    run(body())


def test_reciprocal_rank_fusion(store: Store, run: Runner) -> None:
    async def body() -> None:
        await indexed(store)
        vecs = await embed_all(store)
        lexical = await store.recall(ID, q("adopted puppy"))
        near = await store.recall(ID, RecallQuery((), vector=vecs[lexical[1].entry.entry_id],
                                                  model=MODEL, limit=3))
        fused = rules.fuse([lexical, near], 10)
        by_id = {h.entry.entry_id: h.score for h in fused}
        # second by words, first by vector: 1/62 + 1/61
        assert math.isclose(by_id[lexical[1].entry.entry_id], 1 / 62 + 1 / 61)
        assert fused[0].entry.entry_id == lexical[1].entry.entry_id
        assert all(isinstance(h, RecallHit) for h in fused)
        weighted = rules.fuse([lexical, near], 10, weights=(1.0, 0.0))
        assert weighted[0].entry.entry_id == lexical[0].entry.entry_id
    run(body())


def test_dense_hits_honour_identity_kinds_and_time(store: Store, run: Runner) -> None:
    async def body() -> None:
        await indexed(store)
        await indexed(store, OTHER_USER, "s2", "t2")
        await embed_all(store)
        assert await store.vector_count(ID, MODEL) == 8
        assert await store.vector_count(OTHER_USER, MODEL) == 8
        for v in range(DIM):
            for h in await store.recall(ID, dense(axis(v))):
                assert h.entry.owner.user == ID.user
        # the other agent of the user sees the user-space memory, not the episodes
        seen = {h.entry.kind for v in range(DIM)
                for h in await store.recall(OTHER_AGENT, dense(axis(v)))}
        assert seen == {RecallKind.MEMORY}
        only = {h.entry.kind for v in range(DIM) for h in await store.recall(
            ID, dense(axis(v), kinds=(RecallKind.OVERVIEW,)))}
        assert only == {RecallKind.OVERVIEW}
        late = [h for v in range(DIM) for h in await store.recall(
            ID, dense(axis(v), since=at(3)))]
        assert late and all(h.entry.time >= at(3) for h in late)
        assert await store.recall(ID, dense(axis(0), until=at(-100))) == []
    run(body())


def test_deleting_removes_vectors_and_the_cache_follows(store: Store, run: Runner) -> None:
    async def body() -> None:
        await indexed(store)
        vecs = await embed_all(store)
        memory = next(e for e in await store.missing_vectors("x", "", 100)
                      if e.kind is RecallKind.MEMORY)
        hits = await store.recall(ID, dense(vecs[memory.entry_id]))
        assert hits[0].entry.entry_id == memory.entry_id  # cached now
        assert await store.delete_memory(ID, memory.memory_id)
        assert await store.vector_count(ID, MODEL) == 7
        hits = await store.recall(ID, dense(vecs[memory.entry_id]))
        assert memory.entry_id not in {h.entry.entry_id for h in hits}
        assert await store.delete_session(ID, "s1", at(100))
        assert await store.vector_count(ID, MODEL) == 0
        assert await store.recall(ID, dense(axis(0))) == []
    run(body())


def test_index_stage_writes_vectors_with_its_entries(store: Store, run: Runner) -> None:
    async def body() -> None:
        from sessiond.server.domain.commands import IndexOutput
        from sessiond.server.phase2.pipeline import archive_entries

        messages = await commit_turns(store, ID, "s1", "t1", 0)
        task = await store.claim_task("w", at(20), at(50))
        assert task is not None
        await run_stages(store, task, messages, 21, stop_before_index=True)
        entries = archive_entries(task, messages, "o", "a")
        memories = await store.archive_memory_entries(task)
        assert len(memories) == 1
        vectors = tuple(EntryVector(e, axis(i % DIM))
                        for i, e in enumerate((*entries, *memories)))
        await store.complete_stage(task.task_id, "w", Stage.INDEX,
                                   IndexOutput(entries, vectors, MODEL), at(22))
        assert await store.vector_count(ID, MODEL) == 8 == await store.recall_entry_count(ID)
        # a redo of the stage's writes (a crash after commit) adds nothing
        assert await store.index_vectors(MODEL, vectors) == 0
    run(body())


def test_reindex_reads_find_what_is_missing(store: Store, run: Runner) -> None:
    async def body() -> None:
        await indexed(store)
        assert await store.unindexed_archives(("", -1), 10) == []
        assert await store.unindexed_memories("", 10) == []
        assert await store.count_missing_vectors(MODEL) == 8
        await embed_all(store)
        await embed_all(store, "old:model")
        assert await store.prune_vectors(MODEL) == 8
        assert await store.vector_count(ID, "old:model") == 0
        assert await store.vector_count(ID, MODEL) == 8
    run(body())
