"""The plan of an index: which one to build, its nlist and code size, and the memory it and its
build need.

Under a memory budget the plan is the most accurate index that fits: flat, IVF-Flat, IVF-SQ8/SQ4
or IVF-PQ (with OPQ), its inverted lists on disk. Without one (an unlimited budget) it is the
``--kind`` asked for, held in memory: exact search below ``FLAT_MAX`` vectors, IVF-Flat with
~4 sqrt(N) lists above it (``auto``), or HNSW.

Sizes count what the index holds once loaded (codes, 8-byte ids, the coarse quantizer and
the trained tables); with on-disk inverted lists only the lists a query visits are paged in.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import asdict, dataclass

from xmodal.choices import IndexKind
from xmodal.errors import IndexBuildError

INDEX_KINDS = typing.get_args(IndexKind)  # what --kind asks for (no budget)
FLAT_MAX = 50_000  # "auto" and a budget keep exact search below this many vectors
# Scanning inverted lists costs far more per vector than exact BLAS search: an IVF-Flat index
# that needs more than this fraction of its lists is no faster than exact search.
IVF_MAX_PROBE_FRACTION = 0.05
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
ID_BYTES = 8  # each inverted-list entry stores its 64-bit position
LIST_OVERHEAD = 64  # bytes of bookkeeping per inverted list
MIN_TRAIN_PER_LIST = 39  # FAISS warns below this many training points per centroid
MAX_TRAIN_PER_LIST = 64
PQ_TRAIN = 65_536  # PQ codebooks (256 centroids per sub-quantizer) need no more
PQ_SIZES = (128, 96, 64, 48, 32, 24, 16, 8)  # bytes per vector, largest first
BATCH_ROWS = 65_536  # rows read from Parquet at once while adding
MIN_BATCH_ROWS = 1024
BLOCK_BYTES = 64 << 20  # codes added in memory before a block is written out for merging

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int, what: str = "memory budget") -> int:
    """``"2G"``, ``"512M"``, ``"1.5GiB"`` or a byte count -> bytes (binary units)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
        if not match:
            raise IndexBuildError(f"{what} {text!r}: give bytes or a size like 512M, 2G, 1.5T")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise IndexBuildError(f"{what} must be positive, got {text!r}")
    return size


