"""Tests for xmodal.data.datasets readers on tiny fixtures."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from xmodal.data import BadRowError, Example, ImageTextDataset, TarMember, load_dataset


def _png(path: Path, color: tuple[int, int, int] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path: Path, rows: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    colors = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}
    return {k: _png(tmp_path / "img" / f"{k}.png", c) for k, c in colors.items()}


def test_jsonl_reader(tmp_path: Path, images: dict[str, Path]) -> None:
    path = _jsonl(
        tmp_path / "data.jsonl",
        [
            {"image": "img/a.png", "caption": "  a red square ", "label": "red", "kind": "x"},
            {"image": "img/a.png", "caption": "赤い四角 🟥"},
            {"image": str(images["b"]), "caption": "مربع أخضر", "image_id": "green"},
            "",
            {"image": "img/c.png", "caption": "blue", "image_id": 7},
        ],
    )
    ds = load_dataset(path)
    assert len(ds) == 4 and ds.skipped == []
    first = ds[0]
    assert first.image == str(images["a"]) and first.image_id == str(images["a"])
    assert first.caption == "a red square" and first.label == "red"
    assert first.extra == {"kind": "x"} and first.origin == "data.jsonl:1"
    assert ds.captions()[1:3] == ["赤い四角 🟥", "مربع أخضر"]
    assert ds.image_ids() == [str(images["a"]), "green", "7"]
    assert ds.labels() == ["red", None, None, None]
    assert ds.text_to_image().tolist() == [0, 0, 1, 2]
    assert ds.text_to_image().dtype == torch.long
    assert [ex.caption for ex in ds.unique_images()] == ["a red square", "مربع أخضر", "blue"]


def test_text_to_image_interleaved() -> None:
    ids = ["x", "y", "x", "z", "y", "x"]
    ds = ImageTextDataset([Example(f"/{i}.png", f"c{n}", i) for n, i in enumerate(ids)])
    assert ds.image_ids() == ["x", "y", "z"]
    assert ds.text_to_image().tolist() == [0, 1, 0, 2, 1, 0]
    assert [ex.caption for ex in ds.unique_images()] == ["c0", "c1", "c3"]


def test_csv_reader_and_invalid_utf8(tmp_path: Path, images: dict[str, Path]) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(
        b"image,caption,label,category\n"
        b'img/a.png,"a red, square",red,shapes\n'
        b"img/b.png,caf\xe9 bad bytes,green,\n"
        b'img/c.png,"two\nlines",,colors\n'
        b"img/a.png,\xe7\xba\xa2\xe8\x89\xb2,red,shapes\n"
    )
    with pytest.raises(BadRowError, match=r"data\.csv:3: invalid UTF-8"):
        load_dataset(path)
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 rows in data\.csv"):
        ds = load_dataset(path, skip_bad=True)
    assert ds.captions() == ["a red, square", "two\nlines", "红色"]
    assert ds.labels() == ["red", None, "red"]
    assert ds[0].extra == {"category": "shapes"} and ds[2].origin == "data.csv:6"
    assert len(ds.skipped) == 1 and ds.skipped[0].origin == "data.csv:3"
    assert str(ds.skipped[0]).startswith("data.csv:3: invalid UTF-8")
    assert ds.text_to_image().tolist() == [0, 1, 0]


def test_csv_missing_column(tmp_path: Path, images: dict[str, Path]) -> None:
    path = tmp_path / "d.csv"
    path.write_text("image,text\nimg/a.png,hi\n", encoding="utf-8")
    with pytest.raises(BadRowError, match="caption"):
        load_dataset(path, skip_bad=True)


def test_coco_reader(tmp_path: Path, images: dict[str, Path]) -> None:
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "red one"},
            {"id": 11, "image_id": 2, "caption": "green one"},
            {"id": 12, "image_id": 1, "caption": "another red"},
        ],
    }
    (tmp_path / "ann").mkdir()
    path = tmp_path / "ann" / "captions.json"
    path.write_text(json.dumps(coco), encoding="utf-8")
    ds = load_dataset(path, image_root="../img")
    assert ds.image_ids() == ["1", "2"] and ds.text_to_image().tolist() == [0, 1, 0]
    assert ds[1].image == str(images["b"]) and ds[0].extra == {"id": 10}
    assert ds[2].origin == "captions.json:annotations[2]"
    with pytest.raises(BadRowError, match=r"captions\.json:annotations\[0\]: image 'a.png'"):
        load_dataset(path)


def test_karpathy_reader_split(tmp_path: Path, images: dict[str, Path]) -> None:
    def entry(name: str, split: str, *captions: str) -> dict:
        sentences = [{"raw": c, "tokens": c.split()} for c in captions]
        return {"filepath": "img", "filename": name, "split": split, "sentences": sentences}

    data = {
        "images": [
            entry("a.png", "train", "red", "still red"),
            entry("b.png", "test", "green"),
            entry("c.png", "restval", "blue"),
        ]
    }
    path = tmp_path / "dataset_x.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert load_dataset(path).captions() == ["red", "still red", "green", "blue"]
    train = load_dataset(path, split="train")
    assert train.captions() == ["red", "still red"] and train.image_ids() == [str(images["a"])]
    assert train[0].extra == {"split": "train"}
    assert load_dataset(path, format="karpathy", split="test").captions() == ["green"]
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset(path, split="dev")
    data["images"].append(entry("a.png", "holdout", "x"))
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BadRowError, match=r"images\[3\]: unknown split 'holdout'"):
        load_dataset(path)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_folder_reader(tmp_path: Path, images: dict[str, Path], kind: str) -> None:
    folder = images["a"].parent
    if kind == "txt":
        (folder / "captions.txt").write_text("a.png\tred\tsquare\nb.png\tgreen\n")
    elif kind == "jsonl":
        _jsonl(folder / "captions.jsonl", [{"image": "a.png", "caption": "red\tsquare"}])
    else:
        (folder / "captions.csv").write_text("image,caption\na.png,red\tsquare\n")
    ds = load_dataset(folder)
    assert ds[0].caption == "red\tsquare" and ds[0].image == str(images["a"])
    line = {"txt": 1, "jsonl": 1, "csv": 2}[kind]
    assert ds[0].origin == f"captions.{kind}:{line}"


def _write_shard(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards(tmp_path: Path) -> None:
    red, green = _png_bytes((255, 0, 0)), _png_bytes((0, 255, 0))
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(
        shards / "s-000.tar",
        {
            "0001.png": red,
            "0001.txt": b" a red square \n",
            "0001.json": json.dumps({"label": "red", "image_id": "r", "src": "x"}).encode(),
            "sub/0002.jpg": green,
            "sub/0002.txt": "绿色".encode(),
        },
    )
    _write_shard(shards / "s-001.tar", {"0003.png": green, "0003.txt": b"green again"})
    ds = load_dataset(shards)
    assert ds.captions() == ["a red square", "绿色", "green again"]
    assert ds.image_ids() == ["r", "sub/0002", "0003"] and ds.labels()[0] == "red"
    member = ds[0].image
    assert isinstance(member, TarMember) and member.read_bytes() == red
    assert str(member) == "s-000.tar:0001.png" and ds[0].extra == {"src": "x"}
    assert ds[1].image.read_bytes() == green and ds[2].origin == "s-001.tar:0003"
    single = load_dataset(shards / "s-001.tar")
    assert single[0].image.read_bytes() == green


def test_tar_missing_caption(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    _write_shard(path, {"k1.png": _png_bytes((1, 2, 3)), "k2.png": b"x", "k2.txt": b"ok"})
    with pytest.raises(BadRowError, match=r"s\.tar:k1: no \.txt"):
        load_dataset(path)
    with pytest.warns(UserWarning):
        assert load_dataset(path, skip_bad=True).captions() == ["ok"]


def test_bad_rows(tmp_path: Path, images: dict[str, Path]) -> None:
    path = _jsonl(
        tmp_path / "data.jsonl",
        [
            {"image": "img/a.png", "caption": "fine"},
            {"image": "img/missing.png", "caption": "gone"},
            {"image": "img/b.png", "caption": "   "},
            '{"image": "img/c.png", "caption": ',
            {"caption": "no image"},
            {"image": "img/c.png", "caption": "fine too"},
        ],
    )
    missing = str(tmp_path / "img" / "missing.png")
    with pytest.raises(BadRowError) as err:
        load_dataset(path)
    assert str(err.value) == f"data.jsonl:2: image 'img/missing.png' not found (resolved {missing})"
    with pytest.warns(UserWarning, match=r"skipped 4 of 6 rows in data\.jsonl \(first: data"):
        ds = load_dataset(path, skip_bad=True)
    assert ds.captions() == ["fine", "fine too"]
    assert [s.origin for s in ds.skipped] == [f"data.jsonl:{i}" for i in (2, 3, 4, 5)]
    assert ds.skipped[1].reason == "empty caption" and "invalid JSON" in ds.skipped[2].reason
    assert ds.skipped[3].reason == "missing 'image' column"


def test_all_bad_and_missing_file(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [{"image": "nope.png", "caption": "x"}, "{"])
    with pytest.raises(BadRowError, match=r"no valid rows in bad\.jsonl"):
        load_dataset(path, skip_bad=True)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_dataset(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="format"):
        load_dataset(path, format="avro")
