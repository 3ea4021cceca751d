"""A new model from any transformers vision backbone and text encoder (folders or hub ids), as
the training config's ``model: {image: ..., text: ...}`` builds one."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from xmodal.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConfigError,
    FusionConfig,
    ImageTowerConfig,
    ModelConfig,
    ProcessorConfig,
    TextTowerConfig,
)
from xmodal.models.aligned import RESAMPLE_NAMES
from xmodal.models.model import CrossModalModel
from xmodal.processing import MultimodalProcessor, load_tokenizer

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
TEXT_POOLINGS = ("mean", "cls", "eos")
FUSIONS = ("cross", "pooled", "none")
MIN_VOCABULARY = 100  # fewer tokens: no real tokenizer files were found


def assemble(
    image: str | Path,
    text: str | Path,
    *,
    text_pooling: str = "mean",
    embed_dim: int = 512,
    fusion: str = "cross",
    fusion_layers: int | None = None,
    pretrained: bool = True,
    where: str = "model",
) -> tuple[CrossModalModel, MultimodalProcessor]:
    """A new model from any transformers vision backbone and any text encoder.

    ``image`` / ``text``: a local folder (``save_pretrained`` output, safetensors weights) or a
    hub id. The towers keep their pretrained weights; projections, fusion (``cross``,
    ``pooled`` or ``none``) and the ITM head are new. The processor follows the image
    backbone's own ``preprocessor_config.json`` when it has one (else 224 px, shorter side to
    256, ImageNet mean/std) and the text encoder's tokenizer. ``pretrained=False`` builds the
    towers' architectures with random weights. ``where`` prefixes the keys named in errors.

    Raises ConfigError naming ``<where>.image`` / ``<where>.text`` (or the option) when a name
    cannot be built: folder missing, not a vision / text model, no weights, hub unreachable.
    """
    if text_pooling not in TEXT_POOLINGS:
        raise ConfigError(
            f"{where}.text_pooling must be one of {list(TEXT_POOLINGS)}, got {text_pooling!r}"
        )
    if fusion not in FUSIONS:
        raise ConfigError(f"{where}.fusion must be one of {list(FUSIONS)}, got {fusion!r}")
    image_name = _check_tower(str(image), "pixel_values", "a vision", f"{where}.image", pretrained)
    text_name = _check_tower(str(text), "input_ids", "a text", f"{where}.text", pretrained)
    tokenizer = _tower_tokenizer(text_name, f"{where}.text")
    text_hf = _hf_config(text_name)
    model_config = ModelConfig(
        image=ImageTowerConfig(kind="hf", name=image_name, pretrained=pretrained),
        text=TextTowerConfig(
            name=text_name, package=None, pretrained=pretrained, pooling=text_pooling
        ),
        fusion=FusionConfig(
            kind=fusion,  # type: ignore[arg-type]  # "none": a dual encoder (models that allow it)
            layers=fusion_layers or (2 if fusion == "cross" else 1),
            heads=8,
        ),
        embed_dim=embed_dim,
    )
    try:
        model_config.validate()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    processor_config = ProcessorConfig(
        **image_processor_options(_image_processor_config(image_name), f"{where}.image"),
        tokenizer=text_name,
        padding="longest",
        max_length=_max_text_length(tokenizer, text_hf),
    )
    processor_config.validate()
    try:
        model = CrossModalModel(model_config)
    except (OSError, ValueError) as err:  # weights that do not load into the architecture
        raise ConfigError(
            f"{where}: cannot build the model from {image_name!r} and {text_name!r}: "
            f"{_first_line(err)}"
        ) from None
    return model, MultimodalProcessor(processor_config, tokenizer)


def image_processor_options(data: dict[str, Any] | None, key: str = "image") -> dict[str, Any]:
    """ProcessorConfig image fields from a transformers image processor config (or defaults).

    ``size: {shortest_edge}`` (+ ``crop_size``) resizes the shorter side then centre-crops;
    ``size: {height, width}`` without a crop squashes; ConvNeXt's ``crop_pct`` resizes to
    ``shortest_edge / crop_pct`` first; ``resample`` is PIL's filter code (bilinear if unknown).
    """
    if data is None:
        return {
            "image_size": 224,
            "resize": "shorter",
            "resize_size": 256,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }
    size = _square(data.get("size", 224), f"{key} {IMAGE_PROCESSOR_FILE} size")
    crop = data.get("crop_size")
    do_crop = bool(data.get("do_center_crop", crop is not None)) and crop is not None
    shortest = isinstance(data.get("size"), dict) and "shortest_edge" in data["size"]
    if "crop_pct" in data and shortest and data.get("crop_pct") and size < 384:
        options = {"resize": "shorter", "resize_size": int(size / data["crop_pct"])}
        options["image_size"] = size
    elif do_crop:
        crop_size = _square(crop, f"{key} {IMAGE_PROCESSOR_FILE} crop_size")
        options = {"resize": "shorter", "resize_size": max(size, crop_size)}
        options["image_size"] = crop_size
    elif shortest:
        options = {"resize": "shorter", "resize_size": size, "image_size": size}
    else:
        options = {"resize": "squash", "resize_size": None, "image_size": size}
    normalise = data.get("do_normalize", True)
    options["mean"] = tuple(data.get("image_mean") or IMAGENET_MEAN) if normalise else (0, 0, 0)
    options["std"] = tuple(data.get("image_std") or IMAGENET_STD) if normalise else (1, 1, 1)
    options["interpolation"] = RESAMPLE_NAMES.get(data.get("resample", 2), "bilinear")
    return options


def _square(size: Any, what: str) -> int:
    """One side length from a transformers size (int, shortest_edge, or height == width)."""
    if isinstance(size, int) and size > 0:
        return size
    if isinstance(size, dict):
        if isinstance(size.get("shortest_edge"), int):
            return size["shortest_edge"]
        if size.get("height") == size.get("width") and isinstance(size.get("height"), int):
            return size["height"]
    raise ConfigError(f"{what}: only square sizes are supported, got {size!r}")


def _check_tower(name: str, input_name: str, kind: str, key: str, pretrained: bool) -> str:
    """The tower's folder (absolute) or hub id, after checking that it is ``kind`` model."""
    path = Path(name).expanduser()
    local = path.is_dir()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not local:
        raise ConfigError(f"{key}: folder {name!r} not found")
    if not name:
        raise ConfigError(f"{key} must not be empty")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path) if local else name, local_files_only=local)
    except (OSError, ValueError, KeyError) as err:
        where = f"folder {name!r}" if local else f"{name!r} (not a folder; from the hub)"
        raise ConfigError(
            f"{key}: cannot load a transformers config from {where}: {_first_line(err)}"
        ) from None
    model_class = _auto_model_class(config)
    accepts = inspect.signature(model_class.forward).parameters if model_class else {}
    if input_name not in accepts:
        raise ConfigError(
            f"{key}: {name!r} is a {config.model_type!r} model, not {kind} model "
            f"(its forward takes no {input_name})"
        )
    if local and pretrained and not any(path.glob("*.safetensors")):
        raise ConfigError(
            f"{key}: folder {name!r} has no safetensors weights; save the model there with "
            "save_pretrained() (safetensors is the default)"
        )
    return str(path.resolve()) if local else name