def format_size(size: float) -> str:
    """Bytes as ``1.3G`` / ``640M`` / ``12K`` (rounded up so that it is enough)."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if size >= scale:
            return f"{math.ceil(size / scale * 10) / 10:g}{unit}"
    return f"{math.ceil(size)}B"


@dataclass(frozen=True)
class IndexPlan:
    """One index: ``kind`` flat, ivf-flat, ivf-sq8, ivf-sq4 or ivf-pq (picked by a budget;
    IVF lists on disk), or ivf or hnsw (asked for by ``--kind``; held in memory)."""

    kind: str
    count: int
    dim: int
    nlist: int = 0
    pq_m: int = 0  # bytes per vector of a PQ code (8-bit sub-quantizers)
    opq: bool = False

    @property
    def code_size(self) -> int:
        """Bytes per stored vector (without its id)."""
        return {
            "flat": 4 * self.dim,
            "ivf": 4 * self.dim,
            "hnsw": 4 * self.dim,
            "ivf-flat": 4 * self.dim,
            "ivf-sq8": self.dim,
            "ivf-sq4": (self.dim + 1) // 2,
            "ivf-pq": self.pq_m,
        }[self.kind]

    @property
    def compressed(self) -> bool:
        """Whether scores are approximate (then ``--refine`` re-ranks exactly)."""
        return self.kind in ("ivf-sq8", "ivf-sq4", "ivf-pq")

    @property
    def in_memory(self) -> bool:
        """Whether the whole index lives in memory (no on-disk inverted lists)."""
        return self.kind in ("flat", "ivf", "hnsw")

    def index_bytes(self, count: int | None = None) -> int:
        """Memory of the loaded index holding ``count`` vectors (default: the plan's)."""
        count = self.count if count is None else count
        if self.kind == "flat":
            return count * self.code_size
        if self.kind == "hnsw":  # vectors, 2M level-0 links and about M/2 on upper levels
            return count * (self.code_size + 4 * 2 * HNSW_M + 4 * HNSW_M // 2)
        tables = self.nlist * (4 * self.dim + LIST_OVERHEAD)  # centroids + list headers
        if self.kind in ("ivf-sq8", "ivf-sq4"):
            tables += 2 * 4 * self.dim  # per-dimension ranges
        if self.kind == "ivf-pq":
            tables += 256 * 4 * self.dim  # codebooks
            tables += 4 * self.dim * self.dim if self.opq else 0  # rotation
        return count * (self.code_size + ID_BYTES) + tables

    def train_rows(self) -> int:
        """Training sample size (coarse centroids, then SQ ranges / PQ codebooks)."""
        if self.kind in ("flat", "hnsw"):
            return 0
        need = MAX_TRAIN_PER_LIST * self.nlist
        if self.kind == "ivf-pq":
            need = max(need, PQ_TRAIN)
        return min(self.count, need)

    def build_bytes(self, batch_rows: int = MIN_BATCH_ROWS) -> int:
        """Least memory the build needs: the training sample (float32, held twice while
        training), the trained tables, and one batch of rows read from Parquet (float16 +
        float32 + encoded)."""
        if self.in_memory:
            rows = self.train_rows() * 4 * self.dim * 2
            return self.index_bytes() + rows + batch_rows * 10 * self.dim
        train = self.train_rows() * 4 * self.dim * 2
        tables = self.index_bytes(0) + BLOCK_BYTES
        batch = batch_rows * (10 * self.dim + self.code_size + ID_BYTES + 8 * self.nlist)
        return train + tables + batch

    def factory(self) -> str:
        """The FAISS index-factory string of this plan."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{HNSW_M}"
        codes = {"ivf": "Flat", "ivf-flat": "Flat", "ivf-sq8": "SQ8", "ivf-sq4": "SQ4"}.get(
            self.kind, f"PQ{self.pq_m}"
        )
        rotation = f"OPQ{self.pq_m}," if self.opq else ""
        return f"{rotation}IVF{self.nlist},{codes}"

    def describe(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v or k in ("kind", "count", "dim")}
        out.update(factory=self.factory(), code_bytes=self.code_size)
        return out


def ivf_nlist(count: int) -> int:
    """nlist of an IVF index held in memory: ~4 sqrt(N) lists, at least 39 training points
    per list."""
    return max(1, min(round(4 * math.sqrt(count)), count // MIN_TRAIN_PER_LIST))


def pick_nlist(count: int, max_build_memory: int | None, dim: int) -> int:
    """~sqrt(N) lists rounded to a power of two, at least 39 training points per list, at
    most what a training sample of 64 points per list fits in the build memory."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(count)))))
    nlist = min(nlist, max(1, count // MIN_TRAIN_PER_LIST))
    if max_build_memory is not None:
        affordable = max_build_memory // (3 * MAX_TRAIN_PER_LIST * 4 * dim)
        nlist = min(nlist, max(1, 2 ** int(math.log2(max(1, affordable)))))
    return max(1, nlist)


def candidates(count: int, dim: int, nlist: int) -> list[IndexPlan]:
    """Every index this data could get, most accurate (largest) first."""
    plans = [IndexPlan("flat", count, dim)]
    if count >= MIN_TRAIN_PER_LIST * 2:
        plans += [IndexPlan(k, count, dim, nlist) for k in ("ivf-flat", "ivf-sq8", "ivf-sq4")]
        for m in PQ_SIZES:
            if dim % m == 0 and m < (dim + 1) // 2 and count >= 256:
                plans.append(IndexPlan("ivf-pq", count, dim, nlist, pq_m=m))
    return plans


def plan_index(
    count: int,
    dim: int,
    max_index_memory: int | None,
    max_build_memory: int | None = None,
    reserved: int = 0,
    kind: str = "auto",
) -> IndexPlan:
    """The index of ``count`` x ``dim`` vectors to build.

    With an unlimited budget (``max_index_memory`` None): the ``kind`` asked for, in memory
    (:func:`kind_plan`). Under a budget: the most accurate index within it; exact search below
    ``FLAT_MAX`` vectors while it fits, then IVF-Flat, IVF-SQ8, IVF-SQ4 and IVF-PQ with ever
    fewer bytes per vector. ``reserved``: build memory already in use (the process itself, see
    :func:`process_memory`). A budget too small for any of them raises IndexBuildError naming
    the smallest budget that works.
    """
    if max_index_memory is None:
        return kind_plan(kind, count, dim)
    if count < 1:
        raise IndexBuildError("no vectors to index")
    nlist = pick_nlist(count, max_build_memory, dim)
    plans = candidates(count, dim, nlist)
    fitting = [p for p in plans if p.index_bytes() <= max_index_memory]
    if count >= FLAT_MAX or plans[0] not in fitting:
        fitting = [p for p in fitting if p.kind != "flat"] or fitting
    if max_build_memory is not None:
        buildable = [p for p in fitting if p.build_bytes() + reserved <= max_build_memory]
        if fitting and not buildable:
            least = min(fitting, key=lambda p: p.build_bytes())
            process = f", {format_size(reserved)} of it this process itself" if reserved else ""
            raise IndexBuildError(
                f"--max-build-memory {format_size(max_build_memory)} is too small to build an "
                f"index of {count:,} {dim}-d vectors: the smallest build ({least.factory()}) "
                f"needs {format_size(least.build_bytes() + reserved)}{process}"
            )
        fitting = buildable
    if not fitting:
        least = min(plans, key=lambda p: p.index_bytes())
        raise IndexBuildError(
            f"--max-index-memory {format_size(max_index_memory)} is too small for {count:,} "
            f"{dim}-d vectors: the smallest index ({least.factory()}, {least.code_size} bytes "
            f"per vector + {ID_BYTES} for its id) needs {format_size(least.index_bytes())}"
        )
    return fitting[0]


def kind_plan(kind: str, count: int, dim: int) -> IndexPlan:
    """The in-memory index ``--kind`` asks for: flat, ivf (IVF-Flat, :func:`ivf_nlist` lists),
    hnsw, or auto (flat below ``FLAT_MAX`` vectors, else ivf)."""
    if kind not in INDEX_KINDS:
        raise IndexBuildError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
    if count < 1:
        raise IndexBuildError("no vectors to index")
    if kind == "auto":
        kind = "flat" if count < FLAT_MAX else "ivf"
    return IndexPlan(kind, count, dim, ivf_nlist(count) if kind == "ivf" else 0)


def batch_rows(plan: IndexPlan, max_build_memory: int | None, reserved: int = 0) -> int:
    """Rows to read and add at once: what the build memory leaves after the process itself
    (``reserved``) and training."""
    if max_build_memory is None:
        return BATCH_ROWS
    if plan.kind == "flat":
        return BATCH_ROWS
    spare = max_build_memory - reserved - plan.build_bytes(0)
    per_row = 10 * plan.dim + plan.code_size + ID_BYTES + 8 * max(1, plan.nlist)
    return int(min(BATCH_ROWS, max(MIN_BATCH_ROWS, spare // per_row)))


def process_memory() -> int:
    """Anonymous resident memory of this process in bytes (the interpreter and its libraries
    before a build starts; Linux ``/proc/self/status``), 0 where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
