"""Property-based tests: whatever the input, the processor and the dataset readers either
succeed with well-formed output or raise their one documented error, never anything else."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image

from xmodal.config import ProcessorConfig
from xmodal.data.datasets import BadRowError, ImageTextDataset, load_dataset
from xmodal.processing import (
    CaptionError,
    ImageLoadError,
    MultimodalProcessor,
    caption_problem,
)

SIZE = 32
FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _encoded(fmt: str, mode: str, **options) -> bytes:
    rng = np.random.default_rng(len(fmt) + len(mode))
    img = Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


SEEDS = [
    _encoded("PNG", "RGB"),
    _encoded("PNG", "P", transparency=0),
    _encoded("PNG", "LA"),
    _encoded("JPEG", "RGB"),
    _encoded("JPEG", "CMYK"),
    _encoded("GIF", "P"),
    _encoded("WEBP", "RGB"),
    _encoded("BMP", "RGB"),
    _encoded("TIFF", "RGB", compression="tiff_lzw"),
    _encoded("ICO", "RGBA"),
    _encoded("DDS", "RGBA"),
]


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A valid encoding of one format, then truncated, overwritten or grown at random."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))
    return bytes(data)


@pytest.fixture(scope="module")
def small_processor(minilm_path: str, minilm_tokenizer) -> MultimodalProcessor:
    config = ProcessorConfig(image_size=SIZE, resize_size=36, tokenizer=minilm_path, max_length=24)
    return MultimodalProcessor(config, minilm_tokenizer)


def image_or_load_error(processor: MultimodalProcessor, image: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about some damaged files
        try:
            pixels = processor.process_image(image)
        except ImageLoadError as err:
            assert err.reason and err.source in str(err)
            return
    assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()


@FAST
@given(data=st.one_of(st.binary(max_size=2048), damaged_images()))
def test_any_bytes_give_an_image_tensor_or_image_load_error(small_processor, data) -> None:
    image_or_load_error(small_processor, data)


DTYPES = ["uint8", "uint16", ">u2", "bool", "int8", "int32", "int64", "float16", "float32",
          "float64", ">f4", "complex64"]  # fmt: skip


@FAST
@given(
    array=arrays(
        dtype=st.sampled_from(DTYPES),
        shape=array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9),
    )
)
def test_any_array_gives_an_image_tensor_or_image_load_error(small_processor, array) -> None:
    image_or_load_error(small_processor, array)


captions_alphabet = st.one_of(
    st.characters(),  # any code point but surrogates
    st.characters(categories=["Cs", "Cc", "Cf", "Zs", "Mn", "Co", "Cn"]),  # the awkward ones
    st.sampled_from(" \t\n\u200b\ufeff\ufffd\u202e\u3000"),
)


@FAST
@given(captions=st.lists(st.text(captions_alphabet, max_size=200), min_size=1, max_size=4))
def test_any_captions_give_tokens_or_caption_error(small_processor, captions) -> None:
    bad = [i for i, caption in enumerate(captions) if caption_problem(caption)]
    try:
        out = small_processor.process_text(captions)
    except CaptionError as err:
        assert bad, f"refused captions with no problem: {err}"
        assert str(err).startswith(f"caption {bad[0]} ")
        return
    assert not bad, f"accepted captions {bad}"
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == len(captions)
    assert 2 <= ids.shape[1] <= 24 and ids.dtype == torch.long


# ------------------------------------------------------------------------------ readers

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(captions_alphabet, max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
row_keys = st.sampled_from(["image", "caption", "image_id", "label"]) | st.text(max_size=6)
GOOD_ROW = {"image": "img.png", "caption": "the one good row", "image_id": "good"}


def _json_line(record: object) -> bytes:
    return json.dumps(record).encode("utf-8")


jsonl_lines = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ")),
    st.dictionaries(row_keys, json_values, max_size=5).map(_json_line),
    st.fixed_dictionaries(
        {
            "image": st.sampled_from(["img.png", "", "nope.png", ".", "../img.png"]),
            "caption": st.text(captions_alphabet, max_size=40),
        },
    ).map(_json_line),  # fmt: skip
    json_values.map(_json_line),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),  # deep nesting
    st.integers(4000, 5000).map(lambda n: b'{"image": "img.png", "n": ' + b"9" * n + b"}"),
)
csv_lines = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ")),
    st.lists(
        st.text(captions_alphabet, max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
        max_size=4,
    ).map(b",".join),
    st.sampled_from([b'img.png,"unterminated', b'img.png,"a ""quoted"" one"', b"img.png,ok\rx"]),
    st.integers(131_000, 140_000).map(lambda n: b"img.png," + b"x" * n),
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rows")
    Image.new("RGB", (4, 4)).save(root / "img.png")
    return root


def dataset_or_bad_row(path: Path, good: bool) -> None:
    for skip_bad in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dataset = load_dataset(path, skip_bad=skip_bad)
            except BadRowError as err:
                assert str(err)
                assert not (skip_bad and good), f"the good row was lost: {err}"
                continue
        assert isinstance(dataset, ImageTextDataset) and len(dataset) >= 1
        for example in dataset:
            assert caption_problem(example.caption) is None
            assert Path(example.image).is_file()
        if skip_bad and good:
            assert "the one good row" in dataset.captions()


@FAST
@given(lines=st.lists(jsonl_lines, max_size=6), good=st.booleans(), at=st.integers(0, 6))
def test_any_jsonl_lines_give_a_dataset_or_bad_row_error(folder, lines, good, at) -> None:
    if good:
        lines.insert(at, json.dumps(GOOD_ROW).encode())
    path = folder / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    dataset_or_bad_row(path, good)


@FAST
@given(lines=st.lists(csv_lines, max_size=6), good=st.booleans())
def test_any_csv_lines_give_a_dataset_or_bad_row_error(folder, lines, good) -> None:
    if good:  # first: an unterminated quote rightly swallows the lines after it
        lines.insert(0, b"img.png,the one good row,good")
    path = folder / "rows.csv"
    path.write_bytes(b"image,caption,image_id\n" + b"\n".join(lines) + b"\n")
    dataset_or_bad_row(path, good)
