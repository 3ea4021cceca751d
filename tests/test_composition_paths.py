"""The composition matrix, continued: a representative set of model families through every
path after extraction.

Families (built as in tests/test_composition.py): the model ``xmodal quickstart`` trains (pool
and token levels, MLP image projection, cross fusion with grid positions), the ``seed`` preset
shrunk (pooled fusion, fixed-length captions), a tiny random SigLIP folder (an aligned model,
a new cross fusion on top), and two pure dual encoders (no ITM head): a tiny random CLIP saved
with ``fusion: none`` and the offline default's architecture with ``fusion: none``.

Paths, each a cell: ``export-onnx`` + ``extract`` of images, texts and pairs through the
exported towers (``--onnx-dir``); ``eval`` with ITM re-rank (a dual encoder says in one line
that it skips it); ``eval --calibrate-rerank`` into a copy of an xmodal model directory, whose
weight ``search --rerank`` then uses (a transformers folder is refused in one line, untouched);
``index`` + ``search`` of a caption with ``--rerank``, of an image with ``--rerank`` on a
caption index, and of an indexed image (its top hit is itself); the service (``/search``
plain and re-ranked, ``/embed`` of captions and images, ``/match``); ``filter`` and ``probe``
on the extraction; ``train`` two steps then ``--resume`` to three (and so the packaged
quickstart.yaml's training, shrunk). Each cell: exit 0 (HTTP
200), the output's shape and values where cheap, and stderr (file descriptors: native output
counts) under 4 KB.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from aligned_fixtures import save_clip, save_siglip
from test_composition import (
    MAX_STDERR,
    MIN_COSINE,
    family_processor,
    messages,
    offline_small,
    quickstart_tiny,
    recorded,
    run_cli,
    seed_tiny,
)
from test_extract import N_IMAGES, make_image_folder

pytest.importorskip("onnxruntime")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("fastapi")

import xmodal  # noqa: E402
from xmodal.evaluate.rerank import NOT_BETTER  # noqa: E402
from xmodal.extract import load_manifest, read_shard  # noqa: E402
from xmodal.models.model import CrossModalModel  # noqa: E402
from xmodal.pairs import read_pair_scores  # noqa: E402

ROWS = 2 * N_IMAGES  # two captions an image
K = 3
RERANK_WEIGHT = 0.5  # so that re-ranking acts (a model never calibrated re-ranks with 0)
FAMILIES = ("quickstart", "seed", "siglip", "clip-none", "offline-none")


@dataclass
class Family:
    """A saved model and what the cells made of it so far (each cell makes what it needs)."""

    name: str
    model_dir: Path
    root: Path
    has_itm: bool
    embed_dim: int
    done: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """tests/test_extract.py's image folder (10 images, 20 captions), each row labelled by the
    length of its caption (``kind``: short / long) for the probe."""
    folder = make_image_folder(tmp_path_factory.mktemp("data"), broken=False)
    rows = [json.loads(line) for line in (folder / "captions.jsonl").open()]
    for i, row in enumerate(rows):
        row["kind"] = "long" if i % 2 else "short"
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def save_family(name: str, root: Path, minilm_path: str, tokenizer) -> Path:
    """The family's model saved in ``root / "model"`` (a transformers folder for SigLIP)."""
    model_dir = root / "model"
    torch.manual_seed(0)
    if name == "siglip":
        return save_siglip(model_dir, minilm_path)
    if name == "clip-none":
        model, processor = xmodal.load_model(save_clip(root / "clip"), fusion="none")
        model.save_pretrained(model_dir, processor)
        return model_dir
    if name == "quickstart":
        model = quickstart_tiny()
    else:
        model = CrossModalModel(seed_tiny() if name == "seed" else offline_small("none"))
    model.save_pretrained(model_dir, family_processor(name, minilm_path, tokenizer))
    return model_dir


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, minilm_path, minilm_tokenizer) -> Family:
    root = tmp_path_factory.mktemp(request.param)
    model_dir = save_family(request.param, root, minilm_path, minilm_tokenizer)
    model, _ = xmodal.load_model(model_dir)
    return Family(request.param, model_dir, root, model.has_itm, model.config.embed_dim)


mappers = recorded  # the mappers extract builds (test_composition's fixture)


