"""Building an index from its plan (:mod:`.budget`), one path for every kind: train on a sample,
add the shards batch by batch, tune the search depth (nprobe, efSearch) on held-out rows and
record the recall reached (:mod:`.tuning`).

A plan held in memory (``--kind``: flat, ivf, hnsw; an unlimited budget) is filled in memory
and written as one file; ``auto`` falls back to exact search when IVF-Flat needs too many of
its lists. A plan under a budget adds into blocks merged into on-disk inverted lists; under
the target recall the build tries what raises it within the budget (:func:`escalate`) and
refuses, naming the budget that would reach it (:func:`refusal`), when nothing does.

Files of generation ``g`` in the index folder: ``index-g.faiss`` (the index; on disk, the
quantizer and tables, the lists in ``lists-g.ivfdata``, memory-mapped when searching),
``ids-g.parquet`` (ids and sources, read by position), ``trained-g.faiss`` (on disk: the empty
trained index, for ``--add``), ``heldout-g.npz`` (tuning queries and their exact neighbours)
and, with ``--refine``, ``vectors.bin`` (the normalised vectors in the shards' dtype, appended
to by ``--add``). A build works in ``.build-<g>`` (:func:`work_folder`), removed when it is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from xmodal.atomic import atomic_write_bytes, atomic_write_text, make_dir
from xmodal.errors import IndexBuildError
from xmodal.index import budget as budgets
from xmodal.index.description import INDEX_FORMAT, INDEX_JSON
from xmodal.index.ondisk import file_digest, merge_blocks, read_index
from xmodal.index.store import IdsWriter, VectorsWriter, open_vectors
from xmodal.index.stream import Batch, ShardSource
from xmodal.index.tuning import (
    GROUND_TRUTH_K,
    RECALL_K,
    TARGET_RECALL,
    HeldOut,
    RecallTargetError,
    check_recall,
    floor2,
    held_out_count,
    measured_record,
    search_index,
    tune_depth,
)
from xmodal.shards import now

VECTORS_FILE = "vectors.bin"
REFINE_MAX = 1000  # longest exact re-ranking shortlist the build may settle on
REFINE_HINT = 100  # the shortlist a refusal suggests when no vectors are stored
FINER_NLIST = 4  # the finer coarse quantizer tried under the target: this many times the lists
LADDER = 4  # larger codes a refusal measures to name the budget that would reach the target
RECALL_ROWS = 16_384  # rows encoded at once while measuring codes
HNSW_DEPTHS = (16, 4096)  # the efSearch range tuned
# (plan, trained, source, first, rows, work, ids, vectors, held) -> (blocks, rows added)
Fill = Callable[..., tuple[list[Path], int]]
QUANTIZER = "quantizer"  # a resuming fill's trained index in the work folder
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


def build(
    source: ShardSource,
    out: Path,
    limits: Limits,
    kind: str = "auto",
    refine: int = 0,
    target: float = TARGET_RECALL,
    seed: int = 0,
    previous: dict[str, Any] | None = None,
    accept: float | None = None,
    fill: Fill | None = None,
) -> dict[str, Any]:
    """Build the index planned for ``source`` (``kind`` with an unlimited budget, else the one
    ``limits`` pick) into ``out`` as a new generation.

    Its recall@10 is measured on held-out rows (:mod:`.tuning`). Under ``target`` (with every
    list probed) a budgeted build tries what raises recall within the budget
    (:func:`escalate`); when nothing reaches it, RecallTargetError names the best recall (and,
    under a budget, the budget that would reach the target), unless ``accept`` allows it.
    ``fill`` adds the rows of on-disk lists to blocks (default :func:`fill_blocks`, in this
    process; :mod:`.ray_engine` in parallel)."""
    started = time.perf_counter()
    plan = budgets.plan_index(
        source.count, source.dim, limits.index, limits.build, limits.reserved, kind
    )
    rng = np.random.default_rng(seed)
    held_count = held_out_count(source.count)
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
    with work_folder(out, generation, fill) as work:
        opq_check: dict[str, float] = {}
        if plan.kind == "ivf-pq":
            plan, opq_check = choose_opq(plan, train, seed)
        trained = trained_once(plan, train, seed, work, fill)
        rows = budgets.batch_rows(plan, limits.build, limits.reserved)
        vectors = VectorsWriter(work / VECTORS_FILE, source.dtype) if refine else None
        ids = IdsWriter(work / files["ids_file"])
        index, added = add_batches(plan, trained, source, 0, rows, work, ids, vectors, held, fill)
        ids.close()
        if vectors is not None:
            vectors.close()
        info = _describe(source, plan, added, generation, rows, limits, opq_check, len(train))
        _tune(info, plan, index, held, refine, target, work, work)
        if info["params"]["measured_recall"]["value"] < target and plan.compressed:
            choice = escalate(
                plan, trained, train, source, rows, held, refine, target, limits, seed
            )
            if choice.best < target and (accept is None or choice.best < accept):
                message = refusal(choice, train, source, rows, held, target, limits, seed)
                raise RecallTargetError(message)
            retune = choice.plan != plan or choice.refine != refine
            if choice.plan != plan:  # another code within the budget: add the rows again
                del index
                for block in work.glob("block-*.faiss"):
                    block.unlink()
                (work / "lists.ivfdata").unlink(missing_ok=True)
                plan, trained = choice.plan, choice.trained
                rows = budgets.batch_rows(plan, limits.build, limits.reserved)
                index, _ = add_batches(plan, trained, source, 0, rows, work, None, None, None, fill)
                info = _describe(source, plan, added, generation, rows, limits, opq_check, 0)
            if retune:
                _tune(info, plan, index, held, choice.refine, target, work, work)
            info["plan"]["recall_check"] = choice.tried
        del train
        rejected = ivf_rejection(info, limits)
        if rejected and kind == "auto" and limits.index is None:  # exact search is as fast
            del index
            plan = budgets.IndexPlan("flat", source.count, source.dim)
            trained = train_index(plan, np.zeros((0, plan.dim), np.float32), seed)
            index, _ = add_batches(plan, trained, source, 0, rows, work, None, None, None, fill)
            info = _describe(source, plan, added, generation, rows, limits, opq_check, 0)
            _tune(info, plan, index, held, refine, target, work, work)
        if rejected:
            info["params"]["ivf_rejected"] = rejected
        _save(index, trained, plan, work, files)
        measured = info["params"]["measured_recall"]
        if measured["value"] < target:  # what the build reaches on the held-out rows
            what = f"{info['kind']} index of {added:,} {source.modality}"
            check_recall(measured, target, accept, what)
            info["params"]["accept_recall"] = accept
        info["build_seconds"] = round(time.perf_counter() - started, 1)
        _commit(out, work, info, files)
    return info


@contextmanager
def work_folder(out: Path, generation: int, fill: Fill | None = None) -> Iterator[Path]:
    """The build's work folder, ``<out>/.build-<generation>``, removed once the build is done.
    A fill that resumes names what a rerun may take up again (``fill.reused``, entries of the
    folder: :mod:`.ray_engine`'s finished parts and the trained quantizer): they stay when the
    build stops short and are found by the rerun; everything else in the folder is cleared."""
    work = out / f".build-{generation:05d}"
    reused = frozenset(getattr(fill, "reused", ()))
    clear_work(work, reused)
    make_dir(work)
    done = False
    try:
        yield work
        done = True
    finally:
        clear_work(work, frozenset() if done else reused)


def clear_work(work: Path, keep: frozenset[str]) -> None:
    """Everything in ``work`` but the entries named in ``keep`` removed (the folder itself
    too when nothing is kept)."""
    if not work.exists():
        return
    if not keep or not any((work / name).exists() for name in keep):
        shutil.rmtree(work, ignore_errors=True)
        return
    for entry in work.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's shape, dtype and bytes."""
    digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def trained_once(
    plan: budgets.IndexPlan, train: np.ndarray, seed: int, work: Path, fill: Fill | None
) -> faiss.Index:
    """:func:`train_index`; for a fill that resumes (``QUANTIZER`` in ``fill.reused``) kept in
    ``work`` with what it was trained from (the factory, the seed, the sample's digest), and
    read back by a rerun from the same: the parts it finished were added to that quantizer."""
    if QUANTIZER not in getattr(fill, "reused", ()):
        return train_index(plan, train, seed)
    folder = work / QUANTIZER
    record, stored = folder / "quantizer.json", folder / "trained.faiss"
    key = {"factory": plan.factory(), "seed": seed, "sample": array_digest(train)}
    if record.is_file() and stored.is_file():
        try:
            if json.loads(record.read_text())["from"] == key:
                return read_index(stored)
        except (ValueError, KeyError, IndexBuildError):
            pass  # a damaged record or file: trained again
    shutil.rmtree(folder, ignore_errors=True)
    make_dir(folder)
    trained = train_index(plan, train, seed)
    atomic_write_bytes(stored, faiss.serialize_index(trained).tobytes())
    atomic_write_text(record, json.dumps({"from": key}, indent=2))
    return trained


@dataclass(frozen=True)
class Limits:
    """The budgets of one build (bytes; None: unlimited; ``reserved``: what the process itself
    holds)."""

    index: int | None = None
    build: int | None = None
    reserved: int = 0

    def fits(self, plan: budgets.IndexPlan) -> bool:
        """Whether ``plan`` fits the index budget and can be built within the build one."""
        if self.index is not None and plan.index_bytes() > self.index:
            return False
        return self.build is None or plan.build_bytes() + self.reserved <= self.build


def _describe(
    source: ShardSource,
    plan: budgets.IndexPlan,
    added: int,
    generation: int,
    rows: int,
    limits: Limits,
    opq_check: dict[str, float],
    trained_on: int,
) -> dict[str, Any]:
    """index.json of a fresh build of ``plan`` (params filled in by :func:`_tune`)."""
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
            "max_index_memory": limits.index,
            "max_build_memory": limits.build,
            "index_bytes": plan.index_bytes(),
            "build_bytes": plan.build_bytes(rows),
            "process_bytes": limits.reserved,
            "batch_rows": rows,
        },
        "plan": plan.describe(),
        "params": {"factory": plan.factory()},
    }
    if plan.kind not in ("flat", "hnsw"):
        info["params"]["train_vectors"] = trained_on
    if opq_check and plan.kind == "ivf-pq":
        info["plan"]["opq_check"] = opq_check
    return info


