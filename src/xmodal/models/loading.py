"""What a model name means: a preset, a folder saved by xmodal, an aligned transformers
checkpoint (folder or hub id) or an OpenCLIP model, each tried in that order by
:func:`load_model`."""

from __future__ import annotations

import re
from pathlib import Path

from xmodal.errors import MissingFileError, ModelLoadError
from xmodal.models.aligned import HF_PREFIX, folder_model_type, load_hf_dual_encoder
from xmodal.models.model import CONFIG_NAME, CrossModalModel
from xmodal.models.presets import PRESETS, preset_model
from xmodal.processing import MultimodalProcessor

OPEN_CLIP_PREFIX = "open_clip:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    if name in PRESETS:
        return preset_model(name, pretrained=pretrained, fusion=fusion)
    if _looks_like_hub_id(name):
        return load_hf_dual_encoder(name, fusion=fusion or "cross")
    raise ModelLoadError(
        f"{name!r} is not a model: no such folder, unknown preset (choose one of "
        f"{sorted(PRESETS)}), and not a hub id; give a preset, a model folder, "
        "hf:<hub id> or open_clip:<name>"
    )


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` (a relative path that does not exist here reads the same: the hub is
    asked, and the error says it is neither)."""
    return bool(_HUB_ID.match(name)) and ".." not in name
