"""What the service shows of an index's entries: dataset-relative names, not server paths.

Shards store each image's absolute path (``source``; also its ``id`` when the dataset gave no
``image_id``), and a caption index stores its image's id. Over HTTP those become paths relative
to the folder of the dataset they were extracted from (the ``data`` of the shards' manifest), so
that a client learns nothing of the server's file system. ``xmodal serve --expose-sources``
shows them as stored.

Nothing here holds a Python object per indexed item: a public name is computed from the index's
ids file (read by position) when a result is returned, and a public id is found again through
a sorted table of 64-bit hashes of every public id and their positions (16 bytes per item,
memory-mapped), each candidate checked against the id at its position. The table is built by
one pass over the ids file; for a large index it is saved beside the index
(``serve-names-*.npy``) and reused while the ids file and dataset folders are unchanged.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from xmodal.atomic import atomic_path, atomic_write_text
from xmodal.errors import OutputError
from xmodal.index import SearchIndex, ShardedIndex, read_info
from xmodal.index.integrity import FileWatch
from xmodal.index.store import ID_ROW_GROUP
from xmodal.shards import load_manifest

CACHE_MIN_ITEMS = 100_000  # smaller indexes build their table at each start (a quick pass)
TABLE_FORMAT = "xmodal.serve-names/1"
TABLE_PREFIX = "serve-names"
log = logging.getLogger(__name__)

AnyIndex = SearchIndex | ShardedIndex


class PublicColumn(Sequence):
    """A read-only sequence of one public name per index position, computed when read."""

    def __init__(self, name_at: Callable[[int], Any], count: int):
        self.name_at, self.count = name_at, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item):  # type: ignore[override]
        if isinstance(item, slice):
            return [self.name_at(p) for p in range(*item.indices(self.count))]
        position = int(item) + (self.count if int(item) < 0 else 0)
        if not 0 <= position < self.count:
            raise IndexError(f"position {item} outside 0..{self.count - 1}")
        return self.name_at(position)

    def __iter__(self) -> Iterator[Any]:
        return (self.name_at(p) for p in range(self.count))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class PublicNames:
    """Per index position: the id, source and image id a client sees; public id -> position.

    ``ids``, ``sources`` and ``image_ids`` (caption indexes) are sequences computed per
    position; :meth:`position` looks a public id up in the hash table."""

    def __init__(
        self, index: AnyIndex, expose: bool = False, cache_min_items: int = CACHE_MIN_ITEMS
    ):
        self.index = index
        self.expose = expose
        self.modality = index.modality
        self.count = index.count
        # per run of shards from one dataset: its first position and its dataset folder
        self.starts, self.roots = ([0], [None]) if expose else shard_roots(index)
        self.fallback: str | None = None
        self.ids: Sequence[str] = PublicColumn(self.public_id, self.count)
        self.sources: Sequence[str] = PublicColumn(self.public_source, self.count)
        self.image_ids: Sequence[str | None] = (
            PublicColumn(self.public_image_id, self.count) if self.modality == "texts" else ()
        )
        folder = cache_folder(index) if self.count >= cache_min_items else None
        key = self._table_key()
        saved = load_table(folder, self._mode, key, self.count) if folder else None
        # the saved table is memory-mapped: checked before each lookup, like the index files
        self.table_watch: FileWatch | None = None
        if saved is not None:
            self.fallback, table = saved
            table_path = _table_files(folder, self._mode, key)[0]
            self.table_watch = FileWatch(Path(index.directory).name, [table_path])
        else:
            if not expose:
                self.fallback = self._scan_fallback()
            table = self._build_table()
            if folder is not None:
                save_table(folder, self._mode, key, table, self.fallback)
        self.hashes, self.positions = table[0], table[1]

    # -- one position ---------------------------------------------------------------------------
    def root_at(self, position: int) -> str | None:
        """The folder the names at ``position`` are relative to."""
        root = self.roots[bisect.bisect_right(self.starts, position) - 1]
        return self.fallback if _outside(self._path_at(position), _prefix(root)) else root

    def public_id(self, position: int) -> str:
        raw = self.index.ids[position]
        return raw if self.expose else relative(raw, self.root_at(position))

    def public_source(self, position: int) -> str:
        raw = self.index.sources[position]
        if self.expose or self.modality != "images":  # a caption is shown as it is
            return raw
        return relative(raw, self.root_at(position))

    def public_image_id(self, position: int) -> str | None:
        raw = self.index.image_ids[position]
        return raw if self.expose or not raw else relative(raw, self.root_at(position))

    def _path_at(self, position: int) -> str | None:
        """The image path an entry names: its source for images, its image id for captions."""
        column = self.index.sources if self.modality == "images" else self.index.image_ids
        return column[position]

    def position(self, public_id: str) -> int | None:
        """The first index position of the entry shown as ``public_id`` (None when there is
        none): hash candidates from the table, each checked against the id at its position."""
        if self.table_watch is not None:
            self.table_watch.check()
        key = np.uint64(id_hash(public_id))
        low = int(np.searchsorted(self.hashes, key, "left"))
        high = int(np.searchsorted(self.hashes, key, "right"))
        for slot in range(low, high):  # positions ascend among equal hashes
            position = int(self.positions[slot])
            if self.public_id(position) == public_id:
                return position
        return None

    def result(self, result: dict[str, Any], position: int) -> dict[str, Any]:
        """A search result with its id, source and image id as the client may see them."""
        shown = {**result, "id": self.public_id(position), "source": self.public_source(position)}
        if self.modality == "texts":
            shown["image_id"] = self.public_image_id(position)
        return shown

    def model_id(self, model_id: str) -> str:
        """A model directory is shown by its name only (after its prefix: ``hf:/x/clip`` ->
        ``hf:clip``); a preset or hub id as it is."""
        if self.expose:
            return model_id
        if os.path.isabs(model_id):
            return Path(model_id).name
        prefix, colon, rest = model_id.partition(":")
        return f"{prefix}:{Path(rest).name}" if colon and os.path.isabs(rest) else model_id

    # -- one pass over the ids file -------------------------------------------------------------
    @property
    def _mode(self) -> str:
        return "stored" if self.expose else "public"

    @property
    def _path_column(self) -> str:
        return "source" if self.modality == "images" else "image_id"

    def _segments(self, start: int, rows: int) -> Iterator[tuple[int, int, str | None]]:
        """(offset, end) inside a batch of ``rows`` from ``start``, and their dataset folder."""
        segment = bisect.bisect_right(self.starts, start) - 1
        offset = 0
        while offset < rows:
            end = self.starts[segment + 1] - start if segment + 1 < len(self.starts) else rows
            end = min(rows, end)
            yield offset, end, self.roots[segment]
            offset, segment = end, segment + 1

    def _scan_fallback(self) -> str | None:
        """The deepest folder holding every image that lies outside its dataset's folder (or
        whose dataset folder is unknown): their names are relative to it, never ``..``."""
        common: str | None = None
        broken = False
        for start, columns in self._batches([self._path_column], "finding dataset folders"):
            paths = columns[self._path_column]
            folders: set[str] = set()
            for offset, end, root in self._segments(start, len(paths)):
                prefix = _prefix(root)
                for value in paths[offset:end]:
                    if value and is_absolute(value) and _outside(value, prefix):
                        folders.add(os.path.dirname(value))
            if folders and not broken:
                try:
                    common = os.path.commonpath(sorted(folders | ({common} if common else set())))
                except ValueError:  # paths on different drives
                    broken, common = True, None
        return None if broken else common

    def _build_table(self) -> np.ndarray:
        """(2, count) uint64: the public ids' hashes sorted, and their positions."""
        hashes = np.empty(self.count, np.uint64)
        wanted = ["id"] if self.expose else ["id", self._path_column]
        for start, columns in self._batches(wanted, "hashing public ids"):
            ids = columns["id"]
            if self.expose:
                names: Iterator[str] = iter(ids)
            else:
                names = self._public_batch(start, ids, columns[self._path_column])
            hashes[start : start + len(ids)] = np.fromiter(
                (id_hash(name) for name in names), np.uint64, len(ids)
            )
        order = np.argsort(hashes, kind="stable")
        table = np.empty((2, self.count), np.uint64)
        table[0] = hashes[order]
        table[1] = order
        return table

    def _public_batch(self, start: int, ids: list[str], paths: list[Any]) -> Iterator[str]:
        for offset, end, root in self._segments(start, len(ids)):
            prefix = _prefix(root)
            for raw, value in zip(ids[offset:end], paths[offset:end], strict=True):
                yield relative(raw, self.fallback if _outside(value, prefix) else root)

    def _batches(self, columns: list[str], what: str) -> Iterator[tuple[int, dict[str, list]]]:
        """(first position, {column: values}) of every batch of the ids files, in order."""
        bar = tqdm(
            total=self.count,
            desc=what,
            unit="id",
            leave=False,
            disable=self.count < CACHE_MIN_ITEMS,
        )
        start = 0
        for path in ids_files(self.index):
            file = pq.ParquetFile(str(path))  # its own reader: the index's serves searches
            present = [c for c in columns if c in file.schema_arrow.names]
            for batch in file.iter_batches(batch_size=ID_ROW_GROUP, columns=present):
                values = {c: batch.column(c).to_pylist() for c in present}
                values.update({c: [None] * batch.num_rows for c in columns if c not in present})
                yield start, values
                start += batch.num_rows
                bar.update(batch.num_rows)
        bar.close()

    def _table_key(self) -> str:
        """What the table depends on: the ids files as they are now, the dataset folders."""
        files = []
        for path in ids_files(self.index):
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        record = {
            "format": TABLE_FORMAT,
            "expose": self.expose,
            "count": self.count,
            "files": files,
            "segments": [list(s) for s in zip(self.starts, self.roots, strict=True)],
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def id_hash(value: str) -> int:
    """A 64-bit hash of an id, the same in every process (Python's own hash is salted)."""
    data = value.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def ids_files(index: AnyIndex) -> list[Path]:
    """The ids Parquet file of each part of ``index``, in position order."""
    parts = index.parts if isinstance(index, ShardedIndex) else [index]
    return [part.ids_file.path for part in parts]


def cache_folder(index: AnyIndex) -> Path | None:
    """Where the lookup table is kept: the index's folder (a sharded index's own folder; none
    for folders searched together without one)."""
    if isinstance(index, ShardedIndex):
        info = read_info(index.directory)
        return index.directory if info is not None and info.get("kind") == "sharded" else None
    return index.directory


def _table_files(folder: Path, mode: str, key: str) -> tuple[Path, Path]:
    stem = f"{TABLE_PREFIX}-{mode}-{key[:16]}"
    return folder / f"{stem}.npy", folder / f"{stem}.json"


def load_table(
    folder: Path, mode: str, key: str, count: int
) -> tuple[str | None, np.ndarray] | None:
    """The saved (fallback folder, table) of this key, memory-mapped; None when there is none
    or it does not fit."""
    table_path, meta_path = _table_files(folder, mode, key)
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        table = np.load(table_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("format") != TABLE_FORMAT or meta.get("count") != count:
        return None
    if table.dtype != np.uint64 or table.shape != (2, count):
        return None
    return meta.get("fallback"), table


def save_table(folder: Path, mode: str, key: str, table: np.ndarray, fallback: str | None) -> None:
    """Save the table beside the index (atomic) and drop the older ones of this mode; a
    folder that cannot be written only costs the rebuild at the next start."""
    table_path, meta_path = _table_files(folder, mode, key)
    try:
        with atomic_path(table_path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, table)
        meta = {"format": TABLE_FORMAT, "count": table.shape[1], "fallback": fallback}
        atomic_write_text(meta_path, json.dumps(meta))
    except (OutputError, OSError) as err:
        log.warning("id lookup table not saved (%s): it is rebuilt at each start", err)
        return
    for old in folder.glob(f"{TABLE_PREFIX}-{mode}-*"):
        if old not in (table_path, meta_path):
            old.unlink(missing_ok=True)


def _posix_absolute(value: str) -> bool:
    return value.startswith("/")


# os.path.isabs, without its generic-path overhead where a path is absolute by its first "/"
is_absolute: Callable[[str], bool] = _posix_absolute if os.name == "posix" else os.path.isabs


def relative(value: str, root: str | None) -> str:
    """``value`` relative to ``root`` when it is an absolute path (its file name when no root is
    known); anything else (an image id, a tar member ``shard.tar:name``) as it is."""
    if not is_absolute(value):
        return value
    if root is None:
        return Path(value).name
    prefix = root.rstrip(os.sep) + os.sep
    if value.startswith(prefix) and os.sep == "/":  # the common case, without relpath's cost
        return value[len(prefix) :]
    try:
        return Path(os.path.relpath(value, root)).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(value).name


def shard_roots(index: AnyIndex) -> tuple[list[int], list[str | None]]:
    """The first position of each run of shards extracted from one dataset, and that dataset's
    folder (None when unknown), read from the manifests of the index's shard folders."""
    starts: list[int] = []
    roots: list[str | None] = []
    manifests: dict[str, str | None] = {}
    position = 0
    for entry in index.info.get("shards", []):
        directory = entry["dir"]
        if directory not in manifests:
            manifests[directory] = _manifest_root(directory)
        if not roots or roots[-1] != manifests[directory]:
            starts.append(position)
            roots.append(manifests[directory])
        position += entry["rows"]
    if position != index.count:  # an index description without per-shard rows
        return [0], [None]
    return starts or [0], roots or [None]


def _manifest_root(directory: str) -> str | None:
    try:
        manifest = load_manifest(directory)
    except (OSError, ValueError):
        return None
    data = (manifest or {}).get("data")
    if not isinstance(data, str) or not os.path.isabs(data):
        return None
    return data if Path(data).is_dir() else str(Path(data).parent)


def _prefix(root: str | None) -> str | None:
    """What every path inside the folder ``root`` starts with."""
    return None if root is None else root.rstrip(os.sep) + os.sep


def _outside(path: str | None, prefix: str | None) -> bool:
    """Whether an entry naming the image ``path`` is named relative to the fallback folder:
    its dataset folder is unknown (``prefix`` None), or ``path`` is an absolute path outside it
    (relative to the dataset, its name would climb the server's folders with ``..``)."""
    if prefix is None:
        return True
    return bool(path) and is_absolute(path) and not path.startswith(prefix)
