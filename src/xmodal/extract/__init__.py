"""Embedding extraction at scale: dataset -> decode workers -> model -> Parquet shards.

The package itself imports nothing heavy: ``xmodal.extract.mapper`` (embedding in Python) needs
only the base install, while the names below load the Parquet writer (``pip install
'xmodal[index]'``) on first use. The shard format itself is :mod:`xmodal.shards`; ``Shard``,
``load_manifest`` and ``read_shard`` are importable from here too.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "extract": "xmodal.extract.runner",
    "Shard": "xmodal.shards",
    "load_manifest": "xmodal.shards",
    "read_shard": "xmodal.shards",
    "read_pair_shards": "xmodal.extract.pairs",
}

__all__ = ["Shard", "extract", "load_manifest", "read_pair_shards", "read_shard"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
