"""xmodal index / search: exact and IVF indexes, tuning, adding shards, hash checks, re-ranking."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from test_extract import make_image_folder, save_tiny_model, tiny_processor

from xmodal.cli import main
from xmodal.errors import IncompatibleError
from xmodal.extract import extract, load_manifest, read_shard
from xmodal.index import SearchIndex, build_index, neighbour_recall
from xmodal.models.model import CrossModalModel, save_rerank_weight
from xmodal.processing import MultimodalProcessor
from xmodal.search import search
from xmodal.shards import MANIFEST_FORMAT, save_manifest, shard_name, write_shard


def normed(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_vectors(count: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    return normed(np.random.default_rng(seed).standard_normal((count, dim)))


def clustered_vectors(count: int, clusters: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = normed(rng.standard_normal((clusters, dim)))
    owner = rng.integers(0, clusters, count)
    return normed(centres[owner] + 0.3 * rng.standard_normal((count, dim)) / np.sqrt(dim) * 3)


# the identity of shards that no model made (index tests that need only vectors)
FAKE_IDENTITY = {
    "format": MANIFEST_FORMAT,
    "model": {"id": "fake", "weights_hash": "0" * 64},
    "processor_hash": "0" * 16,
    "created": "2024-01-01T00:00:00+00:00",
}


def write_fake_shards(
    out: Path, vectors: np.ndarray, like: dict, shard_size: int = 1000, prefix: str = "v"
) -> Path:
    """Shards + manifest of given vectors, with the identity of the manifest ``like``."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, len(vectors), shard_size)):
        part = vectors[start : start + shard_size]
        ids = [f"{prefix}{i}" for i in range(start, start + len(part))]
        write_shard(out / shard_name("texts", k), ids, ids, part, "float32", {"image_id": ids})
        shards.append({"index": k, "file": shard_name("texts", k), "rows": len(part), "failed": 0})
    manifest = {
        **{key: like[key] for key in ("format", "model", "processor_hash", "created")},
        "dim": vectors.shape[1],
        "dtype": "float32",
        "normalised": True,
        "shard_size": shard_size,
        "modalities": {
            "texts": {"items": len(vectors), "num_shards": len(shards), "shards": shards}
        },
    }
    save_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_tokenizer, minilm_path):
    root = tmp_path_factory.mktemp("index")
    processor = tiny_processor(minilm_tokenizer, minilm_path)
    model_dir = save_tiny_model(root / "model", processor)
    data = make_image_folder(root / "data", broken=False)
    shards = root / "emb"
    extract(model_dir, data, shards, shard_size=6, workers=0, progress=False)
    return {"root": root, "model": model_dir, "data": data, "shards": shards}


