"""Image-text datasets: the formats ``load_dataset`` reads, and references to their images."""

from xmodal.data.datasets import (
    BadRowError,
    Example,
    ImageTextDataset,
    SkippedRowsWarning,
    TarMember,
    detect_format,
    load_dataset,
)
from xmodal.data.refs import image_ref, location
from xmodal.data.skipped import SkippedRow

__all__ = [
    "BadRowError",
    "Example",
    "ImageTextDataset",
    "SkippedRow",
    "SkippedRowsWarning",
    "TarMember",
    "detect_format",
    "image_ref",
    "load_dataset",
    "location",
]
