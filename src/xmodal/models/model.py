"""CrossModalModel: two towers, projections into a shared space, fusion and an ITM head.

``CrossModalExtractor`` (the name in the project's original design, README) is an alias; that
design is this model with the ``pooled`` fusion (the ``seed`` preset).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from xmodal.atomic import atomic_path, atomic_write_text, make_dir
from xmodal.config import ConfigError, ModelConfig, from_dict, load_json_config, to_dict
from xmodal.errors import (
    IncompatibleError,
    InputError,
    MissingFileError,
    ModelLoadError,
    XmodalError,
)
from xmodal.models.fusion import CrossAttentionFusion, PooledFusion
from xmodal.models.image import build_image_tower
from xmodal.models.text import HFTextTower
from xmodal.models.towers import TowerOutput

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
XMODAL_LIBRARY = "xmodal"  # config.json's "library" in a directory saved by xmodal
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class Features:
    """One modality's features for a batch.

    embeds: (B, D) L2-normalised embeddings in the shared space (the retrieval contract).
    projected: (B, D) the same before normalisation (the ``pooled`` fusion's input).
    tokens: (B, T, D_tower) tower tokens (the cross-attention fusion input).
    mask: (B, T) 1 for real tokens, or None.
    """

    embeds: torch.Tensor
    projected: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor | None = None

    def index(self, idx: torch.Tensor) -> Features:
        """The rows ``idx`` of every field (e.g. to pair images with negative captions)."""
        return Features(
            self.embeds[idx],
            self.projected[idx],
            self.tokens[idx],
            None if self.mask is None else self.mask[idx],
        )


@dataclass
class CrossModalOutput:
    """What ``CrossModalModel.forward`` returns for a batch of aligned (image, caption) pairs."""

    image_embeds: torch.Tensor  # (B, D) normalised
    text_embeds: torch.Tensor  # (B, D) normalised
    fused_embeds: torch.Tensor | None  # (B, D) fused vector of each pair; None: no fusion
    logits_per_text: torch.Tensor  # (B, B) scaled similarity, row = caption
    logits_per_image: torch.Tensor  # (B, B) its transpose
    itm_logits: torch.Tensor | None  # (B, 2) [mismatch, match] per pair; None: no ITM head
    image: Features
    text: Features


class CrossModalModel(nn.Module):
    """Dual-stream image-text model with cross-modal fusion and image-text matching."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.image_tower = build_image_tower(config.image)
        self.text_tower = HFTextTower(config.text)
        dim = config.embed_dim
        self.image_proj = _projection(config, self.image_tower.output_dim, "image")
        self.text_proj = _projection(config, self.text_tower.output_dim, "text")
        fusion = config.fusion
        self.fusion: nn.Module | None
        self.itm_head: nn.Module | None
        if fusion.kind == "none":
            self.fusion = None
        elif fusion.kind == "pooled":
            self.fusion = PooledFusion(dim, fusion.heads)
        else:
            self.fusion = CrossAttentionFusion(
                self.image_tower.token_dim,  # multi-level pooling widens only the pooled vector
                self.text_tower.token_dim,  # SigLIP's pooled head may have another width
                dim,
                fusion.layers,
                fusion.heads,
                fusion.mlp_ratio,
                fusion.dropout,
                fusion.grid_positions,
            )
        # ITM reads the fused vector and the element-wise agreement of the two embeddings: the
        # head can express the contrastive similarity itself, and the fusion refines it.
        self.itm_head = None if self.fusion is None else nn.Linear(2 * dim, 2)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.init_logit_scale)))
        self.siglip_logit_scale = nn.Parameter(torch.tensor(math.log(config.init_siglip_scale)))
        self.siglip_logit_bias = nn.Parameter(torch.tensor(config.init_siglip_bias))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute tower (and fusion) activations in the backward pass: much less activation
        memory for about one more forward pass of compute. Only acts in training mode."""
        for part in (self.image_tower, self.text_tower, self.fusion):
            if part is not None and hasattr(part, "set_gradient_checkpointing"):
                part.set_gradient_checkpointing(enabled)

    # -- features -------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> Features:
        return self.image_features_from_tower(self.image_tower(pixel_values))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Features:
        return self.text_features_from_tower(self.text_tower(input_ids, attention_mask))

    def text_features_by_length(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: int
    ) -> Features:
        """:meth:`text_features` of a batch run as ``groups`` runs of similar length: the
        captions sorted by length, each run cut to its own longest caption. The same features
        to float rounding (tokens padded back to the batch's width), with far less padding to
        compute: a batch padded to its longest caption can be half padding when most captions
        are short (docs/performance.md has the figures). Falls back to one run when the tower's
        output depends on the padding (:attr:`HFTextTower.padding_free`), the padding is not on
        the right, or the batch is too small to split."""
        splittable = groups > 1 and len(input_ids) >= 2 * groups
        if not splittable or not getattr(self.text_tower, "padding_free", False):
            return self.text_features(input_ids, attention_mask)
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        runs = order.chunk(groups)
        width = attention_mask.shape[1]
        cuts = [max(1, int(lengths[rows].max())) for rows in runs]
        positions = torch.arange(width, device=attention_mask.device)
        right_padded = (positions[None, :] < lengths[:, None]) == attention_mask.bool()
        if all(cut == width for cut in cuts) or not bool(right_padded.all()):
            return self.text_features(input_ids, attention_mask)
        parts = [
            self.text_features(input_ids[rows, :cut], attention_mask[rows, :cut])
            for rows, cut in zip(runs, cuts, strict=True)
        ]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return select_rows(pad_tokens(cat_features(parts), width), inverse)

    def image_features_from_tower(self, out: TowerOutput) -> Features:
        """Project a (possibly cached) image tower output into the shared space."""
        projected = self.image_proj(out.pooled)
        return Features(F.normalize(projected, dim=-1), projected, out.tokens, out.mask)

    def text_features_from_tower(self, out: TowerOutput) -> Features:
        projected = self.text_proj(out.pooled)
        return Features(F.normalize(projected, dim=-1), projected, out.tokens, out.mask)

    def embed_image_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D_tower) pooled image tower outputs (e.g. cached or from ONNX Runtime) -> (B, D)
        L2-normalised embeddings, computed in float32."""
        return F.normalize(self.image_proj(pooled.float()), dim=-1)

    def embed_text_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D_tower) pooled text tower outputs -> (B, D) L2-normalised embeddings (float32)."""
        return F.normalize(self.text_proj(pooled.float()), dim=-1)

    @property
    def has_itm(self) -> bool:
        """Whether the model has a fusion and ITM head (``fusion.kind`` is not ``none``)."""
        return self.fusion is not None

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) L2-normalised image embeddings."""
        return self.image_features(pixel_values).embeds

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D) L2-normalised caption embeddings."""
        return self.text_features(input_ids, attention_mask).embeds

    # -- fusion and matching --------------------------------------------------------------------
    def fuse(self, image: Features, text: Features) -> torch.Tensor:
        """Fused vector (B, D) of the pairs (image[i], text[i])."""
        self._require_itm()
        if isinstance(self.fusion, PooledFusion):
            return self.fusion(image.projected, text.projected)
        return self.fusion(image.tokens, image.mask, text.tokens, text.mask)

    def itm_logits(self, image: Features, text: Features) -> torch.Tensor:
        """(B, 2) logits [mismatch, match] of the pairs (image[i], text[i])."""
        return self.itm_from_fused(self.fuse(image, text), image, text)

    def itm_pair_logits(
        self,
        image: Features,
        text: Features,
        image_rows: torch.Tensor,
        text_rows: torch.Tensor,
    ) -> torch.Tensor:
        """(P, 2) logits [mismatch, match] of the pairs (image[image_rows[p]],
        text[text_rows[p]]); equal to :meth:`itm_logits` of the selected rows, but the
        cross-attention fusion projects each image's and each caption's tokens once however
        many pairs share them."""
        self._require_itm()
        if isinstance(self.fusion, PooledFusion):
            return self.itm_logits(select_rows(image, image_rows), select_rows(text, text_rows))
        fused = self.fusion(image.tokens, image.mask, text.tokens, text.mask, image_rows, text_rows)
        agreement = image.embeds.index_select(0, image_rows) * text.embeds.index_select(
            0, text_rows
        )
        return self.itm_head(torch.cat([fused, agreement], dim=-1))

    def itm_from_fused(self, fused: torch.Tensor, image: Features, text: Features) -> torch.Tensor:
        self._require_itm()
        return self.itm_head(torch.cat([fused, image.embeds * text.embeds], dim=-1))

    def itm_score(self, image: Features, text: Features) -> torch.Tensor:
        """(B,) match logit minus mismatch logit: a pair's ITM score for re-ranking."""
        logits = self.itm_logits(image, text)
        return logits[:, 1] - logits[:, 0]

    def _require_itm(self) -> None:
        if self.fusion is None:
            raise IncompatibleError(
                "this model is a pure dual encoder (fusion: none): it has no fusion or ITM head "
                "to score pairs with; re-rank off, or load it with a fusion (e.g. fusion='cross')"
            )

    def clip_scale(self) -> torch.Tensor:
        """exp(logit_scale), at most ``max_logit_scale`` (100) as in CLIP.

        The clamp acts on the log scale: at the ceiling the gradient still flows (exp of the
        clamped parameter can round above the ceiling, where a clamp of exp would zero it).
        """
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def siglip_scale(self) -> torch.Tensor:
        """exp(siglip_logit_scale), at most ``max_siglip_scale`` (100)."""
        return self.siglip_logit_scale.clamp(max=math.log(self.config.max_siglip_scale)).exp()

    @torch.no_grad()
    def clamp_logit_scales_(self) -> None:
        """Clamp the learned log scales in place at their ceilings (ln ``max_logit_scale``,
        ln ``max_siglip_scale``), as OpenCLIP does after each optimiser step: a parameter left
        above its ceiling gets no gradient from the clamped forward and could never come back.
        """
        self.logit_scale.clamp_(max=math.log(self.config.max_logit_scale))
        self.siglip_logit_scale.clamp_(max=math.log(self.config.max_siglip_scale))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> CrossModalOutput:
        image = self.image_features(pixel_values)
        text = self.text_features(input_ids, attention_mask)
        return self.output_from_features(image, text)

    def output_from_features(self, image: Features, text: Features) -> CrossModalOutput:
        fused = self.fuse(image, text) if self.has_itm else None
        logits_per_text = self.clip_scale() * text.embeds @ image.embeds.t()
        return CrossModalOutput(
            image_embeds=image.embeds,
            text_embeds=text.embeds,
            fused_embeds=fused,
            logits_per_text=logits_per_text,
            logits_per_image=logits_per_text.t(),
            itm_logits=None if fused is None else self.itm_from_fused(fused, image, text),
            image=image,
            text=text,
        )

    # -- persistence ----------------------------------------------------------------------------
    def saved_config(self) -> ModelConfig:
        """The config with tower architectures filled in, so loading never needs the hub."""
        config = dataclasses.replace(
            self.config,
            image=dataclasses.replace(self.config.image),
            text=dataclasses.replace(self.config.text),
        )
        if hasattr(self.image_tower, "architecture"):
            config.image.hf_config = self.image_tower.architecture()
        config.text.hf_config = self.text_tower.architecture()
        return config

    def save_pretrained(self, directory: str | Path, processor=None) -> None:
        """Write ``config.json`` + ``model.safetensors`` (+ the processor) into ``directory``."""
        directory = Path(directory)
        make_dir(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "library": "xmodal"})
        data = {"model": to_dict(self.saved_config()), "library": XMODAL_LIBRARY}
        atomic_write_text(directory / CONFIG_NAME, json.dumps(data, indent=2))
        if processor is not None:
            processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> CrossModalModel:
        """Rebuild a saved model from its directory: JSON config + safetensors weights only."""
        config = load_model_config(directory)
        config.image.pretrained = False
        config.text.pretrained = False
        try:
            model = cls(config)
        except (XmodalError, ImportError):
            raise
        except Exception as exc:  # noqa: BLE001 - a tower library rejecting the architecture
            raise ConfigError(
                f"{Path(directory) / CONFIG_NAME}: cannot build the model it describes "
                f"({type(exc).__name__}: {str(exc)[:300]})"
            ) from exc
        state = load_safetensors(Path(directory) / WEIGHTS_NAME, map_location)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # tensor shapes differ from the config's
            raise ModelLoadError(
                f"{directory}: weights do not match the config ({str(exc)[:300]})"
            ) from exc
        if missing or unexpected:
            raise ModelLoadError(
                f"{directory}: weights do not match the config (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
        return model.eval()


def select_rows(features: Features, rows: torch.Tensor) -> Features:
    """The rows ``rows`` of every field, via ``index_select``: its backward sums repeated rows
    in a fixed order on CPUs (indexing's backward uses racing atomic adds on large tensors)."""
    return Features(
        features.embeds.index_select(0, rows),
        features.projected.index_select(0, rows),
        features.tokens.index_select(0, rows),
        None if features.mask is None else features.mask.index_select(0, rows),
    )


def pad_tokens(features: Features, length: int) -> Features:
    """``features`` with tokens (and mask) padded to ``length`` positions; padding is masked."""
    extra = length - features.tokens.shape[1]
    if extra <= 0:
        return features
    mask = features.mask
    if mask is None:
        tokens = features.tokens
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    return Features(
        features.embeds,
        features.projected,
        F.pad(features.tokens, (0, 0, 0, extra)),
        F.pad(mask, (0, extra)),
    )


def cat_features(parts: Sequence[Features]) -> Features:
    """Row-wise concatenation; tokens are padded (and masked) to the longest part."""
    length = max(p.tokens.shape[1] for p in parts)
    parts = [pad_tokens(p, length) for p in parts]
    masks = [p.mask for p in parts]
    known = [m for m in masks if m is not None]
    mask = None
    if known:
        mask = torch.cat(
            [
                m if m is not None else known[0].new_ones(p.tokens.shape[:2])
                for m, p in zip(masks, parts, strict=True)
            ]
        )
    return Features(
        torch.cat([p.embeds for p in parts]),
        torch.cat([p.projected for p in parts]),
        torch.cat([p.tokens for p in parts]),
        mask,
    )


def _projection(config: ModelConfig, tower_dim: int, modality: str) -> nn.Module:
    """A tower's projection into the shared space, as ``config.projection`` says."""
    if config.projection == "none":
        if tower_dim != config.embed_dim:
            raise ConfigError(
                f"projection 'none' needs the {modality} tower's width ({tower_dim}) to equal "
                f"embed_dim ({config.embed_dim})"
            )
        return nn.Identity()
    hidden = config.image_projection_hidden if modality == "image" else 0
    if hidden:
        return nn.Sequential(
            nn.Linear(tower_dim, hidden), nn.GELU(), nn.Linear(hidden, config.embed_dim)
        )
    return nn.Linear(tower_dim, config.embed_dim, bias=config.projection == "linear")


def load_model_config(directory: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` saved in a model directory (which must hold no pickle files)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise MissingFileError(f"{directory} is not a model directory: no {CONFIG_NAME}")
    refuse_pickle_payloads(directory)
    if not (directory / WEIGHTS_NAME).is_file():
        raise MissingFileError(
            f"{directory}: no {WEIGHTS_NAME} (weights load only from safetensors)"
        )
    data = load_json_config(path, "the model config")
    try:
        return from_dict(ModelConfig, data.get("model", {}), "model")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def saved_by_xmodal(directory: str | Path) -> bool:
    """Whether ``directory``'s config.json was written by xmodal (a transformers checkpoint's
    was not)."""
    data = load_json_config(Path(directory) / CONFIG_NAME, "the model config")
    return data.get("library") == XMODAL_LIBRARY


def not_saved_by_xmodal(directory: str | Path) -> str:
    """Why a re-rank weight cannot be saved into ``directory``: its config.json is not
    xmodal's (e.g. a transformers CLIP / SigLIP folder, whose loader never reads one back)."""
    return (
        f"{directory} is not a model saved by xmodal (a transformers checkpoint?): a "
        "calibrated re-rank weight is saved only into an xmodal model directory; fine-tune it "
        "with `xmodal train` (or save it with xmodal) first, or give search and serve "
        "--rerank-weight"
    )


def save_rerank_weight(directory: str | Path, weight: float | None) -> None:
    """Write a calibrated re-rank weight (``fusion.rerank_weight``) into a saved model's
    ``config.json`` (atomically); the weights and thus the model's identity are unchanged."""
    path = Path(directory) / CONFIG_NAME
    load_model_config(directory)  # a model directory with a valid config
    if not saved_by_xmodal(directory):
        raise InputError(not_saved_by_xmodal(directory))
    data = load_json_config(path, "the model config")
    data.setdefault("model", {}).setdefault("fusion", {})["rerank_weight"] = weight
    from_dict(ModelConfig, data["model"], "model").validate()
    atomic_write_text(path, json.dumps(data, indent=2))


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ModelLoadError naming it when it is not readable."""
    try:
        return load_file(str(path), device=device)
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({err})") from err


def refuse_pickle_payloads(directory: str | Path) -> None:
    """Refuse a model directory carrying pickle files (``pytorch_model.bin``, ``*.pt``, ...):
    unpickling can run arbitrary code, and xmodal loads weights only from safetensors."""
    directory = Path(directory)
    for file in sorted(directory.rglob("*")):
        if file.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelLoadError(
                f"refusing model directory {directory}: {file.relative_to(directory)} is a "
                f"pickle payload; xmodal loads weights only from safetensors ({WEIGHTS_NAME}). "
                "Remove the file or convert it to safetensors."
            )