def test_flat_search_finds_own_image_and_caption(setup, tmp_path: Path, capsys) -> None:
    images, texts = tmp_path / "images", tmp_path / "texts"
    info = build_index(setup["shards"], images)
    build_index(setup["shards"], texts, modality="texts")
    assert (info["kind"], info["count"], info["modality"]) == ("flat", 10, "images")
    assert [s["file"] for s in info["shards"]] == ["images-00000.parquet", "images-00001.parquet"]
    manifest = load_manifest(setup["shards"])
    assert info["model"] == manifest["model"]
    assert info["processor_hash"] == manifest["processor_hash"]

    image = setup["data"] / "img7.png"
    results = search(images, setup["model"], image=image, k=3)
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert results[0]["id"] == "img7" and results[0]["source"] == str(image)
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)

    argv = ["search", "--index", str(images), "--model", str(setup["model"]), "-k", "2"]
    code = main([*argv, "--image", str(image)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 3 and lines[1].split()[:3] == ["1", "1.0000", "img7"]

    caption = json.loads((setup["data"] / "captions.jsonl").read_text().splitlines()[5])
    results = search(texts, setup["model"], text=caption["caption"], k=5)
    assert results[0]["source"] == caption["caption"] and results[0]["id"] == "5"
    assert results[0]["image_id"] == caption["image_id"]
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_ivf_on_random_vectors_finds_each_vector(setup, tmp_path: Path) -> None:
    vectors = random_vectors(3000)
    shards = write_fake_shards(tmp_path / "emb", vectors, load_manifest(setup["shards"]))
    info = build_index(shards, tmp_path / "ivf", kind="ivf", modality="texts")
    params = info["params"]
    assert info["kind"] == "ivf" and params["nlist"] == 3000 // 39
    assert 1 <= params["nprobe"] <= params["nlist"] and params["recall_at_10"] >= 0.95
    loaded = SearchIndex(tmp_path / "ivf")
    queries = vectors[::150]
    for row, hits in zip(range(0, 3000, 150), loaded.search(queries, 5), strict=True):
        assert hits[0][0] == row and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        assert len(hits) == 5
    # per-call nprobe: a larger one finds at least as much, and the index is left as it was
    exact = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    few = [[p for p, _ in hits] for hits in loaded.search(queries, 10, nprobe=1)]
    every = [[p for p, _ in hits] for hits in loaded.search(queries, 10, nprobe=params["nlist"])]
    assert neighbour_recall(np.array(every), exact) == 1.0
    assert neighbour_recall(np.array(few), exact) < 1.0
    assert loaded.index.nprobe == params["nprobe"]


def test_auto_keeps_exact_search_for_structureless_data(setup, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("xmodal.index.budget.FLAT_MAX", 1000)
    like = load_manifest(setup["shards"])
    shards = write_fake_shards(tmp_path / "random", random_vectors(4000), like)
    info = build_index(shards, tmp_path / "r", modality="texts")
    params = info["params"]
    assert info["kind"] == "flat" and "little cluster structure" in params["ivf_rejected"]
    assert params["measured_recall"] == {"at": 10, "value": 1.0, "queries": 400}
    assert isinstance(SearchIndex(tmp_path / "r").index, faiss.IndexFlatIP)
    shards = write_fake_shards(tmp_path / "clustered", clustered_vectors(4000, 40), like)
    info = build_index(shards, tmp_path / "c", modality="texts")
    params = info["params"]
    assert info["kind"] == "ivf" and params["recall_at_10"] >= 0.95
    assert params["nprobe"] <= 0.05 * params["nlist"] and "ivf_rejected" not in params
    index = SearchIndex(tmp_path / "c").index
    assert isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat) and index.ntotal == 4000
    assert index.nprobe == params["nprobe"]  # the tuned depth is the index's own


def test_hnsw_index(setup, tmp_path) -> None:
    vectors = clustered_vectors(2000, 20, seed=1)
    shards = write_fake_shards(tmp_path / "emb", vectors, load_manifest(setup["shards"]))
    info = build_index(shards, tmp_path / "h", kind="hnsw", modality="texts")
    params = info["params"]
    assert info["kind"] == "hnsw" and params["recall_at_10"] >= 0.95
    assert (params["M"], params["efConstruction"]) == (32, 80)
    loaded = SearchIndex(tmp_path / "h")
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == params["efSearch"] >= 16
    measured = params["measured_recall"]
    assert measured["at"] == 10 and measured["queries"] == 200  # a tenth of the rows
    assert measured["value"] == pytest.approx(params["recall_at_10"], abs=1e-4)
    hits = loaded.search(vectors[:50], 1, ef_search=256)
    assert [h[0][0] for h in hits] == list(range(50))


def test_neighbour_recall() -> None:
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert neighbour_recall(exact, exact, 4) == 1.0
    assert neighbour_recall(np.array([[0, 1, 9, 9], [7, 6, -1, -1]]), exact, 4) == 0.5


def test_add_new_shards_and_refuse_other_models(setup, tmp_path: Path) -> None:
    like = load_manifest(setup["shards"])
    vectors = random_vectors(1500, seed=3)
    first = write_fake_shards(tmp_path / "a", vectors[:1000], like, shard_size=500, prefix="a")
    second = write_fake_shards(tmp_path / "b", vectors[1000:], like, shard_size=500, prefix="b")
    out = tmp_path / "idx"
    assert main(["index", "--shards", str(first), "--out", str(out), "--what", "texts"]) == 0
    info = build_index(second, out, modality="texts", add=True)
    assert info["count"] == 1500 and info["generation"] == 2
    assert [Path(s["dir"]).name for s in info["shards"]] == ["a", "a", "b"]
    assert sorted(p.name for p in out.iterdir()) == [
        "heldout-00002.npz",
        "ids-00002.parquet",
        "index-00002.faiss",
        "index.json",
    ]
    assert build_index(second, out, modality="texts", add=True)["count"] == 1500  # nothing new
    loaded = SearchIndex(out)
    assert loaded.ids[999:1001] == ["a999", "b0"]
    assert loaded.search(vectors[1200], 1)[0][0][0] == 1200

    other = dict(like, model={"id": "other", "weights_hash": "f" * 64})
    foreign = write_fake_shards(tmp_path / "c", random_vectors(10, seed=4), other, prefix="c")
    with pytest.raises(IncompatibleError) as caught:
        build_index(foreign, out, modality="texts", add=True)
    assert like["model"]["weights_hash"][:16] in str(caught.value)
    assert "f" * 16 in str(caught.value)
    assert SearchIndex(out).count == 1500


def test_search_refuses_a_model_with_other_preprocessing(
    setup, tmp_path: Path, minilm_tokenizer, minilm_path
) -> None:
    build_index(setup["shards"], tmp_path / "idx")
    processor = tiny_processor(minilm_tokenizer, minilm_path, image_size=48, resize_size=56)
    other = tmp_path / "other"
    CrossModalModel.from_pretrained(setup["model"]).save_pretrained(other, processor)
    with pytest.raises(IncompatibleError, match="processor hash"):
        search(tmp_path / "idx", other, text="photo 1")


def test_rerank_orders_by_calibrated_mix(setup, tmp_path: Path, capsys) -> None:
    build_index(setup["shards"], tmp_path / "idx")
    plain = search(tmp_path / "idx", setup["model"], text="photo 3", k=4)
    # never calibrated: re-ranking is a no-op (ITC order, no ITM scores), and the CLI says so
    same = search(tmp_path / "idx", setup["model"], text="photo 3", k=4, rerank=True)
    assert same == plain and all("itm_score" not in r for r in same)
    argv = ["search", "--index", str(tmp_path / "idx"), "--model", str(setup["model"])]
    assert main([*argv, "--text", "photo 3", "-k", "4", "--rerank"]) == 0
    assert "never calibrated" in capsys.readouterr().out

    model = CrossModalModel.from_pretrained(setup["model"])
    processor = MultimodalProcessor.from_pretrained(setup["model"])
    scale = float(model.clip_scale().detach())
    results = search(
        tmp_path / "idx", setup["model"], text="photo 3", k=4, rerank=True, rerank_weight=0.7
    )
    assert len(results) == 4
    combined = [r["rerank_score"] for r in results]
    assert combined == sorted(combined, reverse=True)
    with torch.no_grad():
        image = model.image_features(processor.process_images([results[0]["source"]]))
        text = model.text_features(**processor.process_text(["photo 3"]))
        itm = float(model.itm_score(image, text)[0])
    assert results[0]["itm_score"] == pytest.approx(itm, abs=1e-4)
    expected = scale * results[0]["score"] + 0.7 * itm
    assert results[0]["rerank_score"] == pytest.approx(expected, abs=1e-3)
    # a weight saved with the model (as calibration does) is used without an override
    calibrated = tmp_path / "calibrated"
    shutil.copytree(setup["model"], calibrated)
    save_rerank_weight(calibrated, 0.7)
    saved = search(tmp_path / "idx", calibrated, text="photo 3", k=4, rerank=True)
    assert [r["id"] for r in saved] == [r["id"] for r in results]
    assert [r["rerank_score"] for r in saved] == pytest.approx(combined, abs=1e-5)
    # ... and a CLI override of 0 brings back the ITC order, saying so
    capsys.readouterr()
    argv[-1] = str(calibrated)
    assert main([*argv, "--text", "photo 3", "-k", "4", "--rerank", "--rerank-weight", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("re-rank weight 0")
    assert [line.split()[2] for line in out[2:]] == [r["id"] for r in plain]
    assert main([*argv, "--text", "photo 3", "--rerank", "--rerank-weight", "-1"]) == 2
    assert "--rerank-weight must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="re-ranking"):
        search(tmp_path / "idx", setup["model"], image=setup["data"] / "img1.png", rerank=True)


def test_index_reads_float16_shards_normalised(setup, tmp_path: Path) -> None:
    shards = tmp_path / "f16"
    extract(
        setup["model"], setup["data"], shards, modality="images", dtype="float16", progress=False
    )
    build_index(shards, tmp_path / "idx")
    loaded = SearchIndex(tmp_path / "idx")
    own = read_shard(shards / "images-00000.parquet").embeddings[2]
    (position, score), *_ = loaded.search(own, 1)[0]
    assert loaded.ids[position] == "img2" and score == pytest.approx(1.0, abs=1e-3)
    assert np.linalg.norm(loaded.index.reconstruct(0)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("damage", [b"{", b"\xff\xfe not UTF-8"])
def test_a_damaged_manifest_is_one_line_naming_it(tmp_path: Path, capsys, damage) -> None:
    like = {"format": "xmodal.embeddings/1", "model": {"id": "m", "weights_hash": "0" * 64}}
    shards = write_fake_shards(
        tmp_path / "emb", random_vectors(8), {**like, "processor_hash": "0", "created": "x"}
    )
    (shards / "manifest.json").write_bytes(damage)
    argv = ["index", "--shards", str(shards), "--out", str(tmp_path / "i"), "--modality", "texts"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xmodal index: error: ")
    assert "manifest.json: embeddings manifest is not valid JSON" in err
    assert "\n" not in err and not (tmp_path / "i").exists()


def test_search_several_index_folders_as_one(setup, tmp_path: Path, capsys) -> None:
    """xmodal search --index A B: each part's top-k merged by score, positions run on."""
    for name in ("a", "b"):
        info = build_index(setup["shards"], tmp_path / name, max_index_memory="64M")
        assert info["kind"] == "flat" and info["plan"]["factory"] == "Flat"
    image = setup["data"] / "img7.png"
    parts = [tmp_path / "a", tmp_path / "b"]
    results = search(parts, setup["model"], image=image, k=3)
    assert [r["id"] for r in results[:2]] == ["img7", "img7"]
    assert sorted(r["position"] for r in results[:2]) == [7, 17]
    assert results[1]["score"] == pytest.approx(1.0, abs=1e-5)
    assert results[2]["score"] < results[1]["score"]
    argv = ["search", "--index", *map(str, parts), "--model", str(setup["model"]), "-k", "2"]
    assert main([*argv, "--image", str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines[1:]] == ["img7", "img7"]
    argv = ["index", "--combine", *map(str, parts), "--out", str(tmp_path / "both")]
    assert main(argv) == 0 and "sharded index of 20 images" in capsys.readouterr().out
    assert search(tmp_path / "both", setup["model"], image=image, k=1)[0]["id"] == "img7"
