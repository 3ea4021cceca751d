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
from xmodal.choices import IndexKind
from xmodal.errors import IndexBuildError, MissingDependencyError, MissingFileError
from xmodal.index.description import INDEX_FORMAT, INDEX_JSON, read_info
from xmodal.index.tuning import (
    GROUND_TRUTH_K,
    RECALL_K,
    HeldOut,
    check_recall,
    held_out_count,
    measured_record,
)
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
    """Recall@10 of an index against exact search on held-out rows of the data
    (:mod:`.tuning`): up to ``sample`` rows, at most a tenth of them, searched with every
    held-out row left out of both the index's results and the exact ones."""

    def __init__(self, vectors: np.ndarray, sample: int = TUNING_QUERIES, seed: int = 0):
        rng = np.random.default_rng(seed)
        count = len(vectors)
        self.rows = np.sort(rng.choice(count, size=held_out_count(count, sample), replace=False))
        self.queries = np.ascontiguousarray(vectors[self.rows])
        self.k = min(RECALL_K, count - len(self.rows))
        self.held = HeldOut(self.rows, self.queries, GROUND_TRUTH_K)
        self.held.update(0, vectors)
        self.exact = self.held.found[:, : self.k]
        self.selector = self.held.selector()  # kept alive with the tuner

    def recall(self, index: faiss.Index, params: faiss.SearchParameters | None) -> float:
        if self.k < 1 or not len(self.rows):
            return 1.0
        params = params if params is not None else faiss.SearchParameters()
        params.sel = self.selector
        _, found = index.search(self.queries, self.k, params=params)
        return self.held.recall_at(found, self.k)

    def measured(self, index: faiss.Index, params: faiss.SearchParameters | None) -> dict:
        """The ``measured_recall`` record of ``index`` searched with ``params``."""
        return measured_record(self.recall(index, params), len(self.rows))

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
    """An inner-product index over ``vectors`` and the parameters it was built and tuned with,
    its ``measured_recall`` among them (:mod:`.tuning`; exact search measures ~1.0)."""
    if kind not in INDEX_KINDS:
        raise IndexBuildError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
    count, dim = vectors.shape
    if count == 0:
        raise IndexBuildError("no vectors to index")
    tuner = Tuner(vectors, seed=seed)
    if kind == "flat" or (kind == "auto" and count < FLAT_MAX):
        flat = _flat(vectors)
        return flat, _exact_params(tuner, flat, target)
    if kind == "hnsw":
        index, params = _hnsw(vectors, seed, target, tuner)
        return index, _measured(params, tuner, index)
    index, params = _ivf(vectors, seed, target, tuner)
    reason = ivf_rejection(params)
    if kind == "auto" and reason:
        flat = _flat(vectors)
        return flat, {**_exact_params(tuner, flat, target), "ivf_rejected": reason}
    return index, _measured(params, tuner, index)


def _exact_params(tuner: Tuner, flat: faiss.Index, target: float) -> dict[str, Any]:
    measured = tuner.measured(flat, None) if len(tuner.rows) else measured_record(1.0, 0)
    return {"kind": "flat", "target_recall": target, "measured_recall": measured}


def _measured(params: dict[str, Any], tuner: Tuner, index: faiss.Index) -> dict[str, Any]:
    """``params`` with the recall of ``index`` searched as it is served (its tuned nprobe or
    efSearch) on the tuner's held-out rows."""
    if params["kind"] == "ivf":
        search = faiss.SearchParametersIVF(nprobe=params["nprobe"])
    else:
        search = faiss.SearchParametersHNSW(efSearch=params["efSearch"])
    params["measured_recall"] = tuner.measured(index, search)
    return params


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


def _ivf(
    vectors: np.ndarray, seed: int, target: float, tuner: Tuner | None = None
) -> tuple[faiss.Index, dict[str, Any]]:
    count, dim = vectors.shape
    nlist = ivf_nlist(count)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(count, size=min(count, 50 * nlist), replace=False))
    index.train(np.ascontiguousarray(vectors[train_rows]))
    index.add(vectors)
    nprobe, recall = tune_ivf(index, vectors, seed, target, tuner)
    return index, {
        "kind": "ivf",
        "nlist": nlist,
        "nprobe": nprobe,
        "recall_at_10": recall,
        "target_recall": target,
        "tuning_queries": len(tuner.rows) if tuner else held_out_count(count, TUNING_QUERIES),
        "train_vectors": len(train_rows),
    }


def tune_ivf(
    index: faiss.Index,
    vectors: np.ndarray,
    seed: int = 0,
    target: float = TARGET_RECALL,
    tuner: Tuner | None = None,
) -> tuple[int, float]:
    """The smallest nprobe reaching ``target`` recall@10 (sets it as the index default)."""
    tuner = tuner or Tuner(vectors, seed=seed)
    nprobe, recall = tuner.smallest(
        index, lambda p: faiss.SearchParametersIVF(nprobe=p), 1, index.nlist, target
    )
    index.nprobe = nprobe
    return nprobe, recall


def _hnsw(
    vectors: np.ndarray, seed: int, target: float, tuner: Tuner | None = None
) -> tuple[faiss.Index, dict[str, Any]]:
    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    tuner = tuner or Tuner(vectors, seed=seed)
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
    target: float = TARGET_RECALL,
    accept: float | None = None,
) -> dict[str, Any]:
    """Index the ``modality`` shards of ``shards`` into ``out`` as a ``kind`` index (auto,
    flat, ivf or hnsw); ``add`` appends new shards only. An index whose measured recall@10
    is under ``target`` (and under ``accept`` when given) is refused, nothing written."""
    out = Path(out)
    if add:
        return _add(Path(shards), out, modality, seed, accept)
    manifest, vectors = load_vectors(shards, modality)
    index, params = build_faiss(vectors.embeddings, kind, seed, target)
    _check(params, f"{params['kind']} index of {len(vectors.ids):,} {modality}", accept)
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


def _check(params: dict[str, Any], what: str, accept: float | None) -> None:
    """Refuse a measured recall under the target (unless ``accept`` allows it); record the
    floor that let it through."""
    measured, target = params["measured_recall"], params["target_recall"]
    check_recall(measured, target, accept, what)
    params.pop("accept_recall", None)
    if measured["value"] < target:
        params["accept_recall"] = accept


def _add(
    shards: Path, out: Path, modality: str, seed: int, accept: float | None = None
) -> dict[str, Any]:
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
    params = info["params"]
    params.setdefault("target_recall", TARGET_RECALL)  # an index built before it was recorded
    merged.embeddings = _all_embeddings(merged.shards, modality)
    tuner = Tuner(merged.embeddings, seed=seed)
    if info["kind"] == "ivf":
        nprobe, recall = tune_ivf(index, merged.embeddings, seed, params["target_recall"], tuner)
        params.update(nprobe=nprobe, recall_at_10=recall, tuning_queries=len(tuner.rows))
    if info["kind"] == "flat":
        params["measured_recall"] = tuner.measured(index, None)
    else:
        served = _measured(dict(params, kind=info["kind"]), tuner, index)
        params["measured_recall"] = served["measured_recall"]
    _check(params, f"{out} after adding", params.get("accept_recall") if accept is None else accept)
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
