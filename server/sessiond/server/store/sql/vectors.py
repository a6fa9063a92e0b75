"""Dense vectors of the retrieval index: one per entry and embedder model, written
by Phase 2's `index` stage (and `sessiond reindex`), removed with their entries,
and searched by an exact scan over the caller's own vectors.

The scan runs over an in-process cache of each identity's vectors (a float32
matrix, unit rows), checked against the store on every query with one indexed
count: rows added since are read incrementally, any other change reloads. The
same on both backends; no vector extension is needed (pgvector is not assumed).
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sessiond.server.domain.recall import EntryVector, RecallKind
from sessiond.server.domain.values import Identity
from sessiond.server.store.sql.tx import Tx

VISIBLE = "account=? AND user_id=? AND (agent='' OR agent=?)"
BATCH = 200
KIND_CODES = {k: i for i, k in enumerate(RecallKind)}


def pack(vector: Sequence[float]) -> bytes:
    """float32, little-endian (the stored form on every backend)."""
    a = array("f", vector)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        a.byteswap()
    return a.tobytes()


def unpack(blob: bytes) -> np.ndarray:
    return np.frombuffer(bytes(blob), dtype="<f4")


async def insert(tx: Tx, model: str, vectors: Sequence[EntryVector]) -> int:
    """Store vectors not stored yet for entries that exist (a redo writes nothing)."""
    n = 0
    for start in range(0, len(vectors), BATCH):
        chunk = {v.entry.entry_id: v for v in vectors[start:start + BATCH]}
        marks = ",".join("?" * len(chunk))
        exists = {str(r[0]) for r in await tx.fetch(
            f"SELECT entry_id FROM recall_entries WHERE entry_id IN ({marks})", *chunk)}
        have = {str(r[0]) for r in await tx.fetch(
            f"SELECT entry_id FROM recall_vectors WHERE model=? AND entry_id IN ({marks})",
            model, *chunk)}
        new = [v for i, v in chunk.items() if i in exists and i not in have]
        if not new:
            continue
        await tx.executemany(
            "INSERT INTO recall_vectors (entry_id, model, account, user_id, agent, kind, "
            "time, vector) VALUES (?,?,?,?,?,?,?,?)",
            [(v.entry.entry_id, model, v.entry.owner.account, v.entry.owner.user,
              v.entry.owner.agent, v.entry.kind.value, tx.d.ts(v.entry.time),
              pack(v.vector)) for v in new])
        n += len(new)
    return n


async def present(tx: Tx, model: str, entry_ids: Sequence[str]) -> set[str]:
    """Which of `entry_ids` have a vector of `model` already."""
    out: set[str] = set()
    for start in range(0, len(entry_ids), BATCH):
        chunk = entry_ids[start:start + BATCH]
        out |= {str(r[0]) for r in await tx.fetch(
            f"SELECT entry_id FROM recall_vectors WHERE model=? AND entry_id IN "
            f"({','.join('?' * len(chunk))})", model, *chunk)}
    return out


async def count_missing(tx: Tx, model: str) -> int:
    return int(await tx.fetchval(
        "SELECT COUNT(*) FROM recall_entries e WHERE NOT EXISTS (SELECT 1 FROM "
        "recall_vectors v WHERE v.entry_id = e.entry_id AND v.model = ?)", model))


async def prune(tx: Tx, model: str) -> int:
    """Remove the vectors of every other model."""
    n = int(await tx.fetchval("SELECT COUNT(*) FROM recall_vectors WHERE model<>?", model))
    await tx.execute("DELETE FROM recall_vectors WHERE model<>?", model)
    return n


async def count(tx: Tx, identity: Identity, model: str) -> int:
    return int(await tx.fetchval(
        f"SELECT COUNT(*) FROM recall_vectors WHERE model=? AND {VISIBLE}", model,
        identity.account, identity.user, identity.agent))


@dataclass
class _Block:
    """One identity's vectors for one model, as of `max_seq` with `rows` rows."""

    ids: list[str]
    kinds: np.ndarray  # int8 codes (KIND_CODES)
    times: np.ndarray  # float64 epoch seconds
    matrix: np.ndarray  # float32, one unit row per entry
    max_seq: int

    @property
    def nbytes(self) -> int:
        return int(self.matrix.nbytes + self.times.nbytes + self.kinds.nbytes
                   + 64 * len(self.ids))


