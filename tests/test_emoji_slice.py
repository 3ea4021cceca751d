"""``build_emoji(limit=...)``: a slice of whole names (skin-tone variants stay together)."""

from __future__ import annotations

import json

import pytest
from test_builders import _fake_tarball

from xmodal.apps.builders import build_emoji


def test_limit_keeps_whole_names_and_is_seeded(tmp_path) -> None:
    tarball = _fake_tarball(tmp_path / "fake.tgz")
    full = build_emoji(tmp_path / "full", tarball=tarball, val_fraction=0.2, test_fraction=0.2)
    sliced = build_emoji(tmp_path / "s", tarball=tarball, limit=7, val_fraction=0.2)
    assert sliced["limit"] == 7 and 1 <= sliced["images"] <= 7 < full["images"]
    rows = [
        json.loads(line)
        for split in ("train", "val", "test")
        for line in (tmp_path / "s" / f"{split}.jsonl").read_text().splitlines()
    ]
    per_name = {}
    for row in rows:
        per_name[row["name"]] = per_name.get(row["name"], 0) + 1
    full_rows = [
        json.loads(line)
        for split in ("train", "val", "test")
        for line in (tmp_path / "full" / f"{split}.jsonl").read_text().splitlines()
    ]
    for name, count in per_name.items():  # every kept name has all its images
        assert count == sum(r["name"] == name for r in full_rows), name
    again = build_emoji(tmp_path / "s2", tarball=tarball, limit=7, val_fraction=0.2)
    assert again["splits"] == sliced["splits"]
    one = build_emoji(tmp_path / "one", tarball=tarball, limit=1)
    assert one["images"] >= 1 and one["names"] == 1  # at least one whole name
    with pytest.raises(ValueError, match="limit must be a positive number"):
        build_emoji(tmp_path / "bad", tarball=tarball, limit=0)
