"""Model: batches -> float32 L2-normalised embeddings, on the fastest path measured here.

The torch backend runs images through an inference copy of the image tower (batch norm folded
into the convolutions, channels_last); captions come length-bucketed from the reader; everything
runs in inference mode, and on a CPU freed memory is reused (:mod:`xmodal.runtime`).
Options: a device (CUDA with bf16/fp16 autocast), ``torch.compile``, or the ONNX Runtime towers
(the projections into the shared space stay in torch). ``auto`` picks ONNX Runtime on a CPU when
it is installed (faster than the torch fp32 towers on CPUs; docs/performance.md has the
figures), exporting the towers once at start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
import typing
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xmodal.config import ConfigError, check_choice
from xmodal.errors import ExportError
from xmodal.models.inference import has_conv, inference_copy
from xmodal.models.model import CrossModalModel, Features
from xmodal.models.towers import TowerOutput
from xmodal.runtime import (
    Precision,
    check_device_name,
    pick_autocast,
    pick_device,
    reuse_freed_memory,
)

Backend = Literal["auto", "torch", "onnx"]
"""Where the towers run (see :class:`MapperOptions`)."""

PRECISIONS = typing.get_args(Precision)
BACKENDS = typing.get_args(Backend)

log = logging.getLogger(__name__)
FALLBACK_LINE = "backend auto: the towers run in torch, not ONNX Runtime: %s"

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Backend",
    "DeviceTimer",
    "EmbeddingMapper",
    "MapperOptions",
    "PairScores",
    "Pending",
    "filter_weight",
    "has_conv",
    "mapper_pairs",
    "score_pairs",
]


@dataclass
class MapperOptions:
    """How to run the model; typed and validated like the other configs (build it from plain
    data with ``xmodal.config.from_dict(MapperOptions, {...})``).

    device: ``auto`` (this rank's GPU when there is one, else the CPU), ``cpu``, ``cuda`` or
        ``cuda:N`` (:func:`xmodal.runtime.pick_device`).
    precision: autocast (:data:`xmodal.runtime.Precision`, :func:`xmodal.runtime.pick_autocast`).
    compile: ``torch.compile`` the towers (slow to start; pays off on long runs).
    backend: ``torch``; ``onnx`` (ONNX Runtime towers from ``onnx_dir``, see
        ``xmodal export-onnx``); ``auto``: ONNX Runtime (fp32) on a CPU when onnxruntime is
        installed and neither ``compile`` nor an explicit bf16/fp16 precision asks for torch,
        the towers exported at start (``onnx_dir`` when given); torch otherwise.
    threads: ONNX Runtime's intra-op threads (default: torch's).
    reuse_memory: on a CPU, keep freed memory for reuse instead of fresh pages from the kernel
        for every large tensor (glibc; the process keeps its peak memory until it exits).
    """

    device: str = "cpu"
    precision: Precision = "fp32"
    compile: bool = False
    backend: Backend = "torch"
    onnx_dir: str | None = None
    threads: int | None = None
    reuse_memory: bool = True

    def on_gpu(self) -> bool:
        """Whether the model runs on a GPU (decoding then gets the CPU cores)."""
        return pick_device(self.device).type == "cuda"

    def validate(self) -> None:
        check_device_name(self.device)
        check_choice("precision", self.precision, Precision)
        check_choice("backend", self.backend, Backend)
        if self.backend == "onnx" and not self.onnx_dir:
            raise ConfigError("the onnx backend needs onnx_dir (from `xmodal export-onnx`)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


def resolve_backend(options: MapperOptions, device: torch.device) -> str:
    """``torch`` or ``onnx`` for ``options.backend`` (see :class:`MapperOptions`)."""
    return _resolve_backend(options, device)[0]


def _resolve_backend(options: MapperOptions, device: torch.device) -> tuple[str, str | None]:
    """The backend and, when ``auto`` would have taken ONNX Runtime but cannot, why not."""
    if options.backend != "auto":
        return options.backend, None
    wants_torch = options.compile or options.precision in ("bf16", "fp16")
    if device.type != "cpu" or wants_torch:
        return "torch", None
    if importlib.util.find_spec("onnxruntime") is None:
        return "torch", "onnxruntime is not installed (pip install 'xmodal[onnx]')"
    return "onnx", None


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of white space as single spaces."""
    return " ".join(text.split())


