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
    assert main([*args, "--skip-bad", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["skipped_rows"] == 1 and report["n_images"] == 6
    assert [r["row"] for r in report["skipped"]] == ["data.jsonl:7"]
    # a later run with nothing left out removes the old list
    listed = tmp_path / "report.skipped.jsonl"
    assert listed.is_file() and report["skipped_list"] == str(listed)
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:6]))
    assert main([*args, "--skip-bad", "--out", str(out)]) == 0
    assert not listed.exists() and json.loads(out.read_text())["skipped"] == []


def test_eval_skip_bad_lists_every_row_left_out(tmp_path, tiny_model_dir, capsys) -> None:
    """Four kinds of bad row, two of each image kind: every row is in the report and in
    report.skipped.jsonl with its file:line and reason; the terminal says how many and where."""
    data = Path(write_colour_dataset(tmp_path / "data", n=6))
    images = data.parent / "images"
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (images / "dangling.png").symlink_to(images / "deleted-long-ago.png")
    bad = [
        {"image": "images/corrupt.png", "caption": "a corrupt picture"},  # line 7
        {"image": "images/dangling.png", "caption": "a link to nothing"},  # line 8
        {"image": "images/img000.png", "caption": "   "},  # line 9
        {"image": "images/missing.png", "caption": "a ghost"},  # line 10
        {"image": "images/corrupt.png", "caption": "the corrupt picture again"},  # line 11
    ]
    with open(data, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in bad)
    out = tmp_path / "eval" / "report.json"
    argv = ["eval", "--model", tiny_model_dir, "--data", str(data), "--rerank-k", "0"]
    capsys.readouterr()
    assert main([*argv, "--workers", "0", "--skip-bad", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    report = json.loads(out.read_text())
    assert (report["n_images"], report["n_texts"]) == (6, 6)
    assert report["skipped_rows"] == 3 and report["n_dropped_captions"] == 2
    rows = {r["row"]: r["reason"] for r in report["skipped"]}
    assert list(rows) == [f"data.jsonl:{n}" for n in (7, 8, 9, 10, 11)]  # in dataset order
    assert rows["data.jsonl:8"].startswith("image 'images/dangling.png' not found (a symbolic")
    assert str(images / "deleted-long-ago.png") in rows["data.jsonl:8"]
    assert rows["data.jsonl:9"] == "empty caption"
    assert rows["data.jsonl:10"].startswith("image 'images/missing.png' not found (resolved")
    for line in (7, 11):
        assert rows[f"data.jsonl:{line}"].startswith(f"cannot load image {images / 'corrupt.png'}")
    listed = out.parent / "report.skipped.jsonl"
    lines = listed.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == report["skipped"]
    assert report["skipped_list"] == str(listed)
    # short terminal summary: counts and where the list is, no row printed, no warning
    assert f"5 dataset rows left out, each with its reason: {listed}" in printed.out
    assert "left out: 3 rows the reader refused, 1 undecodable images with 2 rows" in printed.out
    assert "data.jsonl:8" not in printed.out + printed.err
    # without --out the rows themselves are printed (on stderr)
    assert main([*argv, "--workers", "0", "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "5 dataset rows left out (--out REPORT lists every one):" in err
    assert all(f"  data.jsonl:{n}: " in err for n in (7, 8, 9, 10, 11))
