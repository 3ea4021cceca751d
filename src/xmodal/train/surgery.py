"""The model a run trains: built or loaded, given new heads where the config asks, and with
only the parts it trains left trainable."""

from __future__ import annotations

import torch

from xmodal.config import ConfigError, with_keys
from xmodal.models.model import CrossModalModel
from xmodal.presets import assemble, load_model
from xmodal.processing import MultimodalProcessor
from xmodal.train.config import FRESH_ON_CHANGE, ModelSection, TrainConfig

# the parts a rebuild keeps unless a changed key makes them fresh (the towers are always kept)
KEPT_PARTS = ("image_proj.", "text_proj.", "logit_scale", "siglip_logit_")


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
            embed_dim=section.overrides.get("embed_dim", 512),
            fusion=section.fusion or "cross",
            fusion_layers=section.overrides.get("fusion.layers"),
        )
    else:
        model, processor = load_model(section.source, fusion=section.fusion)
    model = with_new_heads(model, section)
    loss = config.loss
    if not model.has_itm and config.itm_stage.optim.steps:
        raise ConfigError(
            "itm_stage trains the fusion and ITM head, and this model has none (fusion: "
            "none); set model.fusion (cross or pooled) or itm_stage.optim.steps: 0"
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
    """The model rebuilt under ``section.fusion`` and ``section.overrides`` where they change
    its config (else the model unchanged).

    The towers keep their weights, and so do the projections and logit scales unless a changed
    key makes them fresh (:data:`FRESH_ON_CHANGE`: new pool levels or a new projection shape a
    fresh image projection, a new ``embed_dim`` fresh linear projections and scales, trained
    at ``lr`` as new layers are); the fusion and ITM head are always fresh. So an aligned model
    keeps its alignment under a new fusion.
    """
    wanted = dict(section.overrides)
    if section.fusion is not None:
        wanted["fusion.kind"] = section.fusion
    changed = [key for key, value in wanted.items() if _get(model.config, key) != value]
    if not changed:
        return model
    model_config = with_keys(model.config, {key: wanted[key] for key in changed})
    if "embed_dim" in changed:
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
    made_fresh = {part for key in changed for part in FRESH_ON_CHANGE[key]}
    kept = ("image_tower.", "text_tower.") + tuple(p for p in KEPT_PARTS if p not in made_fresh)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(kept)}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(kept) for k in missing):
        raise RuntimeError(f"rebuilt model lost weights: {missing[:3]} {unexpected[:3]}")
    return fresh


def _get(config: object, key: str) -> object:
    """The value of a dotted key of a config dataclass."""
    for name in key.split("."):
        config = getattr(config, name)
    return config


def prepare_for_training(
    model: CrossModalModel, config: TrainConfig, device: torch.device
) -> int | None:
    """Ready ``model`` for training on ``device``: weights calibrated for its old ITM head
    dropped (training changes the head), towers locked or partly trainable
    (:func:`configure_trainable`), gradient checkpointing as asked. Returns the first trained
    block of the image tower (``experimental.image_trainable_blocks``; its input is what is
    cached) or None."""
    model.config.fusion.rerank_weight = model.config.fusion.filter_weight = None
    configure_trainable(model, config)
    blocks = config.experimental.image_trainable_blocks
    start = None if blocks is None else image_suffix_start(model, blocks)
    model.set_gradient_checkpointing(config.model.gradient_checkpointing)
    model.to(device)
    return start


def configure_trainable(model: CrossModalModel, config: TrainConfig) -> None:
    """Lock towers or train only the last layers (blocks) of a tower."""
    section, blocks = config.model, config.experimental.image_trainable_blocks
    if section.lock_image:
        model.image_tower.requires_grad_(False)
    elif blocks is not None:
        model.image_tower.requires_grad_(False)
        start = image_suffix_start(model, blocks)
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
    """The first block of the image tower's trained part
    (``experimental.image_trainable_blocks``)."""
    tower = model.image_tower
    if not hasattr(tower, "suffix"):
        raise ConfigError(
            "experimental.image_trainable_blocks needs an EfficientNet-Lite image tower "
            f"(this model's is {type(tower).__name__}); use lock_image or train it whole"
        )
    if trainable_blocks > tower.block_count:
        raise ConfigError(
            f"experimental.image_trainable_blocks is {trainable_blocks} but the image tower has "
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
