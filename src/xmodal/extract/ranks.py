"""``xmodal extract`` under torchrun: rank r embeds the shards k with k % world == r.

Each rank writes its own shard files and, after each one, its records (shard entries and error
records) to a part file ``.parts/rank-{r}.json``, so a killed run still resumes shard by shard.
Rank 0 alone writes ``manifest.json`` and ``errors.jsonl``: at start it folds in the part files
a killed run left, and at the end, after every rank is done, it folds in all ranks' records.
Folding is idempotent (by shard index and error identity), so a crash between writing the
manifest and removing the part files is harmless.
"""

from __future__ import annotations

import json
from typing import Any

from xmodal import storage
from xmodal.atomic import atomic_write_text
from xmodal.shards import SHARD_KINDS, upgrade_error_record
from xmodal.storage import Location

PARTS_DIR = ".parts"


def rank_shards(pending: list[int], rank: int, size: int) -> list[int]:
    """The pending shard indices this rank embeds: k % size == rank."""
    return [k for k in pending if k % size == rank]


def new_part() -> dict[str, Any]:
    """An empty record of one rank's finished shards and error records."""
    return {"shards": {kind: [] for kind in SHARD_KINDS}, "errors": []}


def save_part(out: Location, rank: int, part: dict[str, Any]) -> None:
    """Write this rank's records atomically (after each shard it finishes)."""
    atomic_write_text(storage.join(out, PARTS_DIR, f"rank-{rank}.json"), json.dumps(part))


def load_parts(out: Location) -> list[dict[str, Any]]:
    """The part files a previous (possibly killed) distributed run left in ``out``."""
    folder = storage.join(out, PARTS_DIR)
    if not storage.is_dir(folder):
        return []
    return [json.loads(storage.read_bytes(p)) for p in storage.glob(folder, "rank-*.json")]


def remove_parts(out: Location) -> None:
    storage.remove(storage.join(out, PARTS_DIR), recursive=True)


def fold_shards(manifest: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    """Add the parts' shard entries to the manifest's records (entries already there win)."""
    for part in parts:
        for modality, entries in part["shards"].items():
            record = manifest["modalities"].get(modality)
            if record is None:
                continue
            known = {e["index"] for e in record["shards"]}
            fresh = [e for e in entries if e["index"] not in known]
            record["shards"] = sorted(record["shards"] + fresh, key=lambda e: e["index"])


def fold_errors(
    errors: list[dict[str, Any]], parts: list[dict[str, Any]], keep: set[str] | None = None
) -> list[dict[str, Any]]:
    """``errors`` plus the parts' error records (of the shard files in ``keep``, if given),
    without duplicates, in modality then shard order (the order one process writes them in)."""
    seen = {(e["shard"], e["id"]) for e in errors}
    merged = list(errors)
    for part in parts:
        for record in map(upgrade_error_record, part["errors"]):
            key = (record["shard"], record["id"])
            if key not in seen and (keep is None or record["shard"] in keep):
                seen.add(key)
                merged.append(record)
    return sorted(merged, key=lambda e: (SHARD_KINDS.index(e["modality"]), e["shard"]))
