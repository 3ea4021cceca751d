"""The writing end of extraction: resuming from the shards an earlier run finished, and
clearing what a killed run left half-written. The format itself is :mod:`xmodal.shards`; its
names are importable from here too, as they were before it moved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmodal.data.skipped import SKIPPED_NAME
from xmodal.shards import (  # MissingDependencyError without pyarrow
    DTYPES,
    ERRORS_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MODALITIES,
    SHARD_KINDS,
    Shard,
    load_errors,
    load_manifest,
    modality_record,
    now,
    read_shard,
    save_errors,
    save_manifest,
    shard_name,
    shard_rows,
    shard_table,
    upgrade_error_record,
    write_shard,
    write_table_atomic,
)

__all__ = [  # the format's names, importable from here as before they moved to xmodal.shards
    "DTYPES",
    "ERRORS_NAME",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MODALITIES",
    "SHARD_KINDS",
    "Shard",
    "complete_shards",
    "load_errors",
    "load_manifest",
    "modality_record",
    "now",
    "read_shard",
    "remove_stale_temporaries",
    "save_errors",
    "save_manifest",
    "shard_name",
    "shard_rows",
    "shard_table",
    "upgrade_error_record",
    "write_shard",
    "write_table_atomic",
]


def complete_shards(directory: str | Path, record: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shard entries of one modality whose file exists and holds the recorded number of rows."""
    done = {}
    for entry in record["shards"]:
        if shard_rows(Path(directory) / entry["file"]) == entry["rows"]:
            done[entry["index"]] = entry
    return done


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files an interrupted (killed) run left behind; returns them."""
    stale = []
    patterns = (".manifest.json.*.tmp", ".errors.jsonl.*.tmp", f".{SKIPPED_NAME}.*.tmp")
    for pattern in (*patterns, *(f".{kind}-*.tmp" for kind in SHARD_KINDS)):
        for path in Path(directory).glob(pattern):
            path.unlink(missing_ok=True)
            stale.append(path)
    return stale
