"""Undecodable images in ``xmodal eval`` and ``xmodal train``, with and without skip-bad.

The rows are fine (the files exist), so the readers keep them; decoding fails later, in
DataLoader workers. Without skip-bad the command prints one line naming the file and its
dataset row and exits 2; with it, the image and its captions are dropped from the run,
recorded with the reason and counted.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from conftest import write_colour_dataset
from PIL import Image
from test_bad_inputs import png_claiming

from xmodal.cli import main
from xmodal.data import load_dataset
from xmodal.evaluate.runner import evaluate_model
from xmodal.presets import load_model


def truncated_png(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((48, 48), 60).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


# file name -> (contents builder, words of the reason)
BAD = {
    "zero-bytes.jpg": (lambda p: b"", "empty file (0 bytes)"),
    "text-named.jpg": (lambda p: b"a caption saved under the wrong name\n", "not a recognised"),
    "truncated.png": (truncated_png, "truncated"),
    "bomb.png": (lambda p: png_claiming(30000, 30000), "too many pixels"),
}


def dataset_with_bad_images(root: Path, bad: list[str], n_good: int = 8) -> tuple[Path, Path]:
    """Good colour squares (2 captions each, a label) plus the ``bad`` files (2 captions each)
    placed between them; returns (dataset with everything, the same without the bad rows)."""
    clean = Path(write_colour_dataset(root, n=n_good, captions_per_image=2))
    rows = [json.loads(line) for line in clean.read_text().splitlines()]
    for row in rows:  # "a red circle" / "circle coloured red #1": the colour is the label
        words = row["caption"].split()
        row["label"] = words[1] if words[0] == "a" else words[2]
    clean.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mixed = list(rows)
    for i, name in enumerate(bad):
        (root / "images" / name).write_bytes(BAD[name][0](root / "images" / name))
        for c in range(2):
            row = {"image": f"images/{name}", "caption": f"picture {i} take {c}", "label": "red"}
            mixed.insert(3 + 5 * i, row)
    path = root / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return path, clean


def rows_naming(path: Path, name: str) -> list[str]:
    """``file:line`` of the rows naming ``name``, in order."""
    lines = path.read_text().splitlines()
    return [f"{path.name}:{n}" for n, line in enumerate(lines, start=1) if name in line]


def assert_one_line_error(err: str, path: Path, name: str, reason: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert name in lines[0] and reason in lines[0], err
    assert any(f"row {row})" in lines[0] for row in rows_naming(path, name)), err


# ------------------------------------------------------------------------------ eval


@pytest.mark.parametrize("name", list(BAD))
def test_eval_without_skip_bad_names_the_file_and_row(name, tmp_path, tiny_model_dir, capsys):
    data, _ = dataset_with_bad_images(tmp_path / "data", [name], n_good=4)
    argv = ["eval", "--model", tiny_model_dir, "--data", str(data), "--rerank-k", "0"]
    capsys.readouterr()
    assert main([*argv, "--workers", "1"]) == 2  # decoded in a DataLoader worker
    assert_one_line_error(capsys.readouterr().err, data, name, BAD[name][1])


def test_eval_with_skip_bad_drops_the_images_and_their_captions(tmp_path, tiny_model_dir):
    data, clean = dataset_with_bad_images(tmp_path / "data", list(BAD))
    out = tmp_path / "report.json"
    argv = ["eval", "--model", tiny_model_dir, "--data", str(data), "--out", str(out)]
    assert main([*argv, "--rerank-k", "3", "--workers", "1", "--skip-bad"]) == 0
    report = json.loads(out.read_text())
    assert (report["n_images"], report["n_texts"]) == (8, 16)
    assert report["n_bad_images"] == 4 and report["n_dropped_captions"] == 8
    reasons = {Path(r["source"]).name: r for r in report["bad_images"]}
    assert set(reasons) == set(BAD)
    for name, (_, words) in BAD.items():
        assert words in reasons[name]["reason"]
        assert reasons[name]["row"] == rows_naming(data, name)[0]  # the image's first row
    # retrieval (ITC and re-ranked) and zero-shot are those of the dataset without the bad rows
    model, processor = load_model(tiny_model_dir)
    expected = evaluate_model(model, processor, load_dataset(clean), rerank_k=3, num_workers=0)
    for key in ("retrieval_itc", "retrieval_itm_rerank", "zeroshot"):
        assert report[key] == expected[key], key


# ------------------------------------------------------------------------------ train


def train_config(tmp_path: Path, model: str, data: Path, **data_section) -> Path:
    config = {
        "data": {"train": str(data), "val": str(data), "num_workers": 1, **data_section},
        "model": {"name": model},
        "optim": {"steps": 4, "batch_size": 4, "warmup_steps": 1},
        "out_dir": str(tmp_path / "run"),
        "device": "cpu",
        "precision": "fp32",
        "eval_every": 2,
        "save_every": 2,
        "log_every": 1,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


LOCKED = {"lock_image": True, "cache_image_features": True}


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("zero-bytes.jpg", {}),
        ("text-named.jpg", LOCKED),
        ("truncated.png", {}),
        ("bomb.png", LOCKED),
    ],
)
def test_train_without_skip_bad_names_the_file_and_row(
    name, model, tmp_path, tiny_model_dir, capsys
):
    data, _ = dataset_with_bad_images(tmp_path / "data", [name], n_good=4)
    config = train_config(tmp_path, tiny_model_dir, data)
    if model:
        raw = yaml.safe_load(config.read_text())
        raw["model"].update(model)
        config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 2
    assert_one_line_error(capsys.readouterr().err, data, name, BAD[name][1])
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("model", [{}, LOCKED], ids=["decoded-per-batch", "cached-features"])
def test_train_with_skip_bad_drops_records_and_counts(model, tmp_path, tiny_model_dir):
    data, _ = dataset_with_bad_images(tmp_path / "data", list(BAD), n_good=6)
    config = train_config(tmp_path, tiny_model_dir, data, skip_bad=True)
    raw = yaml.safe_load(config.read_text())
    raw["model"].update(model)
    raw["optim"]["steps"] = 8  # 2 epochs of 20 pairs in batches of 4 when decoding per batch
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config)]) == 0
    out = tmp_path / "run"
    assert (out / "model" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    train_records = {Path(r["source"]).name: r for r in records if r["dataset"] == "train"}
    val_records = {Path(r["source"]).name: r for r in records if r["dataset"] == "val"}
    assert set(val_records) == set(BAD)  # validation drops every one of them
    assert set(train_records) == set(BAD)  # 8 steps see every pair at least once
    assert len(records) == len(train_records) + len(val_records)  # each image once per set
    for name, record in {**train_records, **val_records}.items():
        assert BAD[name][1] in record["reason"] and record["row"] in rows_naming(data, name)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["bad_images"] == len(records)
    assert "val_t2i_R@1" in log[-1]


def test_eval_with_only_undecodable_images_is_one_line(tmp_path, tiny_model_dir, capsys):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rows = []
    for name in BAD:
        (root / "images" / name).write_bytes(BAD[name][0](root / "images" / name))
        rows.append({"image": f"images/{name}", "caption": f"picture of {name}"})
    data = root / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["eval", "--model", tiny_model_dir, "--data", str(data), "--workers", "0"]
    capsys.readouterr()
    assert main([*argv, "--skip-bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xmodal eval: error: no image of ") and "zero-bytes.jpg" in err
    assert len(err.splitlines()) == 1


def test_train_resume_keeps_the_record_of_bad_images(tmp_path, tiny_model_dir):
    from xmodal.train import Trainer, load_train_config

    data, _ = dataset_with_bad_images(tmp_path / "data", list(BAD), n_good=6)
    path = train_config(tmp_path, tiny_model_dir, data, skip_bad=True, num_workers=0)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["val"] = None
    raw["optim"]["steps"] = 8
    path.write_text(yaml.safe_dump(raw))
    Trainer(load_train_config(path)).train(stop_after=5)  # one epoch of 5 batches: all met
    errors = tmp_path / "run" / "errors.jsonl"
    first = errors.read_text()
    assert sorted(Path(json.loads(r)["source"]).name for r in first.splitlines()) == sorted(BAD)
    Trainer(load_train_config(path)).train(resume=True)
    assert errors.read_text() == first  # met again in epoch 2: still once each
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(r["bad_images"] == 4 for r in log[5:])
    stale = {"dataset": "train", "image_id": "gone", "source": "gone.png", "row": "", "reason": ""}
    errors.write_text(first + json.dumps(stale) + "\n")
    Trainer(load_train_config(path)).train()  # a fresh run in the same folder: a new record
    assert errors.read_text() == first


def test_torchrun_records_the_bad_images_every_rank_met(tmp_path, tiny_model_dir):
    """Rank 0 writes errors.jsonl: it lists the images rank 1 alone met too, once each."""
    from test_distributed import WORLD, torchrun

    from xmodal.train import load_train_config
    from xmodal.train.batches import rank_micro_batches

    data, _ = dataset_with_bad_images(tmp_path / "data", list(BAD), n_good=6)
    path = train_config(tmp_path, tiny_model_dir, data, skip_bad=True, num_workers=0)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["val"] = None
    raw["optim"]["steps"] = 2  # 1 epoch: 2 global batches of 2 x 4 of the 20 pairs
    raw["seed"] = 1  # an order in which rank 1 alone meets an image
    path.write_text(yaml.safe_dump(raw))
    config = load_train_config(path)
    rows = load_dataset(data).examples
    met: list[set[str]] = []
    for rank in range(WORLD):
        batches = rank_micro_batches(len(rows), 4, 1, WORLD, rank, config.seed, epoch=0)
        names = {Path(str(rows[j].image)).name for batch in batches for j in batch}
        met.append(names & set(BAD))
    assert met[1] - met[0]  # an image only rank 1 decodes
    torchrun(["--config", str(path)], tmp_path)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(Path(r["source"]).name for r in records) == sorted(met[0] | met[1])
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["bad_images"] == len(records)
