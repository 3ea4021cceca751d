"""The composition matrix: every model family xmodal produces, through ``xmodal export-onnx`` and
``xmodal extract`` on the default backend and on torch.

Families: the offline default's architecture (EfficientNet-Lite0 + a tiny BERT, at 64 px) under
each fusion (cross, pooled, none); the ``seed`` preset's shape (ResNet + BERT [CLS], pooled
fusion, squash resize, captions padded to a fixed length), tiny; and the model ``xmodal
quickstart`` trains, built from the packaged quickstart.yaml's model section (pool levels, token
levels, an MLP image projection, cross fusion with grid positions) over tiny random weights;
and the aligned dual encoders xmodal loads (tiny random transformers CLIP, SigLIP, ChineseCLIP
and VisionTextDualEncoder folders, a new cross fusion on top).

For each: the export's ONNX Runtime towers match PyTorch; ``extract`` on the default backend
(auto: ONNX Runtime on a CPU) runs the ONNX towers, writes the torch run's embeddings (cosine
>= 0.9999) and pair scores (the fusion reads the ONNX image tokens), and writes nothing but
progress bars (its own, and transformers' while it loads weights) to stderr. A fallback to
torch says why in exactly one line (no exporter graph dumps).

tests/test_composition_paths.py takes a representative set of these families through the
other paths (eval, index, search, the service, filter, probe, train and resume).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from aligned_fixtures import save_chinese_clip, save_clip, save_dual_encoder, save_siglip
from conftest import TINY_BERT, TINY_RESNET, write_colour_dataset

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("efficientnet_lite_pytorch")

import xmodal.extract.runner as runner  # noqa: E402
from xmodal.apps.quickstart import quickstart_config_path  # noqa: E402
from xmodal.cli import main as cli_main  # noqa: E402
from xmodal.config import (  # noqa: E402
    FusionConfig,
    ImageTowerConfig,
    ModelConfig,
    ProcessorConfig,
    TextTowerConfig,
    from_dict,
    load_yaml_or_json,
)
from xmodal.extract import read_shard  # noqa: E402
from xmodal.extract.mapper import EmbeddingMapper  # noqa: E402
from xmodal.models.model import CrossModalModel  # noqa: E402
from xmodal.pairs import read_pair_scores  # noqa: E402
from xmodal.presets import seed  # noqa: E402
from xmodal.processing import MultimodalProcessor  # noqa: E402
from xmodal.train.config import ModelSection  # noqa: E402
from xmodal.train.surgery import with_new_heads  # noqa: E402

MIN_COSINE = 0.9999  # as tests/test_onnx.py and xmodal.export.ort.MIN_COSINE
MAX_STDERR = 4096
ROWS = 6


def tiny_text(pooling: str = "mean") -> TextTowerConfig:
    return TextTowerConfig(
        name="tiny-bert", package=None, pretrained=False, pooling=pooling, hf_config=TINY_BERT
    )


def offline_small(fusion: str) -> ModelConfig:
    """The offline default's architecture: EfficientNet-Lite0 (random) + a tiny BERT."""
    return ModelConfig(
        image=ImageTowerConfig(pretrained=False),
        text=tiny_text(),
        fusion=FusionConfig(kind=fusion, layers=1, heads=4),
        embed_dim=32,
    )


def seed_tiny() -> ModelConfig:
    """The ``seed`` preset's model, its towers shrunk (same kinds, pooling and fusion)."""
    config, _ = seed()
    config.image.pretrained = config.text.pretrained = False
    config.image.hf_config = dict(TINY_RESNET)
    config.text.hf_config = dict(TINY_BERT)
    config.fusion.heads = 4
    config.embed_dim = 32
    return config


def quickstart_tiny() -> CrossModalModel:
    """The model the quickstart trains: its YAML's model section over a small offline default
    (as the trainer builds it: :func:`xmodal.train.surgery.with_new_heads`)."""
    raw = load_yaml_or_json(quickstart_config_path())["model"]
    section = from_dict(ModelSection, raw)
    assert section.overrides["image.token_levels"] > 1
    assert section.overrides["image.pool_levels"] > 1
    assert section.overrides["fusion.grid_positions"]
    base = offline_small("cross")
    base.fusion.heads = 4
    model = with_new_heads(CrossModalModel(base), section)
    assert model.config.image.token_levels == section.overrides["image.token_levels"]
    return model


FAMILIES: dict[str, Callable[[], CrossModalModel]] = {
    "offline-cross": lambda: CrossModalModel(offline_small("cross")),
    "offline-pooled": lambda: CrossModalModel(offline_small("pooled")),
    "offline-none": lambda: CrossModalModel(offline_small("none")),
    "seed": lambda: CrossModalModel(seed_tiny()),
    "quickstart": quickstart_tiny,
}


