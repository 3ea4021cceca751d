"""Reading back what ``xmodal extract`` wrote, for filtering and probing: the manifest, the pair
scores and the dataset the shards were made from (checked to be the same data)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmodal.data.datasets import Example, ImageTextDataset, load_dataset
from xmodal.errors import IncompatibleError, InputError, MissingFileError
from xmodal.extract.pairs import PAIRS, PairTable, pair_items, pairs_fingerprint, read_pair_shards
from xmodal.extract.reader import items_fingerprint, text_items
from xmodal.shards import load_manifest


@dataclass
class Extraction:
    """One extraction folder: its manifest and the dataset its shards were made from."""

    directory: Path
    manifest: dict[str, Any]
    data: Path

    def record(self, kind: str) -> dict[str, Any] | None:
        return self.manifest["modalities"].get(kind)

    def require_complete(self, kind: str) -> dict[str, Any]:
        """The manifest record of ``kind``; refused when missing or unfinished (rows would be
        silently missing from whatever is built on it)."""
        record = self.record(kind)
        if record is None:
            raise InputError(f"{self.directory} holds no {kind} (see `xmodal extract --what`)")
        if not record.get("complete"):
            done = len(record["shards"])
            raise InputError(
                f"{self.directory}: the {kind} extraction is unfinished ({done} of "
                f"{record['num_shards']} shards); run the same `xmodal extract` again to finish it"
            )
        return record

    def pairs(self) -> PairTable:
        self.require_complete(PAIRS)
        return read_pair_shards(self.directory, self.manifest)


def open_extraction(directory: str | Path, data: str | Path | None = None) -> Extraction:
    """The extraction folder ``directory`` (MissingFileError when it has no manifest);
    ``data`` defaults to the dataset recorded in the manifest."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    if manifest is None:
        raise MissingFileError(
            f"{directory}: no manifest.json (not an `xmodal extract` output folder)"
        )
    return Extraction(directory, manifest, Path(data or manifest["data"]))


def load_matching_dataset(extraction: Extraction) -> ImageTextDataset:
    """The dataset the shards were extracted from, loaded as extraction does (rows it could not
    use left out), and refused when its pairs or captions are not those of the shards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped rows are counted in the manifest already
        dataset = load_dataset(extraction.data, skip_bad=True)
    for kind, fingerprint in (
        (PAIRS, lambda: pairs_fingerprint(pair_items(dataset))),
        ("texts", lambda: items_fingerprint(text_items(dataset))),
    ):
        record = extraction.record(kind)
        if record is not None and record["items_hash"] != fingerprint():
            raise IncompatibleError(
                f"{extraction.data} is not the data the {kind} in {extraction.directory} were "
                f"extracted from (fingerprint {fingerprint()} != {record['items_hash']}): it "
                "changed since, or name the right file with --data"
            )
    return dataset


def column_value(example: Example, column: str) -> Any:
    """A row's value in ``column`` (``label``, ``caption``, ``image_id`` or any other column)."""
    if column in ("label", "caption", "image_id"):
        return getattr(example, column)
    return example.extra.get(column)
