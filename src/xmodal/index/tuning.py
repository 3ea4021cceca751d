"""Recall of an index against exact search, measured on held-out vectors: rows of the data
that the searches skip (an ID selector), so that no query finds itself or is tuned on the
list that holds it.

The recall every index records (``params["measured_recall"]`` in ``index.json``, e.g.
``{"at": 10, "value": 0.962, "queries": 500}``): up to 500 rows drawn from the indexed data
(at most a tenth of it, seeded) are the queries; each one's exact top-10 is found by flat
inner-product search over every indexed row except the held-out ones, its approximate top-10
by the index as served (its nprobe / efSearch / refine shortlist) with the same rows skipped,
so no query ever finds itself; recall@10 is the mean fraction of the exact top-10 found (a row
tied with the 10th exact score, a duplicate, counts as found). nprobe / efSearch are tuned on
the same rows (:func:`tune_depth`); no index trains its quantizers on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from xmodal.errors import RecallTargetError  # noqa: F401 - importable from here too
from xmodal.index.store import exact_rerank

RECALL_AT = (1, 10, 100)
RECALL_K = 10  # the recall index.json records and the target applies to
GROUND_TRUTH_K = 100
HELD_OUT = 500  # tuning queries (fewer for small collections: at most a tenth of the rows)
TARGET_RECALL = 0.95
CHUNK = 16_384
TIE = 1e-6  # inner products this close to the k-th exact one are ties (duplicate rows)


def held_out_count(count: int, limit: int = HELD_OUT) -> int:
    """Queries held out of ``count`` rows: ``limit``, at most a tenth of the rows (at least
    one query while two rows or more exist)."""
    return min(limit, max(1, count // 10)) if count >= 2 else 0


def measured_record(value: float, queries: int) -> dict[str, Any]:
    """The ``measured_recall`` entry of an index's params."""
    return {"at": RECALL_K, "value": round(float(value), 4), "queries": int(queries)}


def check_recall(measured: dict[str, Any], target: float, accept: float | None, what: str) -> None:
    """RecallTargetError when ``measured`` recall is under ``target`` and ``accept`` (the
    ``--accept-recall`` floor, None: no floor) does not allow it."""
    value = measured["value"]
    if value >= target or (accept is not None and value >= accept):
        return
    allowed = f" and under --accept-recall {accept}" if accept is not None else ""
    raise RecallTargetError(
        f"{what}: recall@{measured['at']} {value:.3f} on {measured['queries']} held-out "
        f"queries is under the target {target}{allowed}; pass --accept-recall "
        f"{floor2(value)} to keep it anyway"
    )


def floor2(value: float) -> float:
    """``value`` rounded down to 2 decimals (an --accept-recall the value meets)."""
    return float(max(0.0, np.floor(value * 100 + 1e-9) / 100))


