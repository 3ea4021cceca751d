"""``xmodal extract --what pairs``: every dataset row scored as an aligned (image, caption) pair.

Per pair: the cosine ``similarity`` of the two embeddings, the ITM match probability ``itm``,
the ``combined`` score (``logit_scale * similarity + w * itm_score`` at the model's calibrated
filter weight, :mod:`xmodal.evaluate.pair_filter`) and, with ``fused``, the fused vector.
Shards are ``pairs-NNNNN.parquet`` beside the images and texts shards, recorded in the same
manifest (``modalities.pairs``), resumed and split between torchrun ranks the same way.
Batches are the length-bucketed captions of a shard, their images decoded in the DataLoader
workers that ``--what images`` uses.
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xmodal import storage
from xmodal.choices import PairScore
from xmodal.data.datasets import ImageTextDataset, TarMember
from xmodal.data.refs import location
from xmodal.errors import ExtractError, IncompatibleError, IndexBuildError
from xmodal.extract.mapper import PairScores
from xmodal.extract.reader import TokenizedCaptions
from xmodal.processing import MultimodalProcessor, caption_problem
from xmodal.shards import (  # MissingDependencyError without pyarrow
    modality_record,
    pa,
    read_table,
)
from xmodal.storage import Location

PAIRS = "pairs"
SCORE_COLUMNS = typing.get_args(PairScore)
FUSED_COLUMN = "fused"


@dataclass(frozen=True)
class PairItem:
    """One dataset row as a pair. id: the row's index; row: where it is in the file."""

    id: str
    image_id: str
    ref: str | TarMember
    caption: str
    row: str

    @property
    def source(self) -> str:
        """The image's location (what error records call ``source``)."""
        return location(self.ref)


def pair_items(dataset: ImageTextDataset) -> list[PairItem]:
    """Every row of ``dataset`` as a pair, in order."""
    return [
        PairItem(str(i), ex.image_id, ex.image, ex.caption, ex.origin)
        for i, ex in enumerate(dataset)
    ]


def pairs_fingerprint(items: Sequence[PairItem]) -> str:
    """Hash of the ids, images and captions: a re-run must see the same pairs in order."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}\x00{item.source}\x00{item.caption}\x01".encode())
    return digest.hexdigest()[:16]


def pairs_record(
    manifest: dict[str, Any],
    items: Sequence[PairItem],
    fused: bool,
    itm: bool,
    out: Location,
    combined_weight: float | None = None,
) -> None:
    """Add (or check) the manifest's ``pairs`` record: same data, same ``fused`` setting, the
    same filter weight in ``combined`` (``combined_weight``; a model with an ITM head)."""
    fresh = PAIRS not in manifest["modalities"]
    record = modality_record(manifest, PAIRS, len(items), pairs_fingerprint(items), out, "this run")
    if fresh:
        record["scores"] = list(SCORE_COLUMNS) if itm else ["similarity"]
        record["fused"] = fused
        if itm:
            record["combined_weight"] = combined_weight
        return
    if "combined" in record["scores"] and record.get("combined_weight") != combined_weight:
        raise ExtractError(
            f"{out} holds combined scores at filter weight {record.get('combined_weight')}; "
            f"this model's is {combined_weight} (re-calibrated since?): use a new --out directory"
        )
    if record.get("fused", False) != fused:
        raise ExtractError(
            f"{out} holds pairs extracted {'with' if record.get('fused') else 'without'} "
            f"--fused; this run asks {'with' if fused else 'without'}: use the same setting "
            "or a new --out directory"
        )


def check_fused(model_has_itm: bool, fused: bool) -> None:
    if fused and not model_has_itm:
        raise IncompatibleError(
            "--fused needs a model with fusion; this one is a pure dual encoder (fusion: none)"
        )


@dataclass
class PairPlan:
    """The batches of the pending shards: captions tokenised once, bucketed by length."""

    batches: list[list[int]]
    shard_of_batch: list[int]
    batches_left: dict[int, int]
    tokens: TokenizedCaptions | None
    token_row: np.ndarray  # item position -> row in ``tokens`` (-1: caption refused)
    refused: dict[int, list[tuple[int, str]]]  # shard -> (position, reason)


def plan_pairs(
    items: Sequence[PairItem],
    shards: Sequence[tuple[int, int, int]],
    processor: MultimodalProcessor,
    batch_size: int,
) -> PairPlan:
    """Batches for the shards ``(k, start, end)``: within a shard, the usable captions sorted by
    token length (padding is masked, so the order changes no score, only the time); a caption
    that cannot be used becomes a failure of its shard, recorded with the reason."""
    refused: dict[int, list[tuple[int, str]]] = {}
    good: list[int] = []
    for k, start, end in shards:
        refused[k] = []
        for position in range(start, end):
            problem = _caption_problem(items[position].caption)
            if problem:
                refused[k].append((position, f"caption {problem}"))
            else:
                good.append(position)
    token_row = np.full(len(items), -1, dtype=np.int64)
    token_row[good] = np.arange(len(good))
    tokens = TokenizedCaptions([items[p].caption for p in good], processor) if good else None
    batches: list[list[int]] = []
    shard_of_batch: list[int] = []
    left: dict[int, int] = {}
    for k, start, end in shards:
        positions = np.asarray([p for p in range(start, end) if token_row[p] >= 0], np.int64)
        if tokens is not None and len(positions):
            positions = positions[np.argsort(tokens.lengths[token_row[positions]], kind="stable")]
        for b in range(0, len(positions), batch_size):
            batches.append(positions[b : b + batch_size].tolist())
            shard_of_batch.append(k)
            left[k] = left.get(k, 0) + 1
    return PairPlan(batches, shard_of_batch, left, tokens, token_row, refused)


def _caption_problem(caption: Any) -> str | None:
    if not isinstance(caption, str):
        return f"is {type(caption).__name__}, not a string"
    return caption_problem(caption)


@dataclass
class PairBuffer:
    """Scores of one shard's pairs as they arrive, in any order."""

    start: int
    end: int
    dim: int
    fused: bool
    similarity: np.ndarray = field(init=False)
    itm: np.ndarray = field(init=False)
    combined: np.ndarray = field(init=False)
    vectors: np.ndarray | None = field(init=False)
    ok: np.ndarray = field(init=False)
    failures: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        count = self.end - self.start
        self.similarity = np.zeros(count, dtype=np.float32)
        self.itm = np.full(count, np.nan, dtype=np.float32)
        self.combined = np.full(count, np.nan, dtype=np.float32)
        self.vectors = np.zeros((count, self.dim), dtype=np.float32) if self.fused else None
        self.ok = np.zeros(count, dtype=bool)

    def put(self, positions: list[int], scores: PairScores) -> None:
        index = np.asarray(positions) - self.start
        self.similarity[index] = scores.similarity
        if scores.itm is not None:
            self.itm[index] = scores.itm
        if scores.combined is not None:
            self.combined[index] = scores.combined
        if self.vectors is not None and scores.fused is not None:
            self.vectors[index] = scores.fused
        self.ok[index] = True


