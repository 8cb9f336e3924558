"""The HTML report, its saved results and the heatmap overlays it shows, on synthetic predictions (no
model is fitted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from gaussad import report as report_module
from gaussad.calibration import Threshold
from gaussad.cli import main
from gaussad.decisions import map_scale
from gaussad.errors import GaussADError
from gaussad.evaluation import CategoryPredictions, CategoryResult, read_mask
from gaussad.heatmaps import colorize, overlay
from gaussad.layout import LabeledImage, list_test_images
from gaussad.metrics import image_auroc, pixel_metrics
from gaussad.report import SECTIONS, CategoryReport, ReportData, gallery_order, render_report, write_report
from gaussad.results import RESULTS_FILE, load_results, save_results

# Test images of the synthetic category in listing order: good/000..003, then scratch/000..003.
# At threshold 0.5: scratch/001 is missed (0.05); good/001 (0.9) and good/002 (0.6) are false alarms.
SCORES = np.array([0.2, 0.9, 0.6, 0.1, 0.7, 0.05, 0.95, 0.6])
EXPECTED_ORDER = [
    ("scratch", "001.png"),  # the miss
    ("good", "001.png"),  # false alarms, highest first
    ("good", "002.png"),
    ("scratch", "003.png"),  # then by distance to the threshold: 0.1, 0.2, 0.3, 0.4, 0.45
    ("scratch", "000.png"),
    ("good", "000.png"),
    ("good", "003.png"),
    ("scratch", "002.png"),
]


def synthetic_category(
    category: Path,
    name: str = "widget",
    scores: np.ndarray = SCORES,
    keep: slice = slice(None),
    map_side: int | None = None,
    image_threshold: float = 0.5,
    pixel_threshold: float = 0.5,
    pixel_normal_level: float = 0.15,
) -> CategoryReport:
    """A category's report from the synthetic data set, with made-up scores and maps (1 on the defect;
    elsewhere uniform in [0, 0.3), so the typical normal value is 0.15)."""
    images = list_test_images(category)[keep]
    scores = scores[keep]
    rng = np.random.default_rng(1)
    side = map_side or 96
    masks = [read_mask(image, (side, side)) for image in images]
    maps = [(rng.random((side, side)) * 0.3 + mask).astype(np.float32) for mask in masks]
    labels = np.array([image.label for image in images])
    both = len(set(labels)) == 2
    pixel_auroc, aupro = pixel_metrics(masks, maps) if both else (float("nan"), float("nan"))
    result = CategoryResult(
        category=name,
        image_auroc=image_auroc(labels, scores) if both else float("nan"),
        pixel_auroc=pixel_auroc,
        aupro=aupro,
        n_train=16,
        n_test=len(images),
        fit_seconds=1.5,
        test_seconds=0.5,
        test_images_per_second=len(images) / 0.5,
    )
    source = "99th percentile of 5-fold held-out normal scores"
    return CategoryReport(
        result=result,
        predictions=CategoryPredictions(images, scores, maps, masks),
        image_threshold=Threshold(image_threshold, 0.1, "label-free", source),
        pixel_threshold=Threshold(pixel_threshold, pixel_normal_level, "label-free", f"map maxima: {source}"),
    )


def synthetic_report(category: Path, *categories: CategoryReport) -> ReportData:
    return ReportData(
        title="Synthetic evaluation",
        config={"backbone": "efficientnet_lite0", "levels": [3, 4, 5], "variance": 0.05, "device": None},
        model_info={"components per level": {"3": 12, "4": 20}, "n_train": 16, "weights sha256": "ab12"},
        categories=list(categories) or [synthetic_category(category)],
    )


class _Parts(HTMLParser):
    """What the tests look at in the report: element ids, image sources, gallery tiles in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[str] = []
        self.tiles: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids.append(attributes["id"] or "")
        if tag == "img":
            self.images.append(attributes.get("src") or "")
        if tag == "figure":
            self.tiles.append(
                (attributes["data-defect"], attributes["data-name"], attributes["data-outcome"])
            )


def parse(text: str) -> _Parts:
    parts = _Parts()
    parts.feed(text)
    return parts


