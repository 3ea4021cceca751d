"""The writing end of extraction: the manifest of a run opened or resumed, each finished shard
recorded (errors, then manifest), the ranks' records merged, and what a killed run left
half-written cleared. The format itself is :mod:`xmodal.shards`; its names are importable from
here too, as they were before it moved."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from xmodal import distributed, storage
from xmodal.atomic import make_dir
from xmodal.data.skipped import SKIPPED_NAME
from xmodal.distributed import World
from xmodal.errors import ExtractError
from xmodal.extract.ranks import (
    fold_errors,
    fold_shards,
    load_parts,
    new_part,
    remove_parts,
    save_part,
)
from xmodal.models.identity import ModelIdentity, check_compatible
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
from xmodal.storage import Location

__all__ = [
    "ShardHook",
    "ShardLog",
    "complete_shards",
    "open_manifest",
    "remove_stale_temporaries",
    "resume_state",
    "shard_entry",
]
__all__ += [  # the format's names, importable from here as before they moved to xmodal.shards
    "DTYPES",
    "ERRORS_NAME",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MODALITIES",
    "SHARD_KINDS",
    "Shard",
    "load_errors",
    "load_manifest",
    "modality_record",
    "now",
    "read_shard",
    "save_errors",
    "save_manifest",
    "shard_name",
    "shard_rows",
    "shard_table",
    "upgrade_error_record",
    "write_shard",
    "write_table_atomic",
]

ShardHook = Callable[[str, int], None]


def complete_shards(directory: Location, record: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shard entries of one modality whose file exists and holds the recorded number of rows."""
    done = {}
    for entry in record["shards"]:
        if shard_rows(storage.join(directory, entry["file"])) == entry["rows"]:
            done[entry["index"]] = entry
    return done


def remove_stale_temporaries(directory: Location) -> list[Location]:
    """Delete temporary files an interrupted (killed) run left behind; returns them."""
    stale = []
    patterns = (".manifest.json.*.tmp", ".errors.jsonl.*.tmp", f".{SKIPPED_NAME}.*.tmp")
    for pattern in (*patterns, *(f".{kind}-*.tmp" for kind in SHARD_KINDS)):
        for path in storage.glob(directory, pattern):
            storage.remove(path)
            stale.append(path)
    return stale


# -- the run's state on disk: opening, resuming, recording each shard, merging ranks -------------
def open_manifest(
    out: Location, identity: ModelIdentity, dim: int, dtype: str, shard_size: int, data: Location
) -> dict[str, Any]:
    """The existing manifest (checked against this run) or a fresh one."""
    manifest = load_manifest(out)
    if manifest is None:
        return {
            "format": MANIFEST_FORMAT,
            "model": identity.to_dict(),
            "processor_hash": identity.processor_hash,
            "dim": dim,
            "dtype": dtype,
            "normalised": True,
            "shard_size": shard_size,
            "data": data if storage.is_url(data) else str(Path(data).resolve()),
            "created": now(),
            "modalities": {},
            "total_rows": 0,
        }
    previous = ModelIdentity.from_record(manifest)
    check_compatible(previous, identity, f"{out} holds embeddings of another model; not extracting")
    for key, value in (("dim", dim), ("dtype", dtype), ("shard_size", shard_size)):
        if manifest[key] != value:
            raise ExtractError(
                f"{out} was extracted with {key}={manifest[key]}, this run asks for {value}: "
                "use the same setting or a new --out directory"
            )
    return manifest


def resume_state(
    out: Location, manifest: dict[str, Any], world: World
) -> tuple[dict[str, dict[int, dict[str, Any]]], list[dict[str, Any]]]:
    """The finished shards per modality (including those a killed distributed run recorded in part
    files) and their error records. Once every rank has read them, rank 0 removes stale
    temporaries and writes the folded state, before any rank writes a shard."""
    parts = load_parts(out)
    fold_shards(manifest, parts)
    done = {
        modality: complete_shards(out, record)
        for modality, record in manifest["modalities"].items()
    }
    for modality, record in manifest["modalities"].items():
        record["shards"] = [done[modality][k] for k in sorted(done[modality])]
    keep = {e["file"] for d in done.values() for e in d.values()}
    errors = load_errors(out, keep)
    if parts:
        errors = fold_errors(errors, parts, keep)
    distributed.barrier()
    if world.is_main:
        make_dir(out)
        remove_stale_temporaries(out)
        if parts:
            save_errors(out, errors)
            save_manifest(out, manifest)
            remove_parts(out)
    distributed.barrier()
    return done, errors


def shard_entry(k: int, file: str, start: int, end: int, rows: int, failed: int) -> dict[str, Any]:
    """Shard ``k``'s manifest entry: its file, item range, rows written and items failed."""
    return {"index": k, "file": file, "start": start, "end": end, "rows": rows, "failed": failed}


class ShardLog:
    """Records each shard once its file is written: in this rank's part file under torchrun
    (rank 0 merges them at the end), else in ``errors.jsonl`` and then ``manifest.json`` (in that
    order, for resuming); then calls ``on_shard(modality, k)``."""

    def __init__(
        self,
        out: Location,
        manifest: dict[str, Any],
        errors: list[dict[str, Any]],
        world: World,
        on_shard: ShardHook | None,
    ):
        self.out, self.manifest, self.errors = out, manifest, errors
        self.world, self.on_shard = world, on_shard
        self.part = new_part()  # this rank's finished shards and errors (distributed runs)

    def record(
        self, modality: str, k: int, entry: dict[str, Any], failures: list[dict[str, Any]]
    ) -> None:
        if self.world.distributed:  # rank 0 writes the manifest once all ranks are done
            self.part["shards"][modality].append(entry)
            self.part["errors"] += failures
            save_part(self.out, self.world.rank, self.part)
        else:
            self.errors += failures
            save_errors(self.out, self.errors)
            record = self.manifest["modalities"][modality]
            record["shards"] = sorted([*record["shards"], entry], key=lambda e: e["index"])
            save_manifest(self.out, self.manifest)
        if self.on_shard is not None:
            self.on_shard(modality, k)

    def close(self) -> dict[str, Any]:
        """Write the final manifest and return it. Under torchrun rank 0 first folds every
        rank's shards and errors into the one manifest and error log; every rank returns it."""
        if not self.world.distributed:
            save_manifest(self.out, self.manifest)
            return self.manifest
        parts = distributed.gather_objects(self.part)
        if self.world.is_main:
            fold_shards(self.manifest, parts)
            save_errors(self.out, fold_errors(self.errors, parts))
            save_manifest(self.out, self.manifest)
            remove_parts(self.out)
        distributed.barrier()
        return self.manifest if self.world.is_main else load_manifest(self.out)
