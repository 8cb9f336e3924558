"""Decisions stated once: verdicts, error counts, defect masks, the colour scale, output names."""

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaussad.calibration import Threshold
from gaussad.decisions import (
    PREDICTIONS_HEADER,
    Decision,
    Defect,
    PredictionRow,
    decide,
    decide_all,
    defect_mask,
    describe_defect,
    image_errors,
    is_anomalous,
    manual_threshold,
    map_scale,
    output_names,
    output_path,
    predictions_csv,
)
from gaussad.errors import GaussADError
from gaussad.heatmaps import colorize, write_pictures

THRESHOLD = Threshold(value=30.0, normal_level=10.0, method="label-free", source="test")


def test_a_score_at_the_threshold_is_anomalous() -> None:
    np.testing.assert_array_equal(is_anomalous([29.9, 30.0, 31.0], 30.0), [False, True, True])
    assert decide(30.0, THRESHOLD) == Decision(30.0, 0.5, True)
    assert decide(10.0, THRESHOLD) == Decision(10.0, 0.0, False)
    assert decide(12.5, None) == Decision(12.5, None, None)  # no threshold: the raw score only
    assert decide_all([20.0, 60.0], THRESHOLD) == [Decision(20.0, 0.25, False), Decision(60.0, 1.0, True)]
    assert decide(40.0, THRESHOLD).as_dict() == {
        "score": 40.0,
        "normalized_score": 0.75,
        "is_anomalous": True,
    }


def test_image_errors_count_false_alarms_and_misses() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    errors = image_errors(labels, [1.0, 2.0, 5.0, 3.0, 5.0, 0.5], 3.0)  # 3.0 and 5.0 flagged; 0.5 missed
    assert errors == (2, 4, 1, 2) and errors.false_alarm_rate == 0.5 and errors.miss_rate == 0.5
    # A score equal to the threshold is anomalous: a false alarm for a good image, no miss for a bad one.
    assert image_errors([0, 1], [0.5, 0.5], 0.5)[::2] == (1, 0)
    assert np.isnan(image_errors([0, 0], [0.1, 0.2], 0.5).miss_rate)
    assert np.isnan(image_errors([1], [0.1], 0.5).false_alarm_rate)


def test_defect_mask_is_the_map_at_or_above_the_pixel_threshold() -> None:
    anomaly_map = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    pixel = Threshold(2.0, 0.5, "label-free", "test")
    np.testing.assert_array_equal(defect_mask(anomaly_map, pixel), [[False, False], [True, True]])
    np.testing.assert_array_equal(defect_mask(anomaly_map, pixel, True), [[False, False], [True, True]])
    assert defect_mask(anomaly_map, None) is None and defect_mask(anomaly_map, None, True) is None