class Pending:
    """Embeddings on their way to the host: on a GPU the copy runs asynchronously into pinned
    memory and :meth:`result` waits for it, so the host prepares the next batch meanwhile."""

    def __init__(self, values: torch.Tensor, event=None):
        self.values, self.event = values, event

    def result(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.values.numpy()


@dataclass
class DeviceTimer:
    """CUDA events around each model call, for the share of wall time the GPU was busy.
    Recording events does not synchronise; :meth:`busy_share` does."""

    events: list = field(default_factory=list)  # (host time at the call, start, end)

    def busy_share(self, since: float, until: float) -> float:
        """GPU time of the calls made between the ``time.perf_counter()`` stamps ``since`` and
        ``until``, over that wall time."""
        torch.cuda.synchronize()
        busy = sum(s.elapsed_time(e) for t, s, e in self.events if since <= t <= until) / 1000
        return busy / max(until - since, 1e-9)


class EmbeddingMapper:
    """Wraps a model for extraction; the model itself is left unchanged (its towers are copied
    or exported for speed, never rewritten in place). ``processor`` is needed only to export the
    towers for the ``auto`` backend; without it ``auto`` means torch.

    ``backend`` is the backend in use; ``fallback`` says why ``auto`` runs torch where it would
    have run ONNX Runtime (onnxruntime missing, an export that fails or differs from PyTorch),
    None otherwise. Such a fallback is logged as one warning line."""

    def __init__(
        self, model: CrossModalModel, options: MapperOptions | None = None, processor=None
    ):
        options = options or MapperOptions()
        options.validate()
        self.options = options
        self.timer: DeviceTimer | None = None  # see time_device
        self.device = pick_device(options.device)
        self.model = model.eval().to(self.device)
        if self.device.type == "cpu" and options.reuse_memory:
            reuse_freed_memory()
        self.backend, self.fallback = _resolve_backend(options, self.device)
        self.onnx = None
        self.channels_last = False  # whether image batches should arrive channels_last
        if self.backend == "onnx":
            self.onnx = self._onnx_towers(processor)
        if self.onnx is not None:
            self.autocast = None  # ONNX Runtime runs the exported fp32 graphs
            return
        if self.fallback:
            log.warning(
                "backend auto: the towers run in torch, not ONNX Runtime: %s", self.fallback
            )
        self.backend = "torch"
        self.autocast = pick_autocast(options.precision, self.device)
        self.channels_last = has_conv(model.image_tower)
        self.image_tower: nn.Module = inference_copy(
            model.image_tower, widen_kernels=self.device.type == "cpu"
        )
        self.text_tower: nn.Module = model.text_tower
        if options.compile:
            self.image_tower = torch.compile(self.image_tower)
            self.text_tower = torch.compile(self.text_tower, dynamic=True)

    def _onnx_towers(self, processor):
        from xmodal.export.ort import OnnxTowers, temporary_towers

        threads = self.options.threads or torch.get_num_threads()
        if self.options.onnx_dir:
            towers = OnnxTowers(self.options.onnx_dir, threads)
            towers.check(self.model)
            return towers
        if processor is None:
            self.fallback = "no processor to trace the towers with"
            return None
        try:
            return temporary_towers(self.model, processor, threads)
        except ExportError as err:
            self.fallback = one_line(str(err))
            return None

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    def use_threads(self, count: int) -> None:
        """The model's intra-op threads from now on: torch's, and ONNX Runtime's sessions
        (unless ``options.threads`` fixed theirs)."""
        torch.set_num_threads(count)
        if self.onnx is not None and self.options.threads is None:
            self.onnx.use_threads(count)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def time_device(self) -> DeviceTimer | None:
        """Start recording the GPU time of every model call (None unless on a GPU)."""
        self.timer = DeviceTimer() if self.device.type == "cuda" else None
        return self.timer

    def _pending(self, embeddings: torch.Tensor, start) -> Pending:
        if self.device.type != "cuda":
            return Pending(embeddings)
        host = embeddings.to("cpu", non_blocking=True)  # into pinned memory
        done = torch.cuda.Event(enable_timing=self.timer is not None)
        done.record()
        if self.timer is not None:
            self.timer.events.append((time.perf_counter(), start, done))
        return Pending(host, done)

    def _start_event(self):
        if self.timer is None:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    @torch.inference_mode()
    def start_images(self, pixel_values: torch.Tensor) -> Pending:
        """(B, 3, H, W) -> (B, D) float32, without waiting for a GPU to finish."""
        start = self._start_event()
        if self.onnx is not None:
            pooled = self.onnx.image_pooled(pixel_values)
        else:
            pixel_values = pixel_values.to(self.device, non_blocking=True)
            if self.channels_last:
                pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                pooled = self.image_tower(pixel_values).pooled
        return self._pending(self.model.embed_image_pooled(pooled.to(self.device)), start)

    def images(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) -> (B, D) float32."""
        return self.start_images(pixel_values).result()

    @torch.inference_mode()
    def start_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Pending:
        """(B, L) token ids -> (B, D) float32, without waiting for a GPU to finish."""
        start = self._start_event()
        if self.onnx is not None:
            pooled = self.onnx.text_pooled(input_ids, attention_mask)
        else:
            input_ids = input_ids.to(self.device, non_blocking=True)
            attention_mask = attention_mask.to(self.device, non_blocking=True)
            with self._autocast():
                pooled = self.text_tower(input_ids, attention_mask).pooled
        return self._pending(self.model.embed_text_pooled(pooled.to(self.device)), start)

    def texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """(B, L) token ids -> (B, D) float32."""
        return self.start_texts(input_ids, attention_mask).result()


@dataclass
class PairScores:
    """Scores of a batch of aligned (image, caption) pairs.

    similarity: (B,) cosine of the two embeddings (those ``images`` / ``texts`` return).
    itm: (B,) ITM match probability, softmax of the ITM head's [mismatch, match] logits; None
        for a model without fusion.
    fused: (B, D) the fused vector of each pair (``CrossModalModel.fuse``), when asked for.
    combined: (B,) ``logit_scale * similarity + w * itm_score`` (the ITM head's match-minus-
        mismatch logit) at the model's calibrated ``fusion.filter_weight`` w (0 when never
        calibrated); None for a model without fusion.
    """

    similarity: np.ndarray
    itm: np.ndarray | None
    fused: np.ndarray | None
    combined: np.ndarray | None = None


def score_pairs(
    model: CrossModalModel,
    image_out: TowerOutput,
    text_out: TowerOutput,
    fused: bool,
    autocast: contextlib.AbstractContextManager,
) -> PairScores:
    """Similarity, ITM probability and (optionally) fused vectors from the two towers' outputs.

    The embeddings are computed in float32 exactly as for ``--what images`` / ``texts``; the
    fusion and ITM head run under ``autocast`` (a null context in fp32)."""
    image = _features(model.image_proj, image_out)
    text = _features(model.text_proj, text_out)
    similarity = (image.embeds * text.embeds).sum(dim=-1)
    if not model.has_itm:
        return PairScores(similarity.cpu().numpy(), None, None)
    with autocast:
        vectors = model.fuse(image, text)
        logits = model.itm_from_fused(vectors, image, text).float()
    itm = torch.softmax(logits, dim=-1)[:, 1]
    itc = float(model.clip_scale().detach()) * similarity.float()
    combined = itc + filter_weight(model) * (logits[:, 1] - logits[:, 0]).to(itc.device)
    return PairScores(
        similarity.cpu().numpy(),
        itm.cpu().numpy(),
        vectors.float().cpu().numpy() if fused else None,
        combined.cpu().numpy(),
    )


def filter_weight(model: CrossModalModel) -> float:
    """The weight of the ITM score in the ``combined`` pair score: the model's calibrated
    ``fusion.filter_weight``, 0 when it was never calibrated (the similarity's order)."""
    return float(model.config.fusion.filter_weight or 0.0)


def _features(projection: nn.Module, out: TowerOutput) -> Features:
    projected = projection(out.pooled.float())
    return Features(F.normalize(projected, dim=-1), projected, out.tokens, out.mask)


@torch.inference_mode()
def mapper_pairs(
    mapper: EmbeddingMapper,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    fused: bool = False,
) -> PairScores:
    """Both towers on a batch of pairs (image i with caption i), then :func:`score_pairs`, on
    the mapper's backend (torch or ONNX Runtime towers) and device. The fusion and ITM head run
    under the precision's autocast also beside the (fp32) ONNX towers: with ``auto`` that is
    bf16 on CPUs with bf16 hardware, where it speeds up the fusion at a small cost in precision
    (ITM probabilities and fused vectors close to fp32's); ``fp32`` keeps everything fp32."""
    device = mapper.device
    dtype = mapper.autocast
    if mapper.onnx is not None:
        dtype = pick_autocast(mapper.options.precision, device)
    fusion_autocast = (
        contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    )
    if mapper.onnx is not None:
        image_out = mapper.onnx.image(pixel_values)
        text_out = mapper.onnx.text(input_ids, attention_mask)
    else:
        pixel_values = pixel_values.to(device, non_blocking=True)
        if mapper.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        input_ids = input_ids.to(device, non_blocking=True)
        attention_mask = attention_mask.to(device, non_blocking=True)
        with mapper._autocast():
            image_out = mapper.image_tower(pixel_values)
            text_out = mapper.text_tower(input_ids, attention_mask)
    image_out = _on(image_out, device)
    text_out = _on(text_out, device)
    return score_pairs(mapper.model, image_out, text_out, fused, fusion_autocast)


def _on(out: TowerOutput, device: torch.device) -> TowerOutput:
    mask = None if out.mask is None else out.mask.to(device)
    return TowerOutput(out.pooled.to(device), out.tokens.to(device), mask)
