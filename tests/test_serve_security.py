"""The service as an outsider on the network meets it: bounded work per request, nothing
executable from the collection, nothing slow on the event loop, a token and allowed hosts,
timeouts, damaged index files, every error kind mapped without a server path."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from test_extract import make_image_folder, save_tiny_model, tiny_processor
from test_index import FAKE_IDENTITY, clustered_vectors, write_fake_shards

import xmodal.errors as errors
from xmodal.errors import (
    CancelledWorkError,
    DeadlineError,
    ImageLoadError,
    IndexDamagedError,
    XmodalError,
)
from xmodal.extract import extract
from xmodal.index import SearchIndex, build_index
from xmodal.models.identity import identify
from xmodal.models.model import CrossModalModel
from xmodal.processing import MultimodalProcessor, load_image
from xmodal.runtime import Deadline
from xmodal.search import IndexedImageError, Searcher
from xmodal.serve import ServeSettings, create_app
from xmodal.serve.problems import ERROR_STATUS, error_response, without_paths
from xmodal.serve.public import PublicNames
from xmodal.serve.security import exposure_warnings, host_name
from xmodal.serve.server import build_server
from xmodal.serve.work import RequestCost, Workers

LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_tokenizer, minilm_path):
    root = tmp_path_factory.mktemp("security")
    model_dir = save_tiny_model(root / "model", tiny_processor(minilm_tokenizer, minilm_path))
    data = make_image_folder(root / "data", broken=False)
    # a PNG with a script in a text chunk, named .html: Pillow opens it, so it is indexed
    script = Image.new("RGB", (8, 8), (200, 10, 10))
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "<html><script>alert(document.domain)</script></html>")
    script.save(data / "evil.html", format="PNG", pnginfo=info)
    row = {"image": "evil.html", "caption": "a red square", "image_id": "evil.html"}
    with open(data / "captions.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    extract(model_dir, data, root / "emb", modality="images", workers=0, progress=False)
    build_index(root / "emb", root / "idx")
    model = CrossModalModel.from_pretrained(model_dir)
    processor = MultimodalProcessor.from_pretrained(model_dir)
    searcher = Searcher(
        model, processor, SearchIndex(root / "idx"), identify(model, processor, model_dir)
    )
    return {"root": root, "data": data, "model_dir": model_dir, "searcher": searcher}


def client_for(searcher: Searcher, **settings) -> TestClient:
    return TestClient(base_url=LOCAL, app=create_app(searcher, ServeSettings(**settings)))


def png(size: tuple[int, int] = (16, 16), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- bounded work


def test_rerank_beyond_its_limit_is_refused_before_any_work(setup, monkeypatch) -> None:
    searcher = setup["searcher"]
    monkeypatch.setattr(searcher.rerank, "weight", 0.5)  # an active re-rank weight
    calls = []
    monkeypatch.setattr(searcher, "_itm_scores", lambda q, p, *a: calls.append(p) or [0.0] * len(p))
    with client_for(searcher, max_rerank=4) as client:
        response = client.post("/search", json={"text": "photo 1", "k": 5, "rerank": True})
        assert response.status_code == 422
        assert "max_rerank" in response.json()["detail"] and "4" in response.json()["detail"]
        assert not calls
        ok = client.post("/search", json={"text": "photo 1", "k": 4, "rerank": True})
        assert ok.status_code == 200 and len(calls) == 1


def test_the_pixel_budget_counts_every_upload_of_a_request(setup) -> None:
    with client_for(setup["searcher"], max_request_pixels=1000) as client:
        files = [("image", (f"{i}.png", png((20, 20)), "image/png")) for i in range(3)]
        response = client.post("/embed", files=files)  # 3 x 400 pixels > 1000
        assert response.status_code == 422
        assert "1,200 pixels" in response.json()["detail"]
        assert "max_request_pixels" in response.json()["detail"]
        assert client.post("/embed", files=files[:2]).status_code == 200


def test_work_past_the_deadline_stops_with_503(setup, monkeypatch) -> None:
    searcher = setup["searcher"]
    seen: list[float] = []

    def slow(texts, work: Deadline = None):  # a model call that checks its deadline
        for _ in range(100):
            work.check()
            seen.append(work.remaining())
            time.sleep(0.02)
        return np.zeros((len(texts), 4), np.float32)

    monkeypatch.setattr(searcher, "embed_texts", slow)
    with client_for(searcher, request_timeout=0.3) as client:
        started = time.monotonic()
        response = client.post("/embed", json={"text": ["a"]})
        took = time.monotonic() - started
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "deadline" in response.json()["detail"]
    assert took < 1.5 and len(seen) < 30  # stopped soon after 0.3 s, not after 2 s


class FakeRequest:
    """A request whose client goes away after ``after`` seconds."""

    def __init__(self, after: float):
        self.gone_at = time.monotonic() + after

    async def is_disconnected(self) -> bool:
        return time.monotonic() > self.gone_at


def test_work_for_a_client_that_went_away_is_cancelled() -> None:
    workers = Workers(ServeSettings(request_timeout=10.0))
    steps: list[int] = []

    def long_work(work: Deadline) -> str:
        for step in range(200):
            work.check()
            steps.append(step)
            time.sleep(0.01)
        return "finished"

    async def main() -> None:
        with pytest.raises(CancelledWorkError):
            await workers.run(FakeRequest(0.15), workers.deadline(), True, long_work)

    anyio.run(main)
    assert 1 <= len(steps) < 100  # stopped about 0.15 s in, not after 200 steps (2 s)


def test_heavy_requests_never_hold_the_slots_of_light_ones() -> None:
    settings = ServeSettings(max_concurrency=3, max_heavy_requests=1, request_timeout=5.0)
    workers = Workers(settings)
    finished: list[str] = []
    release = threading.Event()

    def heavy(work: Deadline) -> None:
        release.wait(5)  # holds its slot until the light request is done
        finished.append("heavy")

    def light(work: Deadline) -> None:
        finished.append("light")

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(3):  # one computing, two queued for the single heavy slot
                group.start_soon(workers.run, FakeRequest(60), workers.deadline(), True, heavy)
            await anyio.sleep(0.05)
            await workers.run(FakeRequest(60), workers.deadline(), False, light)
            release.set()

    anyio.run(main)
    assert finished[0] == "light" and finished.count("heavy") == 3


def test_a_request_waiting_past_its_deadline_for_a_slot_gets_503() -> None:
    workers = Workers(ServeSettings(max_concurrency=2, max_heavy_requests=1, request_timeout=0.2))

    def heavy(work: Deadline) -> str:
        time.sleep(0.5)
        return "done"

    async def main() -> list:
        outcomes: list = []

        async def one() -> None:
            try:
                outcomes.append(await workers.run(FakeRequest(60), workers.deadline(), True, heavy))
            except DeadlineError as err:
                outcomes.append(err)

        async with anyio.create_task_group() as group:
            group.start_soon(one)
            group.start_soon(one)
        return outcomes

    outcomes = anyio.run(main)
    assert sum(o == "done" for o in outcomes) == 1
    assert sum(isinstance(o, DeadlineError) and "busy" in str(o) for o in outcomes) == 1


def test_the_cost_model_names_each_limit() -> None:
    settings = ServeSettings(max_batch=4, max_request_pixels=100, max_rerank=2)
    RequestCost(images=4, pixels=100, captions=4, rerank_pairs=2).check(settings)
    for cost, name in (
        (RequestCost(images=5), "max_batch"),
        (RequestCost(captions=5), "max_batch"),
        (RequestCost(images=1, pixels=101), "max_request_pixels"),
        (RequestCost(captions=1, rerank_pairs=3), "max_rerank"),
    ):
        with pytest.raises(errors.LimitError, match=name):
            cost.check(settings)
    assert RequestCost(images=1).heavy and RequestCost(rerank_pairs=1).heavy
    assert not RequestCost(captions=3).heavy


def test_header_checks_run_off_the_event_loop(setup, monkeypatch) -> None:
    import xmodal.serve.limits as limits

    threads: list[str] = []
    original = limits.check_pixels

    def record(*args):
        threads.append(threading.current_thread().name)
        return original(*args)

    monkeypatch.setattr(limits, "check_pixels", record)
    with client_for(setup["searcher"]) as client:
        response = client.post("/embed", files=[("image", ("a.png", png(), "image/png"))])
    assert response.status_code == 200
    assert threads and all(name != threading.main_thread().name for name in threads)
    loop_threads = [t for t in threads if "asyncio" in t.lower() or t == "MainThread"]
    assert not loop_threads


# ----------------------------------------------------------------------------- the collection


def test_images_are_served_as_their_decoded_type_with_strict_headers(setup) -> None:
    with client_for(setup["searcher"]) as client:
        response = client.get("/images/evil.html")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"  # never text/html
        for path in ("/images/evil.html", "/health", "/", "/static/app.js", "/nothing"):
            headers = client.get(path).headers
            assert headers["x-content-type-options"] == "nosniff", path
            assert "frame-ancestors 'none'" in headers["content-security-policy"], path
            assert "script-src 'self'" in headers["content-security-policy"], path
        page = client.get("/").text
        assert "<script>" not in page and 'src="/static/app.js"' in page  # no inline script
        assert client.get("/docs").status_code == 404


def test_only_raster_formats_are_decoded(tmp_path: Path) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    for data in (eps, ico.getvalue()):
        with pytest.raises(ImageLoadError, match="accepted: PNG, JPEG, WebP, GIF, BMP or TIFF"):
            load_image(data)
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        Image.new("RGB", (9, 7), (1, 2, 3)).save(buffer, format=fmt)
        assert load_image(buffer.getvalue()).size == (9, 7)


def test_a_fifo_in_the_collection_does_not_hang(setup, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo)
    from xmodal.processing import read_regular_file

    with pytest.raises(OSError, match="not a regular file"):
        read_regular_file(fifo)
    assert time.monotonic() - started < 1


# ----------------------------------------------------------------------------- access control


def test_a_token_guards_every_api_path(setup) -> None:
    token = "s3cret-token-of-some-length"
    with client_for(setup["searcher"], token=token) as client:
        for path in ("/health", "/openapi.json", "/images/evil.html"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert client.post("/search", json={"text": "x"}).status_code == 401
        wrong = {"Authorization": "Bearer " + token[:-1] + "X"}
        assert client.get("/health", headers=wrong).status_code == 401
        right = {"Authorization": f"Bearer {token}"}
        assert client.get("/health", headers=right).status_code == 200
        assert client.post("/search", json={"text": "x"}, headers=right).status_code == 200
        assert client.get("/").status_code == 200  # the page holds no data
        assert client.get("/static/app.js").status_code == 200


def test_only_allowed_host_names_are_answered(setup) -> None:
    searcher = setup["searcher"]
    with client_for(searcher) as client:  # bound to loopback: localhost names only
        assert client.get("/health").status_code == 200
        rebound = client.get("/health", headers={"host": "attacker.example:8000"})
        assert rebound.status_code == 400 and "allowed-hosts" in rebound.json()["detail"]
        assert client.get("/health", headers={"host": "127.0.0.1:8000"}).status_code == 200
        assert client.get("/health", headers={"host": "[::1]:8000"}).status_code == 200
    with client_for(searcher, allowed_hosts="search.example.org,*.corp") as client:
        assert client.get("/health", headers={"host": "search.example.org"}).status_code == 200
        assert client.get("/health", headers={"host": "a.b.corp"}).status_code == 200
        assert client.get("/health", headers={"host": "localhost"}).status_code == 400
    assert host_name("[::1]:8000") == "[::1]" and host_name("Example.org:80") == "example.org"


def test_cors_is_off_unless_an_origin_is_named(setup) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    with client_for(setup["searcher"]) as client:
        response = client.get("/health", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
    with client_for(setup["searcher"], cors_origin="https://app.example") as client:
        response = client.options("/search", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example"


def test_an_exposed_bind_without_a_token_warns() -> None:
    assert exposure_warnings(ServeSettings()) == []
    warned = " ".join(exposure_warnings(ServeSettings(host="0.0.0.0")))
    assert "without a token" in warned and "--allowed-hosts" in warned
    quiet = ServeSettings(host="0.0.0.0", token="x" * 20, allowed_hosts="search.example.org")
    assert exposure_warnings(quiet) == []
    with pytest.raises(errors.ConfigError, match="at least 16"):
        ServeSettings(token="short")


# ----------------------------------------------------------------------------- errors, damage


def all_error_kinds() -> list[type[XmodalError]]:
    found, todo = [], [XmodalError]
    while todo:
        kind = todo.pop()
        found.append(kind)
        todo += kind.__subclasses__()
    return found


def instance_of(kind: type[XmodalError], path: str) -> XmodalError:
    if kind is ImageLoadError:
        return kind(path, "not a recognised image format")
    if kind is IndexDamagedError:
        return kind(f"{path} was truncated", "index 'idx' is damaged: its file x was truncated")
    if kind is IndexedImageError:
        return kind(0, "id", path, "is gone", True)
    return kind(f"{path}: something went wrong")


def test_every_error_kind_has_a_status_and_names_no_path(setup) -> None:
    names = PublicNames(setup["searcher"].index)
    mapped = {kind for kind, _ in ERROR_STATUS}
    path = "/srv/private/collection/ids-00001.parquet"
    for kind in all_error_kinds():
        assert kind in mapped, f"{kind.__name__} has no status of its own in ERROR_STATUS"
        status, detail = error_response(instance_of(kind, path), names)
        assert 400 <= status < 600, kind
        assert "/srv" not in detail and "private" not in detail, (kind, detail)
    assert without_paths("cannot read /a/b/c.parquet (row 3)") == "cannot read c.parquet (row 3)"


def test_a_truncated_ids_file_is_a_503_without_a_path(setup, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    import shutil

    shutil.copytree(setup["root"] / "idx", root)
    searcher = setup["searcher"]
    copy = Searcher(searcher.model, searcher.processor, SearchIndex(root))
    with client_for(copy) as client:
        assert client.post("/search", json={"text": "photo"}).status_code == 200
        ids = next(root.glob("ids*.parquet"))
        with open(ids, "r+b") as handle:
            handle.truncate(ids.stat().st_size // 2)
        response = client.post("/search", json={"text": "photo"})
        assert response.status_code == 503
        assert str(tmp_path) not in response.text and "damaged" in response.json()["detail"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "damaged"
        assert str(tmp_path) not in health.text


SIGBUS_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from xmodal.errors import IndexDamagedError
from xmodal.index import SearchIndex
index = SearchIndex(sys.argv[1])
query = np.load(sys.argv[2])
index.search(query, 5, refine=50)
target = Path(sys.argv[1]) / sys.argv[3]
with open(target, "r+b") as handle:
    handle.truncate(64)
try:
    index.search(query, 5, refine=50)
except IndexDamagedError as err:
    print("refused:", err.public)
"""


