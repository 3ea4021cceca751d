"""``xmodal index --engine ray``: the rows of an index with on-disk lists added in parallel Ray
tasks, the index equal to the one-process build.

The driver plans, samples and trains as the one-process build does (:mod:`.build`): one
trained index (the coarse quantizer and the code's tables), put in Ray's object store once and
shared by every task. The shards are split into contiguous parts; a task adds its part's rows
at their positions in the index to block files (:func:`xmodal.index.build.fill_blocks`), and
writes the part's ids and (``--refine``) vectors and the held-out queries' exact neighbours
among its rows. The driver takes the parts in order: their blocks are merged on disk into the
inverted lists (``OnDiskInvertedLists.merge_from_multiple``, as the one-process build merges
its own blocks), so every list holds the same entries in the same order; ids and vectors are
appended and the neighbours merged, then nprobe is tuned and recall measured as always.

Resume: the parts are built in the build's work folder, ``<out>/.build-<generation>/parts/
part-NNNNN/``, each finished by an atomically written ``part.json``: what it covered (its
shards with their sizes and times, first position, rows, batch size), the digest of the trained
index it was added to and of the held-out queries, and the rows added. The trained index is
kept beside them (``quantizer/``, :func:`xmodal.index.build.trained_once`). A build that stops
short (its driver killed, a task out of retries) leaves them; the same command run again reads
the same quantizer back, takes up every part whose record matches and builds the rest; parts
that match nothing are removed. The work folder goes once the build is committed.

A task whose worker dies, or whose node leaves, is retried by Ray (``TASK_RETRIES``); a retry
starts its part again from scratch. Plans held in memory (flat, and the ``--kind`` indexes)
are built in one process. ``ray`` is an optional extra (``pip install 'xmodal[ray]'``); the
shards and the index folder must be at the same paths on every node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from xmodal.atomic import atomic_write_text, make_dir
from xmodal.errors import IndexBuildError, MissingDependencyError
from xmodal.index import budget as budgets
from xmodal.index.build import QUANTIZER, VECTORS_FILE, array_digest, clear_work, fill_blocks
from xmodal.index.store import IdsFile, IdsWriter, VectorsWriter
from xmodal.index.stream import ShardFile, ShardSource
from xmodal.index.tuning import HeldOut

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'xmodal[ray]'"
TASK_RETRIES = 3  # times Ray runs a task again whose worker (or node) died
COPY_BYTES = 16 << 20  # vectors copied from a part's file at once
PARTS = "parts"  # the work folder's parts, one folder each
PART_RECORD = "part.json"  # written last: the part is finished
HELD_FILE = "heldout.npz"  # a part's top-k for the held-out queries


def split(source: ShardSource, parts: int) -> list[tuple[ShardSource, int]]:
    """Up to ``parts`` runs of consecutive shards of about equal rows, each with the position
    of its first row in the index."""
    groups: dict[int, list] = {}
    start = 0
    for shard in source.files:  # a shard goes to the part its first row falls in
        groups.setdefault(start * parts // max(1, source.count), []).append(shard)
        start += shard.rows
    runs, first = [], 0
    for files in groups.values():
        part = source.subset(files)
        runs.append((part, first))
        first += part.count
    return runs


def shard_record(shard: ShardFile) -> dict[str, Any]:
    """A shard as a part's record names it: folder, file, rows, and its size and modification
    time (a shard written again is another input)."""
    record = shard.record()
    try:
        stat = shard.path.stat()
    except OSError:
        return record
    return {**record, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def part_inputs(
    plan: budgets.IndexPlan,
    quantizer: str,
    held: str | None,
    source: ShardSource,
    first: int,
    rows: int,
    with_ids: bool,
    dtype: str | None,
) -> dict[str, Any]:
    """What a part's result depends on: a finished part is taken up by a rerun only when its
    record holds the same (JSON-plain values, compared after a round trip)."""
    return {
        "shards": [shard_record(f) for f in source.files],
        "first": first,
        "count": source.count,
        "batch_rows": rows,
        "factory": plan.factory(),
        "quantizer": quantizer,
        "held_out": held,
        "ids": with_ids,
        "dtype": dtype,
    }


def add_part(
    plan: budgets.IndexPlan,
    trained: np.ndarray,
    source: ShardSource,
    first: int,
    rows: int,
    folder: str,
    held: tuple[np.ndarray, np.ndarray, int] | None,
    with_ids: bool,
    dtype: str | None,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One task: the rows of ``source`` (positions from ``first``) added to block files of the
    serialised ``trained`` index in ``folder``; with them the part's ids file, vectors file
    (``dtype``) and the held-out queries' top-k among its rows (``held``: positions, queries,
    k). Finished by ``part.json`` (written atomically, last), the record returned: ``inputs``
    (:func:`part_inputs`), the rows added and the part's file names."""
    work = Path(folder)
    shutil.rmtree(work, ignore_errors=True)  # a retried task, or a stale part, starts again
    make_dir(work)
    index = faiss.deserialize_index(trained)
    ids = IdsWriter(work / "ids.parquet") if with_ids else None
    vectors = VectorsWriter(work / VECTORS_FILE, dtype) if dtype else None
    top = HeldOut(held[0], held[1], held[2]) if held is not None else None
    blocks, added = fill_blocks(plan, index, source, first, rows, work, ids, vectors, top)
    for writer in (ids, vectors):
        if writer is not None:
            writer.close()
    if top is not None:
        top.save(work / HELD_FILE)
    record = {
        "inputs": inputs,
        "added": added,
        "blocks": [b.name for b in blocks],
        "ids": ids.path.name if ids else None,
        "vectors": vectors.path.name if vectors else None,
        "held": HELD_FILE if top is not None else None,
    }
    atomic_write_text(work / PART_RECORD, json.dumps(record, indent=2))
    return record


