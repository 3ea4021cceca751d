"""Image-text datasets: the formats ``load_dataset`` reads, and references to their images."""

from xmodal.data.datasets import (
    BadRowError,
    Example,
    ImageTextDataset,
    TarMember,
    detect_format,
    load_dataset,
)
from xmodal.data.refs import image_ref, location

__all__ = [
    "BadRowError",
    "Example",
    "ImageTextDataset",
    "TarMember",
    "detect_format",
    "image_ref",
    "load_dataset",
    "location",
]