def family_processor(name: str, minilm_path: str, tokenizer) -> MultimodalProcessor:
    kwargs = {"image_size": 64, "resize_size": 72, "tokenizer": minilm_path}
    if name == "seed":  # the preset's preprocessing: squash, captions padded to a fixed length
        kwargs.update(resize="squash", resize_size=None, padding="max_length", max_length=24)
    return MultimodalProcessor(ProcessorConfig(**kwargs), tokenizer)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_colour_dataset(tmp_path_factory.mktemp("colours"), n=ROWS)


@pytest.fixture()
def recorded(monkeypatch) -> list[EmbeddingMapper]:
    """The mappers ``extract`` builds (to read the backend each run chose)."""
    made: list[EmbeddingMapper] = []

    class Recording(EmbeddingMapper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(runner, "EmbeddingMapper", Recording)
    return made


def run_cli(capfd, argv: list[str]) -> tuple[int, str, str]:
    """``xmodal`` with ``argv``; its return code, stdout and stderr (file descriptors, so
    output written by native code counts too)."""
    capfd.readouterr()
    code = cli_main(argv)
    out, err = capfd.readouterr()
    return code, out, err


# tqdm's bars: "images: 100%|####| 6/6 ..." and, with nothing to do, "images: 0img [00:00, ?img/s]"
PROGRESS = re.compile(r"^\w[\w ]*: +(\d+%\||\d+\w* \[)")


def messages(err: str) -> list[str]:
    """The lines of ``err`` other than progress bars (each bar redraws itself after a CR)."""
    lines = (line.rsplit("\r", 1)[-1].strip() for line in err.split("\n"))
    return [line for line in lines if line and not PROGRESS.match(line)]


def embeddings(out: Path, kind: str) -> tuple[list, np.ndarray]:
    shard = read_shard(out / f"{kind}-00000.parquet")
    return shard.ids, shard.embeddings


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_and_extracts_on_onnx_runtime(
    family, tmp_path, dataset, recorded, capfd, minilm_path, minilm_tokenizer
) -> None:
    model = FAMILIES[family]().eval()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir, family_processor(family, minilm_path, minilm_tokenizer))
    check_exports_and_extracts(model_dir, model.has_itm, tmp_path, dataset, recorded, capfd)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, minilm_path) -> dict[str, Path]:
    """A tiny random transformers checkpoint of each aligned kind (tests/aligned_fixtures.py),
    as a folder of its own files: xmodal loads it with a new cross fusion on top."""
    root = tmp_path_factory.mktemp("aligned")
    return {
        "clip": save_clip(root / "clip"),
        "siglip": save_siglip(root / "siglip", minilm_path),
        "chinese_clip": save_chinese_clip(root / "chinese_clip", minilm_path),
        "dual_encoder": save_dual_encoder(root / "dual_encoder", minilm_path),
    }


@pytest.mark.parametrize("kind", ["clip", "siglip", "chinese_clip", "dual_encoder"])
def test_aligned_family_exports_and_extracts_on_onnx_runtime(
    kind, aligned, tmp_path, dataset, recorded, capfd
) -> None:
    check_exports_and_extracts(aligned[kind], True, tmp_path, dataset, recorded, capfd)


def check_exports_and_extracts(
    model_dir: Path, has_itm: bool, tmp_path: Path, dataset: str, recorded, capfd
) -> None:
    """``export-onnx`` of ``model_dir`` passes its parity check; ``extract`` (images and texts,
    and pairs where the model has an ITM head) on the default backend runs ONNX Runtime and
    writes what torch writes; stderr holds progress bars only."""
    argv = ["export-onnx", "--model", str(model_dir), "--out", str(tmp_path / "onnx")]
    code, out, err = run_cli(capfd, argv)
    assert code == 0, err[-2000:]
    assert len(err) < MAX_STDERR, err[:2000]
    cosines = [float(line.split()[-1]) for line in out.splitlines() if "lowest cosine" in line]
    assert len(cosines) == 2 and min(cosines) >= MIN_COSINE, out

    # images and texts; and pairs where there is a fusion (the image tokens, ITM head)
    modalities = ["both", "pairs"] if has_itm else ["both"]
    outs = {}
    for modality in modalities:
        for name, extra in {"default": [], "torch": ["--backend", "torch"]}.items():
            out_dir = outs[modality, name] = tmp_path / f"{modality}-{name}"
            argv = ["extract", "--model", str(model_dir), "--data", dataset, "--out", str(out_dir)]
            argv += ["--modality", modality, "--workers", "0", "--precision", "fp32", *extra]
            code, _, err = run_cli(capfd, argv)
            assert code == 0, err[-2000:]
            assert len(err) < MAX_STDERR, err[:2000]
            assert messages(err) == [], err  # no fallback: every family exports
    assert [m.backend for m in recorded] == ["onnx", "torch"] * len(modalities)
    assert all(m.fallback is None for m in recorded)
    for kind in ("images", "texts"):
        ids, onnx_values = embeddings(outs["both", "default"], kind)
        torch_ids, torch_values = embeddings(outs["both", "torch"], kind)
        assert ids == torch_ids and len(ids) == ROWS
        assert np.sum(onnx_values * torch_values, axis=1).min() >= MIN_COSINE
    if "pairs" in modalities:
        onnx_pairs = read_pair_scores(outs["pairs", "default"])
        torch_pairs = read_pair_scores(outs["pairs", "torch"])
        assert onnx_pairs.columns["id"] == torch_pairs.columns["id"] and len(onnx_pairs) == ROWS
        assert set(onnx_pairs.scores) == {"similarity", "itm", "combined"}
        for score in ("similarity", "itm"):  # as tests/test_pairs.py
            np.testing.assert_allclose(
                onnx_pairs.scores[score], torch_pairs.scores[score], atol=1e-4
            )