def finished_part(folder: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The record of the part in ``folder`` when it is finished, made from ``inputs`` and its
    files are all there; else None."""
    try:
        record = json.loads((folder / PART_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("inputs") != inputs:
        return None
    try:
        names = [*record["blocks"], record["ids"], record["vectors"], record["held"]]
    except (KeyError, TypeError):
        return None
    if any(name is not None and not (folder / name).is_file() for name in names):
        return None
    return record


class RayFill:
    """:func:`xmodal.index.build.fill_blocks` spread over Ray tasks (``tasks`` of them, default:
    the cluster's CPUs); a context manager connecting to the cluster at ``address`` (default:
    starting one in this process) and leaving it when done. Its finished parts and trained
    quantizer stay in the work folder until the build is committed (``reused``), taken up
    again by a rerun; ``taken_up`` lists the parts the last call took up."""

    part_task = staticmethod(add_part)  # what each task runs
    reused = frozenset({PARTS, QUANTIZER})  # entries of the work folder a rerun takes up

    def __init__(self, address: str | None = None, tasks: int | None = None):
        if tasks is not None and tasks < 1:
            raise IndexBuildError(f"--ray-tasks must be >= 1, got {tasks}")
        self.ray = import_ray()
        self.address, self.tasks, self.started = address, tasks, False
        self.taken_up: list[int] = []

    def __enter__(self) -> RayFill:
        if not self.ray.is_initialized():
            options = {"address": self.address} if self.address else {"include_dashboard": False}
            self.ray.init(log_to_driver=False, **options)
            self.started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def __call__(
        self,
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
        ray = self.ray
        tasks = self.tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
        serialised = faiss.serialize_index(trained)
        quantizer = hashlib.sha256(serialised.data).hexdigest()
        top = (held.positions, held.queries, held.k) if held is not None else None
        held_key = None
        if held is not None:
            held_key = f"{array_digest(held.positions)}:{array_digest(held.queries)}:{held.k}"
        dtype = vectors.dtype.name if vectors is not None else None
        parts = []
        for n, (part, start) in enumerate(split(source, tasks)):
            inputs = part_inputs(
                plan, quantizer, held_key, part, first + start, rows, ids is not None, dtype
            )
            parts.append((work / PARTS / f"part-{n:05d}", part, first + start, inputs))
        _remove_other_parts(work / PARTS, {folder.name for folder, *_ in parts})
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(self.part_task)
        shared = None
        pending: list[tuple[Path, Any]] = []
        self.taken_up = []
        for n, (folder, part, begin, inputs) in enumerate(parts):
            record = finished_part(folder, inputs)
            if record is not None:
                self.taken_up.append(n)
                pending.append((folder, record))
                continue
            shared = shared if shared is not None else ray.put(serialised)
            args = (plan, shared, part, begin, rows, str(folder), top, ids is not None, dtype)
            pending.append((folder, task.remote(*args, inputs)))
        if self.taken_up:
            log.warning(
                "index --engine ray: %d of %d parts taken up from %s (finished by an earlier "
                "run)", len(self.taken_up), len(parts), work / PARTS
            )  # fmt: skip
        blocks: list[Path] = []
        added = 0
        for folder, waiting in pending:  # in part order
            record = waiting if isinstance(waiting, dict) else ray.get(waiting)
            blocks += [folder / name for name in record["blocks"]]
            added += record["added"]
            if ids is not None:
                _append_ids(ids, folder / record["ids"])
            if vectors is not None:
                _append_vectors(vectors, folder / record["vectors"], record["added"])
            if held is not None:
                part_held = HeldOut.load(folder / record["held"])
                held.merge(part_held.scores, part_held.found)
        return blocks, added


def _remove_other_parts(parts: Path, keep: set[str]) -> None:
    """Parts of another split (another task count, other shards) left by an earlier run."""
    clear_work(parts, frozenset(keep))


def _append_ids(ids: IdsWriter, part: Path) -> None:
    written = IdsFile(part).file
    for group in range(written.metadata.num_row_groups):
        ids.write(written.read_row_group(group).to_pydict())


def _append_vectors(vectors: VectorsWriter, part: Path, rows: int) -> None:
    with open(part, "rb") as handle:
        shutil.copyfileobj(handle, vectors.handle, COPY_BYTES)
    vectors.rows += rows


def import_ray() -> Any:
    """The ``ray`` module, or a one-line MissingDependencyError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(f"--engine ray needs Ray ({exc}): {INSTALL_HINT}") from exc
    return ray