@dataclass
class Choice:
    """What :func:`escalate` settled on: the plan (and its trained index), the re-ranking
    shortlist, the best recall@10 any option reaches with every list probed, and every
    option tried (for index.json)."""

    plan: budgets.IndexPlan
    trained: faiss.Index
    refine: int
    best: float
    tried: list[dict[str, Any]]
    hint: float = 0.0  # recall@10 the best option reaches re-ranking REFINE_HINT exactly


def with_plan(plan: budgets.IndexPlan, **changes: Any) -> budgets.IndexPlan:
    return dataclasses.replace(plan, **changes)


def escalate(
    plan: budgets.IndexPlan,
    trained: faiss.Index,
    train: np.ndarray,
    source: ShardSource,
    rows: int,
    held: HeldOut,
    refine: int,
    target: float,
    limits: Limits,
    seed: int = 0,
) -> Choice:
    """Options that raise recall within the budget, when ``plan`` (nprobe tuned up to every
    list) misses ``target``: OPQ (a learnt rotation before the PQ code), a finer coarse
    quantizer (smaller residuals to encode), and, when the vectors are stored (``refine``),
    longer exact re-ranking shortlists (up to ``REFINE_MAX``); the code itself is already the
    largest the budget holds. Each option's recall@10 with every list probed is measured in
    one pass over the rows (the code's decoded vectors scored against the held-out queries,
    as the index scores them); the first that reaches ``target`` wins."""
    options = [(plan, trained)]
    variants = []
    if plan.kind == "ivf-pq" and not plan.opq:
        variants.append(with_plan(plan, opq=True))
    finer = with_plan(plan, nlist=plan.nlist * FINER_NLIST)
    if plan.count >= budgets.MIN_TRAIN_PER_LIST * finer.nlist:
        variants.append(finer)
    for variant in variants:
        if limits.fits(variant):
            options.append((variant, train_index(variant, sample_for(variant, train), seed)))
    shortlist = REFINE_MAX if refine else REFINE_HINT
    scans = scan_codes(source, rows, held, [t for _, t in options], shortlist)
    served = max(RECALL_K, refine) if refine else RECALL_K
    lengths = [served]
    while refine and lengths[-1] < REFINE_MAX:
        lengths.append(min(REFINE_MAX, lengths[-1] * 2))
    tried, table = [], []
    for (option, _), scan in zip(options, scans, strict=True):
        recalls = {r: round(held.recall_at(scan.found, RECALL_K, r), 4) for r in lengths}
        table.append(recalls)
        entry = {"factory": option.factory(), "recall_at_10_all_lists": recalls[served]}
        if refine:
            entry["refine"] = {str(r): v for r, v in recalls.items()}
        tried.append(entry)
    for length in lengths:  # the shortest shortlist first, then the plan's own order
        for (option, codec), recalls in zip(options, table, strict=True):
            if recalls[length] >= target:
                chosen = length if refine and length != served else refine
                return Choice(option, codec, chosen, recalls[length], tried)
    best = max(range(len(options)), key=lambda i: (table[i][lengths[-1]], -i))
    option, codec = options[best]
    value = table[best][lengths[-1]]
    length = min(r for r in lengths if table[best][r] >= value) if refine else 0
    length = refine if length == served else length
    hint = 0.0 if refine else held.recall_at(scans[best].found, RECALL_K, REFINE_HINT)
    return Choice(option, codec, length, value, tried, hint)


