"""Export the image and text towers to ONNX (dynamic batch; dynamic caption length).

Each graph returns the tower's ``pooled`` vector and its ``tokens``; the projections into the
shared space stay in PyTorch (they are tiny), so one export serves every head trained on top of
the same towers. ``onnx.json`` records the tower weights' hashes: the ONNX Runtime backend refuses
a model whose towers differ from the exported ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.atomic import atomic_path, atomic_write_text, make_dir
from xmodal.config import load_json_config
from xmodal.errors import ExportError, MissingFileError, ModelLoadError
from xmodal.models.identity import state_dict_sha256
from xmodal.models.model import CrossModalModel
from xmodal.processing import MultimodalProcessor

META_NAME = "onnx.json"
META_FORMAT = "xmodal.onnx/1"
IMAGE_FILE = "image_tower.onnx"
TEXT_FILE = "text_tower.onnx"
OPSET = 17
SAMPLE_CAPTIONS = ("a photo of a cat", "two dogs playing in the snow on a sunny day", "a red car")
REASON_CHARS = 240  # an exporter error's reason, as one line, is cut to this length
# Where an exporter error's message stops saying why and starts quoting the graph or asking for
# bug reports: nothing from here on is kept in the one-line reason.
REASON_ENDS = re.compile(r"\s*(?:\[Caused by|Torch IR graph|Please feel free to request)")
log = logging.getLogger(__name__)


class ImageTowerGraph(nn.Module):
    """pixel_values (B, 3, S, S) -> pooled (B, D), tokens (B, T, D)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tower(pixel_values)
        return out.pooled, out.tokens


class TextTowerGraph(nn.Module):
    """input_ids, attention_mask (B, L) -> pooled (B, D), tokens (B, L, D)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tower(input_ids, attention_mask)
        return out.pooled, out.tokens


def tower_hashes(model: CrossModalModel) -> dict[str, str]:
    """SHA-256 of each tower's weights (what an export must match)."""
    return {
        "image": state_dict_sha256(model.image_tower),
        "text": state_dict_sha256(model.text_tower),
    }


def sample_inputs(processor: MultimodalProcessor) -> dict[str, torch.Tensor]:
    """Tracing inputs: two images and captions of different lengths (so the mask has padding)."""
    size = processor.config.image_size
    text = processor.process_text(list(SAMPLE_CAPTIONS), apply_template=False)
    pixels = torch.linspace(-1.0, 1.0, 2 * 3 * size * size).reshape(2, 3, size, size)
    return {"pixel_values": pixels, **text}


def failure_reason(exc: BaseException) -> str:
    """One line saying why an export (or the check of one) failed: the exception's kind and the
    first line of its message, without the graph the TorchScript exporter quotes in it."""
    text = str(exc).strip().split("\n", 1)[0]
    text = " ".join(REASON_ENDS.split(text, maxsplit=1)[0].split()).rstrip(".")
    if len(text) > REASON_CHARS:
        text = text[: REASON_CHARS - 3].rstrip() + "..."
    if isinstance(exc, ExportError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Keep the TorchScript exporter's own output off the terminal: its Python warnings, and
    what its C++ side writes straight to the process's stdout and stderr (on a failure, the
    whole graph: hundreds of KB). Both file descriptors point at a temporary file meanwhile,
    so output of other threads in that time is dropped too (exports run before any start).
    The exporter's log is set back as it was afterwards: torch 2.x leaves it on after any
    export (``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled``, not its
    value)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer notices
        is_on = getattr(torch._C, "_jit_is_onnx_log_enabled", None)
        logging_on = is_on() if is_on is not None else None
        saved = [os.dup(fd) for fd in (1, 2)]
        try:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            if logging_on is not None:
                torch._C._jit_set_onnx_log_enabled(logging_on)
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            dropped = sink.seek(0, os.SEEK_END)
            if dropped:
                log.debug("the ONNX exporter wrote %d bytes of its own output (dropped)", dropped)


def _export(graph: nn.Module, args: tuple, path: Path, names: dict[str, Any], tower: str) -> None:
    """Export one tower's graph to ``path``; an exporter failure becomes an :class:`ExportError`
    naming the tower and the reason in one line (a missing onnx package stays an ImportError)."""
    with atomic_path(path) as tmp:
        try:
            with quiet_exporter():
                torch.onnx.export(
                    graph,
                    args,
                    str(tmp),
                    input_names=names["inputs"],
                    output_names=["pooled", "tokens"],
                    dynamic_axes=names["axes"],
                    opset_version=OPSET,
                    do_constant_folding=True,
                    dynamo=False,  # the dynamo exporter needs onnxscript; TorchScript suffices
                )
        except ImportError:
            raise
        except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
            raise ExportError(
                f"cannot export the {tower} tower to ONNX ({failure_reason(exc)})"
            ) from exc


def export_onnx(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    out: str | Path,
    model_id: str = "",
) -> dict[str, Any]:
    """Write ``image_tower.onnx``, ``text_tower.onnx`` and ``onnx.json`` into ``out``; raises
    :class:`ExportError` (one line: the tower and why) when a tower does not export."""
    out = Path(out)
    make_dir(out)
    model = model.eval().float().cpu()
    inputs = sample_inputs(processor)
    with torch.no_grad():
        _export(
            ImageTowerGraph(model.image_tower).eval(),
            (inputs["pixel_values"],),
            out / IMAGE_FILE,
            {
                "inputs": ["pixel_values"],
                "axes": {
                    "pixel_values": {0: "batch"},
                    "pooled": {0: "batch"},
                    "tokens": {0: "batch"},
                },
            },
            "image",
        )
        _export(
            TextTowerGraph(model.text_tower).eval(),
            (inputs["input_ids"], inputs["attention_mask"]),
            out / TEXT_FILE,
            {
                "inputs": ["input_ids", "attention_mask"],
                "axes": {
                    "input_ids": {0: "batch", 1: "length"},
                    "attention_mask": {0: "batch", 1: "length"},
                    "pooled": {0: "batch"},
                    "tokens": {0: "batch", 1: "length"},
                },
            },
            "text",
        )
    meta = {
        "format": META_FORMAT,
        "model": model_id,
        "processor_hash": processor.config_hash,
        "image_size": processor.config.image_size,
        "opset": OPSET,
        "torch": torch.__version__,
        "towers": {
            "image": {"file": IMAGE_FILE, "dim": model.image_tower.output_dim},
            "text": {"file": TEXT_FILE, "dim": model.text_tower.output_dim},
        },
        "weights_sha256": tower_hashes(model),
    }
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=2))
    return meta


def load_meta(directory: str | Path) -> dict[str, Any]:
    """The ``onnx.json`` of an export directory."""
    path = Path(directory) / META_NAME
    if not path.is_file():
        raise MissingFileError(f"{directory} is not an ONNX export (no {META_NAME})")
    return load_json_config(path, "ONNX export", ModelLoadError, META_FORMAT)
