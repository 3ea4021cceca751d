"""extract --what pairs, xmodal filter, xmodal probe: scores against the model computed by hand,
shards, errors, resume, refusals, kept rows in the input's format, probe accuracy."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from test_extract import BROKEN, make_image_folder, save_tiny_model, tiny_processor

from xmodal.cli import main
from xmodal.config import ConfigError
from xmodal.data.datasets import load_dataset
from xmodal.errors import ExtractError, IncompatibleError, InputError
from xmodal.extract import extract, load_manifest, read_pair_shards, read_shard
from xmodal.extract.mapper import EmbeddingMapper, MapperOptions, mapper_pairs
from xmodal.extract.pairs import PairItem, plan_pairs
from xmodal.models.model import CrossModalModel, Features
from xmodal.pairs import filter_pairs, keep_mask, probe, read_pair_scores, score_pairs
from xmodal.pairs.probe import fit_and_score, group_split
from xmodal.processing import MultimodalProcessor

SHARD = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_tokenizer, minilm_path) -> dict:
    root = tmp_path_factory.mktemp("pairs")
    processor = tiny_processor(minilm_tokenizer, minilm_path)
    model = save_tiny_model(root / "model", processor)
    data = make_image_folder(root / "data")
    scored = root / "scored"
    score_pairs(model, data, scored, fused=True, shard_size=SHARD, workers=1, progress=False)
    return {"root": root, "model": model, "data": data, "scored": scored, "processor": processor}


def reference(model_dir: Path, images: list[str], captions: list[str]) -> dict[str, np.ndarray]:
    """Similarity, ITM probability and fused vector of each pair, one pair at a time."""
    model = CrossModalModel.from_pretrained(model_dir)
    processor = MultimodalProcessor.from_pretrained(model_dir)
    out: dict[str, list] = {"similarity": [], "itm": [], "fused": []}
    with torch.no_grad():
        for image, caption in zip(images, captions, strict=True):
            result = model(processor.process_images([image]), **processor.process_text([caption]))
            out["similarity"].append(float(result.image_embeds[0] @ result.text_embeds[0]))
            out["itm"].append(float(torch.softmax(result.itm_logits, -1)[0, 1]))
            out["fused"].append(result.fused_embeds[0].numpy())
    return {k: np.asarray(v) for k, v in out.items()}


def test_pair_scores_match_the_model_pair_by_pair(setup) -> None:
    out, data = setup["scored"], setup["data"]
    manifest = load_manifest(out)
    record = manifest["modalities"]["pairs"]
    rows = [json.loads(line) for line in (data / "captions.jsonl").open()]
    # 21 rows, the broken image's at position 9 (shard 2): 4 + 4 + 3 + 4 + 4 + 1
    assert [s["rows"] for s in record["shards"]] == [4, 4, 3, 4, 4, 1]
    assert [s["failed"] for s in record["shards"]] == [0, 0, 1, 0, 0, 0]
    assert (record["rows"], record["failed"], record["complete"], record["fused"]) == (
        20,
        1,
        True,
        True,
    )
    assert record["scores"] == ["similarity", "itm", "combined"]
    assert record["combined_weight"] == 0.0  # never calibrated: the similarity's order

    table = read_pair_shards(out, manifest)
    good = [i for i, row in enumerate(rows) if row["image_id"] != BROKEN]
    assert table.columns["id"] == [str(i) for i in good]
    assert table.columns["caption"] == [rows[i]["caption"] for i in good]
    assert table.columns["row"] == [f"captions.jsonl:{i + 1}" for i in good]
    images = [str(data / rows[i]["image"]) for i in good]
    assert table.columns["source"] == images
    want = reference(setup["model"], images, table.columns["caption"])
    np.testing.assert_allclose(table.scores["similarity"], want["similarity"], atol=1e-5)
    np.testing.assert_allclose(table.scores["itm"], want["itm"], atol=1e-5)
    np.testing.assert_allclose(table.fused, want["fused"], atol=1e-4)
    assert table.fused.shape == (20, 32)
    scale = float(CrossModalModel.from_pretrained(setup["model"]).clip_scale().detach())
    np.testing.assert_allclose(table.scores["combined"], scale * want["similarity"], atol=1e-4)

    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1
    assert errors[0]["modality"] == "pairs" and errors[0]["id"] == "9"
    assert errors[0]["row"] == "captions.jsonl:10" and errors[0]["caption"] == "a broken file"
    assert "not a recognised image format" in errors[0]["reason"]


def test_pair_similarity_is_the_dot_of_extracted_embeddings(setup, tmp_path: Path) -> None:
    out = tmp_path / "both"
    extract(setup["model"], setup["data"], out, workers=0, progress=False)
    images = read_shard(out / "images-00000.parquet")
    texts = read_shard(out / "texts-00000.parquet")
    by_image = dict(zip(images.ids, images.embeddings, strict=True))
    table = read_pair_scores(setup["scored"])
    text_rows = {i: v for i, v in zip(texts.ids, texts.embeddings, strict=True)}
    dots = [
        float(by_image[image_id] @ text_rows[row])
        for image_id, row in zip(table.columns["image_id"], table.columns["id"], strict=True)
    ]
    np.testing.assert_allclose(table.scores["similarity"], dots, atol=1e-5)


def test_pairs_resume_after_kill_and_refusals(setup, tmp_path: Path) -> None:
    out = tmp_path / "resumed"

    class Killed(Exception):
        pass

    def kill(kind: str, shard: int) -> None:
        if shard == 1:
            raise Killed

    options = {"shard_size": SHARD, "workers": 0, "progress": False, "fused": True}
    with pytest.raises(Killed):
        score_pairs(setup["model"], setup["data"], out, on_shard=kill, **options)
    assert [s["index"] for s in load_manifest(out)["modalities"]["pairs"]["shards"]] == [0, 1]
    written: list[tuple[str, int]] = []
    score_pairs(
        setup["model"], setup["data"], out, on_shard=lambda *a: written.append(a), **options
    )
    assert written == [("pairs", k) for k in range(2, 6)]
    a, b = read_pair_scores(out), read_pair_scores(setup["scored"])
    assert a.columns == b.columns
    np.testing.assert_allclose(a.scores["itm"], b.scores["itm"], atol=1e-6)
    np.testing.assert_allclose(a.fused, b.fused, atol=1e-6)
    assert (out / "errors.jsonl").read_text() == (setup["scored"] / "errors.jsonl").read_text()

    with pytest.raises(ExtractError, match="with --fused"):
        score_pairs(setup["model"], setup["data"], out, shard_size=SHARD, progress=False)
    with pytest.raises(ExtractError, match="pairs only"):
        extract(setup["model"], setup["data"], tmp_path / "x", modality="images", fused=True)
    other = save_tiny_model(tmp_path / "other", setup["processor"], seed=1)
    with pytest.raises(IncompatibleError, match="model weights hash"):
        score_pairs(other, setup["data"], out, **options)


def test_unusable_rows_are_recorded_never_dropped_silently(setup, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    make_image_folder(data, broken=False)
    rows = [json.loads(line) for line in (data / "captions.jsonl").open()]
    rows.insert(2, {"image": "missing.png", "caption": "nowhere"})
    rows.insert(5, {"image": "img1.png", "caption": "\u200b \u200b"})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["extract", "--what", "pairs", "--model", str(setup["model"]), "--data", str(data)]
    argv += ["--workers", "0", "--backend", "torch", "--out"]
    assert main([*argv, str(tmp_path / "strict")]) == 2
    assert "captions.jsonl:3" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "manifest.json").exists()
    assert main([*argv, str(tmp_path / "out"), "--skip-bad"]) == 0
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").open()]
    assert [s["row"] for s in skipped] == ["captions.jsonl:3", "captions.jsonl:6"]
    assert "not found" in skipped[0]["reason"] and "caption" in skipped[1]["reason"]
    record = load_manifest(tmp_path / "out")["modalities"]["pairs"]
    assert record["rows"] == 20 and load_manifest(tmp_path / "out")["skipped_rows"] == 2


def test_onnx_towers_score_pairs_like_torch(make_processor) -> None:
    model = CrossModalModel(tiny_model_config()).eval()
    processor = make_processor()
    pixels = torch.randn(3, 3, 64, 64)
    text = processor.process_text(["a red square", "two blue dots on a line", "x"])
    onnx = EmbeddingMapper(model, MapperOptions(backend="auto"), processor)
    plain = EmbeddingMapper(model)
    assert (onnx.backend, plain.backend) == ("onnx", "torch")
    got = mapper_pairs(onnx, pixels, text["input_ids"], text["attention_mask"], fused=True)
    want = mapper_pairs(plain, pixels, text["input_ids"], text["attention_mask"], fused=True)
    np.testing.assert_allclose(got.similarity, want.similarity, atol=1e-4)
    np.testing.assert_allclose(got.itm, want.itm, atol=1e-4)
    np.testing.assert_allclose(got.fused, want.fused, atol=1e-3)


def test_combined_score_mixes_the_itm_logit_at_the_calibrated_weight(
    setup, tmp_path: Path, capsys
) -> None:
    """``combined`` = logit_scale x similarity + fusion.filter_weight x ITM logit; ``filter --by
    combined`` keeps the best by it; a folder scored at another weight is not resumed."""
    model = tmp_path / "calibrated"
    shutil.copytree(setup["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["model"]["fusion"]["filter_weight"] = 0.5
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "scored"
    score_pairs(model, setup["data"], out, shard_size=SHARD, workers=0, progress=False)
    assert load_manifest(out)["modalities"]["pairs"]["combined_weight"] == 0.5
    table = read_pair_scores(out)
    itm = table.scores["itm"].astype(np.float64)
    scale = float(CrossModalModel.from_pretrained(model).clip_scale().detach())
    want = scale * table.scores["similarity"] + 0.5 * np.log(itm / (1 - itm))
    np.testing.assert_allclose(table.scores["combined"], want, atol=1e-3)
    kept = tmp_path / "kept.jsonl"
    argv = ["filter", "--scores", str(out), "--out", str(kept), "--keep-fraction", "0.25"]
    assert main([*argv, "--by", "combined"]) == 0
    top = np.argsort(-table.scores["combined"], kind="stable")[:5]
    assert sorted(json.loads(line)["caption"] for line in kept.read_text().splitlines()) == sorted(
        table.columns["caption"][i] for i in top
    )
    config["model"]["fusion"]["filter_weight"] = 2.0  # re-calibrated: its scores differ
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExtractError, match="filter weight 0.5"):
        score_pairs(model, setup["data"], out, shard_size=SHARD, workers=0, progress=False)


def test_dual_encoder_pairs_have_similarity_only(setup, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    dual = tmp_path / "dual"
    CrossModalModel(tiny_model_config(fusion="none")).save_pretrained(dual, setup["processor"])
    out = tmp_path / "out"
    with pytest.raises(IncompatibleError, match="--fused"):
        score_pairs(dual, setup["data"], out, fused=True, progress=False)
    score_pairs(dual, setup["data"], out, workers=0, progress=False)
    table = read_pair_scores(out)
    assert set(table.scores) == {"similarity"} and table.fused is None
    kept = tmp_path / "kept.jsonl"
    code = main(["filter", "--scores", str(out), "--out", str(kept), "--min-itm", "0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no itm score" in err
    assert not kept.exists() and not list(tmp_path.glob("kept*"))


def test_keep_mask_matches_a_direct_selection() -> None:
    rng = np.random.default_rng(0)
    scores = {"similarity": rng.uniform(-1, 1, 50), "itm": rng.uniform(0, 1, 50)}
    both = keep_mask(scores, min_similarity=0.1, min_itm=0.4)
    assert both.tolist() == [s >= 0.1 and t >= 0.4 for s, t in zip(*scores.values(), strict=True)]
    top = keep_mask(scores, keep_fraction=0.2, by="itm")
    assert top.sum() == 10
    assert scores["itm"][top].min() > scores["itm"][~top].max()


def test_filter_writes_kept_rows_in_the_input_format(setup, tmp_path: Path) -> None:
    table = read_pair_scores(setup["scored"])
    cut = float(np.median(table.scores["similarity"]))
    kept = tmp_path / "elsewhere" / "kept.jsonl"
    argv = ["filter", "--scores", str(setup["scored"]), "--out", str(kept)]
    assert main([*argv, "--min-similarity", str(cut)]) == 0
    scored = zip(table.columns["row"], table.scores["similarity"], strict=True)
    want = {row for row, score in scored if score >= cut}
    lines = (setup["data"] / "captions.jsonl").read_text().splitlines()
    expected = [json.loads(lines[int(r.split(":")[1]) - 1]) for r in sorted(want, key=_line)]
    got = [json.loads(line) for line in kept.read_text().splitlines()]
    assert len(got) == len(want) == 10
    for g, e in zip(got, expected, strict=True):  # other columns kept, image path re-based
        assert list(g) == list(e)
        assert (g["caption"], g["image_id"]) == (e["caption"], e["image_id"])
        assert (kept.parent / g["image"]).resolve() == (setup["data"] / e["image"]).resolve()
    assert len(load_dataset(kept)) == 10  # a usable dataset where it was written
    report = json.loads((tmp_path / "elsewhere" / "kept.report.json").read_text())
    assert (report["kept"], report["dropped"], report["unscored"]) == (10, 10, 1)
    assert report["cutoffs"]["similarity"] >= cut
    png = tmp_path / "elsewhere" / "kept.scores.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    same = setup["data"] / "top.jsonl"  # beside the input: rows byte for byte
    report = filter_pairs(setup["scored"], same, keep_fraction=0.25, by="itm", histogram=False)
    assert report.kept == 5
    top = np.argsort(-table.scores["itm"], kind="stable")[:5]
    rows = sorted((table.columns["row"][i] for i in top), key=_line)
    assert same.read_text().splitlines() == [lines[_line(r) - 1] for r in rows]
    same.unlink()
    (setup["data"] / "top.report.json").unlink()


def _line(row: str) -> int:
    return int(row.rsplit(":", 1)[1])


def test_filter_keeps_csv_rows_with_their_columns(setup, tmp_path: Path) -> None:
    data = tmp_path / "csvdata"
    make_image_folder(data, broken=False)
    rows = [json.loads(line) for line in (data / "captions.jsonl").open()]
    (data / "captions.jsonl").unlink()
    with open(data / "pairs.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "note, with comma"])
        for i, row in enumerate(rows):
            writer.writerow([row["image"], row["caption"], f"n{i}\nsecond line"])
    out = tmp_path / "scores"
    score_pairs(setup["model"], data / "pairs.csv", out, workers=0, progress=False)
    kept = data / "kept.csv"
    report = filter_pairs(out, kept, keep_fraction=0.5, histogram=False)
    got = list(csv.reader(kept.open(newline="")))
    assert got[0] == ["image", "caption", "note, with comma"] and len(got) == 11 == report.kept + 1
    table = read_pair_scores(out)
    top = sorted(int(table.columns["id"][i]) for i in np.argsort(-table.scores["similarity"])[:10])
    assert [r[2] for r in got[1:]] == [f"n{i}\nsecond line" for i in top]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-similarity", "1.5"], "min_similarity must be within [-1, 1]"),
        (["--min-itm", "-0.1"], "min_itm must be within [0, 1]"),
        (["--keep-fraction", "0"], "keep_fraction must be in (0, 1]"),
        (["--keep-fraction", "0.5", "--min-itm", "0.2"], "exclude each other"),
        ([], "give min_similarity, min_itm or keep_fraction"),
    ],
)
def test_filter_refuses_bad_criteria_writing_nothing(
    setup, tmp_path: Path, capsys, flags, message
) -> None:
    kept = tmp_path / "kept.jsonl"
    assert main(["filter", "--scores", str(setup["scored"]), "--out", str(kept), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_filter_refuses_data_other_than_the_scored(setup, tmp_path: Path) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(setup["data"], changed)
    text = (changed / "captions.jsonl").read_text()
    (changed / "captions.jsonl").write_text(text.replace('"photo 3"', '"photo 33"'))
    out = tmp_path / "kept.jsonl"
    with pytest.raises(IncompatibleError, match="not the data the pairs"):
        filter_pairs(setup["scored"], out, data=changed, min_itm=0.1)
    with pytest.raises(InputError, match="JSONL or CSV"):
        filter_pairs(setup["scored"], out, data=changed / "img0.png", min_itm=0.1)
    with pytest.raises(ConfigError, match="suffix"):
        filter_pairs(setup["scored"], tmp_path / "kept.csv", min_itm=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed"]


def test_probe_matches_a_direct_logistic_regression(setup, tmp_path: Path, capsys) -> None:
    pytest.importorskip("sklearn", reason="scikit-learn (xmodal[probe]) is not installed")
    data = tmp_path / "data"
    make_image_folder(data, broken=False)
    rows = [json.loads(line) for line in (data / "captions.jsonl").open()]
    for i, row in enumerate(rows):
        row["kind"] = "long" if i % 2 else "short"  # the caption's length class
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "features"
    extract(setup["model"], data, out, workers=0, progress=False)
    score_pairs(setup["model"], data, out, fused=True, workers=0, progress=False)
    report = probe(out, "kind", test_fraction=0.3, seed=1)
    assert [r.kind for r in report.results] == [
        "fused",
        "image",
        "text",
        "image+text",
        "fused+image+text",
    ]
    assert [r.dim for r in report.results] == [32, 32, 32, 64, 96]
    # the same probe by hand: rows aligned through the shards' ids
    images = read_shard(out / "images-00000.parquet")
    texts = read_shard(out / "texts-00000.parquet")
    fused = read_pair_scores(out)
    by_image = dict(zip(images.ids, images.embeddings, strict=True))
    labels = np.array([r["kind"] for r in rows])
    groups = np.array([r["image_id"] for r in rows])
    test = group_split(groups, 0.3, 1)
    assert not set(groups[test]) & set(groups[~test])
    assert (report.train_rows, report.test_rows) == (int((~test).sum()), int(test.sum()))
    x = {
        "fused": fused.fused,
        "image": np.stack([by_image[g] for g in groups]),
        "text": texts.embeddings,
    }
    x["image+text"] = np.concatenate([x["image"], x["text"]], axis=1)
    for result in report.results[:4]:
        accuracy, _ = fit_and_score(x[result.kind][~test], labels[~test], x[result.kind][test],
                                    labels[test])  # fmt: skip
        assert result.accuracy == pytest.approx(accuracy)
    by_text = {r.kind: r.accuracy for r in report.results}
    assert by_text["text"] == 1.0 and by_text["image"] <= 0.75  # caption length is in the text

    report_path = tmp_path / "probe.json"
    argv = ["probe", "--features", str(out), "--label", "kind", "--test", str(out)]
    assert main([*argv, "--out", str(report_path), "--kinds", "text", "image"]) == 0
    shown = capsys.readouterr().out
    assert "text" in shown and "majority class" in shown
    saved = json.loads(report_path.read_text())
    assert [r["kind"] for r in saved["results"]] == ["text", "image"]  # as asked
    assert saved["test_rows"] == len(rows)


def test_probe_refuses_features_of_another_model(setup, tmp_path: Path, capsys) -> None:
    other_model = save_tiny_model(tmp_path / "other", setup["processor"], seed=3)
    other = tmp_path / "other-scores"
    score_pairs(other_model, setup["data"], other, fused=True, workers=0, progress=False)
    argv = ["probe", "--features", str(setup["scored"]), "--label", "image_id"]
    assert main([*argv, "--test", str(other)]) == 2
    assert "another model" in capsys.readouterr().err
    assert main([*argv, "--test-fraction", "1.5"]) == 2
    assert main(["probe", "--features", str(setup["scored"]), "--label", "nope"]) == 2
    assert "no row has a 'nope' column" in capsys.readouterr().err


def test_two_ranks_score_what_one_process_does(setup, tmp_path: Path) -> None:
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "xmodal.cli", "extract", "--what", "pairs"]
    command += ["--model", str(setup["model"]), "--data", str(setup["data"]), "--out", str(out)]
    command += ["--shard-size", str(SHARD), "--workers", "0", "--device", "cpu", "--fused"]
    command += ["--precision", "fp32", "--backend", "torch"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = read_pair_scores(out), read_pair_scores(setup["scored"])
    assert a.columns == b.columns
    np.testing.assert_allclose(a.scores["similarity"], b.scores["similarity"], atol=1e-5)
    np.testing.assert_allclose(a.fused, b.fused, atol=1e-4)
    assert (out / "errors.jsonl").read_text() == (setup["scored"] / "errors.jsonl").read_text()
    want = load_manifest(setup["scored"])["modalities"]["pairs"]["shards"]
    assert load_manifest(out)["modalities"]["pairs"]["shards"] == want


def test_plan_refuses_unusable_captions_and_buckets_by_length(processor) -> None:
    captions = ["a dog", "\u200b\u200b", "a very long caption about a dog in a park", "cat", 7]
    items = [PairItem(str(i), f"i{i}", f"/x/{i}.png", c, f"d.jsonl:{i + 1}") for i, c in
             enumerate(captions)]  # fmt: skip
    plan = plan_pairs(items, [(0, 0, 3), (1, 3, 5)], processor, batch_size=2)
    empty = "caption is empty or has only whitespace or invisible characters"
    assert plan.refused == {0: [(1, empty)], 1: [(4, "caption is int, not a string")]}
    assert plan.batches == [[0, 2], [3]]  # shard 0 sorted by length, shard 1 alone
    assert plan.shard_of_batch == [0, 1] and plan.batches_left == {0: 1, 1: 1}
    ids, mask = plan.tokens.batch(plan.token_row[[3, 0]])
    want = processor.process_text(["cat", "a dog"])
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])


def _full_fusion(fusion, image, image_mask, text, text_mask):
    """The reference: every layer run for every text token, the first one returned."""
    image = fusion.image_in(image)
    text = fusion.text_in(text)
    for layer in fusion.layers:
        text = layer(text, text_mask, image, image_mask)
    return fusion.norm(text[:, 0])


@pytest.mark.parametrize("layers", [1, 2])
def test_fusion_of_the_first_token_only_equals_the_full_fusion(layers) -> None:
    config = tiny_model_config()
    config.fusion.layers = layers
    model = CrossModalModel(config).train()  # dropout 0: training mode computes the same
    image = torch.randn(3, 9, model.image_tower.token_dim)
    text = torch.randn(4, 7, model.text_tower.token_dim)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    image_rows = torch.tensor([2, 0, 0, 1, 1, 2])
    text_rows = torch.tensor([0, 1, 0, 3, 2, 2])  # captions shared between pairs
    fused = model.fusion(image, None, text, mask, image_rows, text_index=text_rows)
    reference = _full_fusion(
        model.fusion, image[image_rows], None, text[text_rows], mask[text_rows]
    )
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(fused)
    grads = torch.autograd.grad((fused * weights).sum(), list(model.fusion.parameters()))
    want = torch.autograd.grad((reference * weights).sum(), list(model.fusion.parameters()))
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    plain = model.fusion(image[image_rows], None, text[text_rows], mask[text_rows])
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=1e-5)


def test_itm_pair_logits_equal_the_logits_of_the_selected_pairs() -> None:
    model = CrossModalModel(tiny_model_config()).eval()
    torch.manual_seed(0)
    image = Features(
        torch.nn.functional.normalize(torch.randn(3, 32), dim=-1),
        torch.randn(3, 32),
        torch.randn(3, 9, model.image_tower.token_dim),
    )
    text = Features(
        torch.nn.functional.normalize(torch.randn(4, 32), dim=-1),
        torch.randn(4, 32),
        torch.randn(4, 7, model.text_tower.token_dim),
        torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2, [1] + [0] * 6]),
    )
    image_rows = torch.tensor([2, 0, 0, 1, 2])
    text_rows = torch.tensor([0, 1, 3, 3, 0])  # captions and images read by several pairs
    with torch.no_grad():
        pairs = model.itm_pair_logits(image, text, image_rows, text_rows)
        each = model.itm_logits(image.index(image_rows), text.index(text_rows))
    torch.testing.assert_close(pairs, each, atol=1e-5, rtol=1e-5)
