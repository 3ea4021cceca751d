"""The most expensive single request the service accepts under its default limits, per endpoint.

The service's defaults (``ServeSettings``) are meant to keep any one request under about a
second of CPU on the quickstart model. This script builds that model's architecture (the
offline default's pretrained towers at 224 px with the quickstart config's heads: token and
pool levels, grid positions; random heads, which cost what trained ones do), serves a 64-image
index through the real app in-process, and times one request at each limit: re-rank at
``max_rerank``, ``max_batch`` captions of ``max_text_chars``, uploads filling
``max_request_pixels`` (PNG and JPEG), ``/match`` with the largest upload, a plain search. It
prints a table and writes the figures to ``--out`` (JSON).

    python bench/bench_serve_costs.py --out /tmp/serve-costs.json
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_machine_args, describe_machine, load_average  # noqa: E402

from xmodal.apps.quickstart import quickstart_config_path  # noqa: E402
from xmodal.config import from_dict, load_yaml_or_json  # noqa: E402
from xmodal.extract import extract  # noqa: E402
from xmodal.index import SearchIndex, build_index  # noqa: E402
from xmodal.models.identity import identify  # noqa: E402
from xmodal.presets import load_model  # noqa: E402
from xmodal.search import Searcher  # noqa: E402
from xmodal.serve import ServeSettings, create_app  # noqa: E402
from xmodal.train.config import ModelSection  # noqa: E402
from xmodal.train.surgery import with_new_heads  # noqa: E402


def quickstart_model():
    """The quickstart's architecture over the pretrained offline default (heads random)."""
    model, processor = load_model("offline-default")
    section = from_dict(ModelSection, load_yaml_or_json(quickstart_config_path())["model"])
    return with_new_heads(model, section).eval(), processor


def collection(folder: Path, count: int, side: int) -> Path:
    """``count`` photo-like JPEGs (smooth noise) of ``side`` pixels with a caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
        image.save(folder / f"img{i}.jpg", quality=90)
        rows.append({"image": f"img{i}.jpg", "caption": f"picture number {i}"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def encoded(side: int, fmt: str) -> bytes:
    """A smooth gradient (small when encoded: the decoder's work is in the pixels)."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side))],
        axis=-1,
    ).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(call, repeats: int) -> dict[str, float]:
    """Wall and CPU seconds of the best of ``repeats`` calls (the first one warms up)."""
    call()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), cpu_seconds()
        response = call()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
        assert response.status_code == 200, response.text[:300]
    best = int(np.argmin(walls))
    return {"wall_s": round(walls[best], 3), "cpu_s": round(cpus[best], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_machine_args(parser)
    parser.add_argument("--images", type=int, default=64, help="indexed images")
    parser.add_argument("--side", type=int, default=512, help="indexed images' side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fastapi.testclient import TestClient

    settings = ServeSettings()
    model, processor = quickstart_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "model", processor)
        data = collection(root / "data", args.images, args.side)
        extract(root / "model", data, root / "emb", modality="images", progress=False)
        build_index(root / "emb", root / "idx")
        searcher = Searcher(
            model, processor, SearchIndex(root / "idx"), identify(model, processor, root / "model")
        )
        searcher.rerank.weight = 0.25  # the quickstart's calibrated weight: re-ranking runs
        client = TestClient(create_app(searcher, settings), base_url="http://localhost")
        per_side = int((settings.max_request_pixels / 8) ** 0.5)  # 8 images fill the budget
        big = int(settings.max_request_pixels**0.5)
        caption = ("a small red bird sitting on a branch in the rain " * 40)[
            : settings.max_text_chars
        ]
        cases = {
            "search text (k 10)": lambda: client.post("/search", json={"text": "a bird"}),
            f"search text, rerank k = max_rerank ({settings.max_rerank})": lambda: client.post(
                "/search", json={"text": "a bird", "k": settings.max_rerank, "rerank": True}
            ),
            f"embed {settings.max_batch} captions of {settings.max_text_chars} chars": (
                lambda: client.post("/embed", json={"text": [caption] * settings.max_batch})
            ),
            f"embed 8 PNG {per_side}x{per_side} (= max_request_pixels)": lambda: client.post(
                "/embed",
                files=[
                    ("image", (f"{i}.png", encoded(per_side, "PNG"), "image/png")) for i in range(8)
                ],
            ),
            f"embed 1 JPEG {big}x{big} (= max_request_pixels)": lambda: client.post(
                "/embed", files=[("image", ("a.jpg", encoded(big, "JPEG"), "image/jpeg"))]
            ),
            f"match, PNG {big}x{big}": lambda: client.post(
                "/match",
                files={"image": ("a.png", encoded(big, "PNG"), "image/png")},
                data={"caption": "a bird"},
            ),
        }
        rows = {}
        for name, call in cases.items():
            rows[name] = {**timed(call, args.repeats), "load": round(load_average(), 2)}
            print(
                f"{name:<58} wall {rows[name]['wall_s']:6.3f} s  cpu {rows[name]['cpu_s']:6.3f} s"
                f"  (load {rows[name]['load']})",
                flush=True,
            )
    result = {
        "machine": describe_machine(args.threads),
        "model": "quickstart architecture over offline-default (224 px), random heads",
        "indexed": f"{args.images} JPEG {args.side}x{args.side}",
        "settings": {k: getattr(settings, k) for k in (
            "max_rerank", "max_batch", "max_text_chars", "max_request_pixels", "request_timeout")},
        "requests": rows,
    }  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
