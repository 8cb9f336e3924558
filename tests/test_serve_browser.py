"""The review page in Debian's headless chromium, driven by playwright as tests/test_browser.py does: served
over loopback with an API key (sent as a gateway in front of the page would), its strict
Content-Security-Policy in force, an image chosen, its verdict and overlay drawn, the audit trail listed."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import test_browser
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import expect, sync_playwright
from test_serve_support import fitted_model, inspection_images

from gaussad.serve.app import create_app
from gaussad.serve.settings import ServeSettings

KEY = "review-page-key-0123456789"


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """The app under uvicorn in a thread, on a free loopback port: its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_review_page_inspects_and_lists_decisions(category: Path, tmp_path_factory, tmp_path: Path) -> None:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "chromium is not installed: the browser test needs Debian's chromium on PATH "
            "(apt-get update && apt-get install -y chromium); `make test` installs it as root"
        )
    settings = ServeSettings(
        (fitted_model(category, tmp_path_factory),),
        audit=str(tmp_path / "audit.sqlite3"),
        keep_images=tmp_path / "kept",
        api_keys=(KEY.encode(),),
        device="cpu",
    )
    good, scratched = inspection_images(category)[0], inspection_images(category)[5]
    console, page_errors, requests = [], [], []
    with serve_in_thread(create_app(settings)) as base, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=executable,
            headless=True,
            args=test_browser.CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
            extra_http_headers={"Authorization": f"Bearer {KEY}"},
        )
        try:
            page = context.new_page()
            page.on("console", lambda message: console.append((message.type, message.text)))
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(f"{base}/", wait_until="load")
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            verdicts = []
            for number, path in enumerate((good, scratched), start=1):
                page.set_input_files("#file", str(path))
                # A locator, not wait_for_function: that polls with eval, which the page's policy forbids.
                expect(page.locator("#rows tr")).to_have_count(number, timeout=30_000)
                verdicts.append(page.text_content("#verdict"))
            drawn = page.evaluate(
                """() => {
                    const canvas = document.getElementById('overlay');
                    const context = canvas.getContext('2d');
                    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
                    let green = 0, colours = new Set();
                    for (let i = 0; i < pixels.length; i += 4) {
                        if (pixels[i] === 0 && pixels[i + 1] === 255 && pixels[i + 2] === 0) green++;
                        colours.add((pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2]);
                    }
                    return [canvas.width, canvas.height, green, colours.size];
                }"""
            )
            thumbnails = page.evaluate(
                "() => Array.from(document.querySelectorAll('#rows img')).map(i => i.complete && i.width)"
            )
            rows = page.evaluate(
                "() => Array.from(document.querySelectorAll('#rows tr')).map(r => r.cells[5].textContent)"
            )
            drift = page.text_content("#drift")
        finally:
            context.close()
    assert page_errors == [] and [text for kind, text in console if kind == "error"] == []  # CSP included
    assert all(url.startswith((base, "data:", "blob:")) for url in requests), requests
    assert verdicts == ["good", "anomalous"] and rows == ["anomalous", "good"]  # newest first
    width, height, green, colours = drawn
    assert (width, height) == (96, 96) and green > 20 and colours > 200  # heatmap blended, defect outlined
    assert thumbnails == [64, 64]  # kept images, drawn from their thumbnails (at most 64 px by the style)
    assert "drift: 2 images" in drift
