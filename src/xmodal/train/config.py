"""The training run's configuration: plain, typed, validated data read from YAML.

Every field is documented here; ``configs/*.yaml`` are ready examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from xmodal.config import ConfigError, from_dict, load_yaml_or_json


@dataclass
class DataSection:
    """train: dataset file/folder (any format ``xmodal.data.load_dataset`` reads).
    val: optional held-out dataset for retrieval recall during training.
    format: force a reader (``jsonl``, ``csv``, ``coco``, ``karpathy``, ``folder``, ``tar``).
    skip_bad: skip unreadable rows (reported and counted) instead of stopping.
    caption_template: applied to every caption, e.g. ``"an emoji of {}"``; saved with the model
        (in its processor config), so evaluation and search use it too.
    num_workers: DataLoader processes decoding images (0 = in the main process).
    """

    train: str = ""
    val: str | None = None
    format: str | None = None
    skip_bad: bool = False
    caption_template: str = "{}"
    num_workers: int = 1

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("data.train is required (a dataset file or folder)")
        if self.caption_template.count("{}") != 1:
            raise ConfigError("data.caption_template must contain exactly one '{}'")
        try:
            self.caption_template.format("")
        except (IndexError, KeyError, ValueError) as err:
            raise ConfigError(f"data.caption_template is not a valid template: {err}") from None
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")


@dataclass
class ModelSection:
    """name: a preset (``offline-default``, ``seed``), a saved model directory to fine-tune, or
        an aligned dual encoder (a transformers CLIP / SigLIP / ChineseCLIP /
        VisionTextDualEncoder folder or ``hf:<hub id>``, or ``open_clip:<name>``): training
        then starts from its alignment (its projections and logit scale).
    fusion: ``cross``, ``pooled`` or ``none`` (a pure dual encoder, no ITM head); None keeps
        the model's (new fusion layers on an aligned model: ``cross``).
    lock_image / lock_text: freeze a tower (locked-image or locked-text tuning).
    text_trainable_layers: with an unlocked text tower, train only its last N layers (None: all).
    cache_image_features: with a locked image tower, run it once per image and train from the
        cached outputs (much faster; no image augmentation then).
    fusion_layers / embed_dim: override the preset's values for a new model (None: keep).
    gradient_checkpointing: recompute the towers' and fusion's activations in the backward pass
        (a full fine-tune at 224 px on a CPU: 32-40% less peak memory for 1.1-1.6x the step
        time; docs/performance.md).
    """

    name: str = "offline-default"
    lock_image: bool = False
    lock_text: bool = False
    text_trainable_layers: int | None = None
    cache_image_features: bool = True
    fusion_layers: int | None = None
    embed_dim: int | None = None
    fusion: Literal["cross", "pooled", "none"] | None = None
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if self.text_trainable_layers is not None and self.text_trainable_layers < 0:
            raise ConfigError("model.text_trainable_layers must be >= 0")
        for name in ("fusion_layers", "embed_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name} must be positive, got {value}")


@dataclass
class LossSection:
    """Weights of the summed loss; a weight of 0 switches a term off."""

    infonce: float = 1.0
    siglip: float = 0.0
    itm: float = 1.0
    cosine: float = 0.0

    def validate(self) -> None:
        weights = (self.infonce, self.siglip, self.itm, self.cosine)
        if any(w < 0 for w in weights):
            raise ConfigError("loss weights must be >= 0")
        if not any(w > 0 for w in weights):
            raise ConfigError("at least one loss weight must be > 0")


@dataclass
class OptimSection:
    """steps: optimiser steps in total. batch_size: pairs per micro-batch on each rank;
    accum_steps micro-batches make one step, so a step trains on a global batch of
    batch_size x accum_steps x ranks pairs, every pair scored against all the others (the
    loss is that of the global batch however it is split). lr: peak learning rate of new
    layers; tower_lr: of the pretrained towers (and of an aligned model's projections).
    warmup_steps: linear warm-up, then cosine decay to ``min_lr_ratio`` x lr. weight_decay:
    AdamW decay (never on norms, biases, embeddings or logit scales). grad_clip: max global
    gradient norm (0 = off).
    local_loss: under torchrun, each rank scores only its own pairs' rows of the contrastive
    similarity (O(local x global) instead of O(global^2) memory); same loss and gradient.
    """

    steps: int = 1000
    batch_size: int = 64
    accum_steps: int = 1
    lr: float = 1e-3
    tower_lr: float = 2e-5
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    local_loss: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "accum_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"optim.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.tower_lr < 0:
            raise ConfigError("optim.lr must be > 0 and optim.tower_lr >= 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, weight_decay and grad_clip must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio must be in [0, 1]")


@dataclass
class TrainConfig:
    """A whole training run.

    out_dir: where checkpoints, the final model, ``metrics.jsonl`` and ``training.png`` go.
    precision: ``auto`` (bf16 autocast on GPUs that support it, fp16 on older GPUs, fp32 on
        CPUs without bf16 hardware), or ``fp32``, ``bf16``, ``fp16``.
    device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    cpu_reuse_memory: on a CPU, keep freed memory for reuse instead of taking fresh pages from
        the kernel for every large activation (1.1-1.6x faster steps here, but a 10-50% higher
        peak; turn off to fit the largest batch, e.g. with gradient checkpointing). It applies to
        the whole process from then on.
    eval_every / save_every / log_every: in optimiser steps (0 = only at the end).
    """

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    out_dir: str = "runs/xmodal"
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_reuse_memory: bool = True
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10

    def validate(self) -> None:
        for section in (self.data, self.model, self.loss, self.optim):
            section.validate()
        for name in ("eval_every", "save_every", "log_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML training config; ``overrides`` (nested dict) replace values before checks."""
    data = load_yaml_or_json(path)
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    config = from_dict(TrainConfig, data)
    _resolve_paths(config, Path(path).parent)
    return config


def _resolve_paths(config: TrainConfig, base: Path) -> None:
    """Dataset paths in a config file are relative to that file's folder."""
    for name in ("train", "val"):
        value = getattr(config.data, name)
        if value and not Path(value).is_absolute() and (base / value).exists():
            setattr(config.data, name, str(base / value))
