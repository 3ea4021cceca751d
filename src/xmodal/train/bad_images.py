"""The run's record of undecodable images (``data.skip_bad``): ``out_dir/errors.jsonl``.

Each image is recorded once per dataset, with a warning; rank 0 writes the file (atomically),
gathering what the other ranks met in each step. Without ``skip_bad`` the first one stops the
run with an error naming the file and its row.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from xmodal import distributed
from xmodal.atomic import atomic_write_text
from xmodal.data import ImageTextDataset
from xmodal.data.images import drop_failed_images, failure_record, image_error
from xmodal.errors import InputError


class BadImageLog:
    """``errors.jsonl`` in ``out_dir``; ``is_main``: this process writes it and warns."""

    def __init__(self, out_dir: Path, skip_bad: bool, is_main: bool):
        self.path = Path(out_dir) / "errors.jsonl"
        self.skip_bad, self.is_main = skip_bad, is_main
        self.records: dict[tuple[str, str], dict] = {}  # (dataset, image id) -> record
        self.step_records: list[dict] = []  # this rank's, met since the last step

    def __len__(self) -> int:
        return len(self.records)

    def start(self, resume: bool) -> None:
        """A resumed run keeps the images recorded so far; a fresh one starts a new log."""
        if not self.path.exists():
            return
        if not resume:
            if self.is_main:
                self.path.unlink()
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            self.records[(record["dataset"], record["image_id"])] = record

    def record(self, dataset: str, records: list[dict]) -> None:
        """Add undecodable images of ``dataset`` (``train``, ``val``), each once."""
        new = [r for r in records if (dataset, r["image_id"]) not in self.records]
        for record in new:
            self.records[(dataset, record["image_id"])] = {"dataset": dataset, **record}
            if self.is_main:
                tqdm.write(
                    f"skipped undecodable {dataset} image {record['source']} "
                    f"({record['row']}): {record['reason']}"
                )
        if new and self.is_main:
            lines = "".join(json.dumps(r) + "\n" for r in self.records.values())
            atomic_write_text(self.path, lines)

    def drop_failed(
        self, dataset: ImageTextDataset, failures: dict[int, str], min_pairs: int
    ) -> ImageTextDataset:
        """``dataset`` less the images that failed to decode when cached (recorded; refused
        without ``skip_bad``), refused when fewer than ``min_pairs`` pairs are left."""
        kept, records = drop_failed_images(dataset, failures, self.skip_bad)
        if records:
            self.record("train", records)
            if len(kept) < min_pairs:
                raise InputError(
                    f"{len(kept)} training pairs are left once {len(records)} undecodable "
                    f"images are dropped: fewer than one global batch ({min_pairs})"
                )
        return kept

    def check(self, batch: dict, dataset: ImageTextDataset) -> dict:
        """The batch, once its undecodable images are kept for the step's record (``skip_bad``)
        or refused (ImageLoadError naming the file and row)."""
        if batch["bad_images"]:
            failed = [(dataset[j], reason) for j, reason in batch["bad_images"]]
            if not self.skip_bad:
                raise image_error(*failed[0])
            self.step_records += [failure_record(*f) for f in failed]
            if "image_index" not in batch:
                raise InputError(
                    f"no image of a training micro-batch could be decoded (first: "
                    f"{failed[0][0].image}: {failed[0][1]}); see {self.path}"
                )
        return batch

    def end_step(self) -> None:
        """Record what every rank met in this step (all ranks take part in the gather)."""
        if self.skip_bad:  # the same on every rank
            parts = distributed.gather_objects(self.step_records)
            self.record("train", [record for part in parts for record in part])
        self.step_records = []