class VectorIndex:
    """The exact-scan cache, bounded in bytes (least recently used identity out)."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[tuple[str, str, str, str], _Block] = OrderedDict()
        self._bytes = 0

    async def top(self, tx: Tx, identity: Identity, model: str, query: Sequence[float],
                  kinds: Sequence[RecallKind], since: datetime | None,
                  until: datetime | None, limit: int) -> list[tuple[str, float]]:
        """(entry_id, cosine similarity) of the `limit` nearest entries, best first."""
        block = await self._block(tx, identity, model)
        if block is None or not block.ids or limit <= 0:
            return []
        q = np.asarray(query, dtype="<f4")
        if q.shape[0] != block.matrix.shape[1]:
            return []  # a query of another dimension matches nothing
        scores = block.matrix @ q
        mask = np.ones(len(block.ids), dtype=bool)
        if set(kinds) != set(RecallKind):
            mask &= np.isin(block.kinds, [KIND_CODES[k] for k in kinds])
        if since is not None:
            mask &= block.times >= since.timestamp()
        if until is not None:
            mask &= block.times < until.timestamp()
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return []
        sub = scores[idx]
        k = min(limit, idx.size)
        best = np.argpartition(-sub, k - 1)[:k]
        best = best[np.argsort(-sub[best], kind="stable")]
        return [(block.ids[int(idx[i])], float(sub[i])) for i in best]

    async def _block(self, tx: Tx, identity: Identity, model: str) -> _Block | None:
        key = (model, identity.account, identity.user, identity.agent)
        vis = (identity.account, identity.user, identity.agent)
        stat = await tx.fetchrow(
            "SELECT COUNT(*) AS n, COALESCE(MAX(vseq), 0) AS m FROM recall_vectors "
            f"WHERE model=? AND {VISIBLE}", model, *vis)
        n, max_seq = (int(stat["n"]), int(stat["m"])) if stat is not None else (0, 0)
        block = self._blocks.get(key)
        if block is not None and len(block.ids) == n and block.max_seq == max_seq:
            self._blocks.move_to_end(key)
            return block
        if block is not None and max_seq > block.max_seq:
            added = await self._rows(tx, model, vis, block.max_seq)
            if len(block.ids) + len(added[0]) == n:
                grown = _Block(block.ids + added[0],
                               np.concatenate([block.kinds, added[1]]),
                               np.concatenate([block.times, added[2]]),
                               np.vstack([block.matrix, added[3]]) if len(added[0])
                               else block.matrix, added[4] or block.max_seq)
                return self._keep(key, grown)
        if n == 0:
            self._drop(key)
            return None
        ids, kinds, times, matrix, last = await self._rows(tx, model, vis, 0)
        return self._keep(key, _Block(ids, kinds, times, matrix, last))

    async def _rows(self, tx: Tx, model: str, vis: tuple[str, str, str], after: int
                    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, int]:
        rows = await tx.fetch(
            "SELECT vseq, entry_id, kind, time, vector FROM recall_vectors "
            f"WHERE model=? AND {VISIBLE} AND vseq > ? ORDER BY vseq", model, *vis, after)
        # Rows of another dimension than the first (a model that changed its size) are
        # left out. The matrix is built from the joined blobs in one step (row by row
        # it took ~1 s per 100,000 vectors).
        blobs = [bytes(r["vector"]) for r in rows]
        size = len(blobs[0]) if blobs else 0
        keep = [i for i, b in enumerate(blobs) if len(b) == size]
        dim = size // 4
        ids = [str(rows[i]["entry_id"]) for i in keep]
        codes = {k.value: c for k, c in KIND_CODES.items()}
        kinds = np.fromiter((codes[rows[i]["kind"]] for i in keep), dtype=np.int8,
                            count=len(keep))
        times = np.fromiter((tx.d.epoch(rows[i]["time"]) for i in keep), dtype=np.float64,
                            count=len(keep))
        matrix = np.frombuffer(b"".join(blobs[i] for i in keep), dtype="<f4").reshape(
            len(keep), dim).copy() if keep else np.zeros((0, dim), dtype="<f4")
        last = int(rows[-1]["vseq"]) if rows else 0
        return ids, kinds, times, matrix, last

    def _keep(self, key: tuple[str, str, str, str], block: _Block) -> _Block:
        self._drop(key)
        self._blocks[key] = block
        self._bytes += block.nbytes
        while self._bytes > self.max_bytes and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._bytes -= old.nbytes
        return block

    def _drop(self, key: tuple[str, str, str, str]) -> None:
        old = self._blocks.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