def xmodal_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def traced_size_pooling(hidden, rows: int, cols: int):
    """The token levels' pooling as it was before it exported: an adaptive pooling whose output
    size the tracer records from the map's shape (the ONNX exporter refuses it)."""
    height, width = hidden.shape[-2:]
    return F.adaptive_avg_pool2d(hidden, (height * rows // height, width * cols // width))


def test_a_tower_that_does_not_export_falls_back_in_one_line(
    tmp_path, dataset, recorded, capfd, caplog, monkeypatch, processor
) -> None:
    import xmodal.models.image as image

    monkeypatch.setattr(image, "grid_mean", traced_size_pooling)
    config = offline_small("cross")
    config.image.token_levels = 2
    model_dir = tmp_path / "model"
    CrossModalModel(config).save_pretrained(model_dir, processor)

    argv = ["export-onnx", "--model", str(model_dir), "--out", str(tmp_path / "onnx")]
    code, out, err = run_cli(capfd, argv)
    assert code == 2 and len(out) < MAX_STDERR
    assert err.count("\n") == 1 and len(err) < 400, err[:2000]
    assert err.startswith("xmodal export-onnx: error: cannot export the image tower to ONNX")
    assert "adaptive pooling" in err and "graph" not in err
    # torch leaves its exporter's log on after an export; xmodal sets it back (off)
    assert not torch._C._jit_is_onnx_log_enabled()

    argv = ["extract", "--model", str(model_dir), "--data", dataset, "--out", str(tmp_path / "o")]
    code, out, err = run_cli(capfd, [*argv, "--workers", "0", "--precision", "fp32"])
    assert code == 0
    assert len(out) < MAX_STDERR and len(err) < MAX_STDERR, (out[:2000], err[:2000])
    assert messages(err) == []  # the one line goes through logging (caplog under pytest)
    (warning,) = xmodal_warnings(caplog)
    assert "\n" not in warning and len(warning) < 400, warning[:2000]
    assert warning.startswith("backend auto: the towers run in torch, not ONNX Runtime: ")
    assert "cannot export the image tower to ONNX" in warning and "adaptive pooling" in warning
    assert [m.backend for m in recorded] == ["torch"]
    assert recorded[0].fallback in warning
    assert len(embeddings(tmp_path / "o", "images")[0]) == ROWS


@pytest.mark.parametrize("cause", ["parity", "no-onnxruntime", "no-onnx"])
def test_other_fallbacks_say_why_in_one_line(
    cause, tmp_path, dataset, tiny_model_dir, recorded, capfd, caplog, monkeypatch
) -> None:
    if cause == "parity":  # the export runs, but its embeddings are not PyTorch's
        import xmodal.export.ort as ort

        monkeypatch.setattr(ort, "MIN_COSINE", 1.5)
        expected = "the ONNX towers' embeddings differ from PyTorch's (lowest cosine image"
    elif cause == "no-onnx":  # onnxruntime is there, the onnx package torch.onnx needs is not
        import torch.onnx

        def missing(*args, **kwargs):
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")

        monkeypatch.setattr(torch.onnx, "export", missing)
        expected = "exporting the towers needs the onnx package (pip install 'xmodal[onnx]')"
    else:
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a),
        )
        expected = "onnxruntime is not installed (pip install 'xmodal[onnx]')"
    argv = ["extract", "--model", tiny_model_dir, "--data", dataset, "--out", str(tmp_path / "o")]
    code, out, err = run_cli(capfd, [*argv, "--workers", "0", "--modality", "images"])
    assert code == 0 and len(out) < MAX_STDERR and len(err) < MAX_STDERR
    (warning,) = xmodal_warnings(caplog)
    assert "\n" not in warning and expected in warning, warning
    assert [m.backend for m in recorded] == ["torch"] and warning.endswith(recorded[0].fallback)
