"""Dataset rows that ``--skip-bad`` left out, and ``skipped.jsonl``, the list of them.

One record per row: ``{"row": "data.jsonl:7", "reason": "image 'x.jpg' not found (...)"}``
(``row``: where the row is, ``file:line`` or a shard member; ``reason``: why it was left out).
``xmodal extract`` writes the list into its output folder, ``xmodal eval`` beside its report.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xmodal import storage
from xmodal.atomic import atomic_write_text
from xmodal.storage import Location

SKIPPED_NAME = "skipped.jsonl"


@dataclass(frozen=True)
class SkippedRow:
    """One dataset row left out: where it is (``data.jsonl:7``) and why."""

    origin: str
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"

    def record(self) -> dict[str, str]:
        """The row as a ``skipped.jsonl`` / report record."""
        return {"row": self.origin, "reason": self.reason}


def skipped_records(rows: Iterable[SkippedRow]) -> list[dict[str, str]]:
    """The records of ``rows``, in order."""
    return [row.record() for row in rows]


def write_skipped(path: Location, records: Sequence[dict[str, str]]) -> None:
    """Write ``records`` (:meth:`SkippedRow.record`) to ``path`` atomically, one JSON object a
    line; with none, remove ``path`` (a list left there by an earlier run of the same output)."""
    if not records:
        storage.remove(path)
        return
    text = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)
    atomic_write_text(path, text)


def save_skipped(directory: Location, rows: Iterable[SkippedRow]) -> None:
    """Write ``skipped.jsonl`` in ``directory`` (see :func:`write_skipped`)."""
    write_skipped(storage.join(directory, SKIPPED_NAME), skipped_records(rows))
