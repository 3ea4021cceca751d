"""``xmodal eval`` on any JSONL/CSV in the documented format, checked against the metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import write_colour_dataset

from xmodal.cli import main
from xmodal.data import load_dataset
from xmodal.evaluate.retrieval import retrieval_metrics
from xmodal.evaluate.runner import text_embeddings
from xmodal.presets import load_model


def run_eval(model_dir: str, data: str, out: Path, rerank_k: int) -> dict:
    """``xmodal eval`` through the CLI entry point; the report it wrote."""
    argv = ["eval", "--model", model_dir, "--data", data, "--out", str(out)]
    assert main([*argv, "--rerank-k", str(rerank_k), "--workers", "0"]) == 0
    return json.loads(out.read_text())


def test_eval_jsonl_report_matches_direct_metrics(tmp_path, tiny_model_dir, capsys) -> None:
    data = write_colour_dataset(tmp_path / "data", n=10, captions_per_image=2)
    report = run_eval(tiny_model_dir, data, tmp_path / "report.json", rerank_k=4)
    assert report["n_images"] == 10 and report["n_texts"] == 20
    printed = capsys.readouterr().out
    assert "ITC text->image" in printed and "ITC + ITM re-rank" in printed

    model, processor = load_model(tiny_model_dir)
    dataset = load_dataset(data)
    pixels = processor.process_images([ex.image for ex in dataset.unique_images()])
    with torch.inference_mode():
        image_embeds = model.encode_image(pixels)
    text_embeds = text_embeddings(model, processor, dataset.captions())
    expected = retrieval_metrics(image_embeds, text_embeds, dataset.text_to_image())
    for key in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@10"):
        assert report["retrieval_itc"][key] == pytest.approx(expected[key])
    assert report["retrieval_itm_rerank"]["k"] == 4


def test_eval_keeps_freed_memory_on_cpu(tmp_path, tiny_model_dir, monkeypatch) -> None:
    """Like the trainer and the extraction mapper, ``eval`` serves the towers' activations
    from reused memory on a CPU (each fresh page-faulted pass made the tower 1.6x slower)."""
    from xmodal import runtime

    calls = []
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: calls.append(1) or True)
    data = write_colour_dataset(tmp_path / "data", n=6)
    run_eval(tiny_model_dir, data, tmp_path / "report.json", rerank_k=0)
    assert calls == [1]


def test_eval_csv_with_labels_gives_zero_shot(tmp_path, tiny_model_dir) -> None:
    jsonl = write_colour_dataset(tmp_path / "data", n=8)
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines()]
    path = tmp_path / "data" / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    "image": row["image"],
                    "caption": row["caption"],
                    "label": row["caption"].split()[1],
                }
            )
    report = run_eval(tiny_model_dir, str(path), tmp_path / "report.json", rerank_k=0)
    zeroshot = report["zeroshot"]
    assert set(zeroshot["per_class"]) == {
        "red",
        "green",
        "blue",
        "yellow",
        "black",
        "white",
        "purple",
        "orange",
    }
    assert 0.0 <= zeroshot["top1"] <= zeroshot["top5"] <= 100.0
    assert "retrieval_itm_rerank" not in report


def test_eval_bad_rows_error_or_skip(tmp_path, tiny_model_dir, capsys) -> None:
    data = Path(write_colour_dataset(tmp_path / "data", n=6))
    with open(data, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"image": "images/missing.png", "caption": "a ghost"}) + "\n")
    args = [
        "eval",
        "--model",
        tiny_model_dir,
        "--data",
        str(data),
        "--rerank-k",
        "0",
        "--workers",
        "0",
    ]
    assert main(args) == 2
    assert "data.jsonl:7" in capsys.readouterr().err
    out = tmp_path / "report.json"
    with pytest.warns(UserWarning, match="skipped 1"):
        assert main([*args, "--skip-bad", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["skipped_rows"] == 1 and report["n_images"] == 6
