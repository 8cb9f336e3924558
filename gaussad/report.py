"""One self-contained HTML report of an evaluation: metrics, curves, score histograms, a gallery of the
worst errors with heatmap overlays, and timings.

Everything is embedded (plots and pictures as data URIs, inline CSS, a Content-Security-Policy that
forbids anything else), so the file can be archived, mailed or opened offline and always shows the same.
Plots use `matplotlib.figure.Figure` directly: no pyplot, no global backend switch. A category evaluated
without ground-truth masks shows n/a for its pixel metrics, and no PRO curve nor ground-truth outlines.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_curve

from gaussad import __version__
from gaussad.calibration import Threshold
from gaussad.decisions import ImageErrors, defect_mask, image_errors, is_anomalous, map_scale
from gaussad.errors import GaussADError
from gaussad.evaluation import CategoryEvaluation, CategoryPredictions, CategoryResult, describe_good_shift
from gaussad.fileio import write_text_atomic
from gaussad.heatmaps import overlay
from gaussad.images import read_image
from gaussad.layout import LabeledImage
from gaussad.metrics import AUPRO_FPR_LIMIT, pro_curve

SECTIONS = (
    ("config", "Configuration"),
    ("metrics", "Metrics"),
    ("curves", "Curves"),
    ("histogram", "Score histograms"),
    ("gallery", "Gallery"),
    ("timing", "Timing"),
)
TILE_SIDE = 256  # longest side of a gallery picture, in pixels
PREDICTED_COLOR = (0, 255, 0)
TRUTH_COLOR = (0, 190, 255)
_PLOT_POINTS = 2000  # points kept of a curve for plotting; PRO curves have millions
_GOOD_COLOR, _DEFECT_COLOR = "#3b7dd8", "#e8702a"
_METRICS = ("image_auroc", "pixel_auroc", "aupro")  # averaged in the mean row
_GALLERY_INTRO = (
    '<p class="note">Per category, worst errors first: misses (defective images scored below the image '
    "threshold, lowest first), then false alarms (good images at or above it, highest first), then the "
    "rest, closest calls first. Heatmap colours are fixed per category, as in <code>gaussad predict</code> "
    "(scale below each heading): the typical map value of good images is dark and the pixel threshold "
    'mid-scale. <span class="predicted">Green</span>: outline of the '
    'predicted defect (map &ge; pixel threshold); <span class="truth">blue</span>: ground truth, ringed '
    "just outside, where the category has masks.</p>"
)
_NO_MASKS = '<p class="note">No ground-truth masks: pixel metrics and the PRO curve are not available.</p>'


@dataclass
class CategoryReport:
    """One category's evaluation and the thresholds that turn its scores and maps into decisions."""

    result: CategoryResult
    predictions: CategoryPredictions  # with maps and masks (at STORED_SIDE as evaluations keep them)
    image_threshold: Threshold  # on raw scores: score >= value means anomalous
    pixel_threshold: Threshold  # on raw map values: map >= value is the predicted defect mask

    @property
    def has_masks(self) -> bool:
        """Whether the category has ground truth: pixel metrics, a PRO curve, outlines of the truth."""
        return bool(self.predictions.masks)

    @property
    def threshold_source(self) -> str:
        """How the thresholds were chosen, one line."""
        return f"{self.image_threshold.method}: {self.image_threshold.source}"


def category_report(evaluation: CategoryEvaluation) -> CategoryReport:
    """A category's evaluation as the report takes it; it needs the model's thresholds."""
    if evaluation.image_threshold is None or evaluation.pixel_threshold is None:
        raise GaussADError(
            f"category {evaluation.result.category}: reports and saved results need thresholds: "
            "fit with --folds 2 or more"
        )
    return CategoryReport(
        evaluation.result, evaluation.predictions, evaluation.image_threshold, evaluation.pixel_threshold
    )


@dataclass
class ReportData:
    """Everything a report shows: the run's settings and each category's evaluation."""

    title: str
    config: dict  # model and run configuration
    model_info: dict  # e.g. levels, components per level, n_train, weights checksum
    categories: list[CategoryReport]


