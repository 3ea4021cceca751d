"""Indexes built under a memory budget, out of RAM: train on a sample, add the shards batch by
batch into blocks, merge the blocks into on-disk inverted lists, tune nprobe on held-out rows.

Files of generation ``g`` in the index folder: ``index-g.faiss`` (quantizer and tables; the
lists are in ``lists-g.ivfdata``, memory-mapped when searching), ``ids-g.parquet`` (ids and
sources, read by position), ``trained-g.faiss`` (the empty trained index, for ``--add``),
``heldout-g.npz`` (tuning queries and their exact neighbours) and, with ``--refine``,
``vectors.bin`` (the normalised vectors in the shards' dtype, appended to by ``--add``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from xmodal.atomic import atomic_write_text, make_dir
from xmodal.index import budget as budgets
from xmodal.index.description import INDEX_FORMAT, INDEX_JSON
from xmodal.index.ondisk import file_digest, merge_blocks, read_index
from xmodal.index.store import IdsFile, IdsWriter, VectorsWriter, open_vectors
from xmodal.index.stream import Batch, ShardSource
from xmodal.index.tuning import HELD_OUT, TARGET_RECALL, HeldOut, tune_nprobe
from xmodal.shards import now

VECTORS_FILE = "vectors.bin"
IVF_MAX_PROBE_FRACTION = 0.05
OPQ_SAMPLE = 8_000  # rows the OPQ rotation is trained on
OPQ_IMBALANCE = 1.5


def names(generation: int) -> dict[str, str]:
    g = f"{generation:05d}"
    return {
        "index_file": f"index-{g}.faiss",
        "lists_file": f"lists-{g}.ivfdata",
        "ids_file": f"ids-{g}.parquet",
        "trained_file": f"trained-{g}.faiss",
        "heldout_file": f"heldout-{g}.npz",
    }


def build_planned(
    source: ShardSource,
    out: Path,
    max_index_memory: int,
    max_build_memory: int | None = None,
    refine: int = 0,
    target: float = TARGET_RECALL,
    seed: int = 0,
    previous: dict[str, Any] | None = None,
    flat_max: int = budgets.FLAT_MAX,
) -> dict[str, Any]:
    """Build the index the budget picks over ``source`` into ``out`` (a new generation)."""
    started = time.perf_counter()
    reserved = budgets.process_memory() if max_build_memory is not None else 0
    plan = budgets.plan_index(
        source.count, source.dim, max_index_memory, max_build_memory, flat_max, reserved
    )
    rng = np.random.default_rng(seed)
    held_count = min(HELD_OUT, source.count // 10) if plan.kind != "flat" else 0
    sample = source.sample_positions(plan.train_rows() + held_count, rng)
    held_rows = np.sort(rng.choice(sample, size=held_count, replace=False))
    train_rows = np.setdiff1d(sample, held_rows)
    sample_vectors = source.rows_at(sample)
    held = HeldOut(held_rows, sample_vectors[np.searchsorted(sample, held_rows)])
    train = sample_vectors[np.searchsorted(sample, train_rows)]
    del sample_vectors

    generation = (previous or {}).get("generation", 0) + 1
    files = names(generation)
    make_dir(out)
    work = out / f".build-{generation:05d}"
    shutil.rmtree(work, ignore_errors=True)
    make_dir(work)
    try:
        opq_check: dict[str, float] = {}
        if plan.kind == "ivf-pq":
            plan, opq_check = choose_opq(plan, train, seed)
        trained = train_index(plan, train, seed)
        del train
        rows = budgets.batch_rows(plan, max_build_memory, reserved)
        vectors = VectorsWriter(work / VECTORS_FILE, source.dtype) if refine else None
        ids = IdsWriter(work / files["ids_file"])
        index, added = add_batches(plan, trained, source, 0, rows, work, ids, vectors, held)
        ids.close()
        if vectors is not None:
            vectors.close()
        _save(index, trained, plan, work, files)
        info = {
            "format": INDEX_FORMAT,
            "kind": plan.kind,
            "modality": source.modality,
            "metric": "inner_product",
            "count": added,
            "dim": source.dim,
            "dtype": source.dtype,
            "model": source.manifest["model"],
            "processor_hash": source.manifest["processor_hash"],
            "shards": [f.record() for f in source.files],
            "generation": generation,
            "created": now(),
            "budget": {
                "max_index_memory": max_index_memory,
                "max_build_memory": max_build_memory,
                "index_bytes": plan.index_bytes(),
                "build_bytes": plan.build_bytes(rows),
                "process_bytes": reserved,
                "batch_rows": rows,
            },
            "plan": plan.describe(),
            "params": {"factory": plan.factory()},
        }
        if opq_check:
            info["plan"]["opq_check"] = opq_check
        _tune(info, index, held, refine, target, work, work)
        if plan.kind == "ivf-flat" and _ivf_rejected(info, max_index_memory, flat_max):
            info["params"]["ivf_rejected"] = _ivf_rejected(info, max_index_memory, flat_max)
        info["build_seconds"] = round(time.perf_counter() - started, 1)
        _commit(out, work, info, files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info


def _ivf_rejected(info: dict[str, Any], budget: int, flat_max: int) -> str | None:
    params = info["params"]
    flat_bytes = info["count"] * info["dim"] * 4
    if flat_bytes > budget or params["nprobe"] <= IVF_MAX_PROBE_FRACTION * params["nlist"]:
        return None
    return (
        f"IVF needs nprobe {params['nprobe']} of {params['nlist']} lists: the data has little "
        "cluster structure (exact search would be as fast and fits the budget)"
    )


def choose_opq(
    plan: budgets.IndexPlan, train: np.ndarray, seed: int
) -> tuple[budgets.IndexPlan, dict[str, float]]:
    """OPQ where it helps: PQ splits each vector into ``pq_m`` slices quantised apart, which
    wastes bits when the variance sits unevenly across the slices; OPQ learns a rotation that
    evens it out. It is used when the largest slice variance exceeds the mean by
    ``OPQ_IMBALANCE`` (on the centred training sample)."""
    slices = column_variance(train).reshape(plan.pq_m, -1).sum(axis=1)
    ratio = float(slices.max() / max(slices.mean(), 1e-12))
    use = ratio >= OPQ_IMBALANCE
    chosen = budgets.IndexPlan(plan.kind, plan.count, plan.dim, plan.nlist, plan.pq_m, use)
    return chosen, {"slice_variance_max_over_mean": round(ratio, 3)}


def column_variance(rows: np.ndarray, chunk: int = 16_384) -> np.ndarray:
    """Per-column variance of ``rows``, a chunk at a time (float64 sums): no copy of the whole
    sample, which at 10M vectors is half a GiB per copy."""
    total = np.zeros(rows.shape[1], np.float64)
    squares = np.zeros(rows.shape[1], np.float64)
    for lo in range(0, len(rows), chunk):
        block = rows[lo : lo + chunk].astype(np.float64)
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    mean = total / max(len(rows), 1)
    return np.maximum(squares / max(len(rows), 1) - mean**2, 0.0)


def _quiet(index: faiss.Index, seed: int) -> None:
    """Fewer k-means iterations, a fixed seed, no polysemous training for every quantizer
    the index trains (build time matters more than the last percent of accuracy)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        ivf.cp.niter = 10
        ivf.cp.seed = seed
        ivf.cp.max_points_per_centroid = budgets.MAX_TRAIN_PER_LIST
        if isinstance(ivf, faiss.IndexIVFPQ):
            ivf.do_polysemous_training = False
            ivf.pq.cp.seed = seed
            ivf.pq.cp.niter = 10
            ivf.pq.cp.min_points_per_centroid = 8
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            opq = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(opq, faiss.OPQMatrix):
                opq.niter, opq.niter_pq = 8, 4
                opq.max_train_points = OPQ_SAMPLE
                opq.verbose = False


