"""A corpus of bad inputs through the processor, load_dataset, ``xmodal extract`` and the HTTP API.

Every input gets its documented behaviour (converted, skipped with a record, or an error naming
it) and nothing else in the batch or the run is lost. docs/reliability.md tabulates the results.
"""

from __future__ import annotations

import io
import json
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from test_extract import read_all, save_tiny_model, tiny_processor
from test_index import random_vectors, write_fake_shards

import xmodal.processing as processing
from xmodal.cli import main
from xmodal.config import ConfigError
from xmodal.data.datasets import BadRowError, load_dataset
from xmodal.extract import extract, load_manifest
from xmodal.index import SearchIndex, build_index
from xmodal.models.identity import identify
from xmodal.models.model import CrossModalModel
from xmodal.processing import CaptionError, ImageLoadError, MultimodalProcessor
from xmodal.search import Searcher
from xmodal.serve import ServeSettings, create_app
from xmodal.shards import MANIFEST_FORMAT
from xmodal.train import load_train_config

LOCAL = "http://localhost"  # a Host name the server answers when bound to loopback

RED, BLUE = (220, 20, 20), (20, 20, 220)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height 8-bit grey pixels, with a few rows of data:
    under a kilobyte on disk, gigabytes once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def photo(seed: int = 0, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# name -> None (decoded and converted) or words the ImageLoadError reason must contain
EXPECTED: dict[str, str | None] = {
    "plain.png": None,
    "one-pixel.png": None,
    "grey-16bit.png": None,
    "cmyk.jpg": None,
    "palette-transparent.png": None,
    "animated.gif": None,
    "exif-rotated.jpg": None,
    "long-strip.png": None,
    "zero-bytes.jpg": "empty file (0 bytes)",
    "text-named.jpg": "not a recognised image format",
    "random-bytes.png": "not a recognised image format",
    "drawing.svg": "not a recognised image format",
    "truncated.jpg": "image file is truncated",
    "truncated.png": "image file is truncated",
    "bomb-30000x30000.png": "too many pixels (decompression bomb?)",
    "header-20000x20000.png": "too many pixels (decompression bomb?)",
    "corrupt-lzw.tiff": "OSError: decoder error",
    "unknown-pixel-format.dds": "not a recognised image format (accepted: PNG, JPEG",
    "dangling-link.jpg": "file not found",
    "folder.jpg": "not a regular file",
}
PATH_ONLY = {"dangling-link.jpg", "folder.jpg"}  # no bytes to upload
DECODABLE = [name for name, reason in EXPECTED.items() if reason is None]
UNDECODABLE = [name for name, reason in EXPECTED.items() if reason and name not in PATH_ONLY]


def write_corpus(directory: Path) -> dict[str, Path]:
    """Every EXPECTED input as a file in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    jpeg, png = encode(photo(), "JPEG"), encode(photo(), "PNG")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.paste(0, (0, 0, 8, 16))  # left half: index 0, the transparent one
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, BLUE)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    grey16 = Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))
    dds = bytearray(encode(photo().convert("RGBA"), "DDS"))
    dds[80:84] = b"\0\0\0\0"  # pixel format flags: none
    tiff = bytearray(encode(photo(), "TIFF", compression="tiff_lzw"))
    tiff[8:200] = b"\xff" * 192  # the LZW strip, overwritten
    contents = {
        "plain.png": png,
        "one-pixel.png": encode(Image.new("RGB", (1, 1), RED), "PNG"),
        "grey-16bit.png": encode(grey16, "PNG"),
        "cmyk.jpg": encode(photo().convert("CMYK"), "JPEG"),
        "palette-transparent.png": encode(palette, "PNG", transparency=0),
        "animated.gif": gif.getvalue(),
        "exif-rotated.jpg": encode(photo(size=(40, 20)), "JPEG", exif=exif.tobytes()),
        "long-strip.png": encode(Image.new("RGB", (20000, 1), RED), "PNG"),
        "zero-bytes.jpg": b"",
        "text-named.jpg": b"a caption file saved under the wrong name\n",
        "random-bytes.png": np.random.default_rng(7).bytes(4096),
        "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "bomb-30000x30000.png": png_claiming(30000, 30000),
        "header-20000x20000.png": png_claiming(20000, 20000),
        "corrupt-lzw.tiff": bytes(tiff),
        "unknown-pixel-format.dds": bytes(dds),
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = directory / name
        paths[name].write_bytes(data)
    paths["dangling-link.jpg"] = directory / "dangling-link.jpg"
    paths["dangling-link.jpg"].symlink_to(directory / "deleted-long-ago.jpg")
    paths["folder.jpg"] = directory / "folder.jpg"
    paths["folder.jpg"].mkdir()
    assert set(paths) == set(EXPECTED)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


# name -> caption, and whether a reader keeps it
CAPTIONS: dict[str, tuple[str, bool]] = {
    "plain": ("a red square on grey", True),
    "long-100k": ("a very long caption " * 5000, True),
    "cjk": ("一只红色的猫坐在垫子上", True),
    "emoji": ("🐱 on a 🟥 mat 🎉", True),
    "right-to-left": ("قطة حمراء على السجادة", True),
    "hebrew-mixed": ("a cat חתול אדום", True),
    "empty": ("", False),
    "whitespace": (" \t\u3000\n ", False),
    "zero-width": ("\u200b\u200b\ufeff", False),
    "control-only": ("\x00\x01\x1f", False),
    "lone-surrogate": ("\ud800", False),
}


# ------------------------------------------------------------------------------ processor


def test_processor_converts_or_names_every_corpus_image(corpus, processor) -> None:
    for name, reason in EXPECTED.items():
        if reason is None:
            pixels = processor.process_image(corpus[name])
            assert pixels.shape == (3, 64, 64) and torch.isfinite(pixels).all(), name
            continue
        with pytest.raises(ImageLoadError) as info:
            processor.process_image(corpus[name])
        assert str(corpus[name]) in str(info.value), name
        assert reason in info.value.reason, (name, info.value.reason)


def test_conversions_keep_the_picture(corpus) -> None:
    palette = np.asarray(processing.load_image(corpus["palette-transparent.png"]))
    assert (palette[:, :8] == 255).all() and (palette[:, 8:] == RED).all()  # transparent: white
    assert (np.asarray(processing.load_image(corpus["animated.gif"])) == RED).all()  # frame 1
    assert processing.load_image(corpus["exif-rotated.jpg"]).size == (20, 40)
    grey = np.asarray(processing.load_image(corpus["grey-16bit.png"]))
    assert (grey == round(40000 / 65535 * 255)).all()
    assert processing.load_image(corpus["one-pixel.png"]).getpixel((0, 0)) == RED


def test_a_bad_image_in_a_batch_is_named_and_the_good_ones_are_unchanged(corpus, processor) -> None:
    good = [corpus[name] for name in DECODABLE]
    alone = torch.stack([processor.process_image(path) for path in good])
    for name in UNDECODABLE:
        with pytest.raises(ImageLoadError, match=re.escape(name)):
            processor(images=[*good[:3], corpus[name], *good[3:]])
    assert torch.equal(processor(images=good)["pixel_values"], alone)


def test_decompression_bombs_are_refused_without_decoding(corpus, processor) -> None:
    for name in ("bomb-30000x30000.png", "header-20000x20000.png"):
        assert corpus[name].stat().st_size < 2048
        started = time.perf_counter()
        with pytest.raises(ImageLoadError, match="too many pixels"):
            processor.process_image(corpus[name].read_bytes())
        assert time.perf_counter() - started < 1.0
    small = processing.load_image  # the processor's own limit, below Pillow's
    with pytest.raises(ImageLoadError, match="exceeds the limit of 1000000"):
        small(png_claiming(2000, 2000), max_pixels=1_000_000)


def test_extreme_aspect_ratios_stay_fast_and_keep_the_centre(processor, monkeypatch) -> None:
    strip = encode(Image.new("RGB", (1, 200_000), BLUE), "PNG")  # under 1 kB
    started = time.perf_counter()
    pixels = processor.process_image(strip)
    assert time.perf_counter() - started < 2.0  # was 7 s and 2.5 GB
    expected = processor.process_image(Image.new("RGB", (64, 64), BLUE))
    assert torch.allclose(pixels, expected, atol=1e-5)
    # the shortcut resamples only the cropped region: the same picture as resizing it all
    wide = photo(seed=3, size=(1600, 20))
    shortcut = processor.process_image(wide)
    monkeypatch.setattr(processing, "_MAX_ASPECT", 10**9)
    full = processor.process_image(wide)
    assert (shortcut - full).abs().mean() < 0.02


def test_arrays_of_zero_size_or_foreign_byte_order(processor) -> None:
    for array in (np.zeros((0, 5), np.uint8), np.zeros((4, 0, 3), np.uint8)):
        with pytest.raises(ImageLoadError, match="invalid size"):
            processor.process_image(array)
    big_endian = np.full((4, 4), 40000, dtype=">u2")
    native = np.full((4, 4), 40000, dtype=np.uint16)
    assert torch.equal(processor.process_image(big_endian), processor.process_image(native))


def test_captions(make_processor) -> None:
    processor = make_processor(max_length=16)
    good = [text for text, ok in CAPTIONS.values() if ok]
    started = time.perf_counter()
    batch = processor.process_text(good)
    assert time.perf_counter() - started < 2.0
    assert batch["input_ids"].shape == (len(good), 16)  # the 100k caption, truncated
    assert batch["attention_mask"].sum(dim=1).min() >= 3  # every caption kept some tokens
    for name, (text, ok) in CAPTIONS.items():
        if ok:
            continue
        with pytest.raises(CaptionError, match="caption 2 ") as info:
            processor.process_text(["fine", "also fine", text])
        assert "empty" in str(info.value) or "surrogate" in str(info.value), name


# ------------------------------------------------------------------------------ datasets


def write_jsonl(path: Path, corpus: dict[str, Path]) -> list[str]:
    """One row per corpus image and per caption; returns the rows' expected fates in order."""
    rows, fates = [], []
    for name in EXPECTED:
        rows.append({"image": f"corpus/{name}", "caption": f"picture {name}", "image_id": name})
        fates.append("skipped" if name in PATH_ONLY else "kept")
    for text, ok in CAPTIONS.values():
        rows.append({"image": "corpus/plain.png", "caption": text, "image_id": "plain.png"})
        fates.append("kept" if ok else "skipped")
    lines = [json.dumps(row) for row in rows]
    lines.insert(3, '{"image": "corpus/plain.png", "caption": ')  # a torn line
    fates.insert(3, "skipped")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return fates


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, corpus) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    (root / "corpus").symlink_to(next(iter(corpus.values())).parent, target_is_directory=True)
    return root


