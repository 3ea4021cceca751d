"""FAISS inner-product indexes over extracted embedding shards.

Two ways to build one (:func:`build_index`):

- by kind (``kind=`` auto / flat / ivf / hnsw, :mod:`.legacy`): every embedding loaded in
  memory, exact search below ``FLAT_MAX`` vectors, IVF-Flat above it;
- under a memory budget (``max_index_memory=``, :mod:`.planned`): the most accurate index that
  fits (flat, IVF-Flat, IVF-SQ8/SQ4, IVF-PQ with OPQ where it helps, :mod:`.budget`), trained
  on a sample, filled shard by shard from Parquet, inverted lists on disk and memory-mapped at
  search time, nprobe tuned on held-out rows, optional exact re-ranking (``refine=``); under
  the target recall it tries OPQ, finer lists and longer re-ranking within the budget, and
  refuses (naming the budget that would do) when none reaches it.

:func:`open_index` loads one index, a sharded index (:mod:`.shards`) or several folders.
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

from xmodal.index import legacy, planned  # noqa: E402
from xmodal.index.budget import IndexPlan, format_size, parse_size, plan_index  # noqa: E402
from xmodal.index.description import INDEX_FORMAT, INDEX_JSON, read_info  # noqa: E402
from xmodal.index.legacy import (  # noqa: E402
    FLAT_MAX,
    INDEX_KINDS,
    IVF_MAX_PROBE_FRACTION,
    TARGET_RECALL,
    Tuner,
    Vectors,
    build_faiss,
    ivf_nlist,
    ivf_rejection,
    load_vectors,
    tune_ivf,
)
from xmodal.index.searching import SearchIndex, describe  # noqa: E402
from xmodal.index.shards import ShardedIndex, combine_indexes, open_index  # noqa: E402
from xmodal.index.stream import ShardSource  # noqa: E402
from xmodal.index.tuning import RecallTargetError, neighbour_recall  # noqa: E402

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
    "Tuner",
    "Vectors",
    "build_faiss",
    "build_index",
    "combine_indexes",
    "describe",
    "format_size",
    "ivf_nlist",
    "ivf_rejection",
    "load_vectors",
    "neighbour_recall",
    "open_index",
    "parse_size",
    "plan_index",
    "read_info",
    "tune_ivf",
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
) -> dict[str, Any]:
    """Index the ``modality`` shards of ``shards`` into ``out``; ``add`` appends the shards
    not yet indexed (to either kind of index).

    Without a budget: a ``kind`` index (auto, flat, ivf or hnsw) built in memory. With
    ``max_index_memory`` (bytes or ``"2G"``): the index the budget picks, built out of RAM
    (``max_build_memory`` bounds the build), ``refine`` candidates re-ranked exactly.

    Every index records its recall@10 measured on held-out rows (``params["measured_recall"]``,
    see :mod:`.tuning`). One under ``target_recall`` is refused (RecallTargetError, naming
    the best recall and, for a budget, the budget that would reach the target) unless it
    reaches ``accept_recall``."""
    out = Path(out)
    if refine < 0:
        raise IndexBuildError(f"--refine must be >= 0, got {refine}")
    if not 0 < target_recall <= 1:
        raise IndexBuildError(f"--target-recall must be in (0, 1], got {target_recall}")
    if accept_recall is not None and not 0 <= accept_recall <= 1:
        raise IndexBuildError(f"--accept-recall must be in [0, 1], got {accept_recall}")
    if add:
        info = read_info(out)
        if info is None or "plan" not in info:
            return legacy.build_index(
                shards, out, kind, modality, True, seed, target_recall, accept_recall
            )
        return _add_planned(Path(shards), out, modality, info, accept_recall)
    if max_index_memory is None:
        if max_build_memory is not None or refine:
            raise IndexBuildError("--max-build-memory and --refine need --max-index-memory")
        return legacy.build_index(
            shards, out, kind, modality, False, seed, target_recall, accept_recall
        )
    if kind != "auto":
        raise IndexBuildError("give either --kind or --max-index-memory, not both")
    budget = parse_size(max_index_memory, "--max-index-memory")
    build = parse_size(max_build_memory, "--max-build-memory") if max_build_memory else None
    source = ShardSource(shards, modality)
    return planned.build_planned(
        source,
        out,
        budget,
        build,
        refine,
        target_recall,
        seed,
        read_info(out),
        legacy.FLAT_MAX,
        accept_recall,
    )


def _add_planned(
    shards: Path, out: Path, modality: str, info: dict[str, Any], accept: float | None
) -> dict[str, Any]:
    included = legacy.addable_shards(shards, out, modality, info)
    source = ShardSource(shards, modality, skip=included)
    if source.count == 0:
        return info
    return planned.add_planned(source, out, info, accept)
