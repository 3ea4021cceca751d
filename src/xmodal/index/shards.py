"""Several independently built indexes (one per extraction rank or node) searched as one:
each part answers its own top-k, the answers are merged by score.

A sharded index is a folder whose ``index.json`` (kind ``sharded``) lists its parts; a part
that is missing is refused at load, never silently left out of the search.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.atomic import atomic_write_text, make_dir
from xmodal.errors import IncompatibleError, IndexBuildError, InputError, MissingFileError
from xmodal.index.description import INDEX_FORMAT, INDEX_JSON, read_info
from xmodal.index.searching import Hits, SearchIndex, hits
from xmodal.index.store import ConcatView
from xmodal.models.identity import ModelIdentity, check_compatible
from xmodal.shards import now


def _check_parts(parts: list[SearchIndex]) -> None:
    first = parts[0]
    for part in parts[1:]:
        check_compatible(
            first.identity, part.identity, f"index {first.directory} vs {part.directory}"
        )
        if (part.modality, part.dim) != (first.modality, first.dim):
            raise IncompatibleError(
                f"{part.directory} holds {part.dim}-d {part.modality}, "
                f"{first.directory} {first.dim}-d {first.modality}: not one index"
            )


def combine_indexes(parts: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Write a sharded index in ``out`` over the index folders ``parts`` (checked to come
    from one model and modality); parts inside ``out`` are recorded relative to it."""
    if not parts:
        raise IndexBuildError("a sharded index needs at least one part")
    out = make_dir(out).resolve()
    loaded = [SearchIndex(p) for p in parts]
    _check_parts(loaded)
    first = loaded[0]
    records = []
    for part in loaded:
        where = part.directory.resolve()
        try:
            name = os.path.relpath(where, out) if where.is_relative_to(out) else str(where)
        except ValueError:
            name = str(where)
        records.append({"dir": name, "count": part.count, "generation": part.info["generation"]})
    info = {
        "format": INDEX_FORMAT,
        "kind": "sharded",
        "modality": first.modality,
        "metric": "inner_product",
        "dim": first.dim,
        "count": sum(p.count for p in loaded),
        "model": first.info["model"],
        "processor_hash": first.info["processor_hash"],
        "parts": records,
        "params": {"parts": len(records)},
        "created": now(),
    }
    atomic_write_text(out / INDEX_JSON, json.dumps(info, indent=2))
    return info


class ShardedIndex:
    """Index parts searched as one; positions run through the parts in order."""

    def __init__(self, directory: str | Path | None = None, parts: list[str | Path] = ()):
        if directory is not None:
            self.directory = Path(directory)
            info = read_info(self.directory)
            if info is None or info.get("kind") != "sharded":
                raise IndexBuildError(f"{self.directory}: not a sharded index")
            folders = []
            for record in info["parts"]:
                folder = self.directory / record["dir"]
                if read_info(folder) is None:
                    raise MissingFileError(
                        f"sharded index {self.directory}: part {folder} is missing "
                        f"(no {INDEX_JSON}); refusing to search without it"
                    )
                folders.append(folder)
        else:
            if not parts:
                raise IndexBuildError("a sharded index needs at least one part")
            folders = [Path(p) for p in parts]
            self.directory = folders[0]
            info = {}
        self.parts = [SearchIndex(f) for f in folders]
        _check_parts(self.parts)
        first = self.parts[0]
        self.info = {
            **{k: first.info[k] for k in ("model", "processor_hash", "modality", "dim")},
            "format": INDEX_FORMAT,
            "kind": "sharded",
            "count": sum(p.count for p in self.parts),
            "params": {
                "parts": len(self.parts),
                "part_kinds": [p.kind for p in self.parts],
            },
            "parts": info.get("parts", [{"dir": str(f)} for f in folders]),
            "shards": [s for p in self.parts for s in p.info.get("shards", [])],
        }
        self.offsets = np.cumsum([0] + [p.count for p in self.parts])
        self.ids = ConcatView([p.ids for p in self.parts])
        self.sources = ConcatView([p.sources for p in self.parts])
        self.locations = ConcatView([p.locations for p in self.parts])
        self.image_ids = ConcatView([p.image_ids for p in self.parts])

    kind = property(lambda self: "sharded")
    modality = property(lambda self: self.info["modality"])
    dim = property(lambda self: self.info["dim"])
    count = property(lambda self: int(self.offsets[-1]))

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.from_record(self.info)

    @property
    def refinable(self) -> bool:
        """Whether every part keeps the vectors that exact re-ranking (``refine``) reads."""
        return all(part.refinable for part in self.parts)

    def check_files(self) -> None:
        """IndexDamagedError when a file of any part has changed on disk since it was opened."""
        for part in self.parts:
            part.check_files()

    def search_arrays(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
        refine: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each part's top-k (its own tuned parameters unless given), merged by score."""
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        scores, found = [], []
        for part, offset in zip(self.parts, self.offsets, strict=False):
            s, f = part.search_arrays(queries, k, nprobe, ef_search, refine)
            scores.append(np.where(f >= 0, s, -np.inf))
            found.append(np.where(f >= 0, f + offset, -1))
        scores_all, found_all = np.concatenate(scores, axis=1), np.concatenate(found, axis=1)
        order = np.argsort(-scores_all, axis=1, kind="stable")[:, : min(k, self.count)]
        return np.take_along_axis(scores_all, order, 1), np.take_along_axis(found_all, order, 1)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
        refine: int | None = None,
    ) -> Hits:
        """For each query row, up to k (position, score) pairs, best first."""
        return hits(*self.search_arrays(queries, k, nprobe, ef_search, refine))


def open_index(where: str | Path | list[str | Path]) -> SearchIndex | ShardedIndex:
    """An index folder, a sharded index folder, or several index folders searched as one."""
    if isinstance(where, list | tuple):
        if len(where) == 1:
            return open_index(where[0])
        return ShardedIndex(parts=list(where))
    info = read_info(where)
    if info is not None and info.get("kind") == "sharded":
        return ShardedIndex(where)
    return SearchIndex(where)