def cli(capfd, argv: list[str]) -> tuple[str, str]:
    """``xmodal argv``, which must succeed with a short stderr; its stdout and stderr."""
    code, out, err = run_cli(capfd, argv)
    assert code == 0, err[-2000:]
    assert len(err) < MAX_STDERR, err[:2000]
    return out, err


def refused(capfd, argv: list[str]) -> str:
    """``xmodal argv``, which must refuse in one line; that line."""
    code, out, err = run_cli(capfd, argv)
    assert code == 2 and err.count("\n") == 1 and len(err) < 400, (out[-2000:], err[:2000])
    return err


def features(family: Family, data: Path, capfd, caplog, mappers: list) -> Path:
    """The cell ``export-onnx`` + ``extract``: images and texts, then the pairs (with their fused
    vectors where there is a fusion), into one folder, through the exported ONNX towers."""
    if "features" in family.done:
        return family.done["features"]
    onnx_dir, out = family.root / "onnx", family.root / "features"
    argv = ["export-onnx", "--model", str(family.model_dir), "--out", str(onnx_dir)]
    stdout, _ = cli(capfd, argv)
    cosines = [float(line.split()[-1]) for line in stdout.splitlines() if "lowest cosine" in line]
    assert len(cosines) == 2 and min(cosines) >= MIN_COSINE, stdout
    argv = ["extract", "--model", str(family.model_dir), "--data", str(data), "--out", str(out)]
    argv += ["--onnx-dir", str(onnx_dir), "--workers", "0", "--precision", "fp32"]
    for modality in ("both", "pairs"):
        extra = ["--fused"] if modality == "pairs" and family.has_itm else []
        caplog.clear()
        _, err = cli(capfd, [*argv, "--modality", modality, *extra])
        assert messages(err) == [], err
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == []  # no fallback to torch
    assert [(m.backend, m.fallback) for m in mappers] == [("onnx", None)] * 2
    manifest = load_manifest(out)
    assert {m: r["rows"] for m, r in manifest["modalities"].items()} == {
        "images": N_IMAGES,
        "texts": ROWS,
        "pairs": ROWS,
    }
    shard = read_shard(out / "images-00000.parquet")
    assert shard.embeddings.shape == (N_IMAGES, family.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(shard.embeddings, axis=1), 1.0, atol=1e-4)
    pairs = read_pair_scores(out)
    scores = {"similarity", "itm", "combined"} if family.has_itm else {"similarity"}
    assert set(pairs.scores) == scores
    assert (pairs.fused is not None) == family.has_itm
    family.done["features"] = out
    return out


def index(family: Family, data: Path, capfd, caplog, mappers: list) -> Path:
    """The cell ``index``: a flat index of the extracted images."""
    if "index" in family.done:
        return family.done["index"]
    shards, out = features(family, data, capfd, caplog, mappers), family.root / "index"
    stdout, _ = cli(capfd, ["index", "--shards", str(shards), "--out", str(out)])
    assert str(out) in stdout
    family.done["index"] = out
    return out


def test_extract_through_exported_towers(family, data, capfd, caplog, mappers) -> None:
    features(family, data, capfd, caplog, mappers)


def test_eval_with_rerank(family, data, capfd, tmp_path) -> None:
    report_path = tmp_path / "report.json"
    argv = ["eval", "--model", str(family.model_dir), "--data", str(data)]
    argv += ["--out", str(report_path), "--rerank-k", str(K), "--workers", "0"]
    stdout, _ = cli(capfd, [*argv, "--rerank-weight", str(RERANK_WEIGHT)])
    report = json.loads(report_path.read_text())
    assert report["n_images"] == N_IMAGES
    itc = report["retrieval_itc"]
    assert all(0.0 <= itc[key] <= 100.0 for key in ("t2i_R@1", "t2i_R@5", "i2t_R@1"))  # %
    assert itc["t2i_R@1"] <= itc["t2i_R@5"] <= itc["t2i_R@10"] == 100.0  # 10 images
    if family.has_itm:
        reranked = report["retrieval_itm_rerank"]
        assert reranked["k"] == K and reranked["t2i_R@10"] == 100.0
        assert report["rerank"]["weight"] == RERANK_WEIGHT
        assert report["rerank"]["source"] == "override"
        assert "ITC + ITM re-rank" in stdout
    else:  # a dual encoder says in one line that it cannot re-rank
        assert "retrieval_itm_rerank" not in report
        assert report["retrieval_itm_rerank_skipped"] == "the model has no ITM head (fusion: none)"
        (line,) = [line for line in stdout.splitlines() if "re-rank" in line]
        assert line == "ITM re-rank skipped: the model has no ITM head (fusion: none)"


