"""The web page in headless Chromium: type a caption, get thumbnails with scores, and no path
of the server's in sight."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from test_extract import save_tiny_model, tiny_processor
from test_serve_paths import write_rows

from xmodal.extract import extract
from xmodal.index import SearchIndex, build_index
from xmodal.models.model import CrossModalModel
from xmodal.processing import MultimodalProcessor
from xmodal.search import Searcher
from xmodal.serve import ServeSettings, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TOKEN = "a-token-for-the-web-page-test"


@pytest.fixture(params=["open", "token"])
def server(request, tmp_path: Path, minilm_tokenizer, minilm_path):
    """uvicorn serving a 10-image index on a free loopback port, in a thread; the dataset gives
    no image ids, so each image's stored id is its absolute path."""
    uvicorn = pytest.importorskip("uvicorn")
    model_dir = save_tiny_model(tmp_path / "model", tiny_processor(minilm_tokenizer, minilm_path))
    rows = write_rows(tmp_path / "data")
    extract(model_dir, rows, tmp_path / "emb", modality="images", workers=0, progress=False)
    build_index(tmp_path / "emb", tmp_path / "idx")
    searcher = Searcher(
        CrossModalModel.from_pretrained(model_dir),
        MultimodalProcessor.from_pretrained(model_dir),
        SearchIndex(tmp_path / "idx"),
    )
    settings = ServeSettings(token=TOKEN if request.param == "token" else "")
    app = create_app(searcher, settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://localhost:{port}", tmp_path, request.param
    instance.should_exit = True
    thread.join(timeout=10)


def test_typed_query_shows_thumbnails_with_scores(server: tuple[str, Path, str]) -> None:
    url, root, access = server
    data = root / "data" / "pics"
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            if access == "token":  # the page asks for the token, then sends it with every call
                sync_api.expect(page.locator("#info")).to_have_text("this server needs a token")
                page.fill("#token", TOKEN)
                page.press("#token", "Enter")
            sync_api.expect(page.locator("#info")).to_have_text("10 images indexed (flat)")
            page.select_option("#k", "5")
            page.fill("#query", "photo 4")
            page.press("#query", "Enter")
            results = page.locator("#results .result")
            sync_api.expect(results).to_have_count(5, timeout=15_000)
            sync_api.expect(page.locator("#status")).to_contain_text('5 results for "photo 4"')
            scores = results.locator(".score").all_inner_texts()
            assert all(" score " in s for s in scores)
            values = [float(s.rsplit(" ", 1)[1]) for s in scores]
            assert values == sorted(values, reverse=True)
            thumbs = results.locator("img")
            sync_api.expect(thumbs).to_have_count(5)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')]"
                ".every(img => img.complete && img.naturalWidth > 0)",
                timeout=15_000,
            )
            if access == "open":
                assert thumbs.first.get_attribute("src").startswith("/images/pics%2Fimg")
            else:  # fetched with the token, shown from memory
                assert thumbs.first.get_attribute("src").startswith("blob:")
            shown = page.content() + page.inner_text("body")
            assert "pics/img" in shown and str(root) not in shown

            page.set_input_files("#file", str(data / "img2.png"))  # the drop zone's file picker
            sync_api.expect(page.locator("#status")).to_contain_text("results for image img2.png")
            sync_api.expect(results.first.locator(".caption")).to_have_text("pics/img2.png")
            assert str(root) not in page.content() + page.inner_text("body")
        finally:
            browser.close()
