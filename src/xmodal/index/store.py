"""What an index keeps beside its FAISS file: the ids file (Parquet, read by position at answer
time, never loaded whole) and the raw vectors used for exact re-ranking (memory-mapped)."""

from __future__ import annotations

import bisect
import mmap
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmodal.errors import IndexBuildError

ID_COLUMNS = ("id", "source", "location", "image_id")
ID_ROW_GROUP = 8192  # rows per Parquet row group of the ids file: the unit read per lookup
CACHED_GROUPS = 64


class IdsWriter:
    """Appends ids, sources, locations and image ids to a Parquet file, batch by batch."""

    SCHEMA = pa.schema([(name, pa.string()) for name in ID_COLUMNS])

    def __init__(self, path: Path):
        self.path = path
        self.rows = 0
        self.writer = pq.ParquetWriter(str(path), self.SCHEMA)

    def write(self, columns: dict[str, Any]) -> None:
        """``columns``: the id columns (arrays or lists), absent ones written as nulls."""
        rows = len(columns["id"])
        arrays = [
            pa.array(columns[name], pa.string()) if name in columns else pa.nulls(rows, pa.string())
            for name in ID_COLUMNS
        ]
        self.writer.write_table(pa.table(arrays, schema=self.SCHEMA), ID_ROW_GROUP)
        self.rows += rows

    def close(self) -> None:
        self.writer.close()


class IdsFile:
    """The ids file of an index, read a row group at a time (a small LRU cache of them)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = pq.ParquetFile(str(path))
        except (OSError, pa.ArrowException) as err:
            raise IndexBuildError(f"{path}: cannot read the ids file ({err})") from None
        meta = self.file.metadata
        self.count = meta.num_rows
        self.starts = [0]
        for group in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(group).num_rows)
        self.names = set(self.file.schema_arrow.names)
        self._cache: OrderedDict[tuple[str, int], pa.Array] = OrderedDict()
        self._lock = threading.Lock()

    def column(self, name: str) -> ColumnView:
        return ColumnView(self, name)

    def group(self, name: str, group: int) -> pa.Array:
        """One row group of one column (cached as Arrow, not as Python objects: a lookup turns
        only the value it needs into one)."""
        key = (name, group)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            if name not in self.names:  # older ids files hold only the modality's column
                values = pa.nulls(self.starts[group + 1] - self.starts[group], pa.string())
            else:
                try:
                    table = self.file.read_row_group(group, columns=[name])
                except (OSError, pa.ArrowException) as err:
                    raise IndexBuildError(
                        f"{self.path}: cannot read row group {group} ({err})"
                    ) from None
                values = table.column(0).combine_chunks()
            self._cache[key] = values
            if len(self._cache) > CACHED_GROUPS:
                self._cache.popitem(last=False)
            return values

    def value(self, name: str, position: int) -> Any:
        if not 0 <= position < self.count:
            raise IndexError(f"position {position} outside the index (0..{self.count - 1})")
        group = bisect.bisect_right(self.starts, position) - 1
        return self.group(name, group)[position - self.starts[group]].as_py()


class ColumnView(Sequence):
    """A read-only sequence over one column of an ids file: ``view[position]`` reads (and
    caches) only that position's row group."""

    def __init__(self, ids: IdsFile, name: str):
        self.ids, self.name = ids, name

    def __len__(self) -> int:
        return self.ids.count

    def __getitem__(self, item):  # type: ignore[override]
        if isinstance(item, slice):
            return [self.ids.value(self.name, p) for p in range(*item.indices(len(self)))]
        position = int(item)
        if position < 0:
            position += len(self)
        return self.ids.value(self.name, position)

    def __iter__(self) -> Iterator[Any]:
        for group in range(len(self.ids.starts) - 1):
            yield from self.ids.group(self.name, group).to_pylist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class ConcatView(Sequence):
    """Several sequences end to end (the columns of a sharded index's parts)."""

    def __init__(self, parts: list[Sequence]):
        self.parts = parts
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, item):  # type: ignore[override]
        if isinstance(item, slice):
            return [self[p] for p in range(*item.indices(len(self)))]
        position = int(item) + (len(self) if int(item) < 0 else 0)
        if not 0 <= position < len(self):
            raise IndexError(f"position {item} outside 0..{len(self) - 1}")
        part = bisect.bisect_right(self.starts, position) - 1
        return self.parts[part][position - self.starts[part]]

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class VectorsWriter:
    """Appends L2-normalised vectors (float16 or float32, as the shards) to a raw file."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype = path, np.dtype(dtype)
        self.handle = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.rows = 0

    def write(self, vectors: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(vectors, dtype=self.dtype).tobytes())
        self.rows += len(vectors)

    def close(self) -> None:
        self.handle.flush()
        self.handle.close()


def open_vectors(path: Path, count: int, dim: int, dtype: str) -> np.ndarray:
    """The re-ranking vectors, memory-mapped read-only; IndexBuildError when the file is
    missing or not ``count`` x ``dim`` of ``dtype``."""
    expected = count * dim * np.dtype(dtype).itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IndexBuildError(f"{path}: the re-ranking vectors file is missing") from None
    if size != expected:
        raise IndexBuildError(
            f"{path}: re-ranking vectors file is {size:,} bytes, expected {expected:,} "
            f"({count:,} x {dim} {dtype}): truncated or corrupted; rebuild the index"
        )
    if count == 0:
        return np.zeros((0, dim), dtype)
    mapped = np.memmap(path, dtype=dtype, mode="r", shape=(count, dim))
    advise = getattr(mmap, "MADV_RANDOM", None)
    if advise is not None and getattr(mapped, "_mmap", None) is not None:
        # re-ranking reads scattered rows: no read-ahead or fault-around of their neighbours
        mapped._mmap.madvise(advise)
    return mapped


def exact_rerank(
    queries: np.ndarray,
    candidates: np.ndarray,
    vectors: np.ndarray,
    k: int,
    chunk: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate positions (-1 = none), best k
    first: (scores, positions), padded with (-inf, -1)."""
    count = len(queries)
    scores = np.full((count, k), -np.inf, dtype=np.float32)
    positions = np.full((count, k), -1, dtype=np.int64)
    for start in range(0, count, chunk):
        block = candidates[start : start + chunk]
        valid = block >= 0
        flat = np.unique(block[valid])
        if not len(flat):
            continue
        rows = np.asarray(vectors[flat], dtype=np.float32)  # sorted reads of the mapped file
        where = np.searchsorted(flat, np.where(valid, block, flat[0]))
        exact = np.einsum("qkd,qd->qk", rows[where], queries[start : start + chunk])
        exact[~valid] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        taken = np.take_along_axis(exact, order, axis=1)
        found = np.take_along_axis(block, order, axis=1)
        found[~np.isfinite(taken)] = -1
        width = taken.shape[1]
        scores[start : start + chunk, :width] = taken
        positions[start : start + chunk, :width] = found
    return scores, positions
