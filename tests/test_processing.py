"""MultimodalProcessor and load_image on awkward inputs: modes, EXIF, arrays, bad files, text."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.processing import (
    CaptionError,
    ImageLoadError,
    MultimodalProcessor,
    load_image,
)

WHITE = (255, 255, 255)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


class _Member:
    """Something with read_bytes(), like a tar-shard member."""

    def __init__(self, data: bytes):
        self.data = data

    def read_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return "shard-00001.tar/member-7.png"


# -- modes -------------------------------------------------------------------------------------


def test_rgba_transparent_becomes_white() -> None:
    img = Image.new("RGBA", (6, 4), (10, 20, 30, 255))
    img.putpixel((0, 0), (10, 20, 30, 0))
    img.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black on white -> mid grey
    for source in (img, _encode(img, "PNG")):
        out = _pixels(load_image(source))
        assert out.shape == (4, 6, 3)
        assert tuple(out[0, 0]) == WHITE
        assert abs(int(out[0, 1, 0]) - 127) <= 2 and len(set(out[0, 1].tolist())) == 1
        assert tuple(out[2, 3]) == (10, 20, 30)


def test_processor_transparent_image_is_normalised_white(processor) -> None:
    img = Image.new("RGBA", (80, 90), (200, 0, 0, 0))
    pixels = processor(images=[img])["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    mean = torch.tensor(processor.config.mean).view(3, 1, 1)
    std = torch.tensor(processor.config.std).view(3, 1, 1)
    expected = ((1.0 - mean) / std).expand(3, 64, 64)
    torch.testing.assert_close(pixels[0], expected.float(), atol=1e-5, rtol=0)


def _palette_image() -> Image.Image:
    img = Image.new("P", (4, 2), 0)
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putpixel((1, 0), 1)
    img.putpixel((2, 0), 2)
    return img


def test_palette_without_transparency() -> None:
    img = _palette_image()
    for source in (img, _encode(img, "PNG"), _encode(img, "GIF")):
        out = _pixels(load_image(source))
        assert tuple(out[0, 0]) == (255, 0, 0)
        assert tuple(out[0, 1]) == (0, 255, 0)
        assert tuple(out[0, 2]) == (0, 0, 255)


def test_palette_with_transparency_index() -> None:
    img = _palette_image()
    img.info["transparency"] = 1
    for source in (img, _encode(img, "PNG", transparency=1), _encode(img, "GIF", transparency=1)):
        out = _pixels(load_image(source))
        assert tuple(out[0, 0]) == (255, 0, 0)
        assert tuple(out[0, 1]) == WHITE  # the transparent index
        assert tuple(out[0, 2]) == (0, 0, 255)


def test_palette_with_per_entry_alpha() -> None:
    img = _palette_image()
    data = _encode(img, "PNG", transparency=bytes([255, 255, 0]))
    out = _pixels(load_image(data))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 2]) == WHITE


def test_greyscale_l_and_la() -> None:
    out = _pixels(load_image(Image.new("L", (3, 3), 77)))
    assert (out == 77).all()
    la = Image.new("LA", (3, 3), (77, 255))
    la.putpixel((0, 0), (0, 0))
    for source in (la, _encode(la, "PNG")):
        out = _pixels(load_image(source))
        assert tuple(out[0, 0]) == WHITE
        assert tuple(out[1, 1]) == (77, 77, 77)


def test_cmyk_jpeg() -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = _encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = _pixels(load_image(data)).astype(int)
    assert np.abs(out - np.array([255, 0, 0])).max() <= 8


def test_16bit_png() -> None:
    array = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    data = _encode(Image.fromarray(array), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = _pixels(load_image(data))
    assert out[:, :, 0].tolist() == [[0, 255], [128, 4]]
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotation(tmp_path: Path, make_processor, orientation: int) -> None:
    # stored 48 wide x 24 high, blue, with a red 8x8 marker at the stored top-left
    img = Image.new("RGB", (48, 24), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    for source in (path, path.read_bytes(), Image.open(path)):
        out = load_image(source)
        assert out.size == (24, 48)  # width and height swapped
        arr = np.asarray(out).astype(int)
        # 6: rotate 90 deg clockwise, stored top-left -> top-right;
        # 8: rotate 90 deg counter-clockwise, stored top-left -> bottom-left
        marker = (3, 20) if orientation == 6 else (44, 3)  # (row, col)
        assert np.abs(arr[marker] - [255, 0, 0]).max() < 40
        for corner in [(3, 3), (3, 20), (44, 3), (44, 20)]:
            if corner != marker:
                assert np.abs(arr[corner] - [0, 0, 255]).max() < 40
    # the processor applies it too (squashed to 64 x 64, the marker lands in the same corner)
    pixels = make_processor(resize="squash", resize_size=None)(images=[path])["pixel_values"][0]
    row, col = (6, 57) if orientation == 6 else (57, 6)
    assert pixels[0, row, col] > 1.5 and pixels[2, row, col] < 0  # red
    assert pixels[0, 64 - row, 64 - col] < 0 and pixels[2, 64 - row, 64 - col] > 1.5  # blue


def test_jpeg_draft_keeps_enough_pixels(tmp_path: Path, processor) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1024, 768), (30, 60, 90)).save(path, quality=90)
    small = load_image(path, draft_size=72)
    assert min(small.size) >= 72 and small.size[0] < 1024
    assert processor.load_image(path).size[1] >= processor.config.resize_size
    assert processor(images=[path])["pixel_values"].shape == (1, 3, 64, 64)


# -- arrays, bytes, paths ------------------------------------------------------------------------


def test_numpy_inputs() -> None:
    rgb = np.zeros((5, 7, 3), dtype=np.uint8)
    rgb[1, 2] = (9, 99, 199)
    out = _pixels(load_image(rgb))
    assert out.shape == (5, 7, 3) and tuple(out[1, 2]) == (9, 99, 199)

    flt = np.full((4, 4, 3), 0.5, dtype=np.float32)
    flt[0, 0] = (0.0, 1.0, 2.0)  # clipped to [0, 1]
    out = _pixels(load_image(flt))
    assert tuple(out[1, 1]) == (128, 128, 128) and tuple(out[0, 0]) == (0, 255, 255)

    u16 = np.full((3, 3, 3), 65535, dtype=np.uint16)
    u16[0, 0] = (0, 256, 32768)
    out = _pixels(load_image(u16))
    assert tuple(out[1, 1]) == WHITE and tuple(out[0, 0]) == (0, 1, 128)

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = _pixels(load_image(grey))
    assert out.shape == (3, 4, 3)
    assert (out[:, :, 0] == grey).all() and (out[:, :, 2] == grey).all()
    assert (_pixels(load_image(grey[:, :, None])) == out).all()

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (1, 2, 3, 255)
    out = _pixels(load_image(rgba))
    assert tuple(out[0, 0]) == (1, 2, 3) and tuple(out[1, 1]) == WHITE


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 2), dtype=np.uint8),
        np.zeros((4,), dtype=np.uint8),
        np.zeros((4, 4, 3), dtype=np.int64),
        np.full((4, 4, 3), np.nan, dtype=np.float32),
    ],
)
def test_bad_arrays(array) -> None:
    with pytest.raises(ImageLoadError, match="array"):
        load_image(array)


def test_bytes_paths_and_byte_sources(tmp_path: Path, processor) -> None:
    img = Image.new("RGB", (10, 8), (12, 34, 56))
    data = _encode(img, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for source in (data, path, str(path), _Member(data), img):
        out = _pixels(load_image(source))
        assert out.shape == (8, 10, 3) and tuple(out[3, 3]) == (12, 34, 56)
    batch = processor(images=[data, path, str(path), _Member(data), img])["pixel_values"]
    assert batch.shape == (5, 3, 64, 64)
    for i in range(1, 5):
        torch.testing.assert_close(batch[i], batch[0], atol=0, rtol=0)


def test_resize_modes(make_processor) -> None:
    # 300 x 100: red sides, a green middle third
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))
    crop = make_processor(resize="shorter")(images=[img])["pixel_values"][0]
    squash = make_processor(resize="squash", resize_size=None)(images=[img])["pixel_values"][0]
    green = (1.0 - 0.456) / 0.224
    red_in_green = (0.0 - 0.456) / 0.224  # a red pixel's green channel
    assert crop.shape == squash.shape == (3, 64, 64)
    torch.testing.assert_close(crop[1], torch.full((64, 64), green), atol=1e-4, rtol=0)
    assert squash[1, 32, 2].item() == pytest.approx(red_in_green, abs=1e-4)
    assert squash[1, 32, 32].item() == pytest.approx(green, abs=1e-4)


def test_max_pixels(make_processor) -> None:
    proc = make_processor(max_image_pixels=100)
    with pytest.raises(ImageLoadError, match="exceeds"):
        proc(images=[_encode(Image.new("RGB", (20, 20)), "PNG")])


# -- bad files -------------------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = Image.new("RGB", (64, 64))
    for x in range(64):
        for y in range(64):
            good.putpixel((x, y), ((x * 7) % 256, (y * 13) % 256, (x * y) % 256))
    jpeg = _encode(good, "JPEG", quality=90)
    png = _encode(good, "PNG")
    files = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "corrupt.png": png[:40] + bytes(range(256)) * 4,
        "empty.jpg": b"",
        "text.jpg": b"this is not an image, just some text\n",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    paths["missing.jpg"] = tmp_path / "missing.jpg"
    paths["folder.jpg"] = tmp_path / "folder.jpg"
    paths["folder.jpg"].mkdir()
    return paths


def test_bad_files_name_the_path(tmp_path: Path, processor) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    for name, path in _bad_files(tmp_path).items():
        for call in (load_image, processor.load_image):
            with pytest.raises(ImageLoadError) as info:
                call(path)
            assert str(path) in str(info.value), name
            assert info.value.reason, name
        with pytest.raises(ImageLoadError) as info:
            processor(images=[good, path])
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)


def test_bad_file_reasons(tmp_path: Path) -> None:
    paths = _bad_files(tmp_path)
    expected = {
        "missing.jpg": "not found",
        "empty.jpg": "empty",
        "text.jpg": "not a recognised image",
        "folder.jpg": "not a regular file",
        "truncated.jpg": "truncated",
    }
    for name, words in expected.items():
        with pytest.raises(ImageLoadError, match=words):
            load_image(paths[name])


def test_bad_bytes_source_is_named() -> None:
    with pytest.raises(ImageLoadError, match="member-7"):
        load_image(_Member(b"garbage"))
    with pytest.raises(ImageLoadError, match="7 bytes"):
        load_image(b"garbage")
    with pytest.raises(ImageLoadError, match="unsupported"):
        load_image(12345)


def test_no_images(processor) -> None:
    with pytest.raises(ValueError):
        processor(images=[])
    with pytest.raises(ValueError):
        processor()


# -- captions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "   ", "\n\t ", ["a cat", "  "], [], [None], [5]])
def test_bad_captions(processor, bad) -> None:
    with pytest.raises(CaptionError):
        processor(text=bad)


def test_padding_longest_vs_max_length(make_processor, minilm_tokenizer) -> None:
    captions = ["a cat", "a small dog runs on the green grass"]
    longest = make_processor(padding="longest")(text=captions)
    fixed = make_processor(padding="max_length")(text=captions)
    lengths = [len(minilm_tokenizer(c)["input_ids"]) for c in captions]
    assert lengths[0] < lengths[1]
    assert longest["input_ids"].shape == (2, lengths[1])
    assert fixed["input_ids"].shape == (2, 128) and fixed["attention_mask"].shape == (2, 128)
    assert longest["attention_mask"].sum(1).tolist() == lengths
    assert fixed["attention_mask"].sum(1).tolist() == lengths
    torch.testing.assert_close(
        fixed["input_ids"][:, : lengths[1]] * fixed["attention_mask"][:, : lengths[1]],
        longest["input_ids"] * longest["attention_mask"],
    )
    assert (fixed["input_ids"][:, lengths[1] :] == minilm_tokenizer.pad_token_id).all()
    assert set(longest) == {"input_ids", "attention_mask"}


def test_single_caption_string(processor) -> None:
    out = processor.process_text("a cat")
    assert out["input_ids"].shape[0] == 1


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_truncation(make_processor, minilm_tokenizer, padding) -> None:
    long = "word " * 400
    out = make_processor(padding=padding)(text=[long, "short"])
    assert out["input_ids"].shape == (2, 128)
    assert out["attention_mask"][0].sum().item() == 128
    assert out["input_ids"][0, -1].item() == minilm_tokenizer.sep_token_id
    short = make_processor(padding=padding, max_length=16)(text=long)
    assert short["input_ids"].shape == (1, 16)


# -- identity --------------------------------------------------------------------------------------


def test_config_hash(make_processor) -> None:
    base = make_processor().config_hash
    assert isinstance(base, str) and len(base) == 16
    assert make_processor().config_hash == base
    assert make_processor(image_size=32, resize_size=40).config_hash != base
    assert make_processor(mean=(0.5, 0.5, 0.5)).config_hash != base
    assert make_processor(padding="max_length").config_hash != base


def test_processor_save_load(tmp_path: Path, processor) -> None:
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").is_file()
    assert (tmp_path / "tokenizer").is_dir()
    loaded = MultimodalProcessor.from_pretrained(tmp_path)
    assert loaded.config == processor.config
    assert loaded.config_hash == processor.config_hash
    caption = ["a cat on a mat", "hi"]
    a, b = processor(text=caption), loaded(text=caption)
    assert torch.equal(a["input_ids"], b["input_ids"])
    with pytest.raises(FileNotFoundError):
        MultimodalProcessor.from_pretrained(tmp_path / "nothing")