def test_load_dataset_with_and_without_skip_bad(dataset_dir: Path, corpus) -> None:
    path = dataset_dir / "rows.jsonl"
    fates = write_jsonl(path, corpus)
    with pytest.raises(BadRowError, match=r"^rows\.jsonl:4: invalid JSON"):
        load_dataset(path)
    with pytest.warns(UserWarning, match=f"skipped {fates.count('skipped')} of {len(fates)}"):
        dataset = load_dataset(path, skip_bad=True)
    assert len(dataset) == fates.count("kept")
    skipped_lines = [int(s.origin.split(":")[1]) for s in dataset.skipped]
    assert skipped_lines == [i + 1 for i, fate in enumerate(fates) if fate == "skipped"]
    reasons = "\n".join(s.reason for s in dataset.skipped)
    for words in ("not found", "invalid JSON", "empty caption", "invisible characters"):
        assert words in reasons
    kept = {ex.image_id for ex in dataset}
    assert kept == set(EXPECTED) - PATH_ONLY  # undecodable files pass: decoding comes later
    long = next(ex for ex in dataset if ex.caption.startswith("a very long"))
    assert len(long.caption) == len(CAPTIONS["long-100k"][0].strip())


def test_csv_with_invalid_utf8_and_oversized_fields(dataset_dir: Path) -> None:
    path = dataset_dir / "rows.csv"
    path.write_bytes(
        b"image,caption\n"
        b"corpus/plain.png,fine\n"
        b"corpus/plain.png,caf\xe9 au lait\n"  # Latin-1, not UTF-8
        b'corpus/plain.png,"a quoted, comma caption"\n'
        b"corpus/plain.png," + b"x" * 200_000 + b"\n"  # over csv.field_size_limit()
        b"corpus/plain.png,\xe7\x8c\xab \xf0\x9f\x90\xb1\n"  # valid UTF-8: CJK and emoji
    )
    with pytest.raises(BadRowError, match=r"^rows\.csv:3: invalid UTF-8 bytes"):
        load_dataset(path)
    with pytest.warns(UserWarning):
        dataset = load_dataset(path, skip_bad=True)
    assert dataset.captions() == ["fine", "a quoted, comma caption", "猫 🐱"]
    assert [s.origin for s in dataset.skipped] == ["rows.csv:3", "rows.csv:5"]
    assert "field larger than field limit" in dataset.skipped[1].reason