def sample_for(plan: budgets.IndexPlan, train: np.ndarray) -> np.ndarray:
    """The part of the training sample ``plan`` trains on (evenly spaced: the sample is in
    row order)."""
    need = min(len(train), plan.train_rows())
    if need == len(train):
        return train
    return train[np.linspace(0, len(train) - 1, need).astype(np.int64)]


def scan_codes(
    source: ShardSource, rows: int, held: HeldOut, codecs: list[faiss.Index], shortlist: int
) -> list[HeldOut]:
    """Each trained (empty) index's top-``shortlist`` for the held-out queries over every row
    of ``source`` (held-out rows skipped) with every list probed: the rows encoded and
    decoded by the index (``sa_encode``/``sa_decode``), scored by inner product with the
    queries, as the index scores its codes."""
    found = [HeldOut(held.positions, held.queries, shortlist) for _ in codecs]
    total = source.count * len(codecs)
    with tqdm(total=total, desc="checking recall", unit="vec", leave=False) as bar:
        for batch in source.batches(min(rows, RECALL_ROWS), with_ids=False):
            for codec, top in zip(codecs, found, strict=True):
                top.update(batch.start, codec.sa_decode(codec.sa_encode(batch.embeddings)))
                bar.update(len(batch.embeddings))
    return found