def test_calibrated_rerank_weight_reaches_search(
    family, data, capfd, caplog, mappers, tmp_path
) -> None:
    """``eval --calibrate-rerank`` saves the weight into (a copy of) the model directory, and
    ``search --rerank`` with that copy on the index built before re-ranks with it."""
    idx = index(family, data, capfd, caplog, mappers)
    argv = ["eval", "--data", str(data), "--rerank-k", str(K), "--workers", "0"]
    argv += ["--calibrate-rerank", "--model"]
    if family.name == "siglip":  # a transformers folder: its config.json is not xmodal's
        before = (family.model_dir / "config.json").read_bytes()
        err = refused(capfd, [*argv, str(family.model_dir)])
        assert "not a model saved by xmodal" in err and "--rerank-weight" in err
        assert (family.model_dir / "config.json").read_bytes() == before
        return
    model_dir = tmp_path / "model"
    shutil.copytree(family.model_dir, model_dir)
    before = (model_dir / "config.json").read_bytes()
    stdout, _ = cli(capfd, [*argv, str(model_dir)])
    if not family.has_itm:  # nothing to calibrate, said in one line
        assert "ITM re-rank skipped: the model has no ITM head (fusion: none)" in stdout
        assert (model_dir / "config.json").read_bytes() == before
        return
    weight = json.loads((model_dir / "config.json").read_text())["model"]["fusion"]
    weight = weight["rerank_weight"]
    assert f"re-rank weight {weight:.4g} saved in" in stdout
    search = ["search", "--index", str(idx), "--model", str(model_dir), "--text", "photo 3"]
    stdout, _ = cli(capfd, [*search, "-k", str(K), "--rerank"])
    note = NOT_BETTER if weight == 0 else f"re-rank score: ITC logit + {weight:.4g} x ITM score"
    assert stdout.splitlines()[0] == note
    assert len(search_hits(stdout)) == K


