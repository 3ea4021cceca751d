"""Indexes built in memory by kind (``xmodal index --kind``): every embedding loaded at once.

Exact (flat) search below ``FLAT_MAX`` vectors; above it IVF with nlist ~ 4 sqrt(N) and the
smallest nprobe that reaches recall@10 >= 0.95 against exact search on a sample of the data
(HNSW on request). Per-call search parameters never change the shared index.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from xmodal.atomic import atomic_path, atomic_write_text, make_dir
from xmodal.config import IndexKind
from xmodal.errors import IndexBuildError, MissingDependencyError, MissingFileError
from xmodal.index.description import INDEX_FORMAT, INDEX_JSON, read_info
from xmodal.index.tuning import neighbour_recall
from xmodal.models.identity import ModelIdentity, check_compatible
from xmodal.shards import MODALITIES, load_manifest, now, read_shard

try:
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as exc:  # an optional extra, needed only to build or search an index
    raise MissingDependencyError(
        f"FAISS indexes need faiss-cpu and pyarrow ({exc}): pip install 'xmodal[index]'"
    ) from exc

INDEX_KINDS = typing.get_args(IndexKind)
FLAT_MAX = 50_000
TARGET_RECALL = 0.95
RECALL_K = 10
TUNING_QUERIES = 500
# Scanning inverted lists costs far more per vector than exact BLAS search: when IVF needs
# more than this fraction of its lists, "auto" keeps exact search.
IVF_MAX_PROBE_FRACTION = 0.05
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80


@dataclass
class Vectors:
    """Embeddings with their ids and where they came from.

    ``locations`` (images: where to load each image from, see :mod:`xmodal.data.refs`) and
    ``image_ids`` (texts: the image each caption describes) hold one entry per row; the one
    that does not apply to the modality is all None.
    """

    ids: list[str]
    sources: list[str]
    locations: list[str | None]
    image_ids: list[str | None]
    embeddings: np.ndarray  # float32 (N, D), L2-normalised
    shards: list[dict[str, Any]]


def load_vectors(
    shards_dir: str | Path, modality: str, skip: frozenset[tuple[str, str]] = frozenset()
) -> tuple[dict[str, Any], Vectors]:
    """The manifest and the ``modality`` embeddings of every complete shard not in ``skip``."""
    if modality not in MODALITIES:
        raise IndexBuildError(f"modality must be one of {MODALITIES}, got {modality!r}")
    directory = Path(shards_dir).resolve()
    manifest = load_manifest(directory)
    if manifest is None:
        raise MissingFileError(f"{directory}: no manifest.json (not an `xmodal extract` output)")
    record = manifest["modalities"].get(modality)
    if record is None or not record["shards"]:
        held = sorted(manifest["modalities"]) or "none"
        raise IndexBuildError(f"{directory} has no {modality} shards (it has: {held})")
    ids: list[str] = []
    sources: list[str] = []
    locations: list[str | None] = []
    image_ids: list[str | None] = []
    parts: list[np.ndarray] = []
    shards = []
    entries = [e for e in record["shards"] if (str(directory), e["file"]) not in skip]
    for entry in tqdm(entries, desc=f"reading {modality} shards", unit="shard", leave=False):
        shard = read_shard(directory / entry["file"])
        if len(shard.ids) != entry["rows"]:
            raise IndexBuildError(
                f"{directory / entry['file']}: {len(shard.ids)} rows, manifest says {entry['rows']}"
            )
        ids += shard.ids
        sources += shard.sources
        none = [None] * len(shard.ids)
        locations += shard.columns.get("location", none)
        image_ids += shard.columns.get("image_id", none)
        parts.append(shard.embeddings)
        shards.append({"dir": str(directory), "file": entry["file"], "rows": entry["rows"]})
    dim = manifest["dim"]
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    if manifest["dtype"] != "float32" and len(embeddings):
        faiss.normalize_L2(embeddings)  # undo float16 rounding of the norms
    return manifest, Vectors(ids, sources, locations, image_ids, embeddings, shards)


# ------------------------------------------------------------------------------- building


def ivf_nlist(count: int) -> int:
    """~4 sqrt(N) lists, with at least 39 training points per list."""
    return max(1, min(round(4 * math.sqrt(count)), count // 39))


class Tuner:
    """Recall of an index against exact search, on a sample of the data as queries.

    Each query's own vector is left out of both result lists (it would be an easy hit).
    """

    def __init__(self, vectors: np.ndarray, sample: int = TUNING_QUERIES, seed: int = 0):
        rng = np.random.default_rng(seed)
        count = len(vectors)
        self.rows = np.sort(rng.choice(count, size=min(sample, count), replace=False))
        self.queries = np.ascontiguousarray(vectors[self.rows])
        self.k = min(RECALL_K, count - 1)
        _, exact = faiss.knn(self.queries, vectors, self.k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        self.exact = self._drop_self(exact)

    def _drop_self(self, found: np.ndarray) -> np.ndarray:
        out = np.full((len(found), self.k), -1, dtype=np.int64)
        for i, (row, own) in enumerate(zip(found, self.rows, strict=True)):
            kept = [j for j in row if j != own][: self.k]
            out[i, : len(kept)] = kept
        return out

    def recall(self, index: faiss.Index, params: faiss.SearchParameters | None) -> float:
        if self.k < 1:
            return 1.0
        _, found = index.search(self.queries, self.k + 1, params=params)
        return neighbour_recall(self._drop_self(found), self.exact, self.k)

    def smallest(
        self, index: faiss.Index, make: Any, low: int, high: int, target: float = TARGET_RECALL
    ) -> tuple[int, float]:
        """Smallest value in [low, high] whose recall reaches ``target`` (doubling, bisection)."""
        value, best = low, self.recall(index, make(low))
        failing = low - 1
        while best < target and value < high:
            failing, value = value, min(high, value * 2)
            best = self.recall(index, make(value))
        if best < target:
            return value, best
        while value - failing > max(1, value // 16):
            middle = (failing + value) // 2
            got = self.recall(index, make(middle))
            if got >= target:
                value, best = middle, got
            else:
                failing = middle
        return value, best


def build_faiss(
    vectors: np.ndarray, kind: str = "auto", seed: int = 0, target: float = TARGET_RECALL
) -> tuple[faiss.Index, dict[str, Any]]:
    """An inner-product index over ``vectors`` and the parameters it was built and tuned with."""
    if kind not in INDEX_KINDS:
        raise IndexBuildError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
    count, dim = vectors.shape
    if count == 0:
        raise IndexBuildError("no vectors to index")
    if kind == "flat" or (kind == "auto" and count < FLAT_MAX):
        return _flat(vectors), {"kind": "flat"}
    if kind == "hnsw":
        return _hnsw(vectors, seed, target)
    index, params = _ivf(vectors, seed, target)
    reason = ivf_rejection(params)
    if kind == "auto" and reason:
        return _flat(vectors), {"kind": "flat", "ivf_rejected": reason}
    return index, params


def ivf_rejection(params: dict[str, Any]) -> str | None:
    """Why a tuned IVF index is not worth it over exact search (None when it is)."""
    if params["nprobe"] <= IVF_MAX_PROBE_FRACTION * params["nlist"]:
        return None
    return (
        f"IVF needs nprobe {params['nprobe']} of {params['nlist']} lists for recall@10 "
        f"{params['recall_at_10']:.3f}: the data has little cluster structure, exact search "
        "is as fast"
    )


def _flat(vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def _ivf(vectors: np.ndarray, seed: int, target: float) -> tuple[faiss.Index, dict[str, Any]]:
    count, dim = vectors.shape
    nlist = ivf_nlist(count)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(count, size=min(count, 50 * nlist), replace=False))
    index.train(np.ascontiguousarray(vectors[train_rows]))
    index.add(vectors)
    nprobe, recall = tune_ivf(index, vectors, seed, target)
    return index, {
        "kind": "ivf",
        "nlist": nlist,
        "nprobe": nprobe,
        "recall_at_10": recall,
        "target_recall": target,
        "tuning_queries": min(TUNING_QUERIES, count),
        "train_vectors": len(train_rows),
    }


def tune_ivf(
    index: faiss.Index, vectors: np.ndarray, seed: int = 0, target: float = TARGET_RECALL
) -> tuple[int, float]:
    """The smallest nprobe reaching ``target`` recall@10 (sets it as the index default)."""
    tuner = Tuner(vectors, seed=seed)
    nprobe, recall = tuner.smallest(
        index, lambda p: faiss.SearchParametersIVF(nprobe=p), 1, index.nlist, target
    )
    index.nprobe = nprobe
    return nprobe, recall


def _hnsw(vectors: np.ndarray, seed: int, target: float) -> tuple[faiss.Index, dict[str, Any]]:
    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    tuner = Tuner(vectors, seed=seed)
    ef, recall = tuner.smallest(
        index, lambda e: faiss.SearchParametersHNSW(efSearch=e), 16, 4096, target
    )
    index.hnsw.efSearch = ef
    return index, {
        "kind": "hnsw",
        "M": HNSW_M,
        "efConstruction": HNSW_EF_CONSTRUCTION,
        "efSearch": ef,
        "recall_at_10": recall,
        "target_recall": target,
    }


# ------------------------------------------------------------------------------- on disk


def _write(out: Path, index: faiss.Index, vectors: Vectors, info: dict[str, Any]) -> None:
    """New generation of the index and ids files, then index.json (atomic), then cleanup."""
    generation = info["generation"]
    index_file, ids_file = f"index-{generation:05d}.faiss", f"ids-{generation:05d}.parquet"
    with atomic_path(out / index_file) as tmp:
        faiss.write_index(index, str(tmp))
    table = pa.table(
        {
            "id": pa.array(vectors.ids, pa.string()),
            "source": pa.array(vectors.sources, pa.string()),
            "location": pa.array(vectors.locations, pa.string()),
            "image_id": pa.array(vectors.image_ids, pa.string()),
        }
    )
    with atomic_path(out / ids_file) as tmp:
        pq.write_table(table, str(tmp))
    info.update(index_file=index_file, ids_file=ids_file, updated=now())
    atomic_write_text(out / INDEX_JSON, json.dumps(info, indent=2))
    stale = [*out.glob("index-*.faiss"), *out.glob("ids-*.parquet"), *out.glob(".*.tmp")]
    for old in stale:  # earlier generations, and temporaries of a killed run
        if old.name not in (index_file, ids_file):
            old.unlink(missing_ok=True)


def build_index(
    shards: str | Path,
    out: str | Path,
    kind: str = "auto",
    modality: str = "images",
    add: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Index the ``modality`` shards of ``shards`` into ``out`` as a ``kind`` index (auto,
    flat, ivf or hnsw); ``add`` appends new shards only."""
    out = Path(out)
    if add:
        return _add(Path(shards), out, modality, seed)
    manifest, vectors = load_vectors(shards, modality)
    index, params = build_faiss(vectors.embeddings, kind, seed)
    previous = read_info(out) or {}
    info = {
        "format": INDEX_FORMAT,
        "kind": params.pop("kind"),
        "params": params,
        "modality": modality,
        "metric": "inner_product",
        "count": index.ntotal,
        "dim": vectors.embeddings.shape[1],
        "model": manifest["model"],
        "processor_hash": manifest["processor_hash"],
        "shards": vectors.shards,
        "generation": previous.get("generation", 0) + 1,
        "created": now(),
    }
    make_dir(out)
    _write(out, index, vectors, info)
    return info