def gallery_order(labels: ArrayLike, scores: ArrayLike, threshold: float) -> np.ndarray:
    """Image indices, worst errors first, for the gallery.

    Misses (defective, score below the threshold) from the lowest score, then false alarms (good, score
    at or above it) from the highest, then the correct decisions, the closest calls first.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    flagged = is_anomalous(scores, threshold)
    misses = np.flatnonzero((labels == 1) & ~flagged)
    false_alarms = np.flatnonzero((labels == 0) & flagged)
    correct = np.flatnonzero((labels == 1) == flagged)
    return np.concatenate(
        [
            misses[np.argsort(scores[misses], kind="stable")],
            false_alarms[np.argsort(-scores[false_alarms], kind="stable")],
            correct[np.argsort(np.abs(scores[correct] - threshold), kind="stable")],
        ]
    ).astype(np.intp)


def render_report(report: ReportData, gallery_size: int = 24) -> str:
    """The report as HTML text (ASCII, non-ASCII as character references): nothing outside it is loaded."""
    if gallery_size < 0:
        raise GaussADError(f"gallery size must be 0 or more, got {gallery_size}")
    for category in report.categories:
        _check(category)
    names = [category.result.category for category in report.categories]
    sections = {
        "config": _config_section(report),
        "metrics": _metrics_section(report.categories),
        "curves": "".join(_curves(category) for category in report.categories),
        "histogram": "".join(_histogram(category) for category in report.categories),
        "gallery": _GALLERY_INTRO
        + "".join(_gallery(category, gallery_size) for category in report.categories),
        "timing": _timing_section(report.categories),
    }
    body = "".join(
        f'<section id="{key}"><h2>{title}</h2>{sections[key]}</section>\n' for key, title in SECTIONS
    )
    nav = " ".join(f'<a href="#{key}">{title}</a>' for key, title in SECTIONS)
    text = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(report.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{_text(report.title)}</h1>"
        f'<p class="note">gaussad {_text(__version__)} &middot; {len(names)} '
        f"categor{'y' if len(names) == 1 else 'ies'}: {_text(', '.join(names))}</p>"
        f"<nav>{nav}</nav></header>\n<main>\n{body}</main>\n</body>\n</html>\n"
    )
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_report(path: str | os.PathLike, report: ReportData, gallery_size: int = 24) -> Path:
    """Render the report and write it atomically: the file at `path` is never half written."""
    write_text_atomic(path, render_report(report, gallery_size))
    return Path(path)


def _check(category: CategoryReport) -> None:
    """Fail early, naming the category, if its predictions do not line up."""
    predictions, name = category.predictions, category.result.category
    counts = {len(predictions.images), len(predictions.scores), len(predictions.maps)}
    if len(counts | ({len(predictions.masks)} if category.has_masks else set())) != 1:
        raise GaussADError(
            f"category {name}: {len(predictions.images)} images, "
            f"{len(predictions.scores)} scores, {len(predictions.maps)} maps and "
            f"{len(predictions.masks)} masks; they must match"
        )
    pixel_metrics = {category.result.pixel_auroc is not None, category.result.aupro is not None}
    if pixel_metrics != {category.has_masks}:
        raise GaussADError(f"category {name}: pixel metrics and ground-truth masks must come together")
    masks = predictions.masks if category.has_masks else [None] * len(predictions.maps)
    for image, anomaly_map, mask in zip(predictions.images, predictions.maps, masks, strict=True):
        if anomaly_map.ndim != 2 or (mask is not None and anomaly_map.shape != mask.shape):
            shapes = f"anomaly map {anomaly_map.shape}" + ("" if mask is None else f" and mask {mask.shape}")
            raise GaussADError(f"{image.path}: {shapes} must be 2-D and match")


def _labels(category: CategoryReport) -> np.ndarray:
    return np.array([image.label for image in category.predictions.images], dtype=np.int64)


def _errors(category: CategoryReport) -> ImageErrors:
    return image_errors(_labels(category), category.predictions.scores, category.image_threshold.value)


# --- text and tables ---


def _text(value: object) -> str:
    return html.escape(str(value))


def _fixed(value: float | None, digits: int = 3) -> str:
    """A metric: n/a where not available (None), a dash where undefined (not finite)."""
    if value is None:
        return "n/a"
    return "&ndash;" if not np.isfinite(value) else f"{value:.{digits}f}"


def _general(value: float) -> str:
    return "&ndash;" if not np.isfinite(value) else f"{value:.4g}"


def _rate(errors: int, total: int) -> str:
    return "&ndash;" if total == 0 else f"{100.0 * errors / total:.1f}% ({errors}/{total})"


def _value(value: object) -> str:
    """A configuration value as escaped text: numbers compact, containers as JSON."""
    if isinstance(value, float):
        return _text(f"{value:.6g}")
    if isinstance(value, (str, int, bool)) or value is None:
        return _text(value)
    return _text(json.dumps(value, default=str))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()) -> str:
    """An HTML table; cells are HTML already. classes name each column (e.g. 'num' right-aligns)."""
    classes = list(classes) + [""] * (len(header) - len(classes))
    head = "".join(f'<th class="{c}">{h}</th>' for h, c in zip(header, classes, strict=True))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{c}">{cell}</td>' for cell, c in zip(row, classes, strict=True))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _key_values(title: str, values: dict) -> str:
    rows = [(_text(key), _value(value)) for key, value in values.items()]
    table = _table(("Key", "Value"), rows) if rows else '<p class="note">none given</p>'
    return f"<div><h3>{_text(title)}</h3>{table}</div>"


def _config_section(report: ReportData) -> str:
    return (
        '<div class="columns">'
        + _key_values("Configuration", report.config)
        + _key_values("Model", report.model_info)
        + "</div>"
    )


def _metrics_section(categories: Sequence[CategoryReport]) -> str:
    header = (
        "Category",
        "Image AUROC",
        "Pixel AUROC",
        "AUPRO",
        "Train images",
        "Test images",
        "False alarms (good &ge; threshold)",
        "Misses (defective &lt; threshold)",
    )
    classes = ("name", "num", "num", "num", "num", "num", "num false-alarms", "num misses")
    rows = []
    for category in categories:
        result, errors = category.result, _errors(category)
        rows.append(
            (
                _text(result.category),
                _fixed(result.image_auroc),
                _fixed(result.pixel_auroc),
                _fixed(result.aupro),
                str(result.n_train),
                str(result.n_test),
                _rate(errors.false_alarms, errors.n_good),
                _rate(errors.misses, errors.n_defective),
            )
        )
    if len(categories) > 1:
        rows.append(
            (
                "<b>mean</b>",
                *(_fixed(_mean([getattr(c.result, key) for c in categories])) for key in _METRICS),
                "",
                "",
                _percent(_mean([_errors(c).false_alarm_rate for c in categories])),
                _percent(_mean([_errors(c).miss_rate for c in categories])),
            )
        )
    thresholds = _table(
        ("Category", "Image threshold", "Pixel threshold", "Chosen by"),
        [
            (
                _text(c.result.category),
                _general(c.image_threshold.value),
                _general(c.pixel_threshold.value),
                _text(c.threshold_source),
            )
            for c in categories
        ],
        ("name", "num", "num", ""),
    )
    no_masks = (
        " Pixel metrics n/a: no ground-truth masks; the mean row averages the categories that have them."
        if not all(c.has_masks for c in categories)
        else ""
    )
    shifted = "".join(
        f'<p class="note">{_text(c.result.category)}: {_text(said)}.</p>'
        for c in categories
        if (said := describe_good_shift(c.result))
    )
    return (
        _table(header, rows, classes)
        + '<p class="note">An image is called anomalous when its score is at or above the image '
        f"threshold; the mean row averages the per-category rates.{no_masks}</p><h3>Thresholds</h3>"
        + thresholds
        + shifted
    )


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the finite values; None (n/a) where every value is None, NaN where none is finite."""
    present = [value for value in values if value is not None]
    if not present:
        return None
    finite = [value for value in present if np.isfinite(value)]
    return float(np.mean(finite)) if finite else float("nan")


