"""``--add``: the rows of shards not yet indexed appended to a built index as a new generation,
the search depth re-tuned and the recall measured again on the index's held-out rows.

An index held in memory takes the rows directly; one with on-disk lists gets them in blocks
merged with its current lists. An index folder written before plans were recorded (kind flat,
ivf or hnsw, no ``plan`` or held-out file in ``index.json``) gets both from its own vectors
and is written in the current layout from then on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from xmodal.errors import IndexBuildError, MissingFileError
from xmodal.index import budget as budgets
from xmodal.index.build import (
    VECTORS_FILE,
    Fill,
    _commit,
    _save,
    _tune,
    add_batches,
    blocks_index,
    names,
    work_folder,
)
from xmodal.index.description import read_info
from xmodal.index.ondisk import read_index
from xmodal.index.store import IdsFile, IdsWriter, VectorsWriter, open_vectors
from xmodal.index.stream import ShardSource
from xmodal.index.tuning import TARGET_RECALL, HeldOut, check_recall, held_out_count
from xmodal.models.identity import ModelIdentity, check_compatible
from xmodal.shards import load_manifest

PLAN_KEYS = ("kind", "count", "dim", "nlist", "pq_m", "opq")


def add_shards(
    shards: Path,
    out: Path,
    modality: str,
    accept: float | None = None,
    seed: int = 0,
    fill: Fill | None = None,
) -> dict[str, Any]:
    """Append the ``modality`` rows of ``shards`` that the index in ``out`` does not hold yet
    (RecallTargetError, the index left as it was, when its recall falls under the target and
    under ``accept``, default: the floor the index was built with)."""
    info = read_info_or_fail(out)
    included = addable_shards(shards, out, modality, info)
    source = ShardSource(shards, modality, skip=included)
    if source.count == 0:
        return info
    return add_rows(source, out, info, accept, seed, fill)


def read_info_or_fail(out: Path) -> dict[str, Any]:
    info = read_info(out)
    if info is None:
        raise IndexBuildError(f"{out}: no index to add to (build one first, without --add)")
    return info


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


def add_rows(
    source: ShardSource,
    out: Path,
    info: dict[str, Any],
    accept: float | None,
    seed: int = 0,
    fill: Fill | None = None,
) -> dict[str, Any]:
    """Append ``source``'s rows to the index in ``out`` (see :func:`add_shards`; ``fill``:
    as :func:`xmodal.index.build.build`'s)."""
    old_count = info["count"]
    generation = info["generation"] + 1
    files = names(generation)
    params = info["params"]
    refine = params.get("refine", 0)
    plan = saved_plan(info)
    with work_folder(out, generation, fill) as work:
        vectors = _reopen_vectors(out, info) if refine else None
        ids = IdsWriter(work / files["ids_file"])
        old_ids = IdsFile(out / info["ids_file"])
        for group in range(old_ids.file.metadata.num_row_groups):
            ids.write(old_ids.file.read_row_group(group).to_pydict())
        rows = info.get("budget", {}).get("batch_rows", budgets.BATCH_ROWS)
        if plan.in_memory:
            index = read_index(out / info["index_file"])
            held = _held_out(out, info, index, seed)
            index, added = add_batches(
                plan, index, source, old_count, rows, work, ids, vectors, held
            )
            trained = index
        else:
            held = HeldOut.load(out / info["heldout_file"]) if "heldout_file" in info else None
            trained = read_index(out / info["trained_file"])
            fresh, added = add_batches(
                plan, trained, source, old_count, rows, work, ids, vectors, held, fill
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
        total = old_count + added
        info = dict(info, count=total, generation=generation)
        info["shards"] = info["shards"] + [f.record() for f in source.files]
        info["plan"] = dict(info.get("plan", plan.describe()), count=total)
        info.setdefault("dtype", source.dtype)
        if held is not None:
            target = params.get("target_recall", TARGET_RECALL)
            _tune(info, plan, index, held, refine, target, out, work)
            floor = params.pop("accept_recall", None) if accept is None else accept
            if params["measured_recall"]["value"] < target:
                check_recall(params["measured_recall"], target, floor, f"{out} after adding")
                params["accept_recall"] = floor
        _save(index, trained, plan, work, files)
        _commit(out, work, info, files)
    return info


def saved_plan(info: dict[str, Any]) -> budgets.IndexPlan:
    """The plan an index was built with (for an index written before plans were recorded:
    its kind, count, dimension and nlist)."""
    if "plan" in info:
        return budgets.IndexPlan(**{k: v for k, v in info["plan"].items() if k in PLAN_KEYS})
    nlist = info["params"].get("nlist", 0) if info["kind"] == "ivf" else 0
    return budgets.IndexPlan(info["kind"], info["count"], info["dim"], nlist)


def _held_out(out: Path, info: dict[str, Any], index: faiss.Index, seed: int) -> HeldOut:
    """The index's held-out rows; for an index that saved none, drawn from its own vectors
    (seeded) with their exact neighbours among the others."""
    if "heldout_file" in info:
        return HeldOut.load(out / info["heldout_file"])
    vectors = stored_vectors(index)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), size=held_out_count(len(vectors)), replace=False))
    held = HeldOut(rows, vectors[rows])
    held.update(0, vectors)
    return held


def stored_vectors(index: faiss.Index) -> np.ndarray:
    """Every vector an in-memory flat, IVF-Flat or HNSW-Flat index holds, by position."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return index.reconstruct_n(0, index.ntotal)
    out = np.zeros((index.ntotal, ivf.d), np.float32)
    lists = ivf.invlists
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(number), size).copy()
            codes = faiss.rev_swig_ptr(lists.get_codes(number), size * ivf.code_size)
            out[ids] = np.frombuffer(codes.copy(), np.float32).reshape(size, ivf.d)
    return out


def _reopen_vectors(out: Path, info: dict[str, Any]) -> VectorsWriter:
    """The index's re-ranking vectors file, opened to append the new rows (cut back to the
    rows the index holds, should a killed --add have left more)."""
    path = out / VECTORS_FILE
    open_vectors(path, info["count"], info["dim"], info["dtype"])  # checks its size
    vectors = VectorsWriter.__new__(VectorsWriter)
    vectors.path, vectors.dtype, vectors.rows = path, np.dtype(info["dtype"]), 0
    vectors.handle = open(path, "r+b")  # noqa: SIM115 (closed by the caller)
    vectors.handle.truncate(info["count"] * info["dim"] * vectors.dtype.itemsize)
    vectors.handle.seek(0, os.SEEK_END)
    return vectors
