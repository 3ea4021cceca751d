"""The model a run trains: built or loaded, given new heads where the config asks, and with
only the parts it trains left trainable."""

from __future__ import annotations

import torch

from xmodal.config import ConfigError
from xmodal.models.model import CrossModalModel
from xmodal.presets import assemble, load_model
from xmodal.processing import MultimodalProcessor
from xmodal.train.config import ModelSection, TrainConfig


def build_model(
    config: TrainConfig, log: bool = True
) -> tuple[CrossModalModel, MultimodalProcessor]:
    """The run's model and processor: assembled from two towers or loaded, under new heads
    where ``config.model`` changes them (:func:`with_new_heads`). A model without fusion turns
    the ITM loss term off (said once when ``log``); an ITM stage needs a fusion."""
    section = config.model
    if section.assembled:
        model, processor = assemble(
            section.image,
            section.text,
            text_pooling=section.text_pooling or "mean",
            embed_dim=section.embed_dim or 512,
            fusion=section.fusion or "cross",
            fusion_layers=section.fusion_layers,
        )
    else:
        model, processor = load_model(section.source, fusion=section.fusion)
    model = with_new_heads(model, section)
    loss = config.loss
    if not model.has_itm and config.itm_stage.steps:
        raise ConfigError(
            "itm_stage trains the fusion and ITM head, and this model has none (fusion: "
            "none); set model.fusion (cross or pooled) or itm_stage.steps: 0"
        )
    if not model.has_itm and loss.itm:
        if log:
            print("the model has no fusion (fusion: none): the ITM loss terms are off")
        loss.itm = 0.0
        if not (loss.infonce or loss.siglip or loss.cosine):
            raise ConfigError(
                "loss: itm is the only loss and the model has no fusion (fusion: none); "
                "give infonce, siglip or cosine a weight > 0"
            )
    processor.config.caption_template = config.data.caption_template
    processor.config.validate()
    return model, processor


def with_new_heads(model: CrossModalModel, section: ModelSection) -> CrossModalModel:
    """The model under a fresh fusion and ITM head when ``fusion``, ``fusion_layers``,
    ``fusion_grid_positions``, ``image_token_levels`` or ``embed_dim`` change it, with a fresh
    image projection when ``image_pool_levels`` or ``image_projection_hidden`` do (else the
    model unchanged).

    The towers are kept, and in the same shared space the projections and logit scales too, so
    an aligned model keeps its alignment under a new fusion; a new ``embed_dim`` gets fresh
    projections (``linear``, trained at ``lr`` as new layers are), new pool levels a fresh
    image projection (its input is wider or narrower), a new projection shape one too.
    """
    model_config = model.config
    new_fusion = section.fusion is not None and section.fusion != model_config.fusion.kind
    new_layers = (
        section.fusion_layers is not None and section.fusion_layers != model_config.fusion.layers
    )
    positions = section.fusion_grid_positions
    new_positions = positions is not None and positions != model_config.fusion.grid_positions
    new_dim = section.embed_dim is not None and section.embed_dim != model_config.embed_dim
    token_levels = section.image_token_levels
    new_tokens = token_levels is not None and token_levels != model_config.image.token_levels
    levels = section.image_pool_levels
    new_levels = levels is not None and levels != model_config.image.pool_levels
    hidden = section.image_projection_hidden
    new_head = hidden is not None and hidden != model_config.image_projection_hidden
    changed = (new_fusion, new_layers, new_positions, new_tokens, new_dim, new_levels, new_head)
    if not any(changed):
        return model
    if new_tokens:
        model_config.image.token_levels = token_levels  # type: ignore[assignment]
    if new_levels:
        model_config.image.pool_levels = levels  # type: ignore[assignment]
    if new_head:
        model_config.image_projection_hidden = hidden  # type: ignore[assignment]
    if new_fusion:
        model_config.fusion.kind = section.fusion  # type: ignore[assignment]
    if new_layers:
        model_config.fusion.layers = section.fusion_layers  # type: ignore[assignment]
    if new_positions:
        model_config.fusion.grid_positions = positions  # type: ignore[assignment]
    if new_dim:
        model_config.embed_dim = section.embed_dim  # type: ignore[assignment]
        model_config.projection = "linear"  # not the aligned model's pretrained projections
    try:
        model_config.validate()
    except ConfigError as err:
        raise ConfigError(f"model: {err}") from None
    towers = (model.image_tower, model.text_tower)
    model_config.image.pretrained = model_config.text.pretrained = False
    model_config.image.hf_config = getattr(towers[0], "architecture", lambda: None)()
    model_config.text.hf_config = towers[1].architecture()
    fresh = CrossModalModel(model_config)
    kept: tuple[str, ...] = ("image_tower.", "text_tower.")
    if not new_dim:
        kept += ("text_proj.", "logit_scale", "siglip_logit_")
        kept += () if new_levels or new_head else ("image_proj.",)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(kept)}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(kept) for k in missing):
        raise RuntimeError(f"rebuilt model lost weights: {missing[:3]} {unexpected[:3]}")
    return fresh


