"""The names a user picks from for the layers that need an extra to import.

Each type belongs to the module named in its docstring, which validates against it; it is
defined here, below them, because those modules import pyarrow (:mod:`xmodal.shards`,
:mod:`xmodal.extract.runner`, :mod:`xmodal.pairs`) or faiss (:mod:`xmodal.index`) on import,
while the command line offers these names as choices on a base install
(``typing.get_args`` lists them). Choices whose owner imports on a base install live with it:
:data:`xmodal.runtime.Precision`, :data:`xmodal.extract.mapper.Backend`.
"""

from __future__ import annotations

from typing import Literal

Modality = Literal["images", "texts"]
"""What a shard or an index holds (:data:`xmodal.shards.MODALITIES`)."""
ShardDtype = Literal["float16", "float32"]
"""How a shard stores its embeddings (:data:`xmodal.shards.DTYPES`)."""
ExtractModality = Literal[Modality, "both", "pairs"]
"""What ``xmodal extract`` embeds (:func:`xmodal.extract.runner.extract`); ``pairs`` scores
every row as an (image, caption) pair."""
ExtractEngine = Literal["plain", "ray"]
"""How ``xmodal extract`` runs: ``plain`` in this process (or torchrun's ranks), ``ray`` on a Ray
cluster (:mod:`xmodal.extract.ray_engine`)."""
PairScore = Literal["similarity", "itm", "combined"]
"""The scores ``xmodal extract --what pairs`` writes per pair and ``xmodal filter`` selects by
(:data:`xmodal.extract.pairs.SCORE_COLUMNS`)."""
ProbeFeatures = Literal["fused", "image", "text", "image+text", "fused+image+text"]
"""The feature kinds ``xmodal probe`` compares (``+``: concatenated; :mod:`xmodal.pairs.probe`)."""
IndexKind = Literal["auto", "flat", "ivf", "hnsw"]
"""The index ``xmodal index --kind`` builds (:mod:`xmodal.index`)."""

IndexEngine = Literal["plain", "ray"]
"""How ``xmodal index`` adds rows: ``plain`` in this process, ``ray`` in Ray tasks
(:mod:`xmodal.index.ray_engine`)."""