def _percent(rate: float) -> str:
    return "&ndash;" if not np.isfinite(rate) else f"{100.0 * rate:.1f}%"


def _timing_section(categories: Sequence[CategoryReport]) -> str:
    rows = [
        (
            _text(c.result.category),
            f"{c.result.fit_seconds:.2f}",
            f"{c.result.test_seconds:.2f}",
            f"{c.result.test_images_per_second:.1f}",
        )
        for c in categories
    ]
    if len(categories) > 1:
        fit = sum(c.result.fit_seconds for c in categories)
        test = sum(c.result.test_seconds for c in categories)
        tested = sum(c.result.n_test for c in categories)
        rows.append(("<b>total</b>", f"{fit:.2f}", f"{test:.2f}", f"{tested / test:.1f}" if test else ""))
    return _table(
        ("Category", "Fit (s)", "Test (s)", "Test images per second"), rows, ("name", "num", "num", "num")
    )


# --- plots ---


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure: Figure) -> str:
    """The figure as a PNG data URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(src: str, alt: str, css: str = "plot") -> str:
    return f'<img class="{css}" src="{src}" alt="{_text(alt)}">'


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most _PLOT_POINTS points of a curve, evenly along it, both ends kept: what a plot can show."""
    if len(x) <= _PLOT_POINTS:
        return x, y
    index = np.unique(np.linspace(0, len(x) - 1, _PLOT_POINTS).round().astype(np.intp))
    return x[index], y[index]


def _message(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=axes.transAxes)


