"""The embeddings folder's format: Parquet shards, the manifest that describes them and the
error log, read and written atomically.

Extraction writes it (:mod:`xmodal.extract`), indexing, filtering and the service read it.
Shard files are ``{modality}-{k:05d}.parquet`` with the columns ``id``, ``source``,
``embedding`` (fixed_size_list[D]) and extra string columns; pair shards hold scores instead
(:mod:`xmodal.extract.pairs`).
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from xmodal import storage
from xmodal.atomic import atomic_path, atomic_write_text
from xmodal.choices import Modality, ShardDtype
from xmodal.config import load_json_config
from xmodal.errors import ExtractError, IndexBuildError, MissingDependencyError, XmodalError
from xmodal.storage import Location

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as exc:  # an optional extra: embedding in Python works without it
    raise MissingDependencyError(
        f"Parquet embedding shards need pyarrow ({exc}): pip install 'xmodal[index]'"
    ) from exc

MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
MANIFEST_FORMAT = "xmodal.embeddings/1"
MODALITIES = typing.get_args(Modality)
SHARD_KINDS = (*MODALITIES, "pairs")  # what a shard holds: images, texts or scored pairs
DTYPES = typing.get_args(ShardDtype)


def shard_name(modality: str, index: int) -> str:
    """``images-00000.parquet`` for shard 0 of the images."""
    return f"{modality}-{index:05d}.parquet"


def now() -> str:
    """The current UTC time as the manifest records it (ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- shard files --------------------------------------------------------------------------------
def write_shard(
    path: str | Path,
    ids: list[str],
    sources: list[str],
    embeddings: np.ndarray,
    dtype: str,
    extra: dict[str, list[Any]] | None = None,
) -> None:
    """Write one shard: ``id``, ``source``, ``embedding`` (fixed_size_list[D]) and extra columns."""
    write_table_atomic(path, shard_table(path, ids, sources, embeddings, dtype, extra))


def shard_table(
    path: str | Path,
    ids: list[str],
    sources: list[str],
    embeddings: np.ndarray,
    dtype: str,
    extra: dict[str, list[Any]] | None = None,
) -> pa.Table:
    """The table :func:`write_shard` writes to ``path`` (built apart, so that the Python work is
    done in one thread and the file written in another)."""
    if dtype not in DTYPES:
        raise ExtractError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    rows, dim = embeddings.shape
    if not len(ids) == len(sources) == rows:
        raise ValueError(f"{path}: {len(ids)} ids, {len(sources)} sources, {rows} embeddings")
    values = pa.array(np.ascontiguousarray(embeddings, dtype=dtype).reshape(-1))
    columns: dict[str, pa.Array] = {
        "id": pa.array(ids, pa.string()),
        "source": pa.array(sources, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
    }
    for name, column in (extra or {}).items():
        columns[name] = pa.array(column, pa.string())
    return pa.table(columns)


def write_table_atomic(path: str | Path, table: pa.Table) -> None:
    """Write ``table`` to the Parquet file ``path`` atomically. Only string columns are
    dictionary-encoded: for vectors and scores, distinct floats, a dictionary only costs time
    (a multiple of the plain write's CPU time) and space before Parquet falls back to plain
    encoding."""
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), use_dictionary=strings)


@dataclass
class Shard:
    """One shard read back: embeddings as float32 (N, D)."""

    ids: list[str]
    sources: list[str]
    embeddings: np.ndarray
    columns: dict[str, list[Any]] = field(default_factory=dict)


def read_table(path: Location) -> pa.Table:
    """The Parquet file ``path`` (a local path or a URL) as a table."""
    if not storage.is_url(path):
        return pq.read_table(str(path))
    with storage.open_input(path) as handle:
        return pq.read_table(handle)


