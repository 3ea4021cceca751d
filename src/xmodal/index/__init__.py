"""FAISS inner-product indexes over extracted embedding shards.

One build path (:func:`build_index`, :mod:`.build`): a plan (:mod:`.budget`) says which index
to build; the build trains it on a sample, fills it shard by shard from Parquet, tunes its
search depth (nprobe, efSearch) on held-out rows and records the recall@10 it measures there
(:mod:`.tuning`).

- by kind (``kind=`` auto / flat / ivf / hnsw; an unlimited budget): the index held in memory,
  exact search below ``FLAT_MAX`` vectors, IVF-Flat above it (``auto``);
- under a memory budget (``max_index_memory=``): the most accurate index that fits (flat,
  IVF-Flat, IVF-SQ8/SQ4, IVF-PQ with OPQ where it helps), inverted lists on disk and
  memory-mapped at search time, optional exact re-ranking (``refine=``); under the target
  recall it tries OPQ, finer lists and longer re-ranking within the budget, and refuses
  (naming the budget that would do) when none reaches it.

``add=True`` appends new shards to either (:mod:`.adding`); ``engine="ray"`` adds the rows of
on-disk lists in parallel Ray tasks (:mod:`.ray_engine`). :func:`open_index` loads one index,
a sharded index (:mod:`.shards`) or several folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmodal.errors import IndexBuildError, MissingDependencyError

try:
    import faiss  # noqa: F401
    import pyarrow  # noqa: F401
except ImportError as exc:  # an optional extra, needed only to build or search an index
    raise MissingDependencyError(
        f"FAISS indexes need faiss-cpu and pyarrow ({exc}): pip install 'xmodal[index]'"
    ) from exc

from xmodal.index import budget as budgets  # noqa: E402
from xmodal.index import build  # noqa: E402
from xmodal.index.adding import add_shards  # noqa: E402
from xmodal.index.budget import (  # noqa: E402
    FLAT_MAX,
    INDEX_KINDS,
    IVF_MAX_PROBE_FRACTION,
    IndexPlan,
    format_size,
    parse_size,
    plan_index,
)
from xmodal.index.build import Limits  # noqa: E402
from xmodal.index.description import INDEX_FORMAT, INDEX_JSON, read_info  # noqa: E402
from xmodal.index.searching import SearchIndex, describe  # noqa: E402
from xmodal.index.shards import ShardedIndex, combine_indexes, open_index  # noqa: E402
from xmodal.index.stream import ShardSource  # noqa: E402
from xmodal.index.tuning import (  # noqa: E402
    TARGET_RECALL,
    RecallTargetError,
    neighbour_recall,
)

__all__ = [
    "FLAT_MAX",
    "INDEX_FORMAT",
    "INDEX_JSON",
    "INDEX_KINDS",
    "IVF_MAX_PROBE_FRACTION",
    "TARGET_RECALL",
    "IndexPlan",
    "SearchIndex",
    "RecallTargetError",
    "ShardedIndex",
    "build_index",
    "combine_indexes",
    "describe",
    "format_size",
    "neighbour_recall",
    "open_index",
    "parse_size",
    "plan_index",
    "read_info",
]


def build_index(
    shards: str | Path,
    out: str | Path,
    kind: str = "auto",
    modality: str = "images",
    add: bool = False,
    seed: int = 0,
    max_index_memory: int | str | None = None,
    max_build_memory: int | str | None = None,
    refine: int = 0,
    target_recall: float = TARGET_RECALL,
    accept_recall: float | None = None,
    engine: str = "plain",
    ray_address: str | None = None,
    ray_tasks: int | None = None,
) -> dict[str, Any]:
    """Index the ``modality`` shards of ``shards`` into ``out``; ``add`` appends the shards
    not yet indexed (to any index).

    Without a budget: a ``kind`` index (auto, flat, ivf or hnsw) held in memory. With
    ``max_index_memory`` (bytes or ``"2G"``): the index the budget picks, built out of RAM
    (``max_build_memory`` bounds the build), ``refine`` candidates re-ranked exactly.

    Every index records its recall@10 measured on held-out rows (``params["measured_recall"]``,
    see :mod:`.tuning`). One under ``target_recall`` is refused (RecallTargetError, naming
    the best recall and, for a budget, the budget that would reach the target) unless it
    reaches ``accept_recall``.

    ``engine="ray"`` adds the rows of on-disk lists in parallel Ray tasks (``ray_tasks``,
    default: the cluster's CPUs; ``ray_address``: an existing cluster), the same index
    (:mod:`.ray_engine`)."""
    out = Path(out)
    if engine not in ("plain", "ray"):
        raise IndexBuildError(f"--engine must be plain or ray, got {engine!r}")
    if engine == "plain" and (ray_address or ray_tasks is not None):
        raise IndexBuildError("--ray-address and --ray-tasks need --engine ray")
    if engine == "ray":
        if max_index_memory is None and not add:
            raise IndexBuildError(
                "--engine ray adds to on-disk lists: give --max-index-memory (a --kind index "
                "is built in memory, in one process)"
            )
        from xmodal.index.ray_engine import RayFill

        with RayFill(ray_address, ray_tasks) as fill:
            return _build(shards, out, kind, modality, add, seed, max_index_memory,
                          max_build_memory, refine, target_recall, accept_recall, fill)  # fmt: skip
    return _build(shards, out, kind, modality, add, seed, max_index_memory, max_build_memory,
                  refine, target_recall, accept_recall, None)  # fmt: skip


def _build(
    shards: str | Path,
    out: Path,
    kind: str,
    modality: str,
    add: bool,
    seed: int,
    max_index_memory: int | str | None,
    max_build_memory: int | str | None,
    refine: int,
    target_recall: float,
    accept_recall: float | None,
    fill: build.Fill | None,
) -> dict[str, Any]:
    if refine < 0:
        raise IndexBuildError(f"--refine must be >= 0, got {refine}")
    if not 0 < target_recall <= 1:
        raise IndexBuildError(f"--target-recall must be in (0, 1], got {target_recall}")
    if accept_recall is not None and not 0 <= accept_recall <= 1:
        raise IndexBuildError(f"--accept-recall must be in [0, 1], got {accept_recall}")
    if add:
        return add_shards(Path(shards), out, modality, accept_recall, seed, fill)
    if max_index_memory is None and (max_build_memory is not None or refine):
        raise IndexBuildError("--max-build-memory and --refine need --max-index-memory")
    if max_index_memory is not None and kind != "auto":
        raise IndexBuildError("give either --kind or --max-index-memory, not both")
    if kind not in INDEX_KINDS:
        raise IndexBuildError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
    limits = Limits()
    if max_index_memory is not None:
        limits = Limits(
            parse_size(max_index_memory, "--max-index-memory"),
            parse_size(max_build_memory, "--max-build-memory") if max_build_memory else None,
        )
        if limits.build is not None:
            limits = Limits(limits.index, limits.build, budgets.process_memory())
    source = ShardSource(shards, modality)
    previous = read_info(out)
    return build.build(
        source, out, limits, kind, refine, target_recall, seed, previous, accept_recall, fill
    )