def refusal(
    choice: Choice,
    train: np.ndarray,
    source: ShardSource,
    rows: int,
    held: HeldOut,
    target: float,
    limits: Limits,
    seed: int = 0,
) -> str:
    """The one line naming the best recall the budget reaches and the budget that would
    reach the target: the smallest larger index (up to ``LADDER`` of them measured as
    :func:`escalate` does) whose recall@10 with every list probed reaches it, else the
    smallest exact one (IVF-Flat: exact scores)."""
    plan = choice.plan
    larger = [
        p
        for p in budgets.candidates(plan.count, plan.dim, plan.nlist)
        if p.code_size > plan.code_size and (p.kind != "flat" or plan.count < budgets.FLAT_MAX)
    ]
    larger = [with_plan(p, opq=plan.opq) if p.kind == "ivf-pq" else p for p in larger]
    larger.sort(key=lambda p: p.index_bytes())
    need, reached = None, 1.0
    for option in [p for p in larger if p.compressed][:LADDER]:  # smallest first
        codec = train_index(option, sample_for(option, train), seed)
        value = held.recall_at(scan_codes(source, rows, held, [codec], RECALL_K)[0].found)
        if value >= target:
            need, reached = option, value
            break
    if need is None:
        need = next(p for p in larger if not p.compressed)  # IVF-Flat is always a candidate
    budget = f"--max-index-memory {budgets.format_size(need.index_bytes())}"
    if limits.build is not None and need.build_bytes() + limits.reserved > limits.build:
        build = budgets.format_size(need.build_bytes() + limits.reserved)
        budget += f" and --max-build-memory {build}"
    shortlist = f", re-ranking {choice.refine}" if choice.refine else ""
    hint = ""
    if choice.hint >= target:
        hint = (
            f"; so would --refine {REFINE_HINT} (recall@10 {choice.hint:.3f}, the vectors "
            "kept on disk)"
        )
    return (
        f"--max-index-memory {budgets.format_size(limits.index)} cannot reach recall@10 "
        f"{target} on {plan.count:,} {plan.dim}-d vectors: the best within it is "
        f"{choice.best:.3f} ({plan.factory()}, every list probed{shortlist}); "
        f"{budget} would reach it "
        f"({need.factory()}, recall@10 {reached:.3f}){hint}; or pass --accept-recall "
        f"{floor2(choice.best)} to build it anyway"
    )


