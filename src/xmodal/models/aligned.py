"""Aligned dual encoders from transformers (CLIP, SigLIP, ChineseCLIP, VisionTextDualEncoder) as
:class:`CrossModalModel` s, with their projections, pooling, logit scale and preprocessing intact.

The source's vision and text halves become xmodal's towers (CLIP's end-of-text pooling and
SigLIP's attention-pool head are their ``pooler_output``), its projections become xmodal's
projections (bias-free for CLIP; none for SigLIP, whose towers end in the shared space), its
logit scale (and SigLIP's bias) become xmodal's, so ``encode_image`` / ``encode_text`` equal
the source's normalised ``get_image_features`` / ``get_text_features``. Fusion and the ITM head
are new layers on top (seeded), or absent with ``fusion="none"``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.config import (
    FusionConfig,
    ImageTowerConfig,
    ModelConfig,
    ProcessorConfig,
    TextTowerConfig,
    load_json_config,
)
from xmodal.errors import ModelLoadError
from xmodal.models.model import CONFIG_NAME, PICKLE_SUFFIXES, CrossModalModel
from xmodal.models.towers import hf_config_dict

log = logging.getLogger(__name__)

# ``hf:<folder or hub id>``: a transformers dual encoder (the prefix is optional).
HF_PREFIX = "hf:"
# transformers ``model_type`` of the dual encoders loaded here.
SUPPORTED_TYPES = ("clip", "siglip", "chinese_clip", "vision-text-dual-encoder")
# HF image processors' ``resample`` codes (PIL's).
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def folder_model_type(directory: Path) -> str | None:
    """The ``model_type`` in a folder's config.json (None when it has none, e.g. xmodal's)."""
    data = load_json_config(directory / CONFIG_NAME, "the model config")
    if data.get("library") == "xmodal":
        return None
    return str(data.get("model_type", ""))


def check_supported(model_type: str, source: str) -> None:
    """Refuse a transformers checkpoint that is not one of the supported dual encoders."""
    if model_type in SUPPORTED_TYPES:
        return
    if model_type == "siglip2":
        hint = "Siglip2 (NaFlex patch inputs) is not supported yet; use a SigLIP checkpoint"
    else:
        hint = f"xmodal loads these dual encoders: {', '.join(SUPPORTED_TYPES)}"
        hint += " (a single tower can be used through a tower config instead)"
    raise ModelLoadError(
        f"{source}: model_type {model_type or '(none)'!r} is not a supported image-text dual "
        f"encoder; {hint}"
    )


def refuse_pickle_only(directory: Path) -> None:
    """Refuse a folder whose weights exist only as pickle files (unpickling can run code)."""
    if any(directory.glob("*.safetensors")):
        return  # pickle files beside safetensors are never read
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"refusing model directory {directory}: {pickles[0]} is a pickle payload and there "
            "are no safetensors weights; xmodal loads weights only from safetensors. Convert it "
            "on a machine you trust (transformers: from_pretrained(..., use_safetensors=False) "
            "then save_pretrained(...), which writes model.safetensors)."
        )
    raise ModelLoadError(f"{directory}: no *.safetensors weights in this model folder")


def load_hf_dual_encoder(source: str, fusion: str = "cross"):
    """Model and processor from a transformers dual encoder's folder or hub id."""
    from transformers import AutoConfig, AutoModel

    directory = Path(source)
    local = directory.is_dir()
    if local:
        check_supported(folder_model_type(directory) or "", source)
        refuse_pickle_only(directory)
    try:
        hf_config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{source!r} is neither a preset, a model folder nor a reachable hub id "
            f"({str(exc).splitlines()[0][:200]}); give a preset, a folder, hf:<hub id> or "
            "open_clip:<name>"
        ) from None
    check_supported(hf_config.model_type, source)
    try:
        hf_model = AutoModel.from_pretrained(
            source, local_files_only=local, use_safetensors=True, dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{source}: cannot load its weights from safetensors ({str(exc).splitlines()[0][:200]}"
            "); pickle-only checkpoints are refused: convert them to safetensors first"
        ) from None
    model = from_hf_model(hf_model.eval(), fusion=fusion, source=source)
    processor = processor_from_hf(source, hf_model.config)
    return model, processor


def _half(module: nn.Module, attribute: str) -> nn.Module:
    """The transformer inside a ``*VisionModel`` / ``*TextModel`` wrapper (as towers keep it)."""
    inner = getattr(module, attribute, None)
    return inner if isinstance(inner, nn.Module) else module


def model_config_from_hf(hf_model: nn.Module, fusion: str = "cross", source: str = "") -> dict:
    """The xmodal :class:`ModelConfig` (and the parts to copy) of a transformers dual encoder."""
    model_type = hf_model.config.model_type
    check_supported(model_type, source or type(hf_model).__name__)
    vision = _half(hf_model.vision_model, "vision_model")
    text = _half(hf_model.text_model, "text_model")
    siglip = model_type == "siglip"
    if siglip:
        embed_dim, projection = vision.config.hidden_size, "none"
    else:
        embed_dim, projection = hf_model.config.projection_dim, "linear_no_bias"
    pooling = "cls" if model_type == "chinese_clip" else "pooler"
    config = ModelConfig(
        image=ImageTowerConfig(
            kind="hf", name=source or model_type, pretrained=False, hf_config=hf_config_dict(vision)
        ),
        text=TextTowerConfig(
            name=source or model_type,
            package=None,
            pretrained=False,
            pooling=pooling,
            hf_config=hf_config_dict(text),
            use_attention_mask=not siglip,
        ),
        fusion=FusionConfig(kind=fusion, layers=2, heads=_heads(embed_dim)),
        embed_dim=embed_dim,
        projection=projection,
    )
    return {"config": config, "vision": vision, "text": text}


def _heads(dim: int) -> int:
    """Fusion heads for a new fusion on top: 8 when they divide the width, else fewer."""
    return next(h for h in (8, 4, 2, 1) if dim % h == 0)


@torch.no_grad()
def from_hf_model(hf_model: nn.Module, fusion: str = "cross", source: str = "") -> CrossModalModel:
    """A :class:`CrossModalModel` holding a transformers dual encoder's weights (copied)."""
    parts = model_config_from_hf(hf_model, fusion, source)
    config: ModelConfig = parts["config"]
    # Seeded, so the new fusion layers are the same in every process (extract, then serve).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CrossModalModel(config)
    model.image_tower.model.load_state_dict(parts["vision"].state_dict())
    missing, unexpected = model.text_tower.model.load_state_dict(
        parts["text"].state_dict(), strict=False
    )
    # ChineseCLIP's text model has no BERT pooler; the rebuilt one has (unused, frozen).
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise ModelLoadError(f"{source}: text weights do not fit ({missing[:3]} {unexpected[:3]})")
    if config.projection != "none":
        model.image_proj.weight.copy_(hf_model.visual_projection.weight)
        model.text_proj.weight.copy_(hf_model.text_projection.weight)
    scale = hf_model.logit_scale.detach().reshape(())
    if config.projection == "none":  # SigLIP: its sigmoid loss's scale and bias
        model.siglip_logit_scale.copy_(scale)
        model.siglip_logit_bias.copy_(hf_model.logit_bias.detach().reshape(()))
        # trained SigLIP scales can sit above the default ceiling (about 117 for the released
        # base models): raise the ceiling so neither the forward pass nor training clips them
        model.config.max_siglip_scale = max(config.max_siglip_scale, float(scale.exp()))
    else:
        model.logit_scale.copy_(scale)
        model.config.max_logit_scale = max(config.max_logit_scale, float(scale.exp()))
    return model.eval()


def processor_from_hf(source: str, hf_config: Any) -> Any:
    """A :class:`MultimodalProcessor` with the checkpoint's own preprocessing and tokenizer."""
    from transformers import AutoImageProcessor

    from xmodal.processing import MultimodalProcessor, load_tokenizer

    local = Path(source).is_dir()
    try:
        # Its settings as data; xmodal resizes with PIL as the PIL backend does.
        image_processor = AutoImageProcessor.from_pretrained(
            source, local_files_only=local, backend="pil"
        )
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{source}: no usable image processor or tokenizer config "
            f"({str(exc).splitlines()[0][:200]})"
        ) from None
    text_config = hf_config.text_config
    positions = int(getattr(text_config, "max_position_embeddings", 512))
    config = processor_config_from_hf(image_processor, source)
    config.tokenizer = source
    if hf_config.model_type == "siglip":  # trained on captions padded to a fixed length
        config.padding, config.max_length = "max_length", positions
    else:
        limit = getattr(tokenizer, "model_max_length", positions) or positions
        config.padding, config.max_length = "longest", min(int(limit), positions)
    return MultimodalProcessor(config, tokenizer)