def search_hits(stdout: str) -> list[list[str]]:
    """The rows of ``xmodal search``'s result table (rank, score, [itm,] id, source)."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "score"])
    return [line.split() for line in lines[head + 1 :]]


def test_index_and_search_with_rerank(family, data, capfd, caplog, mappers) -> None:
    idx = index(family, data, capfd, caplog, mappers)
    base = ["search", "--index", str(idx), "--model", str(family.model_dir), "-k", str(K)]
    rerank = ["--text", "photo 3", "--rerank", "--rerank-weight", str(RERANK_WEIGHT)]
    if family.has_itm:
        stdout, _ = cli(capfd, [*base, *rerank])
        assert f"re-rank score: ITC logit + {RERANK_WEIGHT:.4g} x ITM score" in stdout
        hits = search_hits(stdout)
        assert [int(h[0]) for h in hits] == list(range(1, K + 1))
        assert all(len(h) == 5 and h[3].startswith("img") for h in hits)  # with an ITM column
    else:
        err = refused(capfd, [*base, *rerank])
        assert err.startswith("xmodal search: error: ") and "fusion: none" in err
    stdout, _ = cli(capfd, [*base, "--text", "photo 3"])
    assert len(search_hits(stdout)) == K
    if family.has_itm:  # the other way round: an image query re-ranks indexed captions
        shards, texts = family.done["features"], family.root / "texts-index"
        cli(capfd, ["index", "--shards", str(shards), "--out", str(texts), "--modality", "texts"])
        argv = [*base, "--image", str(data / "img3.png"), "--rerank"]
        argv[2] = str(texts)
        stdout, _ = cli(capfd, [*argv, "--rerank-weight", str(RERANK_WEIGHT)])
        hits = search_hits(stdout)
        assert len(hits) == K and all(len(h) >= 5 for h in hits)  # captions: spaces in them
        itm = [float(h[2]) for h in hits]
        assert all(np.isfinite(itm))
    base[-1] = str(N_IMAGES)
    stdout, _ = cli(capfd, [*base, "--image", str(data / "img7.png")])
    hits = search_hits(stdout)
    assert len(hits) == N_IMAGES
    assert_found_itself({h[2]: float(h[1]) for h in hits}, "img7", atol=1e-4)  # 4 decimals


def assert_found_itself(scores: dict[str, float], query: str, atol: float = 1e-5) -> None:
    """An indexed image as the query finds itself at cosine 1, with nothing above it: its top
    hit, or tied for it (a random tower can map several images to one point, as the offline
    default's random EfficientNet does with these noise images)."""
    assert scores[query] == pytest.approx(1.0, abs=atol)
    assert max(scores.values()) <= scores[query] + atol


def test_service(family, data, capfd, caplog, mappers) -> None:
    from fastapi.testclient import TestClient

    from xmodal.search import open_searcher
    from xmodal.serve import create_app

    idx = index(family, data, capfd, caplog, mappers)
    searcher = open_searcher(idx, family.model_dir, RERANK_WEIGHT if family.has_itm else None)
    png = (data / "img4.png").read_bytes()
    upload = {"image": ("q.png", png, "image/png")}
    capfd.readouterr()
    with TestClient(base_url="http://localhost", app=create_app(searcher)) as client:
        response = client.post("/search", json={"text": "photo 4", "k": K})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == K and [r["rank"] for r in results] == [1, 2, 3]
        scores = [r["score"] for r in results]
        assert scores == sorted(scores, reverse=True)

        response = client.post("/search", json={"text": "photo 4", "k": K, "rerank": True})
        if family.has_itm:
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["rerank_weight"] == RERANK_WEIGHT and body["rerank_note"] is None
            combined = [r["rerank_score"] for r in body["results"]]
            assert len(combined) == K and combined == sorted(combined, reverse=True)
            for r in body["results"]:
                expected = searcher.itc_scale * r["score"] + RERANK_WEIGHT * r["itm_score"]
                assert r["rerank_score"] == pytest.approx(expected, rel=1e-5)
        else:
            assert response.status_code == 409 and "fusion: none" in response.json()["detail"]

        response = client.post("/search", files=upload, data={"k": str(N_IMAGES)})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == N_IMAGES
        assert_found_itself({r["id"]: r["score"] for r in results}, "img4")

        response = client.post("/embed", json={"text": ["photo 4", "a dog"]})
        assert response.status_code == 200, response.text
        texts = np.asarray(response.json()["embeddings"])
        assert texts.shape == (2, family.embed_dim)
        response = client.post("/embed", files=[("image", ("a.png", png, "image/png"))] * 2)
        assert response.status_code == 200, response.text
        images = np.asarray(response.json()["embeddings"])
        assert images.shape == (2, family.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-4)
        np.testing.assert_allclose(images[0], images[1], atol=1e-6)

        response = client.post("/match", files=upload, data={"caption": "photo 4"})
        if family.has_itm:
            assert response.status_code == 200, response.text
            body = response.json()
            assert 0.0 <= body["match_probability"] <= 1.0
            assert body["similarity"] == pytest.approx(float(images[0] @ texts[0]), abs=1e-4)
        else:
            assert response.status_code == 409 and "fusion: none" in response.json()["detail"]
    out, err = capfd.readouterr()
    assert len(out) < MAX_STDERR and len(err) < MAX_STDERR, err[:2000]


def test_filter_and_probe(family, data, capfd, caplog, mappers, tmp_path) -> None:
    pytest.importorskip("sklearn", reason="scikit-learn (xmodal[probe]) is not installed")
    scores = features(family, data, capfd, caplog, mappers)
    kept = tmp_path / "kept.jsonl"
    by = "itm" if family.has_itm else "similarity"
    argv = ["filter", "--scores", str(scores), "--out", str(kept), "--keep-fraction", "0.5"]
    stdout, _ = cli(capfd, [*argv, "--by", by])
    assert f"kept {ROWS // 2} of {ROWS} scored pairs" in stdout
    table = read_pair_scores(scores)
    best = np.sort(table.scores[by])[::-1][: ROWS // 2]
    got = [json.loads(line) for line in kept.read_text().splitlines()]
    assert len(got) == ROWS // 2 and all(row["kind"] in ("short", "long") for row in got)
    report = json.loads((tmp_path / "kept.report.json").read_text())
    assert report["cutoffs"][by] == pytest.approx(float(best[-1]), abs=1e-6)
    assert (tmp_path / "kept.scores.png").read_bytes()[:4] == b"\x89PNG"

    report_path = tmp_path / "probe.json"
    argv = ["probe", "--features", str(scores), "--label", "kind", "--out", str(report_path)]
    stdout, _ = cli(capfd, argv)
    assert "majority class" in stdout
    probe = json.loads(report_path.read_text())
    kinds = {r["kind"]: r["dim"] for r in probe["results"]}
    dim = family.embed_dim
    expected = {"image": dim, "text": dim, "image+text": 2 * dim}
    if family.has_itm:  # the pairs' fused vectors too
        assert kinds["fused"] > 0 and kinds["fused+image+text"] == kinds["fused"] + 2 * dim
        expected.update(fused=kinds["fused"], **{"fused+image+text": kinds["fused"] + 2 * dim})
    assert kinds == expected
    assert probe["train_rows"] + probe["test_rows"] == ROWS and probe["classes"] == 2
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in probe["results"])


def test_train_two_steps_and_resume(family, data, capfd, tmp_path) -> None:
    run = tmp_path / "run"
    config = {
        "data": {"train": str(data / "captions.jsonl"), "num_workers": 0},
        "model": {"name": str(family.model_dir)},
        "loss": {"infonce": 1.0, "itm": 1.0 if family.has_itm else 0.0},
        "optim": {"steps": 2, "batch_size": 6, "lr": 1e-3, "warmup_steps": 1},
        "out_dir": str(run),
        "device": "cpu",
        "precision": "fp32",
        "eval_every": 0,
        "save_every": 0,
        "log_every": 1,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    stdout, _ = cli(capfd, ["train", "--config", str(path)])
    assert "after 2 steps" in stdout
    first = xmodal.load_model(run / "model")[0].state_dict()
    stdout, _ = cli(capfd, ["train", "--config", str(path), "--resume", "--steps", "3"])
    assert "at step 2" in stdout and "after 3 steps" in stdout
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    model, processor = xmodal.load_model(run / "model")
    assert model.has_itm == family.has_itm and model.config.embed_dim == family.embed_dim
    after = model.state_dict()
    assert after.keys() == first.keys()
    assert any(not torch.equal(after[key], first[key]) for key in after)  # the third step
    batch = processor.process_text(["photo 1"])
    with torch.no_grad():
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert text.shape == (1, family.embed_dim) and torch.isfinite(text).all()


def test_train_the_quickstart_config_two_steps_and_resume(
    data, capfd, tmp_path, minilm_path, minilm_tokenizer
) -> None:
    """The packaged quickstart.yaml as it is (locked image tower with cached views and
    zoom-outs, multi-level pooling, an MLP projection, token levels, grid positions, the ITM
    stage on reorderings), shrunk: the tiny quickstart model, two steps then one more."""
    from xmodal.apps.quickstart import quickstart_config_path

    model_dir = save_family("quickstart", tmp_path, minilm_path, minilm_tokenizer)
    config = yaml.safe_load(quickstart_config_path().read_text())
    captions = str(data / "captions.jsonl")
    config["data"].update(train=captions, val=captions, num_workers=0)
    config["model"].update(name=str(model_dir), text_trainable_layers=1)
    config["model"]["overrides"]["image_projection_hidden"] = 16
    config["itm_stage"]["optim"]["steps"] = 2
    config["optim"].update(steps=2, batch_size=6, warmup_steps=1)
    run = tmp_path / "run"
    config.update(out_dir=str(run), eval_every=0, save_every=0, log_every=1)
    config.update(device="cpu", precision="fp32")
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    stdout, _ = cli(capfd, ["train", "--config", str(path)])
    assert "after 2 steps" in stdout
    stdout, _ = cli(capfd, ["train", "--config", str(path), "--resume", "--steps", "3"])
    assert "at step 2" in stdout and "after 3 steps" in stdout
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "infonce" in r] == [1, 2, 3]
    assert [r["step"] for r in log if r.get("stage") == "itm"] == [4, 5]
    assert all(np.isfinite(r["loss"]) for r in log)
    model, _ = xmodal.load_model(run / "model")
    image = model.config.image
    assert (image.pool_levels, image.token_levels) == (7, 7)
    assert model.config.fusion.grid_positions and model.config.image_projection_hidden == 16
    assert model.config.fusion.rerank_weight is not None  # calibrated after the ITM stage