def ivf_rejection(info: dict[str, Any], limits: Limits) -> str | None:
    """Why a tuned IVF-Flat index is not worth it over exact search that fits the budget
    (None when it is)."""
    params = info["params"]
    flat = budgets.IndexPlan("flat", info["count"], info["dim"])
    if info["kind"] not in ("ivf", "ivf-flat") or not limits.fits(flat):
        return None
    if params["nprobe"] <= budgets.IVF_MAX_PROBE_FRACTION * params["nlist"]:
        return None
    return (
        f"IVF needs nprobe {params['nprobe']} of {params['nlist']} lists for recall@10 "
        f"{params['recall_at_10']:.3f}: the data has little cluster structure, exact search "
        "is as fast"
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
    """The empty index of ``plan``, trained on ``train`` (nothing to train for flat, HNSW)."""
    index = faiss.index_factory(plan.dim, plan.factory(), faiss.METRIC_INNER_PRODUCT)
    _quiet(index, seed)
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = budgets.HNSW_EF_CONSTRUCTION
    elif plan.kind != "flat":
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
    ids: IdsWriter | None,
    vectors: VectorsWriter | None,
    held: HeldOut | None,
    fill: Fill | None = None,
) -> tuple[faiss.Index, int]:
    """Add every row of ``source`` (positions from ``first``): into ``trained`` itself for a
    plan held in memory; for on-disk lists, into block files in ``work`` (by ``fill``, default
    :func:`fill_blocks`) merged into them. Returns the index and the rows added. Ids, vectors
    and the held-out rows' exact neighbours are recorded where given."""
    if not plan.in_memory:
        fill = fill or fill_blocks
        blocks, added = fill(plan, trained, source, first, rows, work, ids, vectors, held)
        return blocks_index(trained, blocks, work), added
    added = 0
    with closing(_batches(plan, source, first, rows, ids, vectors, held)) as batches:
        for embeddings, positions in batches:
            if plan.kind == "ivf":
                trained.add_with_ids(embeddings, positions)
            else:  # flat, hnsw: the ids are the positions already
                trained.add(embeddings)
            added += len(positions)
    return trained, added