def _auto_model_class(config: Any) -> type | None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES.get(config.model_type)
    if isinstance(name, tuple | list):
        name = name[0]
    return getattr(transformers, name, None) if name else None


def _hf_config(name: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, local_files_only=Path(name).is_dir())


def _tower_tokenizer(name: str, key: str) -> Any:
    """The text encoder's tokenizer; refused when the folder has none (transformers would
    otherwise build an empty vocabulary that maps every word to [UNK])."""
    hint = "; save the text encoder's tokenizer with it (tokenizer.save_pretrained(folder))"
    try:
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(
            f"{key}: no tokenizer could be loaded from {name!r}: {_first_line(err)}{hint}"
        ) from None
    if len(tokenizer) < MIN_VOCABULARY:
        raise ConfigError(
            f"{key}: no tokenizer could be loaded from {name!r}: its vocabulary has only "
            f"{len(tokenizer)} tokens{hint}"
        )
    return tokenizer


def _image_processor_config(name: str) -> dict[str, Any] | None:
    """The image backbone's ``preprocessor_config.json`` as data, or None when it has none."""
    path = Path(name) / IMAGE_PROCESSOR_FILE
    if not Path(name).is_dir():
        try:
            from transformers.utils import cached_file

            found = cached_file(
                name, IMAGE_PROCESSOR_FILE, _raise_exceptions_for_missing_entries=False
            )
        except OSError:
            found = None
        if not found:
            return None
        path = Path(found)
    elif not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    return data if isinstance(data, dict) else None


def _max_text_length(tokenizer: Any, text_config: Any, cap: int = 128) -> int:
    """Truncation length: 128 tokens, or less when the encoder or tokenizer allows less."""
    limits = [cap, getattr(text_config, "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    return min(int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