def neighbour_recall(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each row's exact top-k found in the approximate top-k: how well an
    approximate index finds the exact nearest neighbours (not retrieval Recall@K, which is
    :func:`xmodal.evaluate.retrieval.recall_at_k`)."""
    hits = sum(len(set(a[:k]) & set(e[:k]) - {-1}) for a, e in zip(approx, exact, strict=True))
    return hits / (k * len(exact))


class HeldOut:
    """Held-out queries (rows of the data, at ``positions``) and their exact top-100 among
    every other indexed row, accumulated batch by batch while the rows are added."""

    def __init__(self, positions: np.ndarray, queries: np.ndarray, k: int = GROUND_TRUTH_K):
        self.positions = np.asarray(positions, np.int64)
        self.queries = np.ascontiguousarray(queries, np.float32)
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.found = np.full((len(queries), k), -1, np.int64)

    def update(self, start: int, embeddings: np.ndarray) -> None:
        """Fold rows ``start ..`` of the index into the exact top-k (held-out rows skipped)."""
        if not len(self.queries):
            return
        for lo in range(0, len(embeddings), CHUNK):
            block = embeddings[lo : lo + CHUNK]
            scores = self.queries @ block.T
            first = start + lo
            inside = self.positions[
                (self.positions >= first) & (self.positions < first + len(block))
            ]
            scores[:, inside - first] = -np.inf
            take = min(self.k, scores.shape[1])
            part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            self.merge(np.take_along_axis(scores, part, axis=1), part + first)

    def merge(self, scores: np.ndarray, found: np.ndarray) -> None:
        """Fold candidates (their scores and positions) into the exact top-k: another
        :class:`HeldOut`'s result over other rows, say."""
        all_scores = np.concatenate([self.scores, scores], axis=1)
        all_found = np.concatenate([self.found, found], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(all_scores, order, axis=1)
        self.found = np.take_along_axis(all_found, order, axis=1)
        self.found[~np.isfinite(self.scores)] = -1

    def selector(self) -> faiss.IDSelector:
        """Skips the held-out rows (keep the returned object alive while searching)."""
        return faiss.IDSelectorNot(faiss.IDSelectorBatch(self.positions))

    def recall_at(self, found: np.ndarray, k: int = RECALL_K, shortlist: int = 0) -> float:
        """Mean fraction of each query's exact top-``k`` found in the first ``shortlist``
        (default ``k``) positions of ``found`` (what re-ranking that shortlist exactly finds);
        1.0 when no query has neighbours. Rows tied with the k-th exact score (duplicates)
        count as found: any of them is a correct k-th neighbour."""
        k = min(k, self.k)
        exact = self.found[:, :k]
        valid = int((exact >= 0).sum())
        if valid == 0:
            return 1.0
        shortlist = shortlist or k
        hits = 0
        for i, row in enumerate(found):
            wanted = int((exact[i] >= 0).sum())
            if wanted == 0:
                continue
            kth = self.scores[i, wanted - 1]
            correct = set(self.found[i][self.scores[i] >= kth - TIE].tolist()) - {-1}
            hits += min(wanted, len(set(row[:shortlist].tolist()) & correct))
        return hits / valid

    def recalls(self, found: np.ndarray) -> dict[str, float]:
        """recall@1/10/100 of ``found`` (rows: queries, best first) against exact search."""
        depth = min(self.k, found.shape[1])
        return {
            f"recall_at_{k}": round(self.recall_at(found, k), 4)
            for k in sorted({min(k, depth) for k in RECALL_AT})
            if k >= 1
        }

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(
                handle,
                positions=self.positions,
                queries=self.queries,
                scores=self.scores,
                found=self.found,
            )

    @classmethod
    def load(cls, path: Path) -> HeldOut:
        with np.load(path) as data:
            held = cls(data["positions"], data["queries"], data["scores"].shape[1])
            held.scores, held.found = data["scores"], data["found"]
        return held


def search_parameters(
    index: faiss.Index, depth: int | None, k: int, selector: faiss.IDSelector | None = None
) -> faiss.SearchParameters | None:
    """Per-call parameters for a flat, IVF, OPQ-rotated IVF or HNSW index searched ``depth``
    deep (nprobe lists, clamped to nlist; efSearch, clamped to [k, ntotal]; None: the
    index's own). The index is never modified."""
    inner = index
    rotated = isinstance(index, faiss.IndexPreTransform)
    if rotated:
        inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexIVF):
        chosen = inner.nprobe if depth is None else depth
        params = faiss.SearchParametersIVF(nprobe=max(1, min(chosen, inner.nlist)))
    elif isinstance(inner, faiss.IndexHNSW):  # deeper than the index is large changes nothing
        chosen = inner.hnsw.efSearch if depth is None else depth
        params = faiss.SearchParametersHNSW(efSearch=max(min(chosen, inner.ntotal), k))
    elif selector is not None:
        params = faiss.SearchParameters()
    else:
        return None
    if selector is not None:
        params.sel = selector
    if rotated:
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        outer.referenced = params  # keep the inner object alive with the outer one
        return outer
    return params


def search_index(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    depth: int | None,
    refine: int = 0,
    vectors: np.ndarray | None = None,
    selector: faiss.IDSelector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the top ``k``, searched ``depth`` deep (nprobe / efSearch): the
    index's shortlist of ``max(k, refine)`` re-ranked exactly against ``vectors`` when
    ``refine`` is set."""
    shortlist = max(k, refine) if refine and vectors is not None else k
    shortlist = max(1, min(shortlist, index.ntotal))
    params = search_parameters(index, depth, shortlist, selector)
    scores, found = index.search(queries, shortlist, params=params)
    if refine and vectors is not None:
        return exact_rerank(queries, found, vectors, min(k, shortlist))
    return scores, found


def tune_depth(
    index: faiss.Index,
    held: HeldOut,
    low: int,
    high: int,
    target: float,
    refine: int = 0,
    vectors: np.ndarray | None = None,
) -> tuple[int, dict[str, float]]:
    """The smallest search depth in [low, high] (nprobe of an IVF index, efSearch of an HNSW
    one) whose recall@10 on the held-out queries, searched as served (top 10, re-ranking a
    shortlist of ``max(10, refine)``), reaches ``target`` (doubling, then bisection; ``high``
    when none does), and its recall at 1/10/100 (recall@100 from a top-100 search)."""
    selector = held.selector()
    k = min(RECALL_K, index.ntotal)

    def at10(depth: int) -> float:
        found = search_index(index, held.queries, k, depth, refine, vectors, selector)[1]
        return held.recall_at(found, k)

    value, best = low, at10(low)
    failing = low - 1
    while best < target and value < high:
        failing, value = value, min(high, value * 2)
        best = at10(value)
    if best >= target:
        while value - failing > max(1, value // 16):
            middle = (failing + value) // 2
            got = at10(middle)
            if got >= target:
                value, best = middle, got
            else:
                failing = middle
    served = search_index(index, held.queries, k, value, refine, vectors, selector)[1]
    deep = min(max(RECALL_AT), index.ntotal)
    found = search_index(index, held.queries, deep, value, refine, vectors, selector)[1]
    recalls = {f"recall_at_{deep}": round(held.recall_at(found, deep), 4)} if deep > k else {}
    recalls = {
        "recall_at_1": round(held.recall_at(served, 1), 4),
        f"recall_at_{k}": round(held.recall_at(served, k), 4),
        **recalls,
    }
    return value, recalls
