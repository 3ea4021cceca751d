"""xmodal extract: rows, manifest, error log, resuming after a kill, refusing other models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_model_config
from PIL import Image

from xmodal.cli import main
from xmodal.config import ProcessorConfig
from xmodal.errors import ExtractError, IncompatibleError
from xmodal.extract import extract, load_manifest, read_shard
from xmodal.models.identity import file_sha256
from xmodal.models.model import CrossModalModel
from xmodal.processing import MultimodalProcessor

N_IMAGES = 10
BROKEN = "broken"


def tiny_processor(tokenizer, tokenizer_path: str, **overrides) -> MultimodalProcessor:
    kwargs = {"image_size": 64, "resize_size": 72, "tokenizer": tokenizer_path, **overrides}
    return MultimodalProcessor(ProcessorConfig(**kwargs), tokenizer)


def save_tiny_model(directory: Path, processor: MultimodalProcessor, seed: int = 0) -> Path:
    """A tiny random model (+ processor) saved with save_pretrained."""
    torch.manual_seed(seed)
    CrossModalModel(tiny_model_config()).save_pretrained(directory, processor)
    return directory


def make_image_folder(directory: Path, broken: bool = True) -> Path:
    """N_IMAGES random PNGs, two captions each, one corrupt image (optional), captions.jsonl."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        pixels = rng.integers(0, 256, (48 + 4 * i, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": f"photo {i}", "image_id": f"img{i}"})
        long = f"a much longer caption that describes picture number {i} " * (1 + i % 3)
        rows.append({"image": f"img{i}.png", "caption": long.strip(), "image_id": f"img{i}"})
    if broken:
        (directory / "broken.png").write_bytes(b"this is not a png")
        rows.insert(9, {"image": "broken.png", "caption": "a broken file", "image_id": BROKEN})
    text = "\n".join(json.dumps(row) for row in rows) + "\n"
    (directory / "captions.jsonl").write_text(text, encoding="utf-8")
    return directory


def read_all(out: Path, kind: str) -> dict[str, list]:
    """Every shard of ``kind`` concatenated, in shard order."""
    ids, sources, vectors = [], [], []
    for file in sorted(out.glob(f"{kind}-*.parquet")):
        shard = read_shard(file)
        ids += shard.ids
        sources += shard.sources
        vectors.append(shard.embeddings)
    return {"ids": ids, "sources": sources, "embeddings": np.concatenate(vectors)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_tokenizer, minilm_path):
    root = tmp_path_factory.mktemp("extract")
    processor = tiny_processor(minilm_tokenizer, minilm_path)
    model_dir = save_tiny_model(root / "model", processor)
    data = make_image_folder(root / "data")
    return {"root": root, "model": model_dir, "data": data, "processor": processor}


def test_extract_rows_embeddings_manifest_and_errors(setup, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    extract(setup["model"], setup["data"], out, shard_size=4, workers=1, progress=False)
    model = CrossModalModel.from_pretrained(setup["model"])
    processor = MultimodalProcessor.from_pretrained(setup["model"])

    manifest = load_manifest(out)
    assert manifest["model"]["id"] == str(setup["model"].resolve())
    assert manifest["model"]["weights_hash"] == file_sha256(setup["model"] / "model.safetensors")
    assert manifest["processor_hash"] == processor.config_hash
    assert (manifest["dim"], manifest["dtype"], manifest["normalised"]) == (32, "float32", True)
    images, texts = manifest["modalities"]["images"], manifest["modalities"]["texts"]
    # 11 unique images (the broken one at position 5) in shards of 4: 4 + 3 + 3 rows
    assert [s["rows"] for s in images["shards"]] == [4, 3, 3]
    assert [s["failed"] for s in images["shards"]] == [0, 1, 0]
    assert [s["file"] for s in images["shards"]] == [f"images-0000{i}.parquet" for i in range(3)]
    assert (images["rows"], images["failed"], images["complete"]) == (10, 1, True)
    assert [s["rows"] for s in texts["shards"]] == [4, 4, 4, 4, 4, 1]
    assert manifest["total_rows"] == 10 + 21
    for entry in images["shards"] + texts["shards"]:
        assert pq.ParquetFile(out / entry["file"]).metadata.num_rows == entry["rows"]

    got = read_all(out, "images")
    assert got["ids"] == [f"img{i}" for i in range(N_IMAGES)]
    assert got["sources"] == [str(setup["data"] / f"img{i}.png") for i in range(N_IMAGES)]
    with torch.no_grad():
        expected = model.encode_image(processor.process_images(got["sources"])).numpy()
    np.testing.assert_allclose(got["embeddings"], expected, atol=1e-5)
    schema = pq.read_schema(out / "images-00000.parquet")
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[32]"

    got = read_all(out, "texts")
    captions = [json.loads(line)["caption"] for line in (setup["data"] / "captions.jsonl").open()]
    assert got["ids"] == [str(i) for i in range(len(captions))]
    assert got["sources"] == captions
    with torch.no_grad():
        singles = [model.encode_text(**processor.process_text([c]))[0].numpy() for c in captions]
    np.testing.assert_allclose(got["embeddings"], np.stack(singles), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got["embeddings"], axis=1), 1.0, atol=1e-5)
    assert read_shard(out / "texts-00002.parquet").columns["image_id"][1] == BROKEN

    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1
    assert errors[0]["id"] == BROKEN
    assert errors[0]["source"] == str(setup["data"] / "broken.png")
    assert "not a recognised image format" in errors[0]["reason"]


