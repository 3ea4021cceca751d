"""Embedding extraction at scale: dataset -> decode workers -> model -> Parquet shards."""

from xmodal.extract.identity import IncompatibleError, ModelIdentity, identify
from xmodal.extract.reader import image_ref
from xmodal.extract.runner import ExtractError, extract
from xmodal.extract.writer import Shard, load_manifest, read_shard

__all__ = [
    "ExtractError",
    "IncompatibleError",
    "ModelIdentity",
    "Shard",
    "extract",
    "identify",
    "image_ref",
    "load_manifest",
    "read_shard",
]