def processor_config_from_hf(image_processor: Any, source: str = "") -> ProcessorConfig:
    """Resize, crop, interpolation and mean/std of a transformers image processor."""

    def get(name: str, default: Any = None) -> Any:
        value = getattr(image_processor, name, default)
        return default if value is None else value

    def unsupported(what: str) -> ModelLoadError:
        return ModelLoadError(f"{source}: image preprocessing not supported by xmodal: {what}")

    size = dict(get("size", {}) or {})
    crop = dict(get("crop_size", {}) or {}) if get("do_center_crop", False) else {}
    if crop and crop.get("height") != crop.get("width"):
        raise unsupported(f"non-square crop {crop}")
    if not get("do_resize", True):
        raise unsupported("no resize")
    if size.get("shortest_edge") and not size.get("longest_edge"):
        if not crop:
            raise unsupported("a shortest-edge resize without a square centre crop")
        resize, resize_size, image_size = "shorter", int(size["shortest_edge"]), int(crop["height"])
    elif size.get("height") and size.get("height") == size.get("width"):
        side = int(size["height"])
        if crop and int(crop["height"]) != side:
            raise unsupported(f"a {side} px square resize followed by a {crop['height']} px crop")
        resize, resize_size, image_size = "squash", None, side
    else:
        raise unsupported(f"resize size {size}")
    if get("do_rescale", True) and abs(float(get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise unsupported(f"rescale factor {get('rescale_factor')}")
    if get("do_normalize", True):
        mean = tuple(float(v) for v in get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(v) for v in get("image_std", (0.5, 0.5, 0.5)))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = get("resample", 2)
    try:
        interpolation = RESAMPLE_NAMES[int(resample)]
    except (TypeError, ValueError, KeyError):
        interpolation = str(getattr(resample, "name", resample)).lower()
    if interpolation not in RESAMPLE_NAMES.values():
        raise unsupported(f"interpolation {resample!r}")
    return ProcessorConfig(
        image_size=image_size,
        resize=resize,
        resize_size=resize_size,
        interpolation=interpolation,
        mean=mean,
        std=std,
        reducing_gap=None,
        resize_rounding="floor",
    )
