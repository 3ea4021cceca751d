"""Richer training captions for the emoji set, from a fake emojibase-data tarball (no network)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from test_builders import _entries, _rgba_png

from xmodal.apps import builders
from xmodal.apps.builders import build_emoji
from xmodal.apps.emoji_captions import KEYWORDS_TARBALL, extra_captions, read_keywords_tar
from xmodal.errors import InputError, MissingDependencyError


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _emoji_tarball(path: Path) -> Path:
    entries = _entries()
    for i, entry in enumerate(entries[:10]):
        entry["unified"] = f"{0x1F600 + i:X}"
        entry["short_names"] = [f"tf-{i}", f"test_face_{i}"]  # the second is the name again
    entries[2]["unified"] += "-FE0F"  # found without its variation selector
    files = {"package/emoji.json": json.dumps(entries).encode()}
    images = [e["image"] for e in entries if e["image"] != "absent.png"]
    images += [v["image"] for e in entries for v in (e.get("skin_variations") or {}).values()]
    for i, image in enumerate(images):
        files[f"package/img/google/64/{image}"] = _rgba_png(i * 7)
    return _tar(path, files)


def _keywords_tarball(path: Path) -> Path:
    data = [
        {"label": f"cldr face {i}", "hexcode": f"{0x1F600 + i:X}", "tags": [f"tag{i}", "happy"]}
        for i in range(10)
        if i != 3  # one emoji without keywords: it keeps its short name only
    ]
    data[0]["skins"] = [{"label": "cldr face 0: light skin tone", "hexcode": "1F600-1F3FB"}]
    return _tar(path, {"package/en/data.json": json.dumps(data).encode()})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rich_captions_add_rows_for_training_images_only(tmp_path: Path) -> None:
    emoji = _emoji_tarball(tmp_path / "emoji.tgz")
    keywords = _keywords_tarball(tmp_path / "kw.tgz")
    plain = build_emoji(tmp_path / "plain", tarball=emoji, val_fraction=0.2, test_fraction=0.3)
    rich = build_emoji(
        tmp_path / "rich",
        tarball=emoji,
        val_fraction=0.2,
        test_fraction=0.3,
        rich_captions=True,
        keywords_tarball=keywords,
    )
    for split in ("val", "test"):  # evaluation captions as they were: the names
        assert (tmp_path / "rich" / f"{split}.jsonl").read_text() == (
            tmp_path / "plain" / f"{split}.jsonl"
        ).read_text()
    plain_train = _rows(tmp_path / "plain" / "train.jsonl")
    train = _rows(tmp_path / "rich" / "train.jsonl")
    assert rich["splits"]["train"]["images"] == plain["splits"]["train"]["images"]
    assert rich["splits"]["train"]["captions"] == len(train) > len(plain_train)
    assert rich["rich_captions"] is True and rich["keywords_integrity"].startswith("sha512-")
    by_image: dict[str, list[str]] = {}
    for row in train:
        by_image.setdefault(row["image_id"], []).append(row["caption"])
    for row in plain_train:  # each image: its name first, then new captions, no duplicates
        captions = by_image[row["image_id"]]
        assert captions[0] == row["caption"]
        assert len(captions) == len(set(captions)) >= 2
    names = {r["name"] for r in plain_train}
    for row in plain_train:
        if not row["name"].startswith("test face"):  # the nameless one: short name "x" added
            assert by_image[row["image_id"]] == [row["caption"], "x"]
            continue
        i = int(row["name"].split()[-1])
        tone = row["caption"][len(row["name"]) :]
        expected = [f"tf {i}"]  # the short name tf-i, readable
        if i != 3:
            expected += [f"cldr face {i}", f"tag{i}, happy"]
        assert by_image[row["image_id"]][1:] == [c + tone for c in expected], row
    assert names == {r["name"] for r in train}


def test_variant_keywords_and_lookup() -> None:
    keywords = {"1F44B": {"label": "waving hand", "tags": ["bye", "hello"]}}
    entry = {"unified": "1F44B", "short_names": ["wave", "+1"], "name": "WAVING HAND SIGN"}
    assert extra_captions(entry, keywords) == ["wave", "waving hand", "bye, hello"]
    assert extra_captions({"non_qualified": "1f44b", "short_names": []}, keywords)[0] == (
        "waving hand"
    )
    assert extra_captions(entry, None) == ["wave"]  # "+1" is no caption


def test_keywords_tarball_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    emoji = _emoji_tarball(tmp_path / "emoji.tgz")
    not_keywords = _tar(tmp_path / "other.tgz", {"package/README.md": b"hi"})
    with pytest.raises(InputError, match="not an emojibase-data tarball"):
        read_keywords_tar(not_keywords)
    with pytest.raises(FileNotFoundError, match="emojibase-data tarball not found"):
        build_emoji(tmp_path / "o", tarball=emoji, rich_captions=True, keywords_tarball="x.tgz")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cache = tmp_path / "cache"
    with pytest.raises(MissingDependencyError, match="emojibase-data.*without rich captions"):
        build_emoji(tmp_path / "o", tarball=emoji, rich_captions=True, cache_dir=cache)
    cache.mkdir()  # a cached, integrity-checked tarball needs no npm
    cached = _keywords_tarball(cache / KEYWORDS_TARBALL)
    sidecar = cache / f"{KEYWORDS_TARBALL}.json"
    sidecar.write_text(json.dumps({"integrity": builders.sha512_integrity(cached)}))
    summary = build_emoji(tmp_path / "o", tarball=emoji, rich_captions=True, cache_dir=cache)
    assert summary["splits"]["train"]["captions"] > summary["splits"]["train"]["images"]
