"""Recall of an index against exact search, measured on held-out vectors: rows of the data
that the searches skip (an ID selector), so that no query finds itself or is tuned on the
list that holds it."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from xmodal.index.store import exact_rerank

RECALL_AT = (1, 10, 100)
GROUND_TRUTH_K = 100
HELD_OUT = 500  # tuning queries (fewer for small collections: at most a tenth of the rows)
TARGET_RECALL = 0.95
CHUNK = 16_384


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
            self._merge(np.take_along_axis(scores, part, axis=1), part + first)

    def _merge(self, scores: np.ndarray, found: np.ndarray) -> None:
        all_scores = np.concatenate([self.scores, scores], axis=1)
        all_found = np.concatenate([self.found, found], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(all_scores, order, axis=1)
        self.found = np.take_along_axis(all_found, order, axis=1)
        self.found[~np.isfinite(self.scores)] = -1

    def selector(self) -> faiss.IDSelector:
        """Skips the held-out rows (keep the returned object alive while searching)."""
        return faiss.IDSelectorNot(faiss.IDSelectorBatch(self.positions))

    def recalls(self, found: np.ndarray) -> dict[str, float]:
        """recall@1/10/100 of ``found`` (rows: queries, best first) against exact search."""
        out = {}
        for k in RECALL_AT:
            k = min(k, self.k, found.shape[1])
            exact = self.found[:, :k]
            if (exact >= 0).sum() == 0:
                continue
            hits = sum(len(set(a[:k]) & set(e) - {-1}) for a, e in zip(found, exact, strict=True))
            out[f"recall_at_{k}"] = round(hits / max(1, int((exact >= 0).sum())), 4)
        return out

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


def ivf_parameters(
    index: faiss.Index, nprobe: int | None, selector: faiss.IDSelector | None = None
) -> faiss.SearchParameters | None:
    """Per-call parameters for a flat, IVF or OPQ-rotated IVF index (the index is never
    modified)."""
    inner = index
    rotated = isinstance(index, faiss.IndexPreTransform)
    if rotated:
        inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(nprobe=max(1, min(nprobe or 1, inner.nlist)))
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
    nprobe: int | None,
    refine: int = 0,
    vectors: np.ndarray | None = None,
    selector: faiss.IDSelector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the top ``k``: the index's shortlist of ``max(k, refine)``
    re-ranked exactly against ``vectors`` when ``refine`` is set."""
    shortlist = max(k, refine) if refine and vectors is not None else k
    shortlist = max(1, min(shortlist, index.ntotal))
    params = ivf_parameters(index, nprobe, selector)
    scores, found = index.search(queries, shortlist, params=params)
    if refine and vectors is not None:
        return exact_rerank(queries, found, vectors, min(k, shortlist))
    return scores, found


def tune_nprobe(
    index: faiss.Index,
    held: HeldOut,
    nlist: int,
    target: float,
    refine: int = 0,
    vectors: np.ndarray | None = None,
) -> tuple[int, dict[str, float]]:
    """The smallest nprobe whose recall@10 (with re-ranking) on the held-out queries reaches
    ``target`` (doubling, then bisection), and its recall at 1/10/100."""
    selector = held.selector()

    def measure(nprobe: int) -> dict[str, float]:
        k = min(max(RECALL_AT), index.ntotal)
        found = search_index(index, held.queries, k, nprobe, refine, vectors, selector)[1]
        return held.recalls(found)

    def at10(r: dict[str, float]) -> float:
        return r.get("recall_at_10", min(r.values()) if r else 1.0)

    value, best = 1, measure(1)
    failing = 0
    while at10(best) < target and value < nlist:
        failing, value = value, min(nlist, value * 2)
        best = measure(value)
    if at10(best) >= target:
        while value - failing > max(1, value // 16):
            middle = (failing + value) // 2
            got = measure(middle)
            if at10(got) >= target:
                value, best = middle, got
            else:
                failing = middle
    return value, best
