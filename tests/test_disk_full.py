"""A full disk during extract, index and train: one line naming the output, exit code 2, and
the same command run again once there is space finishes with the result of an uninterrupted
run.

The disk is a real, tiny tmpfs (these tests run as root here and in CI); where mounting is not
allowed, the write is made to fail with ``ENOSPC`` instead (fault injection at the writers).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_colour_dataset
from test_extract import make_image_folder, read_all, save_tiny_model, tiny_processor
from test_index import FAKE_IDENTITY, random_vectors, write_fake_shards

from xmodal.atomic import atomic_path, is_out_of_space
from xmodal.cli import main
from xmodal.errors import OutputError
from xmodal.index import SearchIndex
from xmodal.pairs import score_pairs


class SmallDisk:
    """A folder on a file system of ``size`` bytes that can be grown (``grow``)."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch):
        self.path = path
        self.monkeypatch = monkeypatch
        path.mkdir()
        self.mounted = _mount(path, "size=40k")
        if not self.mounted:  # no tmpfs: every write of a shard or a file fails with ENOSPC
            self._inject()

    def _inject(self) -> None:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.monkeypatch.setattr(pq, "write_table", full)
        self.monkeypatch.setattr("xmodal.atomic.os.replace", full)

    def fill(self, leave: int = 1024) -> None:
        """Take all but ``leave`` bytes of the space left (a tmpfs only)."""
        if self.mounted:
            free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
            (self.path / "filler").write_bytes(b"\0" * max(0, free - leave))

    def grow(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(self.path)], check=True)
        else:
            self.monkeypatch.undo()

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


def _mount(path: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


@pytest.fixture()
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk", monkeypatch)
    yield disk
    disk.unmount()


def one_error_line(capsys: pytest.CaptureFixture, command: str, output: Path) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"xmodal {command}: error")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    assert str(output) in lines[0] or output.name in lines[0], lines[0]
    return lines[0]


def test_out_of_space_errors_are_recognised() -> None:
    assert is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_out_of_space(OSError("[errno 28] Error writing bytes. No space left on device"))
    assert is_out_of_space(RuntimeError("fwrite failed: Disk quota exceeded"))
    assert not is_out_of_space(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_out_of_space(RuntimeError("shape mismatch"))


def test_a_full_disk_inside_an_atomic_write_names_the_output(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    with pytest.raises(OutputError, match="cannot write .*table.parquet: No space left"):
        with atomic_path(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not target.exists() and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError):  # the caller's own errors pass through unchanged
        with atomic_path(target):
            raise ValueError("not a write error")


def test_extract_on_a_full_disk_then_resumed(
    small_disk: SmallDisk, tmp_path: Path, capsys, minilm_tokenizer, minilm_path: str
) -> None:
    model = save_tiny_model(tmp_path / "model", tiny_processor(minilm_tokenizer, minilm_path))
    data = make_image_folder(tmp_path / "data")
    args = ["--model", str(model), "--data", str(data), "--shard-size", "2", "--workers", "0"]
    reference = tmp_path / "reference"
    assert main(["extract", *args, "--out", str(reference)]) == 0
    capsys.readouterr()
    out = small_disk.path / "emb"
    assert main(["extract", *args, "--out", str(out)]) == 2
    line = one_error_line(capsys, "extract", out)
    assert "No space left" in line or "space" in line.lower()
    small_disk.grow()
    assert main(["extract", *args, "--out", str(out)]) == 0
    for kind in ("images", "texts"):
        want, got = read_all(reference, kind), read_all(out, kind)
        assert got["ids"] == want["ids"] and got["sources"] == want["sources"]
        np.testing.assert_allclose(got["embeddings"], want["embeddings"], atol=1e-6)
    assert not list(out.glob(".*.tmp"))


def test_index_on_a_full_disk_then_rebuilt(small_disk: SmallDisk, tmp_path: Path, capsys) -> None:
    vectors = random_vectors(4000, dim=32, seed=5)
    shards = write_fake_shards(tmp_path / "emb", vectors, FAKE_IDENTITY)
    out = small_disk.path / "index"
    args = ["index", "--shards", str(shards), "--out", str(out), "--modality", "texts"]
    assert main(args) == 2
    one_error_line(capsys, "index", out)
    small_disk.grow()
    assert main(args) == 0
    index = SearchIndex(out)
    found = index.search(vectors[:5], k=1)
    assert [hits[0][0] for hits in found] == list(range(5))


def test_train_on_a_full_disk_then_resumed(
    small_disk: SmallDisk, tmp_path: Path, capsys, tiny_model_dir: str
) -> None:
    data = write_colour_dataset(tmp_path / "data", n=8)
    config = {
        "data": {"train": data, "num_workers": 0},
        "model": {"name": tiny_model_dir},
        "optim": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "device": "cpu",
        "precision": "fp32",
        "eval_every": 0,
        "save_every": 1,
        "log_every": 1,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = small_disk.path / "run"
    assert main(["train", "--config", str(path), "--out-dir", str(out)]) == 2
    one_error_line(capsys, "train", out)
    small_disk.grow()
    assert main(["train", "--config", str(path), "--out-dir", str(out), "--resume"]) == 0
    assert (out / "model" / "model.safetensors").is_file()


def test_filter_on_a_full_disk_then_rerun(
    small_disk: SmallDisk, tmp_path: Path, capsys, minilm_tokenizer, minilm_path: str
) -> None:
    model = save_tiny_model(tmp_path / "model", tiny_processor(minilm_tokenizer, minilm_path))
    data = make_image_folder(tmp_path / "data")
    scored = tmp_path / "scored"
    score_pairs(model, data, scored, fused=True, shard_size=4, workers=0, progress=False)
    small_disk.fill()
    kept = small_disk.path / "kept.jsonl"
    args = ["filter", "--scores", str(scored), "--out", str(kept), "--keep-fraction", "0.5"]
    assert main(args) == 2
    one_error_line(capsys, "filter", kept)
    small_disk.grow()
    assert main(args) == 0
    assert len(kept.read_text().splitlines()) == 10
