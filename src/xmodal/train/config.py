"""The training run's configuration: plain, typed, validated data read from YAML.

Every field is documented here; ``configs/*.yaml`` are ready examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from xmodal.config import (
    ConfigError,
    ModelConfig,
    check_caption_template,
    coerce_key,
    from_dict,
    load_yaml_or_json,
    with_keys,
)
from xmodal.data.datasets import DatasetFormat
from xmodal.runtime import Precision


@dataclass
class DataSection:
    """train: dataset file/folder (any format ``xmodal.data.load_dataset`` reads).
    val: optional held-out dataset for retrieval recall during training.
    format: force a reader (``jsonl``, ``csv``, ``coco``, ``karpathy``, ``folder``, ``tar``).
    skip_bad: leave out unusable rows and undecodable images (with their captions) instead of
        stopping; they are listed in ``errors.jsonl`` in ``out_dir`` and counted in the log.
    caption_template: applied to every caption, e.g. ``"an emoji of {}"``; saved with the model
        (in its processor config), so evaluation and search use it too.
    num_workers: DataLoader processes decoding images (0 = in the main process).
    """

    train: str = ""
    val: str | None = None
    format: DatasetFormat | None = None
    skip_bad: bool = False
    caption_template: str = "{}"
    num_workers: int = 1

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("data.train is required (a dataset file or folder)")
        check_caption_template(self.caption_template, "data.caption_template")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")


DEFAULT_MODEL = "offline-default"


@dataclass
class ModelSection:
    """The model to train: a whole model by ``name``, or a new one from two towers.

    name: a preset (``offline-default``, ``seed``), a saved model directory to fine-tune, or
        an aligned dual encoder (a transformers CLIP / SigLIP / ChineseCLIP /
        VisionTextDualEncoder folder or ``hf:<hub id>``, or ``open_clip:<name>``): training
        then starts from its alignment (its projections and logit scale). Default:
        ``offline-default`` when neither ``name`` nor ``image``/``text`` is given.
    image / text: assemble a NEW model from any transformers vision backbone and any text
        encoder, each a local folder (relative to the config file) or a hub id; both needed,
        and not together with ``name``. The processor follows the image backbone's
        ``preprocessor_config.json`` and the text encoder's tokenizer
        (:func:`xmodal.presets.assemble`).
    text_pooling: with image/text, how the text tower pools: ``mean``, ``cls`` or ``eos`` (the
        last real token, for CLIP-style causal encoders). Default ``mean``.
    fusion: ``cross``, ``pooled`` or ``none`` (a pure dual encoder, no ITM head): the fusion
        of an assembled model, or a fresh fusion replacing a named model's (None keeps the
        model's; new fusion layers on an aligned model: ``cross``).
    lock_image / lock_text: freeze a tower (locked-image or locked-text tuning).
    text_trainable_layers: with an unlocked text tower, train only its last N layers (None: all).
    cache_image_features: with a locked image tower, run it once per image and train from the
        cached outputs (much faster; augmentation only through ``cached_views``).
    cached_views: with a cached locked image tower, how many views of each training image to
        cache (1 = the image as evaluation sees it). View 0 is that image; the others are
        seeded augmentations (random resized crop, colour jitter, greyscale, blur, and a
        mirror with probability ``experimental.view_flip``:
        :class:`xmodal.data.augment.AugmentView`),
        the same in every run of a seed, so ``--resume`` stays exact. Every pair of a step
        reads one view drawn at random (seeded by the step's position). Costs one image tower
        pass per image and view, and that much cache memory.
    view_zoom_out: probability that an augmented view is then zoomed out: drawn at 55-90% of
        its size at a random place on a canvas of its background colour
        (:func:`xmodal.data.augment.zoom_out`), as other artists and photos frame a subject
        smaller; 0 (the default) never.
    gradient_checkpointing: recompute the towers' and fusion's activations in the backward pass:
        less peak memory for slower steps (measured in docs/performance.md, "Training").
    overrides: keys of the model's own config (:class:`xmodal.config.ModelConfig`) to change,
        dotted, e.g. ``{image.pool_levels: 7, fusion.layers: 1}``; the parts a changed key
        feeds start fresh (:data:`FRESH_ON_CHANGE`), the rest keeps its weights. The keys:
        ``image.pool_levels``: N > 1 pools the mean, max and std of the final map and of the
        N - 1 stage outputs before it (colour and local shape the final map pools away);
        cached with a locked tower like any pooled output. ``image.token_levels``: N > 1 gives
        each grid token the N - 1 stage outputs before the final map too, averaged to its
        patch (not with ``experimental.image_trainable_blocks``). ``image_projection_hidden``:
        N > 0 an MLP image projection with N hidden units, 0 a linear one. ``embed_dim``: the
        shared space's width (fresh linear projections; an assembled model: 512).
        ``fusion.layers`` (an assembled model: 2 cross / 1 pooled), ``fusion.heads``,
        ``fusion.mlp_ratio``, ``fusion.dropout``, ``fusion.grid_positions`` (a fixed code of
        each image token's place in the grid, so the ITM head can tell left from right).
    """

    name: str | None = None
    image: str | None = None
    text: str | None = None
    text_pooling: Literal["mean", "cls", "eos"] | None = None
    fusion: Literal["cross", "pooled", "none"] | None = None
    lock_image: bool = False
    lock_text: bool = False
    text_trainable_layers: int | None = None
    cache_image_features: bool = True
    cached_views: int = 1
    view_zoom_out: float = 0.0
    gradient_checkpointing: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def assembled(self) -> bool:
        """True when the model is assembled from ``image`` + ``text`` towers."""
        return self.image is not None or self.text is not None

    @property
    def source(self) -> str:
        """The whole model to load when not assembled: ``name`` or the default preset."""
        return self.name or DEFAULT_MODEL

    def validate(self) -> None:
        if self.text_trainable_layers is not None and self.text_trainable_layers < 0:
            raise ConfigError(
                f"model.text_trainable_layers must be >= 0, got {self.text_trainable_layers}"
            )
        if self.name is not None and not self.name:
            raise ConfigError("model.name must not be empty")
        if self.cached_views < 1:
            raise ConfigError(f"model.cached_views must be >= 1, got {self.cached_views}")
        if not 0 <= self.view_zoom_out <= 1:
            raise ConfigError(f"model.view_zoom_out must be in [0, 1], got {self.view_zoom_out}")
        self.overrides = checked_overrides(self.overrides)
        if self.assembled:
            if self.name is not None:
                raise ConfigError(
                    "model.name and model.image/model.text are mutually exclusive: name loads "
                    "a whole model, image + text assemble a new one from two towers"
                )
            for key in ("image", "text"):
                if not getattr(self, key):
                    other = "text" if key == "image" else "image"
                    raise ConfigError(
                        f"model.{key} is required with model.{other} (a folder or hub id)"
                    )
        elif self.text_pooling is not None:
            raise ConfigError(
                "model.text_pooling applies to a model assembled from model.image and "
                "model.text; a named model keeps its text tower's pooling"
            )


# The model-config keys ``model.overrides`` may change, and the parts of the model (weight
# name prefixes) a change makes fresh besides the fusion and ITM head, which every rebuild
# makes fresh: they read all the rest. ``fusion.kind`` is set by ``model.fusion``.
FRESH_ON_CHANGE: dict[str, tuple[str, ...]] = {
    "image.pool_levels": ("image_proj.",),  # the pooled vector is wider
    "image.token_levels": (),  # the fusion's tokens are wider
    "image_projection_hidden": ("image_proj.",),
    "embed_dim": ("image_proj.", "text_proj.", "logit_scale", "siglip_logit_"),
    "fusion.kind": (),
    "fusion.layers": (),
    "fusion.heads": (),
    "fusion.mlp_ratio": (),
    "fusion.dropout": (),
    "fusion.grid_positions": (),
}
OVERRIDABLE = tuple(key for key in FRESH_ON_CHANGE if key != "fusion.kind")


def checked_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``model.overrides`` with each value of its key's type; ConfigError naming
    ``model.overrides.<key>`` for a key that is not in :data:`OVERRIDABLE`, a value of the
    wrong type or one the model config refuses."""
    checked = {}
    for key, value in overrides.items():
        if key == "fusion.kind":
            raise ConfigError("model.overrides.fusion.kind: write model.fusion instead")
        if key not in OVERRIDABLE:
            raise ConfigError(
                f"model.overrides.{key}: not a key a run overrides; known: {list(OVERRIDABLE)}"
            )
        checked[key] = coerce_key(ModelConfig, key, value, "model.overrides")
    # Each value is checked on the default model config; whether ``embed_dim`` divides the
    # fusion's heads depends on the model loaded, checked when it is rebuilt (with_new_heads).
    base = ModelConfig()
    if "fusion.heads" not in checked:
        base.fusion.heads = 1
    try:
        with_keys(base, checked).validate()
    except ConfigError as err:
        raise ConfigError(f"model.overrides: {err}") from None
    return checked


@dataclass
class LossSection:
    """Weights of the summed loss; a weight of 0 switches a term off. (The ITM order terms
    train in their own stage: :class:`ITMStageSection`.)"""

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
    text_length_groups: the text tower runs each micro-batch as this many runs of captions of
    similar length, each padded only to its own longest (the same features to float
    rounding, so the same objective, with less padding to compute; 1: the batch at once;
    :meth:`xmodal.models.model.CrossModalModel.text_features_by_length`).
    """

    where: ClassVar[str] = "optim"
    min_steps: ClassVar[int] = 1

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
    text_length_groups: int = 4

    def validate(self) -> None:
        where = self.where
        if self.steps < self.min_steps:
            raise ConfigError(f"{where}.steps must be >= {self.min_steps}, got {self.steps}")
        for name in ("batch_size", "accum_steps", "text_length_groups"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.tower_lr < 0:
            raise ConfigError(f"{where}.lr must be > 0 and {where}.tower_lr >= 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"{where}.warmup_steps, weight_decay and grad_clip must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{where}.min_lr_ratio must be in [0, 1]")


@dataclass
class StageOptimSection(OptimSection):
    """The ITM stage's optimiser: :class:`OptimSection`'s keys with the stage's defaults.
    ``steps`` 0 runs no stage; ``batch_size`` is captions per step; AdamW with linear warm-up
    and cosine decay to ``min_lr_ratio`` x lr; ``grad_clip`` as in ``optim``. The stage trains
    only new layers (the fusion and ITM head) in one process, so ``tower_lr``,
    ``accum_steps``, ``local_loss`` and ``text_length_groups`` mean nothing there and are
    refused."""

    where: ClassVar[str] = "itm_stage.optim"
    min_steps: ClassVar[int] = 0
    unused: ClassVar[tuple[str, ...]] = (
        "tower_lr",
        "accum_steps",
        "local_loss",
        "text_length_groups",
    )

    steps: int = 0
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1

    def validate(self) -> None:
        for name in self.unused:
            if getattr(self, name) != getattr(OptimSection, name):
                raise ConfigError(
                    f"{self.where}.{name}: the ITM stage trains only the fusion and ITM head, "
                    "in one process; leave it out"
                )
        super().validate()


@dataclass
class ITMStageSection:
    """A second stage after ``optim.steps``: the fusion and ITM head train alone on the frozen
    features of the training pairs, with negatives from the whole training set
    (:mod:`xmodal.train.itm_stage`); the re-rank weight is calibrated after it.

    optim: the stage's optimiser (:class:`StageOptimSection`; ``optim.steps`` 0: no stage).
    itm / reordered / reordered_images: weights of the binary ITM term, the order term (an
        image against its caption and a reordering of it) and its image side (a caption
        against its image and the image of a training caption that reorders it).
    """

    itm: float = 1.0
    reordered: float = 0.0
    reordered_images: float = 0.0
    optim: StageOptimSection = field(default_factory=StageOptimSection)

    @property
    def steps(self) -> int:
        """The stage's optimiser steps (0: no stage)."""
        return self.optim.steps

    def validate(self) -> None:
        self.optim.validate()
        weights = {n: getattr(self, n) for n in ("itm", "reordered", "reordered_images")}
        if any(w < 0 for w in weights.values()):
            raise ConfigError(f"itm_stage weights must be >= 0, got {weights}")
        if self.steps and not any(weights.values()):
            raise ConfigError("itm_stage: give itm, reordered or reordered_images a weight > 0")


@dataclass
class ExperimentalSection:
    """Options kept for research: measured in docs/experiments.md, off (or at their measured
    value) by default; a run sets them to repeat or extend those measurements.

    view_flip: probability of a horizontal mirror in an augmented view (``model.cached_views``;
        0 keeps left and right, which matter for arrows and directional symbols).
    image_trainable_blocks: with an unlocked EfficientNet-Lite image tower, train only its last
        N MBConv blocks and its head convolution (0: the head only; None: all). With
        ``model.cache_image_features`` the frozen blocks run once per image (and view) and
        their output map is cached, so each step runs only the trained part; batch norms keep
        their ImageNet statistics (the tower stays in eval mode).
    itm_hard_negatives: in the ITM stage, each caption's negative image is drawn from its N
        most similar training images by ITC, each image's negative caption likewise.
    itm_reordered_batch: rows the ITM stage's order terms read each step, drawn from the
        captions that have a reordering (0: the listed captions of the step's batch). Such
        captions are often a small share of a dataset (6% of the emoji names); drawn apart,
        they train every step.
    cpu_reuse_memory: on a CPU, keep freed memory for reuse instead of taking fresh pages from
        the kernel for every large activation: faster steps for a higher peak (measured in
        docs/performance.md, "Training"); turn off to fit the largest batch, e.g. with gradient
        checkpointing. It applies to the whole process from then on.
    """

    view_flip: float = 0.0
    image_trainable_blocks: int | None = None
    itm_hard_negatives: int = 16
    itm_reordered_batch: int = 64
    cpu_reuse_memory: bool = True

    def validate(self) -> None:
        if not 0 <= self.view_flip <= 1:
            raise ConfigError(f"experimental.view_flip must be in [0, 1], got {self.view_flip}")
        blocks = self.image_trainable_blocks
        if blocks is not None and blocks < 0:
            raise ConfigError(f"experimental.image_trainable_blocks must be >= 0, got {blocks}")
        if self.itm_hard_negatives < 1:
            raise ConfigError(
                f"experimental.itm_hard_negatives must be >= 1, got {self.itm_hard_negatives}"
            )
        if self.itm_reordered_batch < 0:
            raise ConfigError(
                f"experimental.itm_reordered_batch must be >= 0, got {self.itm_reordered_batch}"
            )


@dataclass
class TrainConfig:
    """A whole training run.

    out_dir: where checkpoints, the final model, ``metrics.jsonl`` and ``training.png`` go.
    precision: ``auto`` (bf16 autocast on GPUs that support it and on CPUs with AVX512-BF16 or
        AMX, fp16 on older GPUs, fp32 on other CPUs), or ``fp32``, ``bf16``, ``fp16``. fp16
        trains with a dynamic gradient scaler (overflowing steps are skipped and the scale
        halves); its state is checkpointed, so resuming stays exact.
    device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    eval_every / save_every / log_every: in optimiser steps (0 = only at the end).
    rerank_k: with an ITM head and a ``data.val`` set, each validation re-ranks the ITC top
        ``rerank_k`` and calibrates the re-rank weight saved with the model
        (``fusion.rerank_weight``, :mod:`xmodal.evaluate.rerank`); 0 leaves it uncalibrated.
    experimental: options kept for research (:class:`ExperimentalSection`).
    """

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    itm_stage: ITMStageSection = field(default_factory=ITMStageSection)
    out_dir: str = "runs/xmodal"
    seed: int = 0
    precision: Precision = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    rerank_k: int = 16
    experimental: ExperimentalSection = field(default_factory=ExperimentalSection)

    @property
    def image_cached(self) -> bool:
        """Whether training reads cached image tower outputs (of the whole locked tower, or of
        the frozen blocks before ``experimental.image_trainable_blocks``) instead of decoding
        images."""
        blocks = self.experimental.image_trainable_blocks
        locked = self.model.lock_image or blocks is not None
        return self.model.cache_image_features and locked

    def validate(self) -> None:
        for section in (
            self.data,
            self.model,
            self.loss,
            self.optim,
            self.itm_stage,
            self.experimental,
        ):
            section.validate()
        for name in ("eval_every", "save_every", "log_every", "rerank_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        model, blocks = self.model, self.experimental.image_trainable_blocks
        if model.lock_image and blocks is not None:
            raise ConfigError(
                "model.lock_image freezes the whole image tower; "
                "experimental.image_trainable_blocks trains its last blocks: set one of them"
            )
        if model.overrides.get("image.token_levels", 1) != 1 and blocks is not None:
            raise ConfigError(
                "model.overrides.image.token_levels > 1 needs the whole image tower run at "
                "once; it does not combine with experimental.image_trainable_blocks"
            )
        if model.cached_views > 1 and not self.image_cached:
            raise ConfigError(
                "model.cached_views > 1 needs cached image tower outputs (model.lock_image: "
                "true or experimental.image_trainable_blocks, and model.cache_image_features: "
                "true)"
            )


@dataclass(frozen=True)
class Retired:
    """A key a training config no longer takes: ``note`` says what to write instead or why it
    went; ``default`` is the value that left it off (a run saved with it resumes)."""

    default: Any
    note: str


# Options tried and not adopted (docs/experiments.md, "Options removed").
RETIRED: dict[str, Retired] = {
    "model.view_redraw": Retired(0.0, "removed (redrawn views cost in-style recall)"),
    "loss.itm_rerank": Retired(0.0, "removed (not adopted); itm_stage trains the ITM head"),
    "loss.itm_rerank_k": Retired(8, "removed with loss.itm_rerank (not adopted)"),
    "loss.itm_reordered": Retired(0.0, "removed (superseded): use itm_stage.reordered"),
    "optim.neighbour_share": Retired(0.0, "removed (hard-negative batches measured worse)"),
    "itm_stage.views": Retired(1, "removed (more views measured worse): the stage reads view 0"),
    "itm_stage.head_from_similarity": Retired(False, "removed (not adopted, docs/experiments.md)"),
    "itm_stage.random_negatives": Retired(0.0, "removed (not adopted, docs/experiments.md)"),
}

# Keys that moved: old key -> (the section it lives in now, its key there). A value of None in
# a ``model.overrides`` move meant "keep the model's", which is leaving the key out now.
MOVED: dict[str, tuple[str, str]] = {
    "model.image_pool_levels": ("model.overrides", "image.pool_levels"),
    "model.image_token_levels": ("model.overrides", "image.token_levels"),
    "model.image_projection_hidden": ("model.overrides", "image_projection_hidden"),
    "model.fusion_layers": ("model.overrides", "fusion.layers"),
    "model.fusion_grid_positions": ("model.overrides", "fusion.grid_positions"),
    "model.embed_dim": ("model.overrides", "embed_dim"),
    "model.view_flip": ("experimental", "view_flip"),
    "model.image_trainable_blocks": ("experimental", "image_trainable_blocks"),
    "itm_stage.hard_negatives": ("experimental", "itm_hard_negatives"),
    "itm_stage.reordered_batch": ("experimental", "itm_reordered_batch"),
    "cpu_reuse_memory": ("experimental", "cpu_reuse_memory"),
    **{
        f"itm_stage.{name}": ("itm_stage.optim", name)
        for name in ("steps", "batch_size", "lr", "warmup_steps", "weight_decay")
    },
}


def _lookup(data: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(found, value) of a one- or two-part dotted ``key`` in a config as read."""
    section, _, name = key.rpartition(".")
    values = data.get(section) if section else data
    if isinstance(values, dict) and name in values:
        return True, values[name]
    return False, None


def check_retired(data: dict[str, Any]) -> None:
    """ConfigError naming the first key of ``data`` (a config as read) that :data:`RETIRED`
    lists, with what to write instead, or that :data:`MOVED` lists, with where it went."""
    for key, retired in RETIRED.items():
        if _lookup(data, key)[0]:
            raise ConfigError(f"{key}: {retired.note}")
    for key, (section, name) in MOVED.items():
        found, value = _lookup(data, key)
        if found:
            shown = "N" if value is None else json.dumps(value)
            raise ConfigError(f"{key} moved: write {section}: {{{name}: {shown}}}")


def merge(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set the values of the nested dict ``overrides`` in ``data``, section by section."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merge(data[key], value)
        else:
            data[key] = value


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML training config; ``overrides`` (nested dict) replace values before checks."""
    data = load_yaml_or_json(path)
    merge(data, overrides or {})
    check_retired(data)
    config = from_dict(TrainConfig, data)
    _resolve_paths(config, Path(path).parent)
    return config


def _resolve_paths(config: TrainConfig, base: Path) -> None:
    """Dataset and tower folder paths in a config file are relative to that file's folder
    (a tower written ``./x`` or ``../x`` always is: it names a folder, never a hub id)."""
    for section, name in (
        ("data", "train"),
        ("data", "val"),
        ("model", "image"),
        ("model", "text"),
    ):
        part = getattr(config, section)
        value = getattr(part, name)
        if not value or Path(value).is_absolute():
            continue
        explicit = section == "model" and value.startswith(("./", "../"))
        if explicit or (base / value).exists():
            setattr(part, name, str(base / value))
