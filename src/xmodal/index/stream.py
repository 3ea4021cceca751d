"""Embedding shards read batch by batch (never all at once): the rows to index, a sample of
them, and their id columns."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmodal.errors import IndexBuildError, MissingFileError
from xmodal.shards import MODALITIES, load_manifest


@dataclass(frozen=True)
class ShardFile:
    dir: str
    file: str
    rows: int

    @property
    def path(self) -> Path:
        return Path(self.dir) / self.file

    def record(self) -> dict[str, Any]:
        return {"dir": self.dir, "file": self.file, "rows": self.rows}


@dataclass
class Batch:
    start: int  # position of the first row in the index
    embeddings: np.ndarray  # float32 (n, D), L2-normalised
    columns: dict[str, pa.Array]  # id, source and (when the shard has them) location, image_id


class ShardSource:
    """The complete ``modality`` shards of an extraction folder (minus ``skip``), in order."""

    def __init__(
        self, shards_dir: str | Path, modality: str, skip: frozenset[tuple[str, str]] = frozenset()
    ):
        if modality not in MODALITIES:
            raise IndexBuildError(f"modality must be one of {MODALITIES}, got {modality!r}")
        directory = Path(shards_dir).resolve()
        manifest = load_manifest(directory)
        if manifest is None:
            raise MissingFileError(
                f"{directory}: no manifest.json (not an `xmodal extract` output)"
            )
        record = manifest["modalities"].get(modality)
        if record is None or not record["shards"]:
            held = sorted(manifest["modalities"]) or "none"
            raise IndexBuildError(f"{directory} has no {modality} shards (it has: {held})")
        self.manifest, self.modality = manifest, modality
        self.dim: int = manifest["dim"]
        self.dtype: str = manifest["dtype"]
        self.files = [
            ShardFile(str(directory), e["file"], e["rows"])
            for e in record["shards"]
            if (str(directory), e["file"]) not in skip
        ]
        self.count = sum(f.rows for f in self.files)

    def subset(self, files: list[ShardFile]) -> ShardSource:
        """The same source holding only ``files`` (some of its own, in order)."""
        part = copy.copy(self)
        part.files = list(files)
        part.count = sum(f.rows for f in part.files)
        return part

    def _open(self, shard: ShardFile) -> pq.ParquetFile:
        try:
            handle = pq.ParquetFile(str(shard.path))
        except FileNotFoundError:
            raise MissingFileError(f"{shard.path}: shard listed in the manifest is gone") from None
        except (OSError, pa.ArrowException) as err:
            raise IndexBuildError(f"{shard.path}: cannot read the shard ({err})") from None
        if handle.metadata.num_rows != shard.rows:
            raise IndexBuildError(
                f"{shard.path}: {handle.metadata.num_rows} rows, manifest says {shard.rows}"
            )
        if "embedding" not in handle.schema_arrow.names:
            raise IndexBuildError(f"{shard.path}: not an embedding shard (no embedding column)")
        return handle

    def batches(self, rows: int, with_ids: bool = True) -> Iterator[Batch]:
        """The shards' rows in order, ``rows`` at a time (a batch never spans two shards)."""
        position = 0
        for shard in self.files:
            handle = self._open(shard)
            wanted = [
                c
                for c in ("embedding", "id", "source", "location", "image_id")
                if c in handle.schema_arrow.names and (with_ids or c == "embedding")
            ]
            for record in handle.iter_batches(batch_size=rows, columns=wanted):
                embeddings = to_float32(record.column("embedding"))
                columns = {n: record.column(n) for n in wanted if n != "embedding"}
                yield Batch(position, embeddings, columns)
                position += len(embeddings)

    def rows_at(self, positions: np.ndarray, batch: int = 65_536) -> np.ndarray:
        """float32 rows at the sorted ``positions`` (reading only the shards holding them)."""
        out = np.empty((len(positions), self.dim), np.float32)
        start, filled = 0, 0
        for shard in self.files:
            end = start + shard.rows
            lo, hi = np.searchsorted(positions, [start, end])
            if hi > lo:
                wanted = positions[lo:hi] - start
                offset = 0
                for record in self._open(shard).iter_batches(batch, columns=["embedding"]):
                    n = record.num_rows
                    a, b = np.searchsorted(wanted, [offset, offset + n])
                    if b > a:
                        rows = wanted[a:b] - offset
                        out[filled : filled + b - a] = to_float32(record.column(0).take(rows))
                        filled += b - a
                    offset += n
            start = end
        return out

    def sample_positions(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` distinct sorted positions, drawn from evenly spaced shards holding at
        least 4x as many rows (so that sampling reads a fraction of a large collection)."""
        count = min(count, self.count)
        if count == 0:
            return np.zeros(0, np.int64)
        need = min(self.count, 4 * count)
        picked, held = [], 0
        step = max(1, math.floor(len(self.files) / max(1, math.ceil(need / self._mean_rows()))))
        order = list(range(0, len(self.files), step))
        order += [i for i in range(len(self.files)) if i not in set(order)]
        for i in order:
            if held >= need:
                break
            picked.append(i)
            held += self.files[i].rows
        starts = np.cumsum([0] + [f.rows for f in self.files])
        pool = np.concatenate(
            [np.arange(starts[i], starts[i + 1], dtype=np.int64) for i in sorted(picked)]
        )
        return np.sort(rng.choice(pool, size=count, replace=False))

    def _mean_rows(self) -> float:
        return max(1.0, self.count / max(1, len(self.files)))


def to_float32(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list embedding column as an L2-normalised float32 (n, D) array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    vectors = np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)
    if len(vectors):
        faiss.normalize_L2(vectors)  # undo float16 rounding of the norms
    return vectors