# ------------------------------------------------------------------------------ extract


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm_tokenizer, minilm_path) -> Path:
    root = tmp_path_factory.mktemp("model")
    return save_tiny_model(root / "model", tiny_processor(minilm_tokenizer, minilm_path))


def test_extract_records_every_bad_input_and_keeps_every_good_one(
    dataset_dir: Path, corpus, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    path = dataset_dir / "rows.jsonl"
    fates = write_jsonl(path, corpus)
    out = tmp_path / "emb"
    args = ["extract", "--model", str(tiny_model), "--data", str(path), "--out", str(out)]
    assert main([*args, "--workers", "0", "--shard-size", "7"]) == 2  # bad rows: refused
    assert "rows.jsonl:4: invalid JSON" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipped"):
        assert main([*args, "--workers", "0", "--shard-size", "7", "--skip-bad"]) == 0
    images = read_all(out, "images")
    assert sorted(images["ids"]) == sorted(DECODABLE)
    errors = [json.loads(line) for line in (out / "errors.jsonl").open(encoding="utf-8")]
    assert sorted(e["id"] for e in errors) == sorted(UNDECODABLE)
    for record in errors:
        assert EXPECTED[record["id"]] in record["reason"], record
        assert record["modality"] == "images" and record["source"].endswith(record["id"])
    texts = read_all(out, "texts")
    assert len(texts["ids"]) == fates.count("kept") == len(set(texts["ids"]))
    assert np.isfinite(texts["embeddings"]).all() and np.isfinite(images["embeddings"]).all()
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").open()]
    assert len(skipped) == fates.count("skipped") and skipped[0]["row"] == "rows.jsonl:4"
    assert skipped[0]["reason"].startswith("invalid JSON")
    manifest = load_manifest(out)
    assert manifest["skipped_rows"] == len(skipped)
    assert manifest["modalities"]["images"]["failed"] == len(UNDECODABLE)
    assert manifest["modalities"]["images"]["rows"] == len(DECODABLE)


# ------------------------------------------------------------------------------ HTTP API


@pytest.fixture(scope="module")
def client(tmp_path_factory, corpus, tiny_model: Path):
    root = tmp_path_factory.mktemp("serve")
    (root / "data").mkdir()
    rows = [{"image": str(corpus[n]), "caption": f"picture {n}", "image_id": n} for n in DECODABLE]
    (root / "data" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    extract(tiny_model, root / "data" / "rows.jsonl", root / "emb", modality="images", workers=0,
            progress=False)  # fmt: skip
    build_index(root / "emb", root / "idx")
    model = CrossModalModel.from_pretrained(tiny_model)
    processor = MultimodalProcessor.from_pretrained(tiny_model)
    index = SearchIndex(root / "idx")
    app = create_app(Searcher(model, processor, index, identify(model, processor, tiny_model)))
    with TestClient(base_url=LOCAL, app=app, raise_server_exceptions=False) as test_client:
        yield test_client


def upload(path: Path) -> dict:
    return {"image": (path.name, path.read_bytes(), "application/octet-stream")}


def test_every_bad_upload_is_a_4xx_naming_it_and_the_server_keeps_answering(client, corpus) -> None:
    plain = client.post("/embed", files=upload(corpus["plain.png"]))
    assert plain.status_code == 200
    for name, reason in EXPECTED.items():
        if name in PATH_ONLY:
            continue
        files = upload(corpus[name])
        embed = client.post("/embed", files=files)
        match = client.post("/match", files=files, data={"caption": "a red square"})
        search = client.post("/search", files=files, data={"k": "3"})
        for route, response in (("embed", embed), ("match", match), ("search", search)):
            if reason is None:
                assert response.status_code == 200, (name, route, response.text)
            else:  # bombs are refused from the header, before decoding: too large
                status = 413 if name.startswith(("bomb", "header")) else 400
                assert response.status_code == status, (name, route, response.text)
                detail = response.json()["detail"]
                assert name in detail and reason in detail, (name, route, detail)
        assert client.get("/health").status_code == 200
    again = client.post("/embed", files=upload(corpus["plain.png"]))
    assert again.json()["embeddings"] == plain.json()["embeddings"]


def test_uploads_with_too_many_pixels_are_413_before_decoding(client, corpus) -> None:
    big = encode(Image.new("RGB", (7000, 6000), RED), "PNG")  # 42 M pixels in about 130 kB
    started = time.perf_counter()
    response = client.post("/embed", files={"image": ("wide.png", big, "image/png")})
    assert time.perf_counter() - started < 1.0  # decoding would take seconds
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "image 'wide.png': 7000x6000 pixels exceeds the limit of 40000000 per image"
    )
    strict = ServeSettings(max_image_pixels=64 * 48 - 1)
    with TestClient(base_url=LOCAL, app=create_app(client.app.state.searcher, strict)) as small:
        assert small.post("/embed", files=upload(corpus["plain.png"])).status_code == 413
        assert small.post("/embed", files=upload(corpus["one-pixel.png"])).status_code == 200


def test_bad_captions_are_422_naming_the_problem(client, corpus) -> None:
    files = upload(corpus["plain.png"])
    for name, (text, ok) in CAPTIONS.items():
        body = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        embed = client.post(
            "/embed",
            content=json.dumps({"text": [text]}),  # ASCII JSON: a lone surrogate as \\ud800
            headers={"content-type": "application/json"},
        )
        match = client.post("/match", files=files, data={"caption": body})
        if ok and len(text) <= 1000:
            assert embed.status_code == 200 and match.status_code == 200, name
            continue
        assert embed.status_code == 422, (name, embed.text)
        detail = embed.json()["detail"]
        assert detail.startswith("text[0] ") and any(
            words in detail for words in ("empty", "invisible", "5000", "limit is 1000")
        ), (name, detail)
        if name != "lone-surrogate":  # a form field cannot carry one: it arrives replaced
            assert match.status_code == 422, (name, match.text)
    assert client.get("/health").status_code == 200


def test_malformed_bodies_are_4xx(client) -> None:
    cases = [
        (b"[" * 100_000, "application/json", 422),  # nested too deep to parse
        (b'{"text": "a", "k": ' + b"9" * 5000 + b"}", "application/json", 422),  # huge number
        (b'{"text": "caf\xe9"}', "application/json", 422),  # not UTF-8
        (b"--b\r\ngarbage", "multipart/form-data; boundary=b", 422),
        (b'{"text": ["a"]}', "multipart/form-data; boundary=b", 400),
        (b"xxx", "multipart/form-data", 400),  # no boundary
        (b"text=cat", "text/plain", 415),
    ]
    for body, content_type, status in cases:
        for route in ("/embed", "/search", "/match"):
            response = client.post(route, content=body, headers={"content-type": content_type})
            assert response.status_code in (status, 422), (route, body[:30], response.text)
            assert 400 <= response.status_code < 500
    assert client.post("/search", json={"text": "a red square"}).status_code == 200


def test_huge_search_parameters_are_clamped(tmp_path: Path) -> None:
    vectors = random_vectors(300, seed=2)
    like = {"format": MANIFEST_FORMAT, "model": {"id": "x", "weights_hash": "0" * 64},
            "processor_hash": "0" * 16, "created": "2024-01-01T00:00:00+00:00"}  # fmt: skip
    build_index(write_fake_shards(tmp_path / "emb", vectors, like), tmp_path / "hnsw",
                kind="hnsw", modality="texts")  # fmt: skip
    index = SearchIndex(tmp_path / "hnsw")
    for params in ({"ef_search": 10**30}, {"ef_search": 2**31}, {"nprobe": 10**30}):
        found = index.search(vectors[:3], k=1, **params)  # was OverflowError: HTTP 500
        assert [hits[0][0] for hits in found] == [0, 1, 2]


# ------------------------------------------------------------------------------ configs


def test_training_yaml_errors_name_the_key_or_file(tmp_path: Path) -> None:
    base = {"data": {"train": "data.jsonl"}, "optim": {"steps": 2, "batch_size": 2}}
    cases = [
        ({"optim": {"stepz": 2}}, "stepz"),
        ({"optim": {"steps": "two"}}, "optim.steps must be an integer"),
        ({"optim": {"batch_size": -4}}, "optim.batch_size must be positive"),
        ({"data": {"train": "data.jsonl", "num_workers": -1}}, "data.num_workers"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"model": {"overrides": {"embed_dim": 0}}}, "model.overrides: embed_dim must be a posi"),
        ({"loss": {"itm": -1.0}}, "loss weights must be >= 0"),
    ]
    for change, words in cases:
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({**base, **change}), encoding="utf-8")
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_train_config(path)
    path.write_text("data: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(path)
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_train_config(tmp_path / "absent.yaml")
    assert main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2


def test_model_config_json_errors_name_the_file_and_key(tiny_model: Path, tmp_path: Path) -> None:
    original = json.loads((tiny_model / "config.json").read_text())
    cases = [
        (lambda c: c["model"].update(bogus=1), "unknown key(s) ['bogus'] in model"),
        (lambda c: c["model"]["fusion"].update(layers="two"), "model.fusion.layers must be"),
        (lambda c: c["model"].update(embed_dim=-32), "embed_dim must be a positive"),
        (lambda c: c["model"].update(init_logit_scale=float("nan")), "must be a number"),
        (lambda c: c["model"]["text"]["hf_config"].update(hidden_size=-8), "cannot build"),
        (lambda c: c["model"]["image"]["hf_config"].pop("model_type"), "cannot build"),
        (lambda c: c["model"].update(embed_dim=64), "weights do not match"),
    ]
    for change, words in cases:
        directory = tmp_path / "model"
        directory.mkdir(exist_ok=True)
        (directory / "model.safetensors").write_bytes(
            (tiny_model / "model.safetensors").read_bytes()
        )
        config = json.loads(json.dumps(original))
        change(config)
        (directory / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=re.escape(words)) as info:
            CrossModalModel.from_pretrained(directory)
        assert str(directory) in str(info.value), words
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: the model config is not valid JSON"):
        CrossModalModel.from_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        CrossModalModel.from_pretrained(directory)
    with pytest.raises(ConfigError, match="processor.image_size must be a positive"):
        processing.ProcessorConfig(image_size=-1).validate()
