"""A built index loaded for searching: FAISS index (inverted lists memory-mapped when on
disk), ids read from Parquet by position, optional exact re-ranking."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.errors import IndexBuildError, InputError, MissingFileError
from xmodal.index.description import INDEX_JSON, read_info
from xmodal.index.integrity import FileWatch
from xmodal.index.ondisk import READ_FLAGS, check_lists, file_digest, read_index
from xmodal.index.store import IdsFile, open_vectors
from xmodal.index.tuning import search_index
from xmodal.models.identity import ModelIdentity

Hits = list[list[tuple[int, float]]]


class SearchIndex:
    """A built index loaded for searching: the FAISS index, ids, sources and description.

    ``ids``, ``sources``, ``locations`` and ``image_ids`` are sequences read from the ids
    Parquet file a row group at a time, never whole.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        info = read_info(self.directory)
        if info is None:
            raise MissingFileError(
                f"{self.directory}: no {INDEX_JSON} (build it with xmodal index)"
            )
        if info.get("kind") == "sharded":
            raise IndexBuildError(
                f"{self.directory} is a sharded index: open it with xmodal.index.open_index"
            )
        self.info = info
        index_path = self.directory / info["index_file"]
        if "digest" in info and file_digest(index_path) != info["digest"]:
            raise IndexBuildError(
                f"{index_path}: index file does not match its checksum in {INDEX_JSON} "
                "(corrupted); rebuild the index"
            )
        if "lists_file" in info:
            lists = self.directory / info["lists_file"]
            if not lists.is_file():
                raise IndexBuildError(f"{lists}: inverted lists file is missing")
            if lists.stat().st_size != info.get("lists_bytes", lists.stat().st_size):
                raise IndexBuildError(
                    f"{lists}: inverted lists file is {lists.stat().st_size:,} bytes, "
                    f"{INDEX_JSON} says {info['lists_bytes']:,}: truncated or corrupted; "
                    "rebuild the index"
                )
            self.index = read_index(index_path, READ_FLAGS)
            check_lists(self.index, lists)
        else:
            self.index = read_index(index_path)
        self.vectors: np.ndarray | None = None
        if "vectors_file" in info:
            self.vectors = open_vectors(
                self.directory / info["vectors_file"], info["count"], info["dim"], info["dtype"]
            )
        self.ids_file = IdsFile(self.directory / info["ids_file"])
        self.ids: Sequence[str] = self.ids_file.column("id")
        self.sources: Sequence[str] = self.ids_file.column("source")
        self.locations: Sequence[str | None] = self.ids_file.column("location")
        self.image_ids: Sequence[str | None] = self.ids_file.column("image_id")
        mapped = ("lists_file", "vectors_file")
        watched = [self.directory / info[key] for key in mapped if key in info]
        self.files = FileWatch(self.directory.name, [*watched, self.ids_file.path])
        if not self.index.ntotal == len(self.ids) == info["count"]:
            raise IndexBuildError(
                f"{self.directory}: index holds {self.index.ntotal} vectors, ids file "
                f"{len(self.ids)}, {INDEX_JSON} says {info['count']}"
            )

    @property
    def kind(self) -> str:
        """The index type: flat, ivf or hnsw (asked for by kind, in memory), or flat, ivf-flat,
        ivf-sq8, ivf-sq4 or ivf-pq (picked by a memory budget)."""
        return self.info["kind"]

    @property
    def modality(self) -> str:
        """What the index holds: images or texts."""
        return self.info["modality"]

    @property
    def count(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.info["dim"]

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.from_record(self.info)

    @property
    def refinable(self) -> bool:
        """Whether it keeps the vectors that exact re-ranking (``refine``) reads."""
        return self.vectors is not None

    def check_files(self) -> None:
        """IndexDamagedError when a file this index reads lazily or maps has changed on disk
        since it was opened (searching it could crash the process)."""
        self.files.check()

    @property
    def measured_recall(self) -> dict[str, Any] | None:
        """Recall@10 against exact search measured at build time (:func:`measured_recall`)."""
        return measured_recall(self.info)

    def search_arrays(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
        refine: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), each (Q, k) best first; position -1 where fewer were found.

        ``nprobe`` (IVF) / ``ef_search`` (HNSW): how deep to search (default: the depth tuned
        at build time). ``refine``: re-rank a shortlist of that many candidates exactly
        (default: the index's own setting; 0 turns it off)."""
        self.check_files()
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise InputError(f"query dimension {queries.shape[1]} != index dimension {self.dim}")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        if refine is not None and refine < 0:
            raise InputError(f"refine must be >= 0, got {refine}")
        k = min(k, self.count)
        if refine and self.vectors is None:
            raise InputError(
                f"{self.directory} keeps no vectors for re-ranking: rebuild it with --refine K "
                "(under --max-index-memory)"
            )
        params = self.info["params"]
        depth = ef_search if self.kind == "hnsw" else nprobe
        if depth is None:
            depth = params.get("efSearch" if self.kind == "hnsw" else "nprobe")
        chosen = params.get("refine", 0) if refine is None else refine
        return search_index(self.index, queries, k, depth, chosen, self.vectors)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
        refine: int | None = None,
    ) -> Hits:
        """For each query row, up to k (position, score) pairs, best first."""
        scores, found = self.search_arrays(queries, k, nprobe, ef_search, refine)
        return hits(scores, found)


def hits(scores: np.ndarray, found: np.ndarray) -> Hits:
    return [
        [(int(p), float(s)) for p, s in zip(row_p, row_s, strict=True) if p >= 0]
        for row_p, row_s in zip(found, scores, strict=True)
    ]


def describe(info: dict[str, Any]) -> str:
    """One line: kind, the parameters that matter and the measured recall."""
    params = dict(info.get("params", {}))
    measured = params.pop("measured_recall", None)
    text = ", ".join(f"{k}={v}" for k, v in params.items()) or "exact"
    if measured:
        text += (
            f"; measured recall@{measured['at']} {measured['value']} on {measured['queries']} "
            "held-out queries"
        )
    return f"{info['kind']} index of {info['count']} {info['modality']} ({text})"


def measured_recall(info: dict[str, Any]) -> dict[str, Any] | None:
    """``{"at": 10, "value": ..., "queries": n}``: the recall the index measured against exact
    search when it was built (``info["params"]["measured_recall"]``; None for an index built
    before it was recorded)."""
    return info.get("params", {}).get("measured_recall")