def train_index(plan: budgets.IndexPlan, train: np.ndarray, seed: int) -> faiss.Index:
    index = faiss.index_factory(plan.dim, plan.factory(), faiss.METRIC_INNER_PRODUCT)
    _quiet(index, seed)
    if plan.kind != "flat":
        with tqdm(total=1, desc=f"training {plan.factory()}", unit="index", leave=False) as bar:
            index.train(train)
            bar.update()
    return index


def add_batches(
    plan: budgets.IndexPlan,
    trained: faiss.Index,
    source: ShardSource,
    first: int,
    rows: int,
    work: Path,
    ids: IdsWriter,
    vectors: VectorsWriter | None,
    held: HeldOut | None,
) -> tuple[faiss.Index, int]:
    """Add every row of ``source`` (positions from ``first``); IVF rows go to block files in
    ``work`` that are merged into on-disk lists. Returns the index and the rows added."""
    flat = plan.kind == "flat"
    index = trained if flat else faiss.clone_index(trained)
    blocks: list[Path] = []
    block_limit = max(rows, budgets.BLOCK_BYTES // (plan.code_size + budgets.ID_BYTES))
    added = 0
    bar = tqdm(total=source.count, desc=f"adding to {plan.factory()}", unit="vec", leave=False)
    for batch in source.batches(rows):
        positions = np.arange(first + added, first + added + len(batch.embeddings), dtype=np.int64)
        if flat:
            index.add(batch.embeddings)
        else:
            index.add_with_ids(batch.embeddings, positions)
        _record(batch, ids, vectors)
        if held is not None:
            held.update(int(positions[0]) if len(positions) else first, batch.embeddings)
        added += len(batch.embeddings)
        bar.update(len(batch.embeddings))
        if not flat and index.ntotal >= block_limit:
            blocks.append(_flush(index, work, len(blocks)))
            index = faiss.clone_index(trained)
    bar.close()
    if flat:
        return index, added
    if index.ntotal or not blocks:
        blocks.append(_flush(index, work, len(blocks)))
    return blocks_index(trained, blocks, work), added


def blocks_index(
    trained: faiss.Index, blocks: list[Path], work: Path, ondisk: frozenset[Path] = frozenset()
) -> faiss.Index:
    return merge_blocks(faiss.clone_index(trained), blocks, work / "lists.ivfdata", ondisk)


def _record(batch: Batch, ids: IdsWriter, vectors: VectorsWriter | None) -> None:
    ids.write(batch.columns)
    if vectors is not None:
        vectors.write(batch.embeddings)


def _flush(index: faiss.Index, work: Path, number: int) -> Path:
    path = work / f"block-{number:05d}.faiss"
    faiss.write_index(index, str(path))
    return path


def _save(
    index: faiss.Index,
    trained: faiss.Index,
    plan: budgets.IndexPlan,
    work: Path,
    files: dict[str, str],
) -> None:
    """The index (its lists renamed to this generation's name), the trained empty index."""
    if plan.kind != "flat":
        faiss.write_index(trained, str(work / files["trained_file"]))
        ivf = faiss.extract_index_ivf(index)
        ondisk = faiss.downcast_InvertedLists(ivf.invlists)
        ondisk.filename = str(work / files["lists_file"])  # read back from the same folder
        os.replace(work / "lists.ivfdata", work / files["lists_file"])
    faiss.write_index(index, str(work / files["index_file"]))


def _tune(
    info: dict[str, Any],
    index: faiss.Index,
    held: HeldOut,
    refine: int,
    target: float,
    vectors_dir: Path,
    work: Path,
) -> None:
    """nprobe from the held-out rows, recall at 1/10/100 (exact search: 1.0)."""
    params = info["params"]
    if info["kind"] == "flat":
        params.update(recall_at_1=1.0, recall_at_10=1.0, recall_at_100=1.0)
        return
    vectors = (
        open_vectors(vectors_dir / VECTORS_FILE, info["count"], info["dim"], info["dtype"])
        if refine
        else None
    )
    nlist = faiss.extract_index_ivf(index).nlist
    nprobe, recalls = tune_nprobe(index, held, nlist, target, refine, vectors)
    params.update(nlist=nlist, nprobe=nprobe, refine=refine, target_recall=target, **recalls)
    params["tuning_queries"] = len(held.queries)
    held.save(work / names(info["generation"])["heldout_file"])


def _commit(out: Path, work: Path, info: dict[str, Any], files: dict[str, str]) -> None:
    """Move the new generation's files in, write index.json (atomic), drop older ones."""
    if (work / VECTORS_FILE).exists():  # a fresh build's; --add appends to the current one
        os.replace(work / VECTORS_FILE, out / VECTORS_FILE)
    for key, name in files.items():
        if (work / name).exists():
            os.replace(work / name, out / name)
            info[key] = name
    info["digest"] = file_digest(out / info["index_file"])
    if "lists_file" in info:
        info["lists_bytes"] = (out / info["lists_file"]).stat().st_size
    if info["params"].get("refine"):
        info["vectors_file"] = VECTORS_FILE
    info["updated"] = now()
    atomic_write_text(out / INDEX_JSON, json.dumps(info, indent=2))
    keep = {info[k] for k in files if k in info}
    if "vectors_file" in info:
        keep.add(VECTORS_FILE)
    patterns = ("index-*.faiss", "ids-*.parquet", "lists-*.ivfdata", "trained-*.faiss")
    for pattern in (*patterns, "heldout-*.npz", ".*.tmp"):
        for old in out.glob(pattern):
            if old.name not in keep:
                old.unlink(missing_ok=True)
    if "vectors_file" not in info:
        (out / VECTORS_FILE).unlink(missing_ok=True)


def add_planned(source: ShardSource, out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Append ``source``'s rows to a budgeted index as a new generation: the new rows go to
    blocks merged with the current lists; nprobe is re-tuned on the same held-out rows."""
    old_count = info["count"]
    generation = info["generation"] + 1
    files = names(generation)
    work = out / f".build-{generation:05d}"
    shutil.rmtree(work, ignore_errors=True)
    make_dir(work)
    refine = info["params"].get("refine", 0)
    try:
        vectors = None
        if refine:
            path = out / VECTORS_FILE
            open_vectors(path, old_count, info["dim"], info["dtype"])  # checks its size
            vectors = VectorsWriter.__new__(VectorsWriter)
            vectors.path, vectors.dtype, vectors.rows = path, np.dtype(info["dtype"]), 0
            vectors.handle = open(path, "r+b")  # noqa: SIM115 (closed below)
            vectors.handle.truncate(old_count * info["dim"] * vectors.dtype.itemsize)
            vectors.handle.seek(0, os.SEEK_END)
        ids = IdsWriter(work / files["ids_file"])
        old_ids = IdsFile(out / info["ids_file"])
        for group in range(old_ids.file.metadata.num_row_groups):
            ids.write(old_ids.file.read_row_group(group).to_pydict())
        plan = budgets.IndexPlan(**{k: v for k, v in info["plan"].items() if k in _PLAN_KEYS})
        rows = info["budget"]["batch_rows"]
        held = HeldOut.load(out / info["heldout_file"]) if "heldout_file" in info else None
        if plan.kind == "flat":
            index = read_index(out / info["index_file"])
            index, added = add_batches(
                plan, index, source, old_count, rows, work, ids, vectors, held
            )
        else:
            trained = read_index(out / info["trained_file"])
            fresh, added = add_batches(
                plan, trained, source, old_count, rows, work, ids, vectors, held
            )
            (work / "lists.ivfdata").rename(work / "new.ivfdata")
            new_block = work / "new-block.faiss"
            ondisk = faiss.downcast_InvertedLists(faiss.extract_index_ivf(fresh).invlists)
            ondisk.filename = str(work / "new.ivfdata")
            faiss.write_index(fresh, str(new_block))
            del fresh
            current = out / info["index_file"]
            index = blocks_index(
                trained, [current, new_block], work, frozenset([current, new_block])
            )
        ids.close()
        if vectors is not None:
            vectors.close()
        _save(index, trained if plan.kind != "flat" else index, plan, work, files)
        info = dict(info, count=old_count + added, generation=generation)
        info["shards"] = info["shards"] + [f.record() for f in source.files]
        info["plan"] = dict(info["plan"], count=old_count + added)
        if held is not None:
            _tune(info, index, held, refine, info["params"]["target_recall"], out, work)
        _commit(out, work, info, files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info


_PLAN_KEYS = ("kind", "count", "dim", "nlist", "pq_m", "opq")