@pytest.mark.parametrize("kind", ["vectors_file", "lists_file"])
def test_a_mapped_file_truncated_in_place_never_kills_the_process(tmp_path: Path, kind) -> None:
    vectors = clustered_vectors(3000, 20, dim=32, seed=3)
    shards = write_fake_shards(tmp_path / "emb", vectors, FAKE_IDENTITY)
    build_index(
        shards,
        tmp_path / "idx",
        modality="texts",
        max_index_memory="128k",
        refine=50,
        max_build_memory="16G",
    )
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert kind in info, info.keys()
    np.save(tmp_path / "q.npy", vectors[:2])
    done = subprocess.run(
        [sys.executable, "-c", SIGBUS_SCRIPT, str(tmp_path / "idx"), str(tmp_path / "q.npy"),
         info[kind]],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert "index 'idx' is damaged" in line and "truncated" in line and str(tmp_path) not in line


# ----------------------------------------------------------------------------- a real server


@pytest.fixture()
def live(setup, caplog):
    """uvicorn with the service's protocol, short timeouts, on a free loopback port."""
    settings = ServeSettings(
        port=_free_port(), header_timeout=0.5, body_timeout=0.5, keepalive_timeout=1.0,
        log_level="warning",
    )  # fmt: skip
    server = build_server(create_app(setup["searcher"], settings), settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    logging.getLogger("xmodal.serve").propagate = True
    yield settings
    server.should_exit = True
    thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_slow_and_idle_clients_are_closed(live) -> None:
    port = live.port
    idle = socket.create_connection(("127.0.0.1", port))
    slow_headers = socket.create_connection(("127.0.0.1", port))
    slow_headers.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # never ends
    slow_body = socket.create_connection(("127.0.0.1", port))
    slow_body.sendall(
        b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"text":'
    )
    for sock in (idle, slow_headers, slow_body):
        assert _closed_within(sock, 3.0)
        sock.close()
    with socket.create_connection(("127.0.0.1", port)) as ok:  # a normal client still works
        ok.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        ok.settimeout(5)
        assert ok.recv(100).startswith(b"HTTP/1.1 200")


def test_a_client_leaving_mid_body_is_one_log_line(live, caplog) -> None:
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(
            b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"text":'
        )
        time.sleep(0.1)
    time.sleep(1.0)
    text = caplog.text
    assert "Traceback" not in text and "Exception in ASGI" not in text
    assert text.count("went away") == 1, text  # one line, naming what happened


def test_the_model_lock_serves_short_calls_before_queued_long_ones() -> None:
    from xmodal.search import ModelLock

    lock = ModelLock()
    order: list[str] = []

    def take(name: str, priority: int) -> None:
        with lock.held(priority):
            order.append(name)

    with lock.held(1):  # a chunk of long work holds the lock while others queue
        threads = [threading.Thread(target=take, args=(f"long{i}", 1)) for i in range(3)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        short = threading.Thread(target=take, args=("short", 0))
        short.start()
        time.sleep(0.05)
    for thread in [*threads, short]:
        thread.join(5)
    assert order == ["short", "long0", "long1", "long2"]  # then in arrival order


def test_images_through_the_tower_in_chunks_equal_one_batch(setup) -> None:
    searcher = setup["searcher"]
    images = sorted(setup["data"].glob("img*.png"))
    assert len(images) > 8  # more than one chunk of the model lock
    chunked = searcher.image_features(images)
    pixels = searcher.processor.process_images(images)
    with torch.inference_mode():
        whole = searcher.model.image_features(pixels)
    torch.testing.assert_close(chunked.embeds, whole.embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked.tokens, whole.tokens, atol=1e-5, rtol=1e-4)