def prepare_for_training(
    model: CrossModalModel, section: ModelSection, device: torch.device
) -> int | None:
    """Ready ``model`` for training on ``device``: weights calibrated for its old ITM head
    dropped (training changes the head), towers locked or partly trainable
    (:func:`configure_trainable`), gradient checkpointing as asked. Returns the first trained
    block of the image tower (``image_trainable_blocks``; its input is what is cached) or None."""
    model.config.fusion.rerank_weight = model.config.fusion.filter_weight = None
    configure_trainable(model, section)
    blocks = section.image_trainable_blocks
    start = None if blocks is None else image_suffix_start(model, blocks)
    model.set_gradient_checkpointing(section.gradient_checkpointing)
    model.to(device)
    return start


def configure_trainable(model: CrossModalModel, section: ModelSection) -> None:
    """Lock towers or train only the last layers (blocks) of a tower."""
    if section.lock_image:
        model.image_tower.requires_grad_(False)
    elif section.image_trainable_blocks is not None:
        model.image_tower.requires_grad_(False)
        start = image_suffix_start(model, section.image_trainable_blocks)
        for module in model.image_tower.suffix_modules(start):
            module.requires_grad_(True)
    if section.lock_text:
        model.text_tower.requires_grad_(False)
    elif section.text_trainable_layers is not None:
        layers = _encoder_layers(model.text_tower.model)
        model.text_tower.requires_grad_(False)
        keep = section.text_trainable_layers
        for layer in list(layers)[len(layers) - keep :] if keep else []:
            layer.requires_grad_(True)


def image_suffix_start(model: CrossModalModel, trainable_blocks: int) -> int:
    """The first block of the image tower's trained part (``model.image_trainable_blocks``)."""
    tower = model.image_tower
    if not hasattr(tower, "suffix"):
        raise ConfigError(
            "model.image_trainable_blocks needs an EfficientNet-Lite image tower "
            f"(this model's is {type(tower).__name__}); use lock_image or train it whole"
        )
    if trainable_blocks > tower.block_count:
        raise ConfigError(
            f"model.image_trainable_blocks is {trainable_blocks} but the image tower has "
            f"{tower.block_count} blocks"
        )
    return tower.block_count - trainable_blocks


def _encoder_layers(module: torch.nn.Module) -> torch.nn.ModuleList:
    encoder = getattr(module, "encoder", None)
    for name in ("layer", "layers"):
        layers = getattr(encoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ConfigError("model.text_trainable_layers: this text tower has no encoder.layer list")


def set_train_mode(model: CrossModalModel, image_eval: bool = False) -> None:
    """Train mode, except locked towers (their batch-norm statistics and dropout stay fixed)
    and, with ``image_eval``, the image tower (a partly trained one keeps its statistics)."""
    model.train()
    for tower in (model.image_tower, model.text_tower):
        if not any(p.requires_grad for p in tower.parameters()):
            tower.eval()
    if image_eval:
        model.image_tower.eval()