def test_report_has_every_section_in_order_and_nothing_external(category) -> None:
    text = render_report(synthetic_report(category))
    parts = parse(text)
    section_ids = [key for key, _ in SECTIONS]
    assert section_ids == ["config", "metrics", "curves", "histogram", "gallery", "timing"]
    assert [i for i in parts.ids if i in section_ids] == section_ids
    assert "http://" not in text and "https://" not in text
    # 2 plots (curves, histogram), a colour bar and 8 tiles; every one embedded.
    assert len(parts.images) == 11
    assert all(re.fullmatch(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+", src) for src in parts.images)
    assert text.isascii()
    assert "efficientnet_lite0" in text and "[3, 4, 5]" in text and "99th percentile" in text


def test_gallery_puts_misses_then_false_alarms_first(category) -> None:
    parts = parse(render_report(synthetic_report(category)))
    assert [(defect, name) for defect, name, _ in parts.tiles] == EXPECTED_ORDER
    assert [outcome for *_, outcome in parts.tiles[:3]] == ["miss", "false alarm", "false alarm"]
    assert {outcome for *_, outcome in parts.tiles[3:]} == {"detected", "normal"}
    limited = parse(render_report(synthetic_report(category), gallery_size=2))
    assert [(defect, name) for defect, name, _ in limited.tiles] == EXPECTED_ORDER[:2]


def test_gallery_order() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert gallery_order(labels, SCORES, 0.5).tolist() == [5, 1, 2, 7, 4, 0, 3, 6]
    assert gallery_order([0, 1], [0.5, 0.4], 0.5).tolist() == [1, 0]  # at the threshold: a false alarm


def test_metrics_table_rates_and_mean_row(category) -> None:
    text = render_report(synthetic_report(category))
    assert re.findall(r'<td class="num false-alarms">([^<]*)</td>', text) == ["50.0% (2/4)"]
    assert re.findall(r'<td class="num misses">([^<]*)</td>', text) == ["25.0% (1/4)"]
    assert "<b>mean</b>" not in text

    strict = synthetic_category(category, name="strict", image_threshold=0.92)  # 0 false alarms, 3 misses
    text = render_report(synthetic_report(category, synthetic_category(category), strict))
    assert re.findall(r'<td class="num false-alarms">([^<]*)</td>', text) == [
        "50.0% (2/4)",
        "0.0% (0/4)",
        "25.0%",
    ]
    assert re.findall(r'<td class="num misses">([^<]*)</td>', text) == ["25.0% (1/4)", "75.0% (3/4)", "50.0%"]


def test_text_is_escaped(category) -> None:
    report = synthetic_report(category, synthetic_category(category, name="<b>x</b>"))
    report.config["<script>alert(1)</script>"] = "a & b"
    text = render_report(report)
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text
    assert "<script>" not in text and "&lt;script&gt;" in text and "a &amp; b" in text


@pytest.mark.parametrize(
    ("case", "options", "false_alarms", "misses"),
    [
        ("only good images", {"keep": slice(0, 4)}, "50.0% (2/4)", "&ndash;"),
        ("only defective images", {"keep": slice(4, 8)}, "&ndash;", "25.0% (1/4)"),
        ("nothing flagged", {"image_threshold": 2.0, "pixel_threshold": 5.0}, "0.0% (0/4)", "100.0% (4/4)"),
        (
            "everything flagged",
            {"image_threshold": 0.0, "pixel_threshold": -1.0, "pixel_normal_level": -2.0},
            "100.0% (4/4)",
            "0.0% (0/4)",
        ),
        ("maps smaller than images", {"map_side": 40}, "50.0% (2/4)", "25.0% (1/4)"),
    ],
)
def test_edge_cases_render(category, case, options, false_alarms, misses) -> None:
    text = render_report(synthetic_report(category, synthetic_category(category, **options)))
    assert re.findall(r'<td class="num false-alarms">([^<]*)</td>', text) == [false_alarms], case
    assert re.findall(r'<td class="num misses">([^<]*)</td>', text) == [misses], case
    assert all(src.startswith("data:image/") for src in parse(text).images)


def test_write_report_is_atomic(category, tmp_path) -> None:
    report = synthetic_report(category)
    path = write_report(tmp_path / "report.html", report, gallery_size=3)
    assert path == tmp_path / "report.html"
    text = path.read_text()
    assert text == render_report(report, gallery_size=3) and text.endswith("</html>\n")
    with pytest.raises(GaussADError, match="gallery size"):
        write_report(path, report, gallery_size=-1)
    assert path.read_text() == text  # a failed write leaves the previous report whole
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # and no temporary file behind


def test_report_rejects_mismatched_predictions(category) -> None:
    broken = synthetic_category(category)
    broken.predictions.maps.pop()
    with pytest.raises(GaussADError, match="must match"):
        render_report(synthetic_report(category, broken))


def test_gallery_colours_follow_the_calibrated_scale(category, monkeypatch) -> None:
    """The gallery draws on `map_scale`, as predict does: the typical normal value dark, the pixel
    threshold mid-scale, whatever the range of the maps."""
    scales = []

    def recording_overlay(image, anomaly_map, low, high, **options):
        scales.append((low, high))
        return overlay(image, anomaly_map, low, high, **options)

    monkeypatch.setattr(report_module, "overlay", recording_overlay)
    widget = synthetic_category(category, pixel_threshold=0.6, pixel_normal_level=0.2)
    render_report(synthetic_report(category, widget))
    assert scales == [map_scale(widget.pixel_threshold)] * 8 == [(0.2, 1.0)] * 8


def _overlay_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.zeros((32, 40, 3), dtype=np.uint8)
    image[:] = (100, 50, 200)
    anomaly_map = np.tile(np.linspace(-1.0, 3.0, 40, dtype=np.float32), (32, 1))
    mask = np.zeros((32, 40), dtype=bool)
    mask[10:20, 12:25] = True
    return image, anomaly_map, mask


def test_overlay_outlines_the_mask() -> None:
    image, anomaly_map, mask = _overlay_inputs()
    result = overlay(image, anomaly_map, 0.0, 2.0, mask=mask, outline_color=(0, 255, 0))
    assert result.shape == image.shape and result.dtype == np.uint8
    boundary = np.zeros_like(mask)
    boundary[[10, 19], 12:25] = boundary[10:20, [12, 24]] = True
    assert (result[boundary] == (0, 255, 0)).all()
    assert not (result[~boundary] == (0, 255, 0)).all(axis=-1).any()  # inside and outside: blended only
    np.testing.assert_array_equal(result[~boundary], overlay(image, anomaly_map, 0.0, 2.0)[~boundary])

    edge = np.zeros((32, 40), dtype=bool)
    edge[:5, :5] = True  # touching the image border: the border closes the outline
    assert (
        overlay(image, anomaly_map, 0.0, 2.0, mask=edge, outline_color=(1, 2, 3))[0, 2] == (1, 2, 3)
    ).all()


def test_overlay_blends_with_the_colorize_scale() -> None:
    image, anomaly_map, _ = _overlay_inputs()
    result = overlay(image, anomaly_map, 0.0, 2.0, alpha=0.25).astype(np.float64)
    heat = colorize(anomaly_map, 0.0, 2.0).astype(np.float64)
    np.testing.assert_array_equal(result, np.rint(0.75 * image + 0.25 * heat))
    # Below `low`: the dark end of the colormap (inferno's near-black) blended in.
    assert anomaly_map[5, 0] < 0.0
    dark = colorize(np.array([[0.0]]), 0.0, 2.0)[0, 0].astype(np.float64)
    assert dark.max() < 10
    np.testing.assert_array_equal(result[5, 0], np.rint(0.75 * image[5, 0] + 0.25 * dark))
    np.testing.assert_array_equal(overlay(image, anomaly_map, 0.0, 2.0, alpha=0.0), image)


def test_overlay_rejects_mismatched_inputs() -> None:
    image, anomaly_map, mask = _overlay_inputs()
    with pytest.raises(GaussADError, match="anomaly map"):
        overlay(image, anomaly_map[:-1], 0.0, 1.0)
    with pytest.raises(GaussADError, match="mask"):
        overlay(image, anomaly_map, 0.0, 1.0, mask=mask[:, :-1])
    with pytest.raises(GaussADError, match="uint8"):
        overlay(image.astype(np.float32), anomaly_map, 0.0, 1.0)
    with pytest.raises(GaussADError, match="alpha"):
        overlay(image, anomaly_map, 0.0, 1.0, alpha=1.5)


def test_saved_results_keep_the_thresholds_whole(category, tmp_path) -> None:
    widget = synthetic_category(category)
    save_results(tmp_path / "results", {"backbone": "x"}, {"levels": [3]}, [widget])
    config, model_info, (loaded,) = load_results(tmp_path / "results")
    assert (config, model_info) == ({"backbone": "x"}, {"levels": [3]})
    assert (
        loaded.image_threshold == widget.image_threshold and loaded.pixel_threshold == widget.pixel_threshold
    )
    assert loaded.result == widget.result and [m.shape for m in loaded.predictions.maps] == [(256, 256)] * 8
    assert render_report(synthetic_report(category, loaded)).count("<figure") == 8


def test_results_of_format_1_take_the_normal_level_from_the_good_maps(category, tmp_path) -> None:
    save_results(tmp_path / "results", {}, {}, [synthetic_category(category, pixel_threshold=0.7)])
    path = tmp_path / "results" / RESULTS_FILE
    document = json.loads(path.read_text())
    entry = document["categories"][0]
    document["format_version"] = 1
    entry.update(image_threshold=0.5, pixel_threshold=0.7, threshold_source="label-free: 99th percentile")
    path.write_text(json.dumps(document))
    _, _, (loaded,) = load_results(tmp_path / "results")
    good_maps = [
        m
        for m, image in zip(loaded.predictions.maps, loaded.predictions.images, strict=True)
        if image.label == 0
    ]
    assert loaded.pixel_threshold == Threshold(
        0.7, float(np.median(np.concatenate([m.ravel() for m in good_maps]))), "label-free", "99th percentile"
    )
    assert 0.1 < loaded.pixel_threshold.normal_level < 0.2  # the good maps are uniform in [0, 0.3)
    assert loaded.image_threshold.value == 0.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda document: [document], r"results\.json: not gaussad results \(a JSON list, not an object\)"),
        (lambda document: "text", r"results\.json: not gaussad results \(a JSON str"),
        (lambda document: {**document, "categories": {}}, r"results\.json: categories must be a JSON array"),
        (
            lambda document: _change_entry(document, lambda entry: entry["result"].update(colour="red")),
            r"results\.json: categories\[0\]\.result: unknown keys colour",
        ),
        (
            lambda document: _change_entry(document, lambda entry: entry["result"].pop("aupro")),
            r"results\.json: categories\[0\]\.result: missing aupro",
        ),
        (
            lambda document: _change_entry(
                document, lambda entry: entry["pixel_threshold"].update(value="high")
            ),
            r"results\.json: categories\[0\]\.pixel_threshold\.value: 'high' is not float",
        ),
        (
            lambda document: _change_entry(document, lambda entry: entry.pop("predictions")),
            r"results\.json: categories\[0\]: missing predictions",
        ),
    ],
    ids=["a list", "a string", "categories not a list", "unknown key", "missing key", "wrong kind", "no npz"],
)
def test_damaged_results_json_is_one_clear_error_naming_the_file(category, tmp_path, change, message) -> None:
    save_results(tmp_path / "results", {}, {}, [synthetic_category(category)])
    path = tmp_path / "results" / RESULTS_FILE
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(GaussADError, match=message):
        load_results(tmp_path / "results")
    assert main(["report", str(tmp_path / "results"), "-o", str(tmp_path / "report.html")]) == 2
    assert not (tmp_path / "report.html").exists()


