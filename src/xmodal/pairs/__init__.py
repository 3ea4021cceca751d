"""Image-caption pairs at scale: score them, filter noisy ones, probe fused features.

- :func:`score_pairs`: every row of a dataset as a pair -> Parquet shards with its cosine
  ``similarity``, ITM match probability ``itm`` and optionally its ``fused`` vector (the same as
  ``xmodal.extract.extract(..., modality="pairs")``); :func:`read_pair_scores` reads them back.
- :func:`filter_pairs`: the rows that pass a score threshold or fraction, in the input's format.
- :func:`probe`: linear-probe accuracy of a label from fused / image / text / concatenated
  features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmodal.extract.pairs import PairTable
from xmodal.pairs.filtering import FilterReport, filter_pairs, keep_mask
from xmodal.pairs.probe import ProbeReport, probe
from xmodal.pairs.scores import open_extraction

__all__ = [
    "FilterReport",
    "PairTable",
    "ProbeReport",
    "filter_pairs",
    "keep_mask",
    "probe",
    "read_pair_scores",
    "score_pairs",
]


def score_pairs(
    model: str | Path, data: str | Path, out: str | Path, *, fused: bool = False, **options: Any
) -> dict[str, Any]:
    """Score every row of ``data`` as an (image, caption) pair into shards in ``out``; returns
    the manifest. ``options`` are those of :func:`xmodal.extract.extract` (``shard_size``,
    ``batch_size``, ``workers``, ``skip_bad``, ``options`` for device/backend, ...)."""
    from xmodal.extract.runner import extract

    return extract(model, data, out, modality="pairs", fused=fused, **options)


def read_pair_scores(directory: str | Path) -> PairTable:
    """The pair scores (and fused vectors) of a finished ``--what pairs`` extraction."""
    return open_extraction(directory).pairs()
