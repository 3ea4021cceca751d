"""Image-text datasets, readers and builders of real data sets."""

from xmodal.data.builders import (
    FASHION_MNIST_CLASSES,
    build_emoji,
    build_fashion_mnist,
    read_fashion_mnist,
    sha512_integrity,
    split_names,
    tone_caption,
)
from xmodal.data.datasets import (
    BadRowError,
    Example,
    ImageTextDataset,
    TarMember,
    detect_format,
    load_dataset,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "BadRowError",
    "Example",
    "ImageTextDataset",
    "TarMember",
    "build_emoji",
    "build_fashion_mnist",
    "detect_format",
    "load_dataset",
    "read_fashion_mnist",
    "sha512_integrity",
    "split_names",
    "tone_caption",
]