def read_shard(path: Location) -> Shard:
    """The shard file ``path``; IndexBuildError when it lacks an embedding shard's columns."""
    table = read_table(path)
    missing = {"id", "source", "embedding"} - set(table.column_names)
    if missing:
        raise IndexBuildError(f"{path}: not an embedding shard (no column(s) {sorted(missing)})")
    embedding = table.column("embedding").combine_chunks()
    dim = embedding.type.list_size
    flat = embedding.flatten().to_numpy(zero_copy_only=False)
    extra = {
        name: table.column(name).to_pylist()
        for name in table.column_names
        if name not in ("id", "source", "embedding")
    }
    return Shard(
        table.column("id").to_pylist(),
        table.column("source").to_pylist(),
        flat.astype(np.float32).reshape(-1, dim),
        extra,
    )


def shard_rows(path: Location) -> int | None:
    """Row count from the Parquet footer; None when the file is missing or unreadable (on a
    URL the footer alone is read)."""
    try:
        if not storage.is_url(path):
            return pq.ParquetFile(str(path)).metadata.num_rows
        with storage.open_input(path) as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except (OSError, pa.ArrowException, XmodalError):
        return None


# -- the manifest -------------------------------------------------------------------------------
def load_manifest(directory: Location) -> dict[str, Any] | None:
    """The ``manifest.json`` of an extraction directory (None when there is none yet).

    Its ``modalities`` maps ``images`` / ``texts`` to their shard records; manifests written
    before that key was renamed (``kinds``) are read the same way.
    """
    path = storage.join(directory, MANIFEST_NAME)
    if not storage.is_file(path):
        return None
    manifest = load_json_config(path, "embeddings manifest", IndexBuildError, MANIFEST_FORMAT)
    if "modalities" not in manifest and "kinds" in manifest:  # written before the rename
        manifest["modalities"] = manifest.pop("kinds")
    return manifest


def modality_record(
    manifest: dict[str, Any],
    modality: str,
    count: int,
    fingerprint: str,
    out: Location,
    data: str,
) -> dict[str, Any]:
    """The manifest's record of ``modality`` (``count`` items hashed to ``fingerprint``): a new
    one, or the existing one after checking that it holds the same items."""
    record = manifest["modalities"].get(modality)
    if record is None:
        record = manifest["modalities"][modality] = {
            "items": count,
            "items_hash": fingerprint,
            "num_shards": math.ceil(count / manifest["shard_size"]),
            "shards": [],
        }
    elif record["items"] != count or record["items_hash"] != fingerprint:
        raise ExtractError(
            f"{out} holds {modality} of other data ({record['items']} items, fingerprint "
            f"{record['items_hash']}) than {data} ({count} items, fingerprint "
            f"{fingerprint}): use a new --out directory"
        )
    return record


def save_manifest(directory: Location, manifest: dict[str, Any]) -> None:
    """Recount the totals and write ``manifest.json`` atomically."""
    for record in manifest["modalities"].values():
        record["rows"] = sum(s["rows"] for s in record["shards"])
        record["failed"] = sum(s["failed"] for s in record["shards"])
        done = {s["index"] for s in record["shards"]}
        record["complete"] = done == set(range(record["num_shards"]))
    manifest["total_rows"] = sum(r["rows"] for r in manifest["modalities"].values())
    manifest["updated"] = now()
    atomic_write_text(storage.join(directory, MANIFEST_NAME), json.dumps(manifest, indent=2))


# -- the error log ------------------------------------------------------------------------------
def load_errors(directory: Location, keep: set[str]) -> list[dict[str, Any]]:
    """Error records of the shard files in ``keep`` (those of unfinished shards are dropped)."""
    path = storage.join(directory, ERRORS_NAME)
    if not storage.is_file(path):
        return []
    records = []
    for line in storage.read_bytes(path).decode("utf-8").splitlines():
        if line.strip():
            record = upgrade_error_record(json.loads(line))
            if record.get("shard") in keep:
                records.append(record)
    return records


def upgrade_error_record(record: dict[str, Any]) -> dict[str, Any]:
    """An error record with its ``modality`` key (older logs called it ``kind``)."""
    if "modality" not in record and "kind" in record:
        record["modality"] = record.pop("kind")
    return record


def save_errors(directory: Location, records: list[dict[str, Any]]) -> None:
    """Write ``errors.jsonl`` atomically (one JSON object per unreadable item)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(storage.join(directory, ERRORS_NAME), text)