def _change_entry(document: dict, change) -> dict:
    change(document["categories"][0])
    return document


def test_damaged_results_are_one_line_from_the_command_line(category, tmp_path) -> None:
    save_results(tmp_path / "results", {}, {}, [synthetic_category(category)])
    (tmp_path / "results" / RESULTS_FILE).write_text("[1, 2]")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gaussad.cli",
            "report",
            str(tmp_path / "results"),
            "-o",
            str(tmp_path / "r.html"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = f"{tmp_path / 'results' / RESULTS_FILE}: not gaussad results (a JSON list, not an object)"
    assert result.stderr.strip().splitlines() == [f"gaussad: error: {expected}"]


def without_masks(category: CategoryReport, name: str = "plain") -> CategoryReport:
    """A category as evaluated without ground truth: no mask files, no masks, pixel metrics None."""
    predictions = category.predictions
    return CategoryReport(
        replace(category.result, category=name, pixel_auroc=None, aupro=None),
        CategoryPredictions(
            [LabeledImage(image.path, image.defect, None) for image in predictions.images],
            predictions.scores,
            predictions.maps,
            [],
        ),
        category.image_threshold,
        category.pixel_threshold,
    )


def _metric_cells(text: str, name: str) -> list[str]:
    """The image AUROC, pixel AUROC and AUPRO cells of a category's row (or the mean's) in the report."""
    row = re.search(rf'<td class="name">{name}</td>((?:<td class="num">[^<]*</td>){{3}})', text)
    assert row, name
    return re.findall(r'<td class="num">([^<]*)</td>', row.group(1))


def test_a_category_without_masks_shows_n_a_and_no_pixel_plots(category, monkeypatch) -> None:
    rings = []
    monkeypatch.setattr(report_module, "_ring", lambda rgb, truth: rings.append(truth.shape))
    widget = synthetic_category(category)
    text = render_report(synthetic_report(category, widget, without_masks(widget)))
    expected = [
        f"{widget.result.image_auroc:.3f}",
        f"{widget.result.pixel_auroc:.3f}",
        f"{widget.result.aupro:.3f}",
    ]
    assert _metric_cells(text, "widget") == expected
    assert _metric_cells(text, "plain") == [expected[0], "n/a", "n/a"]
    assert _metric_cells(text, "<b>mean</b>") == expected  # pixel metrics: the mean of widget's alone
    assert 'alt="ROC and PRO curves of widget"' in text and 'alt="ROC curve of plain"' in text
    assert "PRO curves of plain" not in text and "No ground-truth masks to outline." in text
    assert len(rings) == 8  # the ground truth ringed on widget's tiles only
    parts = parse(text)
    assert len(parts.images) == 22 and len(parts.tiles) == 16  # each: 2 plots, a colour bar, 8 tiles
    only_plain = render_report(synthetic_report(category, without_masks(widget), without_masks(widget, "x")))
    assert _metric_cells(only_plain, "<b>mean</b>") == [expected[0], "n/a", "n/a"]


def test_pixel_metrics_without_masks_are_refused(category) -> None:
    plain = without_masks(synthetic_category(category))
    plain.result.aupro = 0.5
    with pytest.raises(GaussADError, match="category plain: pixel metrics and ground-truth masks must come"):
        render_report(synthetic_report(category, plain))


def test_saved_results_keep_missing_pixel_metrics_as_null(category, tmp_path) -> None:
    plain = without_masks(synthetic_category(category))
    save_results(tmp_path / "results", {}, {}, [synthetic_category(category), plain])
    document = json.loads((tmp_path / "results" / RESULTS_FILE).read_text())
    widget_result, plain_result = (entry["result"] for entry in document["categories"])
    assert plain_result["pixel_auroc"] is None and plain_result["aupro"] is None
    assert widget_result["aupro"] is not None
    with np.load(tmp_path / "results" / "plain.npz") as stored:
        assert "masks" not in stored.files and set(stored["mask_paths"]) == {""}
    _, _, (widget, loaded) = load_results(tmp_path / "results")
    assert loaded.result == plain.result and loaded.predictions.masks == [] and not loaded.has_masks
    assert [image.mask_path for image in loaded.predictions.images] == [None] * 8
    assert len(widget.predictions.masks) == 8 and widget.has_masks
    text = render_report(synthetic_report(category, widget, loaded))
    assert _metric_cells(text, "plain")[1:] == ["n/a", "n/a"]
