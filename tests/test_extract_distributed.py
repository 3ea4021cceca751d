"""xmodal extract under torchrun: ranks split the shards; nothing is lost, duplicated or redone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_extract import make_image_folder, read_all, save_tiny_model, tiny_processor

from xmodal.extract import extract, load_manifest
from xmodal.extract.ranks import PARTS_DIR, rank_shards

SHARD = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_tokenizer, minilm_path) -> dict:
    root = tmp_path_factory.mktemp("extract-ranks")
    model = save_tiny_model(root / "model", tiny_processor(minilm_tokenizer, minilm_path))
    data = make_image_folder(root / "data")
    whole = root / "whole"
    extract(model, data, whole, shard_size=SHARD, workers=0, progress=False)
    return {"model": model, "data": data, "whole": whole}


def shard_records(out: Path) -> dict[str, list[dict]]:
    kinds = load_manifest(out)["modalities"]
    return {kind: record["shards"] for kind, record in kinds.items()}


def assert_same_extraction(got: Path, want: Path) -> None:
    for kind in ("images", "texts"):
        a, b = read_all(got, kind), read_all(want, kind)
        assert a["ids"] == b["ids"] and len(set(a["ids"])) == len(a["ids"])
        assert a["sources"] == b["sources"]
        np.testing.assert_allclose(a["embeddings"], b["embeddings"], atol=1e-5)
    assert shard_records(got) == shard_records(want)
    assert load_manifest(got)["total_rows"] == load_manifest(want)["total_rows"]
    assert (got / "errors.jsonl").read_text() == (want / "errors.jsonl").read_text()
    assert not (got / PARTS_DIR).exists() and not list(got.glob(".*.tmp"))


def test_shards_go_round_robin_to_ranks() -> None:
    pending = [0, 2, 3, 4, 5, 7]
    split = [rank_shards(pending, r, 3) for r in range(3)]
    assert split == [[0, 3], [4, 7], [2, 5]]
    assert sorted(k for part in split for k in part) == pending


def test_two_ranks_extract_what_one_process_does(setup, tmp_path: Path) -> None:
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "xmodal.cli", "extract"]
    command += ["--model", str(setup["model"]), "--data", str(setup["data"]), "--out", str(out)]
    command += ["--shard-size", str(SHARD), "--workers", "0", "--device", "cpu"]
    command += ["--precision", "fp32"]  # as the in-process reference
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_extraction(out, setup["whole"])


def test_resume_folds_in_the_shards_of_a_killed_distributed_run(setup, tmp_path: Path) -> None:
    """Rank 1 had finished images shard 1 (the one with the broken image) when the run died:
    its part file makes a resumed run skip that shard and keep its error record."""
    whole, out = setup["whole"], tmp_path / "resumed"
    out.mkdir()
    shutil.copy(whole / "images-00001.parquet", out)
    entry = shard_records(whole)["images"][1]
    errors = [json.loads(line) for line in (whole / "errors.jsonl").read_text().splitlines()]
    assert [e["shard"] for e in errors] == ["images-00001.parquet"]
    part = {"shards": {"images": [entry], "texts": []}, "errors": errors}
    (out / PARTS_DIR).mkdir()
    (out / PARTS_DIR / "rank-1.json").write_text(json.dumps(part))
    written: list[tuple[str, int]] = []
    extract(
        setup["model"],
        setup["data"],
        out,
        shard_size=SHARD,
        workers=0,
        progress=False,
        on_shard=lambda kind, k: written.append((kind, k)),
    )
    assert ("images", 1) not in written and ("images", 0) in written
    assert_same_extraction(out, whole)
