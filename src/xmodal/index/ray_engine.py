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

A task whose worker dies is retried by Ray (``TASK_RETRIES``); a retry starts its part again
from scratch. Plans held in memory (flat, and the ``--kind`` indexes) are built in one process.
``ray`` is an optional extra (``pip install 'xmodal[ray]'``); the shards and the index folder
must be at the same paths on every node.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from xmodal.atomic import make_dir
from xmodal.errors import IndexBuildError, MissingDependencyError
from xmodal.index import budget as budgets
from xmodal.index.build import VECTORS_FILE, fill_blocks
from xmodal.index.store import IdsFile, IdsWriter, VectorsWriter
from xmodal.index.stream import ShardSource
from xmodal.index.tuning import HeldOut

INSTALL_HINT = "pip install 'xmodal[ray]'"
TASK_RETRIES = 3  # times Ray runs a task again whose worker died
COPY_BYTES = 16 << 20  # vectors copied from a part's file at once


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
) -> dict[str, Any]:
    """One task: the rows of ``source`` (positions from ``first``) added to block files of the
    serialised ``trained`` index in ``folder``; with them the part's ids file, vectors file
    (``dtype``) and the held-out queries' top-k among its rows (``held``: positions, queries,
    k)."""
    work = Path(folder)
    shutil.rmtree(work, ignore_errors=True)  # a retried task starts again
    make_dir(work)
    index = faiss.deserialize_index(trained)
    ids = IdsWriter(work / "ids.parquet") if with_ids else None
    vectors = VectorsWriter(work / VECTORS_FILE, dtype) if dtype else None
    top = HeldOut(held[0], held[1], held[2]) if held is not None else None
    blocks, added = fill_blocks(plan, index, source, first, rows, work, ids, vectors, top)
    for writer in (ids, vectors):
        if writer is not None:
            writer.close()
    return {
        "blocks": [str(b) for b in blocks],
        "added": added,
        "ids": str(ids.path) if ids else None,
        "vectors": str(vectors.path) if vectors else None,
        "held": (top.scores, top.found) if top is not None else None,
    }


class RayFill:
    """:func:`xmodal.index.build.fill_blocks` spread over Ray tasks (``tasks`` of them, default:
    the cluster's CPUs); a context manager connecting to the cluster at ``address`` (default:
    starting one in this process) and leaving it when done."""

    part_task = staticmethod(add_part)  # what each task runs

    def __init__(self, address: str | None = None, tasks: int | None = None):
        if tasks is not None and tasks < 1:
            raise IndexBuildError(f"--ray-tasks must be >= 1, got {tasks}")
        self.ray = import_ray()
        self.address, self.tasks, self.started = address, tasks, False

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
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(self.part_task)
        shared = ray.put(faiss.serialize_index(trained))
        top = (held.positions, held.queries, held.k) if held is not None else None
        dtype = vectors.dtype.name if vectors is not None else None
        pending = [
            task.remote(
                plan,
                shared,
                part,
                first + start,
                rows,
                str(work / f"part-{n:05d}"),
                top,
                ids is not None,
                dtype,
            )
            for n, (part, start) in enumerate(split(source, tasks))
        ]
        blocks: list[Path] = []
        added = 0
        for result in ray.get(pending):  # in part order
            blocks += [Path(b) for b in result["blocks"]]
            added += result["added"]
            if ids is not None:
                _append_ids(ids, Path(result["ids"]))
            if vectors is not None:
                _append_vectors(vectors, Path(result["vectors"]), result["added"])
            if held is not None:
                held.merge(*result["held"])
        return blocks, added


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