def _curves(category: CategoryReport) -> str:
    """The image ROC curve with the operating point, and the PRO curve with the AUPRO limit where the
    category has ground-truth masks."""
    figure = _figure(9.0 if category.has_masks else 4.5, 3.6)
    axes = figure.subplots(1, 2 if category.has_masks else 1, squeeze=False)[0]
    for each in axes:
        each.set(xlim=(0, 1), ylim=(0, 1.02), aspect="equal")
        each.grid(alpha=0.3)
    _roc_plot(axes[0], category)
    name = category.result.category
    if not category.has_masks:
        return f"<h3>{_text(name)}</h3>{_NO_MASKS}" + _img(_png(figure), f"ROC curve of {name}")
    _pro_plot(axes[1], category)
    return f"<h3>{_text(name)}</h3>" + _img(_png(figure), f"ROC and PRO curves of {name}")


def _roc_plot(axes: Axes, category: CategoryReport) -> None:
    """The image ROC curve with the operating point at the image threshold."""
    labels, scores, errors = _labels(category), category.predictions.scores, _errors(category)
    axes.set(title="Image ROC", xlabel="false positive rate", ylabel="true positive rate")
    if errors.n_good and errors.n_defective:
        fpr, tpr, _ = roc_curve(labels, scores)
        axes.plot([0, 1], [0, 1], ":", color="grey")
        axes.plot(fpr, tpr, color=_GOOD_COLOR, label=f"AUROC {category.result.image_auroc:.3f}")
        axes.plot(
            errors.false_alarm_rate, 1.0 - errors.miss_rate, "o", color="black", label="at the threshold"
        )
        axes.legend(loc="lower right")
    else:
        _message(axes, "needs both good and\ndefective test images")


def _pro_plot(axes: Axes, category: CategoryReport) -> None:
    """The PRO curve of the stored maps and masks, with the AUPRO limit."""
    axes.set(title="Per-region overlap", xlabel="false positive rate (pixels)", ylabel="PRO")
    try:
        fpr, pro = _thin(*pro_curve(category.predictions.masks, category.predictions.maps))
    except GaussADError as error:
        _message(axes, f"no PRO curve:\n{error}")
    else:
        axes.plot(fpr, pro, color=_DEFECT_COLOR, label=f"AUPRO {category.result.aupro:.3f}")
        axes.axvline(AUPRO_FPR_LIMIT, color="black", linestyle="--", label=f"FPR limit {AUPRO_FPR_LIMIT}")
        axes.axvspan(0, AUPRO_FPR_LIMIT, color="grey", alpha=0.12)
        axes.legend(loc="lower right")


def _histogram(category: CategoryReport) -> str:
    """Image scores of good and defective images on shared bins, with the image threshold."""
    labels, threshold = _labels(category), category.image_threshold.value
    scores = np.asarray(category.predictions.scores, dtype=np.float64)
    figure = _figure(9.0, 3.0)
    axes = figure.subplots()
    axes.set(xlabel="image score", ylabel="images")
    finite = np.isfinite(scores)
    if finite.any():
        shown = np.append(scores[finite], threshold) if np.isfinite(threshold) else scores[finite]
        edges = np.histogram_bin_edges(shown, bins=30)
        for label, name, color in ((0, "good", _GOOD_COLOR), (1, "defective", _DEFECT_COLOR)):
            chosen = scores[finite & (labels == label)]
            axes.hist(chosen, bins=edges, color=color, alpha=0.6, label=f"{name} ({len(chosen)})")
        if np.isfinite(threshold):
            axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
        axes.legend()
    else:
        _message(axes, "no scores")
    name = category.result.category
    return f"<h3>{_text(name)}</h3>" + _img(_png(figure), f"histogram of image scores of {name}")


def _color_bar(low: float, high: float, threshold: float) -> str:
    """A small legend of a category's heatmap colours, the pixel threshold marked."""
    figure = _figure(5.0, 0.85)
    axes = figure.subplots()
    axes.imshow(np.linspace(0.0, 1.0, 256)[None], aspect="auto", cmap="inferno", extent=(low, high, 0, 1))
    axes.set_yticks([])
    axes.set_xlabel("anomaly map value", fontsize=8)
    axes.tick_params(labelsize=8)
    if low <= threshold <= high:
        axes.axvline(threshold, color=np.array(PREDICTED_COLOR) / 255, linewidth=2)
    return _img(_png(figure), "heatmap colour scale", "legend")


# --- gallery ---