def fill_blocks(
    plan: budgets.IndexPlan,
    trained: faiss.Index,
    source: ShardSource,
    first: int,
    rows: int,
    work: Path,
    ids: IdsWriter | None,
    vectors: VectorsWriter | None,
    held: HeldOut | None,
) -> tuple[list[Path], int]:
    """Every row of ``source`` (positions from ``first``) added to block files in ``work``:
    copies of ``trained`` with in-memory lists of up to ``BLOCK_BYTES`` of codes each, to be
    merged (:func:`blocks_index`). Returns the blocks, in order, and the rows added."""
    limit = max(rows, budgets.BLOCK_BYTES // (plan.code_size + budgets.ID_BYTES))
    blocks: list[Path] = []
    index = faiss.clone_index(trained)
    added = 0
    with closing(_batches(plan, source, first, rows, ids, vectors, held)) as batches:
        for embeddings, positions in batches:
            index.add_with_ids(embeddings, positions)
            added += len(positions)
            if index.ntotal >= limit:
                blocks.append(_flush(index, work, len(blocks)))
                index = faiss.clone_index(trained)
    if index.ntotal or not blocks:
        blocks.append(_flush(index, work, len(blocks)))
    return blocks, added


def _batches(
    plan: budgets.IndexPlan,
    source: ShardSource,
    first: int,
    rows: int,
    ids: IdsWriter | None,
    vectors: VectorsWriter | None,
    held: HeldOut | None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(embeddings, positions) of ``source``'s rows, ``rows`` at a time, positions from
    ``first``; ids, vectors and the held-out rows' exact neighbours recorded where given."""
    what = f"adding to {plan.factory()}"
    with tqdm(total=source.count, desc=what, unit="vec", leave=False) as bar:
        for batch in source.batches(rows, with_ids=ids is not None):
            count = len(batch.embeddings)
            _record(batch, ids, vectors)
            if held is not None:
                held.update(first, batch.embeddings)
            yield batch.embeddings, np.arange(first, first + count, dtype=np.int64)
            first += count
            bar.update(count)


def blocks_index(
    trained: faiss.Index, blocks: list[Path], work: Path, ondisk: frozenset[Path] = frozenset()
) -> faiss.Index:
    return merge_blocks(faiss.clone_index(trained), blocks, work / "lists.ivfdata", ondisk)


def _record(batch: Batch, ids: IdsWriter | None, vectors: VectorsWriter | None) -> None:
    if ids is not None:
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
    """The index (on disk: its lists renamed to this generation's name, and the trained empty
    index)."""
    if not plan.in_memory:
        faiss.write_index(trained, str(work / files["trained_file"]))
        ivf = faiss.extract_index_ivf(index)
        ondisk = faiss.downcast_InvertedLists(ivf.invlists)
        ondisk.filename = str(work / files["lists_file"])  # read back from the same folder
        os.replace(work / "lists.ivfdata", work / files["lists_file"])
    faiss.write_index(index, str(work / files["index_file"]))


def _tune(
    info: dict[str, Any],
    plan: budgets.IndexPlan,
    index: faiss.Index,
    held: HeldOut,
    refine: int,
    target: float,
    vectors_dir: Path,
    work: Path,
) -> None:
    """The search depth (nprobe, efSearch) from the held-out rows, the smallest reaching
    ``target`` (else the deepest), set as the index's own; recall at 1/10/100 and
    ``measured_recall`` (:mod:`.tuning`) of the index as served."""
    params = info["params"]
    vectors = (
        open_vectors(vectors_dir / VECTORS_FILE, info["count"], info["dim"], info["dtype"])
        if refine
        else None
    )
    depth = None
    if plan.kind == "flat":
        found = search_index(
            index, held.queries, GROUND_TRUTH_K, None, refine, vectors, held.selector()
        )[1]
        params.update(refine=refine, target_recall=target, **held.recalls(found))
    elif plan.kind == "hnsw":
        depth, recalls = tune_depth(index, held, *HNSW_DEPTHS, target, refine, vectors)
        faiss.downcast_index(index).hnsw.efSearch = depth
        params.update(M=budgets.HNSW_M, efConstruction=budgets.HNSW_EF_CONSTRUCTION)
        params.update(efSearch=depth, refine=refine, target_recall=target, **recalls)
    else:
        ivf = faiss.extract_index_ivf(index)
        depth, recalls = tune_depth(index, held, 1, ivf.nlist, target, refine, vectors)
        ivf.nprobe = depth
        params.update(nlist=ivf.nlist, nprobe=depth, refine=refine, target_recall=target)
        params.update(recalls)
    selector = held.selector()
    found = search_index(index, held.queries, RECALL_K, depth, refine, vectors, selector)[1]
    params["measured_recall"] = measured_record(held.recall_at(found), len(held.queries))
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