def _add(shards: Path, out: Path, modality: str, seed: int) -> dict[str, Any]:
    info = read_info(out)
    if info is None:
        raise IndexBuildError(f"{out}: no index to add to (build one first, without --add)")
    included = addable_shards(shards, out, modality, info)
    _, new = load_vectors(shards, modality, skip=included)
    if not new.ids:
        return info
    from xmodal.index.searching import SearchIndex

    current = SearchIndex(out)
    index = current.index
    index.add(new.embeddings)
    merged = Vectors(
        list(current.ids) + new.ids,
        list(current.sources) + new.sources,
        list(current.locations) + new.locations,
        list(current.image_ids) + new.image_ids,
        new.embeddings,
        info["shards"] + new.shards,
    )
    if info["kind"] == "ivf":
        merged.embeddings = _all_embeddings(merged.shards, modality)
        nprobe, recall = tune_ivf(index, merged.embeddings, seed, info["params"]["target_recall"])
        info["params"].update(nprobe=nprobe, recall_at_10=recall)
    info.update(count=index.ntotal, shards=merged.shards, generation=info["generation"] + 1)
    _write(out, index, merged, info)
    return info


def _all_embeddings(shards: list[dict[str, Any]], modality: str) -> np.ndarray:
    """Re-read the embeddings of the listed shards (for re-tuning after an add)."""
    parts = []
    for directory in dict.fromkeys(s["dir"] for s in shards):
        wanted = {s["file"] for s in shards if s["dir"] == directory}
        every = {e["file"] for e in load_manifest(directory)["modalities"][modality]["shards"]}
        _, vectors = load_vectors(
            directory, modality, skip=frozenset((directory, f) for f in every - wanted)
        )
        parts.append(vectors.embeddings)
    return np.concatenate(parts)


def addable_shards(
    shards: Path, out: Path, modality: str, info: dict[str, Any]
) -> frozenset[tuple[str, str]]:
    """Check that ``shards`` may be added to the index in ``out`` (same modality, same model)
    and return the (dir, file) shards the index holds already."""
    if info["modality"] != modality:
        raise IndexBuildError(f"{out} indexes {info['modality']}, not {modality}")
    manifest = load_manifest(shards)
    if manifest is None:
        raise MissingFileError(f"{shards}: no manifest.json (not an `xmodal extract` output)")
    check_compatible(
        ModelIdentity.from_record(info),
        ModelIdentity.from_record(manifest),
        f"index {out} vs shards {shards}; not adding",
    )
    return frozenset((s["dir"], s["file"]) for s in info["shards"])