def test_an_anomalous_image_never_has_an_empty_mask() -> None:
    """Flagged images whose map stayed below the pixel threshold had an empty mask (215 of 361 tiles):
    their mask is the hottest region, at half the peak's height above the typical normal value."""
    pixel = Threshold(10.0, 1.0, "label-free", "test")
    anomaly_map = np.array([[1.0, 2.0, 1.0], [3.0, 7.0, 5.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    assert not defect_mask(anomaly_map, pixel, False).any()  # a good image: at the threshold, empty
    assert not defect_mask(anomaly_map, pixel).any()  # no decision given: at the threshold
    hot = defect_mask(anomaly_map, pixel, True)  # peak 7, normal 1: half height is 4
    np.testing.assert_array_equal(hot, anomaly_map >= 4.0)
    # A peak at or below the typical normal value still marks the peak itself.
    flat = np.full((2, 2), 0.5, dtype=np.float32)
    assert defect_mask(flat, pixel, True).all()
    rng = np.random.default_rng(0)
    for _ in range(50):
        noisy = rng.normal(0.0, 1.0, (8, 9)).astype(np.float32)
        assert defect_mask(noisy, pixel, True).any()


def test_describe_defect_counts_regions_and_boxes_the_largest() -> None:
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 1:4] = True  # 6 pixels: the largest region, columns 1-3 and rows 1-2
    mask[4, 6] = mask[5, 7] = True  # diagonal neighbours: one 8-connected region of 2
    defect = describe_defect(mask)
    assert defect == Defect(area=8, regions=2, box=(1, 1, 4, 3))
    assert defect.box_text() == "1 1 4 3"
    assert describe_defect(np.zeros((3, 3), dtype=bool)) == Defect(0, 0, None)
    assert Defect(0, 0, None).box_text() == ""


def test_map_scale_puts_the_normal_level_dark_and_the_threshold_mid_scale() -> None:
    low, high = map_scale(Threshold(3.0, 1.0, "label-free", "test"))
    assert (low, high) == (1.0, 5.0) and (low + high) / 2 == 3.0
    # The calibrated rule ignores the run's range; an uncalibrated model takes it.
    assert map_scale(Threshold(3.0, 1.0, "f1", "test"), (0.0, 100.0)) == (1.0, 5.0)
    assert map_scale(None, (0.25, 7.5)) == (0.25, 7.5)
    with pytest.raises(GaussADError, match="range"):
        map_scale(None)


def test_manual_threshold_keeps_the_normal_level_and_must_exceed_it() -> None:
    threshold = manual_threshold(50.0, THRESHOLD, "image")
    assert threshold == Threshold(50.0, 10.0, "manual", "image threshold set by hand")
    assert manual_threshold(0.5, None, "pixel").normal_level == 0.0
    for value in (10.0, 5.0, float("nan")):
        with pytest.raises(
            GaussADError, match="image threshold .*: must be above the typical normal value 10"
        ):
            manual_threshold(value, THRESHOLD, "image")


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path, format="PNG")
    return path


def test_output_names_refuse_two_images_that_write_the_same_files(tmp_path) -> None:
    _touch(tmp_path / "in" / "x.png")
    _touch(tmp_path / "in" / "x.jpg")  # both would write maps/x.npy and maps/x.png
    with pytest.raises(GaussADError, match=r"x\.(png|jpg) and .*x\.(png|jpg) would both be written as x"):
        output_names([tmp_path / "in"])
    with pytest.raises(GaussADError, match="would both be written as x"):  # given as files, too
        output_names([tmp_path / "in" / "x.png", tmp_path / "in" / "x.jpg"])


def test_output_names_keep_folders_and_dots(tmp_path) -> None:
    a, b = _touch(tmp_path / "in" / "a" / "0.png"), _touch(tmp_path / "in" / "b" / "0.png")
    dotted = _touch(tmp_path / "other" / "part.v2.png")
    pairs = output_names([tmp_path / "in", dotted])
    assert pairs == [(a, Path("a/0")), (b, Path("b/0")), (dotted, Path("part.v2"))]
    assert output_path(tmp_path, "maps", Path("a/0"), ".npy") == tmp_path / "maps" / "a" / "0.npy"
    assert output_path(tmp_path, "masks", Path("part.v2"), ".png") == tmp_path / "masks" / "part.v2.png"


def test_predictions_csv_has_defects_errors_and_empty_columns_where_unknown() -> None:
    text = predictions_csv(
        [
            PredictionRow("a.png", decide(40.0, THRESHOLD), Defect(12, 2, (3, 4, 9, 8))),
            PredictionRow("b.png", decide(1.5, None)),
            PredictionRow("c.png", error="c.png: cannot read image (truncated)"),
            PredictionRow("d.png", decide(20.0, THRESHOLD), Defect(0, 0, None)),
        ]
    )
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [
        list(PREDICTIONS_HEADER),
        ["a.png", "40.000000", "0.7500", "1", "12", "2", "3 4 9 8", ""],
        ["b.png", "1.500000", "", "", "", "", "", ""],
        ["c.png", "", "", "", "", "", "", "c.png: cannot read image (truncated)"],
        ["d.png", "20.000000", "0.2500", "0", "0", "0", "", ""],
    ]


def test_write_pictures_draws_on_the_given_scale(tmp_path) -> None:
    image = _touch(tmp_path / "in" / "x.png")
    anomaly_map = np.array([[0.0, 1.0], [2.0, 4.0]], dtype=np.float32)
    scale = map_scale(Threshold(2.0, 1.0, "label-free", "test"))
    mask = defect_mask(anomaly_map, Threshold(2.0, 1.0, "label-free", "test"))
    write_pictures(tmp_path / "out", Path("sub/x"), anomaly_map, scale, mask, image)
    heatmap = np.asarray(Image.open(tmp_path / "out" / "maps" / "sub" / "x.png"))
    np.testing.assert_array_equal(heatmap, colorize(anomaly_map, 1.0, 3.0))
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out" / "masks" / "sub" / "x.png")), mask * 255
    )
    assert Image.open(tmp_path / "out" / "overlays" / "sub" / "x.png").size == (2, 2)
    write_pictures(tmp_path / "bare", Path("x"), anomaly_map, scale, None)  # no mask, no overlay
    assert sorted(
        p.relative_to(tmp_path / "bare").as_posix() for p in (tmp_path / "bare").rglob("*.png")
    ) == ["maps/x.png"]


def test_decisions_import_without_torch() -> None:
    code = "import sys, gaussad.decisions; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
