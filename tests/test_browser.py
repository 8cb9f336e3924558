"""The HTML report in a real headless browser: Debian's chromium, driven by playwright.

Playwright never downloads a browser here: it drives the system chromium, which CI installs
(.ci/run). Without it the test fails, saying how to install it.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from test_report import synthetic_category, synthetic_report

from gaussad.report import SECTIONS, write_report

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_report_renders_in_headless_chromium(category, tmp_path) -> None:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "chromium is not installed: the browser test needs Debian's chromium on PATH "
            "(apt-get update && apt-get install -y chromium); .ci/run installs it"
        )
    report = synthetic_report(
        category, synthetic_category(category), synthetic_category(category, name="<b>second</b>")
    )
    path = write_report(tmp_path / "report.html", report)

    messages, page_errors, requests = [], [], []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("console", lambda message: messages.append((message.type, message.text)))
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(path.as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])"
            )
            visible = {key: page.locator(f"#{key}").is_visible() for key, _ in SECTIONS}
            title = page.title()
            page.screenshot(path=tmp_path / "screenshot.png", full_page=True)
        finally:
            context.close()

    assert page_errors == []
    assert [text for kind, text in messages if kind == "error"] == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert len(images) == 2 * (3 + 8)  # per category: curves, histogram, colour bar, 8 tiles
    assert [alt for alt, loaded in images if not loaded] == []
    assert visible == {key: True for key, _ in SECTIONS}
    assert title == "Synthetic evaluation"

    with Image.open(tmp_path / "screenshot.png") as screenshot:
        pixels = np.asarray(screenshot.convert("RGB")).astype(np.int32)
    assert pixels.shape[0] > 2000  # the whole page, not one screen
    colors = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])
    assert len(colors) > 500 and pixels.std() > 20  # pictures and plots, not a blank page
