"""ONNX Runtime towers: run the exported image and text towers, refusing mismatched weights."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xmodal.errors import ExportError, IncompatibleError, MissingDependencyError
from xmodal.export.onnx import failure_reason, load_meta, sample_inputs, tower_hashes
from xmodal.models.model import CrossModalModel
from xmodal.models.towers import TowerOutput
from xmodal.processing import MultimodalProcessor

MIN_COSINE = 0.9999


def _session(path: Path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("the onnx backend needs `pip install 'xmodal[onnx]'`") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: decode workers share the cores (measured faster).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [
        p
        for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
        if p in ort.get_available_providers()
    ]
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxTowers:
    """The two exported towers of ``directory``; outputs are float32 numpy arrays."""

    def __init__(self, directory: str | Path, threads: int | None = None):
        self.directory = Path(directory)
        self.meta = load_meta(self.directory)
        self.threads = threads
        self._folder: tempfile.TemporaryDirectory | None = None  # see temporary_towers
        self._open()

    def _open(self) -> None:
        towers = self.meta["towers"]
        self._image = _session(self.directory / towers["image"]["file"], self.threads)
        self._text = _session(self.directory / towers["text"]["file"], self.threads)
        # A tower that ignores the mask (SigLIP's text) exports without that input.
        self._text_inputs = {node.name for node in self._text.get_inputs()}

    def use_threads(self, threads: int) -> None:
        """Run on ``threads`` intra-op threads from now on: ONNX Runtime fixes a session's
        thread pool when it is created, so the sessions are opened again when this changes."""
        if threads != self.threads:
            self.threads = threads
            self._open()

    def check(self, model: CrossModalModel) -> None:
        """Raise IncompatibleError unless ``model``'s towers are the exported ones."""
        expected, actual = self.meta["weights_sha256"], tower_hashes(model)
        wrong = [name for name in ("image", "text") if expected[name] != actual[name]]
        if wrong:
            raise IncompatibleError(
                f"{self.directory}: the ONNX {' and '.join(wrong)} tower(s) were exported from "
                f"other weights than this model's (hash {expected[wrong[0]][:16]} != "
                f"{actual[wrong[0]][:16]}): export this model again"
            )

    def image(self, pixel_values: torch.Tensor) -> TowerOutput:
        """(B, 3, S, S) -> pooled (B, D) and tokens (B, T, D)."""
        pooled, tokens = self._image.run(["pooled", "tokens"], self._image_feed(pixel_values))
        return TowerOutput(torch.from_numpy(pooled), torch.from_numpy(tokens))

    def image_pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> pooled (B, D) only."""
        return torch.from_numpy(self._image.run(["pooled"], self._image_feed(pixel_values))[0])

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
        """(B, L) -> pooled (B, D), tokens (B, L, D) and the mask."""
        feed = self._text_feed(input_ids, attention_mask, self._text_inputs)
        pooled, tokens = self._text.run(["pooled", "tokens"], feed)
        return TowerOutput(torch.from_numpy(pooled), torch.from_numpy(tokens), attention_mask)

    def text_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> pooled (B, D) only."""
        feed = self._text_feed(input_ids, attention_mask, self._text_inputs)
        return torch.from_numpy(self._text.run(["pooled"], feed)[0])

    @staticmethod
    def _image_feed(pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
        return {"pixel_values": np.ascontiguousarray(pixel_values.float().numpy())}

    @staticmethod
    def _text_feed(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, names: set[str]
    ) -> dict[str, np.ndarray]:
        feed = {"input_ids": input_ids.long().numpy()}
        if "attention_mask" in names:
            feed["attention_mask"] = attention_mask.long().numpy()
        return feed


def parity(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    towers: OnnxTowers,
    pixel_values: torch.Tensor | None = None,
    captions: list[str] | None = None,
) -> dict[str, float]:
    """Lowest cosine similarity between ONNX Runtime and PyTorch embeddings, per modality."""
    towers.check(model)
    sample = sample_inputs(processor)
    pixels = sample["pixel_values"] if pixel_values is None else pixel_values
    text = sample if captions is None else processor.process_text(captions)
    ids, mask = text["input_ids"], text["attention_mask"]
    model = model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        pairs = {
            "image": (
                model.encode_image(pixels.to(device)).cpu(),
                model.embed_image_pooled(towers.image_pooled(pixels).to(device)).cpu(),
            ),
            "text": (
                model.encode_text(ids.to(device), mask.to(device)).cpu(),
                model.embed_text_pooled(towers.text_pooled(ids, mask).to(device)).cpu(),
            ),
        }
        return {
            name: float(F.cosine_similarity(ref, onnx, dim=-1).min())
            for name, (ref, onnx) in pairs.items()
        }


def temporary_towers(
    model: CrossModalModel, processor: MultimodalProcessor, threads: int | None = None
) -> OnnxTowers:
    """Export the towers to a temporary folder and load them (the folder is removed with the
    towers). Raises :class:`ExportError`, its message one line saying why, when the export or
    ONNX Runtime fails, or when the ONNX embeddings differ from PyTorch's (cosine <
    ``MIN_COSINE``): the caller then runs the towers in torch."""
    from xmodal.export.onnx import export_onnx

    device = next(model.parameters()).device
    # The files live as long as the towers (removed with them): use_threads reopens them.
    folder = tempfile.TemporaryDirectory(prefix="xmodal-onnx-")
    try:
        export_onnx(model, processor, folder.name)
        towers = OnnxTowers(folder.name, threads)
        towers._folder = folder
        model.to(device)  # export_onnx ran it on the CPU
        scores = parity(model, processor, towers)
    except ExportError:
        folder.cleanup()
        raise
    except ImportError as exc:  # torch.onnx needs the onnx package
        folder.cleanup()
        package = (exc.name or "onnx").split(".")[0]
        raise ExportError(
            f"exporting the towers needs the {package} package (pip install 'xmodal[onnx]')"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any failure means: use torch, saying why
        folder.cleanup()
        raise ExportError(
            f"ONNX Runtime cannot run the exported towers ({failure_reason(exc)})"
        ) from exc
    finally:
        model.to(device)
    if min(scores.values()) < MIN_COSINE:
        del towers
        folder.cleanup()
        lowest = ", ".join(f"{name} {value:.6f}" for name, value in scores.items())
        raise ExportError(
            f"the ONNX towers' embeddings differ from PyTorch's (lowest cosine {lowest}; "
            f"{MIN_COSINE} needed)"
        )
    return towers
