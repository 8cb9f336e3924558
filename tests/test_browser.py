"""The HTML report in a real headless browser: Debian's chromium, driven by playwright.

Playwright never downloads a browser here: it drives the system chromium, which `make test` installs
(scripts/ensure-packages). Without it the test fails, saying how to install it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import BOTTLE, needs
from PIL import Image
from playwright.sync_api import sync_playwright
from test_report import synthetic_category, synthetic_report

from gaussad.cli import main
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


@dataclass
class PageVisit:
    """What a headless browser saw when it opened a page."""

    console_errors: list[str]
    page_errors: list[str]
    requests: list[str]
    images: list[tuple[str, bool]]  # (alt text, loaded)
    visible: dict[str, bool]  # section id -> visible
    title: str
    screenshot: np.ndarray  # full page, RGB


def visit(path: Path, tmp_path: Path) -> PageVisit:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "chromium is not installed: the browser test needs Debian's chromium on PATH "
            "(apt-get update && apt-get install -y chromium); `make test` installs it as root"
        )
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
    with Image.open(tmp_path / "screenshot.png") as screenshot:
        pixels = np.asarray(screenshot.convert("RGB")).astype(np.int32)
    errors = [text for kind, text in messages if kind == "error"]
    return PageVisit(errors, page_errors, requests, [tuple(i) for i in images], visible, title, pixels)


def assert_sound(page: PageVisit) -> None:
    """No errors, nothing fetched from outside, every picture drawn, every section shown, not blank."""
    assert page.page_errors == [] and page.console_errors == []
    assert all(url.startswith(("file:", "data:")) for url in page.requests), page.requests
    assert [alt for alt, loaded in page.images if not loaded] == []
    assert page.visible == {key: True for key, _ in SECTIONS}
    assert page.screenshot.shape[0] > 2000  # the whole page, not one screen
    pixels = page.screenshot
    colors = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])
    assert len(colors) > 500 and pixels.std() > 20  # pictures and plots, not a blank page


def test_report_renders_in_headless_chromium(category, tmp_path) -> None:
    report = synthetic_report(
        category, synthetic_category(category), synthetic_category(category, name="<b>second</b>")
    )
    page = visit(write_report(tmp_path / "report.html", report), tmp_path)
    assert_sound(page)
    assert len(page.images) == 2 * (3 + 8)  # per category: curves, histogram, colour bar, 8 tiles
    assert page.title == "Synthetic evaluation"


@needs(BOTTLE)
@pytest.mark.slow
def test_bottle_report_shows_every_section(tmp_path) -> None:
    report = tmp_path / "bottle.html"
    assert main(["report", str(BOTTLE), "-o", str(report), "--quiet", "--device", "cpu"]) == 0
    page = visit(report, tmp_path)
    assert_sound(page)
    assert len(page.images) == 3 + 24  # curves, histogram, colour bar, a full gallery
    html = report.read_text()
    for text in ("bottle", "contamination", "label-free", "Image AUROC"):
        assert text in html, text