def _gallery(category: CategoryReport, gallery_size: int) -> str:
    predictions, errors = category.predictions, _errors(category)
    low, high = map_scale(category.pixel_threshold)
    order = gallery_order(_labels(category), predictions.scores, category.image_threshold.value)
    order = order[:gallery_size]
    tiles = "".join(
        _tile(
            predictions.images[index],
            float(predictions.scores[index]),
            predictions.maps[index],
            predictions.masks[index] if category.has_masks else None,
            category,
            (low, high),
        )
        for index in order
    )
    name = category.result.category
    truth = "" if category.has_masks else " No ground-truth masks to outline."
    return (
        f'<h3>{_text(name)}</h3><div class="scale">{_color_bar(low, high, category.pixel_threshold.value)}'
        f'</div><p class="note">{len(order)} of {len(predictions.images)} test images shown; '
        f"misses: {errors.misses}, false alarms: {errors.false_alarms}.{truth}</p>"
        f'<div class="gallery">{tiles}</div>'
    )


def _tile(
    image: LabeledImage,
    score: float,
    anomaly_map: np.ndarray,
    truth: np.ndarray | None,
    category: CategoryReport,
    scale: tuple[float, float],
) -> str:
    """One gallery picture, downscaled, with its heatmap and outlines (the ground truth's where there is
    one), and its caption."""
    picture = read_image(image.path)
    shrink = min(1.0, TILE_SIDE / max(picture.size))
    size = (max(1, round(picture.width * shrink)), max(1, round(picture.height * shrink)))
    picture = picture.resize(size, Image.Resampling.LANCZOS)
    # The map may have another size than the image (a fixed evaluation size): it covers the whole image.
    small_map = np.asarray(Image.fromarray(anomaly_map.astype(np.float32)).resize(size, Image.Resampling.BOX))
    anomalous = bool(is_anomalous(score, category.image_threshold.value))
    predicted = _shrink_mask(defect_mask(anomaly_map, category.pixel_threshold, anomalous), size)
    rgb = overlay(np.asarray(picture), small_map, *scale, mask=predicted, outline_color=PREDICTED_COLOR)
    if truth is not None:
        _ring(rgb, _shrink_mask(truth, size))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=88, subsampling=0)
    source = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    flagged = bool(is_anomalous(score, category.image_threshold.value))
    outcome = {
        (True, True): "detected",
        (True, False): "miss",
        (False, True): "false alarm",
        (False, False): "normal",
    }[(image.label == 1, flagged)]
    decision = "anomalous" if flagged else "normal"
    wrong = f' <span class="error">{outcome}</span>' if outcome in ("miss", "false alarm") else ""
    return (
        f'<figure class="tile {outcome.replace(" ", "-")}" data-name="{_text(image.path.name)}" '
        f'data-defect="{_text(image.defect)}" data-outcome="{outcome}">'
        f'<img src="{source}" width="{size[0]}" height="{size[1]}" alt="{_text(image.path.name)}">'
        f'<figcaption><span class="file">{_text(image.path.name)}</span><br>'
        f"{_text(image.defect)} &middot; score {_general(score)} &middot; <b>{decision}</b>{wrong}"
        "</figcaption></figure>"
    )


def _ring(rgb: np.ndarray, truth: np.ndarray) -> None:
    """Ring the ground truth just outside its region, in place, so that a prediction on it stays visible."""
    rgb[ndimage.binary_dilation(truth, structure=np.ones((3, 3), dtype=bool)) & ~truth] = TRUTH_COLOR


def _shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to (width, height); a pixel is set if any pixel it covers is, so none vanish."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask.astype(bool)
    covered = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)
    return np.asarray(covered) > 0


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;background:#fff;
margin:0 auto;max-width:1280px;padding:0 20px 40px;line-height:1.4}
header{border-bottom:1px solid #ddd;margin-bottom:8px}
h1{font-size:1.6em;margin:18px 0 4px}h2{font-size:1.3em;margin-top:28px;border-bottom:1px solid #eee}
h3{font-size:1.05em;margin:18px 0 6px}
nav{margin:8px 0 10px}nav a{margin-right:14px;color:#1a5fb4;text-decoration:none}
.note{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:6px 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafafa}
.columns{display:flex;flex-wrap:wrap;gap:32px}
img.plot{max-width:100%;height:auto;display:block}img.legend{height:auto;max-width:100%}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
figure.tile{margin:0;padding:6px;border:2px solid #ddd;border-radius:4px;background:#fafafa}
figure.tile img{width:100%;height:auto;display:block}
figure.miss{border-color:#d62728}figure.false-alarm{border-color:#ff9f1c}
figcaption{font-size:.8em;margin-top:4px;overflow-wrap:anywhere}
.file{font-family:ui-monospace,monospace}.error{color:#d62728;font-weight:bold}
.predicted{color:#1b9e1b;font-weight:bold}.truth{color:#0a8fd0;font-weight:bold}
"""
