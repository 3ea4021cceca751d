"""Tests for xmodal.apps.builders on fake emoji tarballs and fake IDX files (no network)."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmodal.apps import builders
from xmodal.apps.builders import (
    build_emoji,
    build_fashion_mnist,
    code_key,
    name_kinds,
    sha512_integrity,
    split_names,
    tone_caption,
    tones_named,
)
from xmodal.data import load_dataset
from xmodal.errors import ConfigError, InputError, MissingDependencyError

TONES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")


def _rgba_png(value: int) -> bytes:
    """A 64x64 RGBA image: pixel (0, 0) fully transparent, the rest opaque grey ``value``."""
    img = Image.new("RGBA", (64, 64), (value, value, value, 255))
    img.putpixel((0, 0), (10, 20, 30, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _entries() -> list[dict]:
    entries = []
    for i in range(10):
        name = f"TEST FACE {i}"
        entries.append(_entry(name, f"{i:04x}.png", category="Smileys" if i % 2 else "Objects"))
    entries[0]["skin_variations"] = {t: _variant(f"0000-{t.lower()}.png") for t in TONES}
    entries[1]["skin_variations"] = {
        "1F3FB-1F3FC": _variant("0001-a.png"),
        "1F3FD-1F3FD": _variant("0001-b.png"),
        "1F3FE": _variant("0001-c.png", has_img=False),
    }
    entries.append({**_entry(None, "nameless.png"), "short_names": ["no_name_here", "x"]})
    entries.append(_entry("NO GOOGLE", "nogoogle.png", has_img=False))
    entries.append(_entry("ABSENT FILE", "absent.png"))
    return entries


def _entry(name: str | None, image: str, category: str = "Objects", has_img: bool = True) -> dict:
    return {
        "name": name,
        "short_names": [(name or "x").lower().replace(" ", "_")],
        "image": image,
        "category": category,
        "subcategory": "test",
        "has_img_google": has_img,
    }


def _variant(image: str, has_img: bool = True) -> dict:
    return {"image": image, "has_img_google": has_img}


def _fake_tarball(path: Path) -> Path:
    entries = _entries()
    files = {"package/emoji.json": json.dumps(entries).encode(), "package/README.md": b"hi"}
    images = [e["image"] for e in entries if e["image"] != "absent.png"]
    images += [v["image"] for e in entries for v in (e.get("skin_variations") or {}).values()]
    for i, image in enumerate(images):
        files[f"package/img/google/64/{image}"] = _rgba_png(i * 7)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_tone_caption() -> None:
    assert tone_caption("1F3FB") == "light skin tone"
    assert tone_caption("1f3fb-1F3FC") == "light skin tone, medium-light skin tone"
    assert tone_caption("1F3FF-1F3FF") == "dark skin tone"


def test_tones_named_and_name_kinds() -> None:
    kiss = "kiss: woman, man"
    rows = [
        {"name": kiss, "caption": kiss},
        {"name": kiss, "caption": f"{kiss}: light skin tone"},
        {"name": kiss, "caption": f"{kiss}: light skin tone, dark skin tone"},
        {"name": "wave", "caption": "wave: medium skin tone"},
        {"name": "cat", "caption": "cat"},
        {"name": "dog", "caption": "a dog, drawn"},  # a caption that is not "<name>: ..."
    ]
    assert [tones_named(r) for r in rows] == [0, 1, 2, 1, 0, 0]
    assert name_kinds(rows) == {kiss: 2, "wave": 1, "cat": 0, "dog": 0}


def test_split_names_keeps_the_test_names_and_draws_validation_per_kind() -> None:
    names = [f"name {i:03d}" for i in range(200)]
    kinds = {n: 0 for n in names[:170]} | {n: 1 for n in names[170:194]}
    kinds |= {n: 2 for n in names[194:]}  # 6 rare names: a plain shuffle may give val none
    plain = split_names(names, 7, 0.1, 0.2)
    split = split_names(names, 7, 0.1, 0.2, kinds)
    assert [n for n in split if split[n] == "test"] == [n for n in plain if plain[n] == "test"]
    assert sorted(split) == sorted(names) and set(split.values()) == {"train", "val", "test"}
    for kind, total in ((0, 170), (1, 24), (2, 6)):
        members = [n for n in names if kinds[n] == kind]
        val = [n for n in members if split[n] == "val"]
        left = [n for n in members if split[n] != "test"]
        assert len(val) == min(max(round(total * 0.1), 1), len(left) - 1)
        assert any(split[n] == "train" for n in members)  # every kind still trains
    # seeded: the same draw again, another seed another one
    assert split_names(names, 7, 0.1, 0.2, kinds) == split
    assert split_names(names, 8, 0.1, 0.2, kinds) != split
    # a kind with a single name left keeps it for training
    lone = split_names("abcde", 0, 0.2, 0.0, {"a": 0, "b": 0, "c": 0, "d": 0, "e": 1})
    assert lone["e"] == "train" and list(lone.values()).count("val") == 1


def test_build_emoji(tmp_path: Path) -> None:
    tarball = _fake_tarball(tmp_path / "emoji.tgz")
    out = tmp_path / "out"
    summary = build_emoji(out, tarball=tarball, seed=3, val_fraction=0.2, test_fraction=0.3)
    assert summary["images"] == 11 + 5 + 2 and summary["names"] == 11
    assert summary["skipped"] == {"no_google_image": 2, "missing_file": 1}
    assert summary["integrity"] == sha512_integrity(tarball)
    rows = {s: _read_jsonl(out / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert [len({r["name"] for r in rows[s]}) for s in rows] == [6, 2, 3]
    names = [{r["name"] for r in split_rows} for split_rows in rows.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    by_id = {r["image_id"]: r for split_rows in rows.values() for r in split_rows}
    assert by_id["0000.png"]["caption"] == "test face 0"
    assert by_id["0000-1f3fd.png"]["caption"] == "test face 0: medium skin tone"
    assert by_id["0001-a.png"]["caption"] == "test face 1: light skin tone, medium-light skin tone"
    assert by_id["0001-b.png"]["caption"] == "test face 1: medium skin tone"
    assert by_id["nameless.png"]["caption"] == "no name here"
    assert by_id["0001.png"] | {"image": ""} == {
        "image": "",
        "caption": "test face 1",
        "image_id": "0001.png",
        "category": "Smileys",
        "subcategory": "test",
        "name": "test face 1",
    }
    assert len({by_id[f"0000-{t.lower()}.png"]["name"] for t in TONES} | {"test face 0"}) == 1
    img = Image.open(out / "images" / "0001.png")
    assert img.mode == "RGB" and img.size == (64, 64)
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((40, 40)) == (7, 7, 7)
    ds = load_dataset(out / "train.jsonl")
    assert len(ds) == len(rows["train"]) and ds[0].extra["category"]
    assert json.loads((out / "summary.json").read_text())["seed"] == 3


def test_build_emoji_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = _fake_tarball(tmp_path / "emoji.tgz")
    out = tmp_path / "out"
    first = build_emoji(out, tarball=tarball, size=8)
    assert Image.open(out / "images" / "0000.png").size == (8, 8)
    mtime = (out / "train.jsonl").stat().st_mtime_ns

    def boom(*args: object) -> None:
        raise AssertionError("should not rebuild")

    monkeypatch.setattr(builders, "_read_emoji_tar", boom)
    assert build_emoji(out, tarball=tarball, size=8) == first
    assert (out / "train.jsonl").stat().st_mtime_ns == mtime
    monkeypatch.undo()
    again = build_emoji(out, tarball=tarball, size=8, seed=1)
    assert again["seed"] == 1 and again["images"] == first["images"]
    assert not list(out.rglob("*.tmp"))


def test_build_emoji_bad_tarball(tmp_path: Path) -> None:
    plain = tmp_path / "not.tgz"
    plain.write_bytes(b"definitely not a tar")
    with pytest.raises(ValueError, match="not a readable tar"):
        build_emoji(tmp_path / "o", tarball=plain)
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(ValueError, match="emoji.json"):
        build_emoji(tmp_path / "o", tarball=empty)
    with pytest.raises(FileNotFoundError):
        build_emoji(tmp_path / "o", tarball=tmp_path / "absent.tgz")


def test_emoji_npm_missing_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cache = tmp_path / "cache"
    with pytest.raises(MissingDependencyError, match="install Node.js/npm.*--from TARBALL"):
        build_emoji(tmp_path / "o", cache_dir=cache)
    cache.mkdir()
    cached = _fake_tarball(cache / builders.EMOJI_TARBALL)
    sidecar = cache / f"{builders.EMOJI_TARBALL}.json"
    sidecar.write_text(json.dumps({"integrity": "sha512-AAAA"}))
    with pytest.raises(MissingDependencyError, match="npm not found"):
        build_emoji(tmp_path / "o", cache_dir=cache)
    sidecar.write_text(json.dumps({"integrity": sha512_integrity(cached)}))
    assert build_emoji(tmp_path / "o", cache_dir=cache)["images"] == 18


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _fake_fashion(folder: Path, prefix: str = "t10k", n: int = 12) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28) % 256
    _idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, pixels)
    _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.arange(n) % 10)
    return pixels


def test_build_fashion_mnist_fake(tmp_path: Path) -> None:
    pixels = _fake_fashion(tmp_path / "src")
    out = tmp_path / "out"
    summary = build_fashion_mnist(out, source_dir=tmp_path / "src", limit=11)
    assert summary["images"] == 11 and summary["classes"]["t-shirt"] == 2
    rows = _read_jsonl(out / "test.jsonl")
    assert rows[9] == {
        "image": "images/test_9.png",
        "caption": "a photo of a ankle boot",
        "label": "ankle boot",
        "image_id": "test_9",
    }
    img = Image.open(out / "images" / "test_3.png")
    assert img.mode == "L" and np.array_equal(np.asarray(img), pixels[3])
    assert load_dataset(out / "test.jsonl").labels()[:2] == ["t-shirt", "trouser"]


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_fashion_mnist(tmp_path / "o", source_dir=tmp_path / "none")
    _fake_fashion(tmp_path / "src", prefix="train", n=3)
    _idx(tmp_path / "src" / "train-labels-idx1-ubyte.gz", 2051, np.zeros(3))
    with pytest.raises(ValueError, match="magic number 2051"):
        build_fashion_mnist(tmp_path / "o", source_dir=tmp_path / "src", split="train")
    _idx(tmp_path / "src" / "train-labels-idx1-ubyte.gz", 2049, np.zeros(4))
    with pytest.raises(ValueError, match="3 images but 4 labels"):
        build_fashion_mnist(tmp_path / "o", source_dir=tmp_path / "src", split="train")
    with pytest.raises(ValueError, match="split"):
        build_fashion_mnist(tmp_path / "o", source_dir=tmp_path / "src", split="val")


@pytest.mark.skipif(
    not Path(builders.FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_build_fashion_mnist_real(tmp_path: Path) -> None:
    summary = build_fashion_mnist(tmp_path, limit=20)
    assert summary["images"] == 20 and sum(summary["classes"].values()) == 20
    img = Image.open(tmp_path / "images" / "test_0.png")
    assert img.size == (28, 28) and img.mode == "L"
    assert _read_jsonl(tmp_path / "test.jsonl")[0]["label"] == "ankle boot"


def _artist_tarball(path: Path, folder: str, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {**files, "package/LICENSE.md": b"x"}.items():
            info = tarfile.TarInfo(name if name.startswith("package/") else folder + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _svg(colour: str) -> bytes:
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="72" height="72" viewBox="0 0 72 72">'
        f'<rect x="9" y="9" width="54" height="54" fill="{colour}"/></svg>'
    ).encode()


def test_build_emoji_with_other_artists(tmp_path: Path) -> None:
    pytest.importorskip("resvg_py")
    tarball = _fake_tarball(tmp_path / "emoji.tgz")
    codes = [f"{i:04x}" for i in range(10)] + [f"0000-{t.lower()}" for t in TONES]
    # OpenMoji-like: SVG, upper-case names, one with a FE0F selector the Google name lacks
    svgs = {f"{c.upper()}.svg": _svg("#d02020") for c in codes if c != "0003"}
    svgs["0003-FE0F.svg"] = _svg("#2040d0")
    openmoji = _artist_tarball(tmp_path / "om.tgz", "package/color/svg/", svgs)
    pngs = {f"{c}.png": _rgba_png(90) for c in codes[:6]}
    pngs["_alt/0000.png"] = _rgba_png(1)  # a sub-folder of alternates: not read
    emojione = _artist_tarball(tmp_path / "e1.tgz", "package/png/64/", pngs)
    out = tmp_path / "out"
    kwargs = dict(seed=3, val_fraction=0.2, test_fraction=0.3, size=32)
    plain = build_emoji(tmp_path / "plain", tarball=tarball, **kwargs)
    summary = build_emoji(
        out,
        tarball=tarball,
        artists=("openmoji",),
        check_artists=("emojione",),
        artist_tarballs={"openmoji": openmoji, "emojione": emojione},
        **kwargs,
    )
    rows = {s: _read_jsonl(out / f"{s}.jsonl") for s in ("train", "val", "test")}
    google_train = [r for r in rows["train"] if "/" not in r["image_id"]]
    drawn = [r for r in rows["train"] if "/" in r["image_id"]]
    assert google_train == _read_jsonl(tmp_path / "plain" / "train.jsonl")
    assert rows["test"] == _read_jsonl(tmp_path / "plain" / "test.jsonl")
    assert {r["image_id"].split("/")[0] for r in drawn} == {"openmoji"}  # never emojione
    # every training name the artist drew, as the same caption of another image
    drawable = {
        r["image_id"] for r in google_train if code_key(r["image_id"]) in map(code_key, svgs)
    }
    assert {r["image_id"].split("/", 1)[1] for r in drawn} == drawable
    by_google = {r["image_id"]: r for r in google_train}
    for row in drawn:
        google = by_google[row["image_id"].split("/", 1)[1]]
        assert row | {"image": "", "image_id": ""} == google | {"image": "", "image_id": ""}
        img = Image.open(out / row["image"])
        assert img.mode == "RGB" and img.size == (32, 32)
        assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
        red = row["image_id"] != "openmoji/0003.png"
        assert img.getpixel((16, 16)) == ((208, 32, 32) if red else (32, 64, 208))
    test_names = {r["name"] for r in rows["test"]}
    for artist in ("openmoji", "emojione"):
        checked = _read_jsonl(out / f"test.{artist}.jsonl")
        assert checked and {r["name"] for r in checked} <= test_names
        assert all(r["image_id"].startswith(f"{artist}/") for r in checked)
        assert summary["artists"][artist]["test_images"] == len(checked)
    assert summary["artists"]["openmoji"]["train_images"] == len(drawn)
    assert summary["artists"]["emojione"]["train_images"] == 0
    assert summary["splits"]["train"]["captions"] == plain["splits"]["train"]["captions"] + len(
        drawn
    )
    # a rebuild at another size redraws the artists' images too (none left at the old size)
    build_emoji(
        out,
        tarball=tarball,
        artists=("openmoji",),
        check_artists=("emojione",),
        artist_tarballs={"openmoji": openmoji, "emojione": emojione},
        **{**kwargs, "size": 16},
    )
    for artist in ("openmoji", "emojione"):
        for path in (out / "images" / artist).glob("*.png"):
            assert Image.open(path).size == (16, 16), path
    with pytest.raises(ConfigError, match="unknown emoji artist"):
        build_emoji(out, tarball=tarball, artists=("picasso",))
    with pytest.raises(ConfigError, match="cannot also be"):
        build_emoji(out, tarball=tarball, artists=("openmoji",), check_artists=("openmoji",))
    broken = _artist_tarball(tmp_path / "bad.tgz", "package/color/svg/", {"0000.svg": b"<svg"})
    with pytest.raises(InputError, match="0000.svg: SVG could not be rendered"):
        build_emoji(
            tmp_path / "bad",
            tarball=tarball,
            check_artists=("openmoji",),
            artist_tarballs={"openmoji": broken},
            **kwargs,
        )
