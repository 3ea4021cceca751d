"""kill -9 during training, extraction and index building.

Each trial starts the real CLI in a subprocess, waits until it has written its first output,
sleeps a random (seeded) delay and sends SIGKILL. Then: no half-written file sits under a final
name (every .safetensors/.json/.jsonl/.parquet/.faiss/.png parses completely), and re-running
the command finishes the work with exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import write_colour_dataset
from PIL import Image
from safetensors.torch import load_file
from test_extract import make_image_folder, read_all, save_tiny_model, tiny_processor
from test_index import random_vectors, write_fake_shards

from xmodal.extract import load_manifest
from xmodal.extract.writer import MANIFEST_FORMAT
from xmodal.index import SearchIndex
from xmodal.train import load_train_config, train

SEED = 20240611
TRIALS = 2
STEPS = 6  # training steps; a checkpoint every 2
RUN_TIMEOUT = 180
ENV = {
    **os.environ,
    "OMP_WAIT_POLICY": "PASSIVE",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MPLBACKEND": "Agg",
    "TQDM_DISABLE": "1",
}


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "xmodal.cli", *map(str, args)]


def run(args: list[str], log: Path) -> float:
    """Run ``args`` to a successful end; returns the seconds it took."""
    started = time.monotonic()
    with open(log, "wb") as err:
        proc = subprocess.run(
            args, env=ENV, stdout=subprocess.DEVNULL, stderr=err, timeout=RUN_TIMEOUT
        )
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    return time.monotonic() - started


def run_and_kill(args: list[str], ready: Callable[[], bool], delay: float, log: Path) -> bool:
    """Start ``args``; once ``ready()`` holds, wait ``delay`` seconds and SIGKILL it.

    Returns True when the process was killed, False when it finished first.
    """
    started = time.monotonic()
    with open(log, "wb") as err:
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None and not ready():
            if time.monotonic() - started > RUN_TIMEOUT:
                proc.kill()
                pytest.fail(f"{args[3]} never became ready")
            time.sleep(0.005)
        deadline = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if not killed:
        assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    return killed


def count(directory: Path, pattern: str) -> Callable[[], int]:
    """How many files under final names match ``pattern`` (which must not start with '*')."""
    return lambda: len(list(directory.glob(pattern))) if directory.is_dir() else 0


def assert_no_torn_files(root: Path) -> int:
    """Every file under a final name parses completely; returns how many were checked.

    Temporaries have hidden names (``.x.safetensors.123.tmp``, ``.step-0000004.abc.tmp/``) and
    are skipped: they are never read as results.
    """
    checked = 0
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        suffix = path.suffix
        try:
            if suffix == ".safetensors":
                load_file(str(path))
            elif suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif suffix == ".jsonl":
                for line in path.read_text(encoding="utf-8").splitlines():
                    json.loads(line)
            elif suffix == ".parquet":
                pq.read_table(str(path))
            elif suffix == ".faiss":
                faiss.read_index(str(path))
            elif suffix == ".png":
                with Image.open(path) as img:
                    img.load()
            else:
                continue
        except Exception as err:  # noqa: BLE001 - any failure to parse is a torn file
            pytest.fail(f"half-written file under a final name: {relative}: {err!r}")
        checked += 1
    return checked


# -------------------------------------------------------------------------------- training


def test_training_killed_and_resumed_ends_with_the_uninterrupted_weights(
    tmp_path: Path, tiny_model_dir: str
) -> None:
    data = write_colour_dataset(tmp_path / "data", n=16)
    config = {
        "data": {"train": data, "num_workers": 0},
        "model": {"name": tiny_model_dir},
        "loss": {"infonce": 1.0, "itm": 1.0},
        "optim": {"steps": STEPS, "batch_size": 4, "lr": 3e-3, "tower_lr": 1e-3, "warmup_steps": 1},
        "device": "cpu",
        "precision": "fp32",
        "eval_every": 0,
        "save_every": 2,
        "log_every": 1,
        "seed": 3,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")

    def command(out: Path, *extra: str) -> list[str]:
        return cli("train", "--config", path, "--out-dir", out, *extra)

    reference = tmp_path / "reference"  # uninterrupted, in this process (one thread, as the CLI)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_train_config(path, {"out_dir": str(reference)}))
    finally:
        torch.set_num_threads(threads)
    expected = load_file(str(reference / "model" / "model.safetensors"))
    checkpoints = count(reference / "checkpoints", "step-*")()
    assert checkpoints == STEPS // 2
    rng = random.Random(SEED)
    kills = 0
    for trial in range(TRIALS):
        out = tmp_path / f"killed-{trial}"
        # after the k-th checkpoint (k < the last), within about a step or a checkpoint write
        k, delay = rng.randrange(1, checkpoints), rng.uniform(0.0, 0.3)
        written = count(out / "checkpoints", "step-*")
        kills += run_and_kill(
            command(out), lambda w=written, k=k: w() >= k, delay, tmp_path / "k.log"
        )
        assert_no_torn_files(out)
        run(command(out, "--resume"), tmp_path / "resume.log")
        assert assert_no_torn_files(out) > 0
        weights = load_file(str(out / "model" / "model.safetensors"))
        assert weights.keys() == expected.keys()
        for key, value in expected.items():
            assert np.array_equal(weights[key].numpy(), value.numpy()), (trial, k, delay, key)
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
        assert steps == list(range(1, STEPS + 1)), (trial, k, delay)
    assert kills >= 1, "every run finished before its kill: the trials tested nothing"


# ------------------------------------------------------------------------------ extraction


def test_extraction_killed_and_rerun_has_every_row_once(
    tmp_path: Path, minilm_tokenizer, minilm_path: str
) -> None:
    model = save_tiny_model(tmp_path / "model", tiny_processor(minilm_tokenizer, minilm_path))
    data = make_image_folder(tmp_path / "data")

    def command(out: Path) -> list[str]:
        return cli(
            "extract", "--model", model, "--data", data, "--out", out,
            "--shard-size", "2", "--workers", "0", "--batch-size", "2",
        )  # fmt: skip

    reference = tmp_path / "reference"
    run(command(reference), tmp_path / "ref.log")
    shards = count(reference, "[it][me]*-*.parquet")()
    assert shards == 17  # 6 of images (11, one broken), 11 of captions (21)
    rng = random.Random(SEED + 1)
    kills = 0
    for trial in range(TRIALS):
        out = tmp_path / f"killed-{trial}"
        # after the k-th shard file, within a few milliseconds (mid shard, manifest or log)
        k, delay = rng.randrange(1, shards - 3), rng.uniform(0.0, 0.03)
        written = count(out, "[it][me]*-*.parquet")
        kills += run_and_kill(
            command(out), lambda w=written, k=k: w() >= k, delay, tmp_path / "k.log"
        )
        assert_no_torn_files(out)
        run(command(out), tmp_path / "rerun.log")
        assert assert_no_torn_files(out) > 0
        for kind in ("images", "texts"):
            want, got = read_all(reference, kind), read_all(out, kind)
            assert got["ids"] == want["ids"], (trial, k, delay, kind)
            assert len(set(got["ids"])) == len(got["ids"])
            assert got["sources"] == want["sources"]
            np.testing.assert_allclose(got["embeddings"], want["embeddings"], atol=1e-6)
        errors = [json.loads(line) for line in (out / "errors.jsonl").open()]
        assert [e["id"] for e in errors] == ["broken"]
        assert load_manifest(out)["total_rows"] == load_manifest(reference)["total_rows"]
        assert not list(out.glob(".*.tmp"))
    assert kills >= 1, "every run finished before its kill: the trials tested nothing"


# ------------------------------------------------------------------------------ index


def test_index_build_killed_and_rerun_loads_and_answers(tmp_path: Path) -> None:
    vectors = random_vectors(6000, seed=11)
    like = {
        "format": MANIFEST_FORMAT,
        "model": {"id": "fake", "weights_hash": "0" * 64},
        "processor_hash": "0" * 16,
        "created": "2024-01-01T00:00:00+00:00",
    }
    shards = write_fake_shards(tmp_path / "emb", vectors, like)
    out = tmp_path / "index"
    command = cli("index", "--shards", shards, "--out", out, "--kind", "ivf", "--modality", "texts")

    def answers(directory: Path) -> None:
        index = SearchIndex(directory)
        assert index.count == len(vectors)
        found = index.search(vectors[:20], k=1, nprobe=index.info["params"]["nlist"])
        assert [hits[0][0] for hits in found] == list(range(20))

    rng = random.Random(SEED + 2)
    total = run(command, tmp_path / "first.log")
    answers(out)  # generation 1; each trial's killed rebuild must leave a usable index
    kills = 0
    for trial in range(TRIALS):
        if trial % 2:  # while the new generation's files are being written
            ready, delay = (lambda: any(out.glob(".*.tmp"))), rng.uniform(0.0, 0.05)
        else:  # anywhere: start-up, reading shards, training and tuning IVF
            ready, delay = (lambda: True), rng.uniform(0.0, 0.8 * total)
        kills += run_and_kill(command, ready, delay, tmp_path / "k.log")
        assert_no_torn_files(out)
        answers(out)  # the previous generation (or the new one) stays usable
        run(command, tmp_path / "rerun.log")
        assert_no_torn_files(out)
        answers(out)
        assert len(list(out.glob("index-*.faiss"))) == 1 and not list(out.glob(".*.tmp"))
    assert kills >= 1, "every run finished before its kill: the trials tested nothing"