def test_float16_shards(setup, tmp_path: Path) -> None:
    out32, out16 = tmp_path / "f32", tmp_path / "f16"
    for out, dtype in ((out32, "float32"), (out16, "float16")):
        extract(setup["model"], setup["data"], out, modality="texts", dtype=dtype, progress=False)
    schema = pq.read_schema(out16 / "texts-00000.parquet")
    assert str(schema.field("embedding").type) == "fixed_size_list<element: halffloat>[32]"
    assert load_manifest(out16)["dtype"] == "float16"
    assert "images" not in load_manifest(out16)["modalities"]
    half, full = read_all(out16, "texts"), read_all(out32, "texts")
    assert half["embeddings"].dtype == np.float32
    np.testing.assert_allclose(half["embeddings"], full["embeddings"], atol=2e-3)


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(setup, tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    options = {"shard_size": 3, "workers": 0, "progress": False}
    extract(setup["model"], setup["data"], whole, **options)

    def kill_after_first(kind: str, shard: int) -> None:
        raise Killed(f"{kind} {shard}")

    with pytest.raises(Killed):
        extract(setup["model"], setup["data"], resumed, on_shard=kill_after_first, **options)
    assert load_manifest(resumed)["modalities"]["images"]["rows"] == 3
    assert sorted(p.name for p in resumed.glob("*.parquet")) == ["images-00000.parquet"]
    # a torn file under the next shard's name (not in the manifest) must be redone
    (resumed / "images-00001.parquet").write_bytes(b"PAR1 torn")
    (resumed / ".manifest.json.x1y2.tmp").write_text("{")  # as left by kill -9 mid-write
    written = []
    extract(
        setup["model"],
        setup["data"],
        resumed,
        **options,
        on_shard=lambda k, i: written.append((k, i)),
    )
    assert ("images", 0) not in written and ("images", 1) in written

    for kind in ("images", "texts"):
        a, b = read_all(whole, kind), read_all(resumed, kind)
        assert b["ids"] == a["ids"] and len(set(b["ids"])) == len(b["ids"])
        assert b["sources"] == a["sources"]
        np.testing.assert_allclose(b["embeddings"], a["embeddings"], atol=1e-6)
    assert not list(resumed.glob(".*.tmp"))
    assert (resumed / "errors.jsonl").read_text() == (whole / "errors.jsonl").read_text()
    assert load_manifest(resumed)["total_rows"] == load_manifest(whole)["total_rows"]


def test_extract_refuses_another_model_or_settings(setup, tmp_path: Path, capsys) -> None:
    out = tmp_path / "emb"
    extract(setup["model"], setup["data"], out, modality="texts", progress=False)
    other = save_tiny_model(tmp_path / "other", setup["processor"], seed=1)
    with pytest.raises(IncompatibleError, match="model weights hash"):
        extract(other, setup["data"], out, modality="texts", progress=False)
    with pytest.raises(ExtractError, match="shard_size=10000"):
        extract(setup["model"], setup["data"], out, modality="texts", shard_size=5, progress=False)
    code = main(["extract", "--model", str(other), "--data", str(setup["data"]), "--out", str(out)])
    assert code == 2
    message = capsys.readouterr().err
    first = load_manifest(out)["model"]["weights_hash"][:16]
    assert first in message and file_sha256(other / "model.safetensors")[:16] in message