def pair_table(
    items: Sequence[PairItem], buffer: PairBuffer, scores: Sequence[str], dtype: str
) -> pa.Table:
    """The table of one shard's scored pairs. Columns: ``id`` (dataset row index),
    ``image_id``, ``source`` (image location), ``caption``, ``row`` (``file:line``), the
    ``scores`` (float32) and, with fused vectors, ``fused`` (fixed_size_list[D] of ``dtype``)."""
    keep = np.flatnonzero(buffer.ok)
    chosen = [items[buffer.start + i] for i in keep]
    columns: dict[str, pa.Array] = {
        "id": pa.array([item.id for item in chosen], pa.string()),
        "image_id": pa.array([item.image_id for item in chosen], pa.string()),
        "source": pa.array([item.source for item in chosen], pa.string()),
        "caption": pa.array([item.caption for item in chosen], pa.string()),
        "row": pa.array([item.row for item in chosen], pa.string()),
        "similarity": pa.array(buffer.similarity[keep], pa.float32()),
    }
    if "itm" in scores:
        columns["itm"] = pa.array(buffer.itm[keep], pa.float32())
    if "combined" in scores:
        columns["combined"] = pa.array(buffer.combined[keep], pa.float32())
    if buffer.vectors is not None:
        values = pa.array(np.ascontiguousarray(buffer.vectors[keep], dtype=dtype).reshape(-1))
        columns[FUSED_COLUMN] = pa.FixedSizeListArray.from_arrays(values, buffer.dim)
    return pa.table(columns)


@dataclass
class PairTable:
    """Pair shards read back: the string columns, the scores and the fused vectors (if any)."""

    columns: dict[str, list[str]]
    scores: dict[str, np.ndarray]
    fused: np.ndarray | None

    def __len__(self) -> int:
        return len(self.columns["id"])


def read_pair_shards(directory: Location, manifest: dict[str, Any]) -> PairTable:
    """Every finished pairs shard of an extraction folder, in shard order."""
    record = manifest.get("modalities", {}).get(PAIRS)
    if record is None:
        raise IndexBuildError(
            f"{directory} holds no pair scores (extract them with `xmodal extract --what pairs`)"
        )
    tables = [read_table(storage.join(directory, e["file"])) for e in record["shards"]]
    if not tables:
        raise IndexBuildError(f"{directory}: no finished pairs shard yet")
    table = pa.concat_tables(tables)
    names = ("id", "image_id", "source", "caption", "row")
    columns = {name: table.column(name).to_pylist() for name in names}
    scores = {
        name: table.column(name).to_numpy().astype(np.float32)
        for name in SCORE_COLUMNS
        if name in table.column_names
    }
    fused = None
    if FUSED_COLUMN in table.column_names:
        vectors = table.column(FUSED_COLUMN).combine_chunks()
        flat = vectors.flatten().to_numpy(zero_copy_only=False)
        fused = flat.astype(np.float32).reshape(-1, vectors.type.list_size)
    return PairTable(columns, scores, fused)
