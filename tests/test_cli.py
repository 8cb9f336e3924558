"""The command-line tool: fit, predict and evaluate on a synthetic category; user errors as one line."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaussad.calibration import Threshold
from gaussad.cli import build_parser, main
from gaussad.config import DEFAULTS, MODEL_OPTIONS
from gaussad.decisions import map_scale
from gaussad.heatmaps import colorize

FAST = ["--image-size", "64", "--batch-size", "8", "--device", "cpu", "--quiet", "--map-levels", "2,3"]


def test_model_options_come_from_the_config() -> None:
    for command in ("fit", "evaluate", "report"):
        given = [command, "data"] + (["-o", "out"] if command != "evaluate" else [])
        args = build_parser().parse_args(given)
        assert {name: getattr(args, name) for name in MODEL_OPTIONS} == vars(DEFAULTS), command
    args = build_parser().parse_args(
        [
            "fit",
            "d",
            "-o",
            "m",
            "--map-levels",
            "3,5",
            "--image-size",
            "96",
            "--variance",
            "0.5",
            "--folds",
            "0",
        ]
    )
    assert (args.map_levels, args.image_size, args.variance, args.folds) == ([3, 5], 96, 0.5, 0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "d", "-o", "m", "--reduction", "nope"])


def test_help_and_argument_errors_do_not_import_torch() -> None:
    code = (
        "import sys, gaussad.cli\n"
        "try:\n    gaussad.cli.main(['fit', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--max-false-alarm-rate" in result.stdout and "(default: efficientnet_lite0)" in result.stdout


def test_reports_without_thresholds_are_refused_before_fitting(category: Path, tmp_path) -> None:
    result = run_cli("evaluate", str(category), "--report", str(tmp_path / "r.html"), *FAST, "--folds", "0")
    assert result.returncode == 2 and "need thresholds: fit with --folds 2 or more" in result.stderr
    assert "widget" not in result.stdout  # no category was evaluated


@pytest.fixture(scope="module")
def model_dir(category: Path, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("cli") / "model"
    assert main(["fit", str(category / "train" / "good"), "-o", str(target), *FAST]) == 0
    return target


def test_fit_writes_a_model_folder(model_dir: Path) -> None:
    config = json.loads((model_dir / "model.json").read_text())
    assert config["map_levels"] == [2, 3] and config["image_size"] == 64 and config["n_train"] == 16


def test_predict_writes_scores_and_maps_named_by_relative_path(
    model_dir: Path, category: Path, tmp_path
) -> None:
    out = tmp_path / "out"
    assert (
        main(["predict", str(model_dir), str(category / "test"), "-o", str(out), "--quiet", "--overlays"])
        == 0
    )
    with (out / "predictions.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 and set(rows[0]) == {"path", "score", "normalized_score", "is_anomalous"}
    for row in rows:
        assert 0.0 <= float(row["normalized_score"]) <= 1.0
        assert (row["is_anomalous"] == "1") == (float(row["normalized_score"]) >= 0.5)
        if "scratch" in row["path"]:
            assert row["is_anomalous"] == "1"
    scores = {
        Path(row["path"]).relative_to(category / "test").as_posix(): float(row["score"]) for row in rows
    }
    assert min(v for k, v in scores.items() if k.startswith("scratch")) > max(
        v for k, v in scores.items() if k.startswith("good")
    )
    # good/000.png and scratch/000.png do not collide: each keeps its folder.
    for name in ("good/000", "scratch/000"):
        heatmap = Image.open(out / "maps" / f"{name}.png")
        assert heatmap.mode == "RGB" and heatmap.size == (96, 96)
        assert np.load(out / "maps" / f"{name}.npy").shape == (96, 96)
        assert Image.open(out / "overlays" / f"{name}.png").size == (96, 96)
    defect_mask = np.asarray(Image.open(out / "masks" / "scratch" / "000.png")) > 0
    truth = np.asarray(Image.open(category / "ground_truth" / "scratch" / "000_mask.png")) > 0
    assert (defect_mask & truth).sum() > 0.5 * truth.sum()  # the predicted mask covers the scratch
    # The heatmap is drawn on the model's calibrated scale, the one the report's gallery uses too.
    pixel = Threshold(**json.loads((model_dir / "model.json").read_text())["thresholds"]["pixel"])
    anomaly_map = np.load(out / "maps" / "scratch" / "000.npy")
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "maps" / "scratch" / "000.png")), colorize(anomaly_map, *map_scale(pixel))
    )
    np.testing.assert_array_equal(defect_mask, anomaly_map >= pixel.value)


def test_predict_refuses_colliding_names_and_keeps_earlier_results(
    model_dir: Path, category: Path, tmp_path
) -> None:
    out = tmp_path / "out"
    assert main(["predict", str(model_dir), str(category / "test" / "good"), "-o", str(out), "--quiet"]) == 0
    before = (out / "predictions.csv").read_text()
    good, bad = category / "test" / "good", category / "test" / "scratch"
    assert main(["predict", str(model_dir), str(good), str(bad), "-o", str(out), "--quiet"]) == 2
    assert (out / "predictions.csv").read_text() == before


def test_predict_refuses_two_images_that_would_write_the_same_files(model_dir: Path, tmp_path) -> None:
    """x.png and x.jpg both write maps/x.npy and maps/x.png: refused, not silently overwritten."""
    folder = tmp_path / "in"
    folder.mkdir()
    picture = Image.fromarray(np.full((96, 96, 3), 128, dtype=np.uint8))
    picture.save(folder / "x.png")
    picture.save(folder / "x.jpg")
    out = tmp_path / "out"
    result = run_cli("predict", str(model_dir), str(folder), "-o", str(out), "--quiet", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "would both be written as x" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_predict_without_thresholds_scales_pictures_by_the_run(category: Path, tmp_path) -> None:
    model = tmp_path / "model"
    assert main(["fit", str(category / "train" / "good"), "-o", str(model), *FAST, "--folds", "0"]) == 0
    out = tmp_path / "out"
    assert main(["predict", str(model), str(category / "test"), "-o", str(out), "--quiet"]) == 0
    with (out / "predictions.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 and all(row["normalized_score"] == row["is_anomalous"] == "" for row in rows)
    assert not (out / "masks").exists()
    names = [f"{kind}/{index:03d}" for kind in ("good", "scratch") for index in range(4)]
    maps = {name: np.load(out / "maps" / f"{name}.npy") for name in names}
    scale = map_scale(None, (min(m.min() for m in maps.values()), max(m.max() for m in maps.values())))
    for name, anomaly_map in maps.items():
        heatmap = np.asarray(Image.open(out / "maps" / f"{name}.png"))
        np.testing.assert_array_equal(heatmap, colorize(anomaly_map, *scale))


def test_evaluate_prints_the_table_and_writes_json(category: Path, tmp_path, capsys) -> None:
    report = tmp_path / "results.json"
    html = tmp_path / "report.html"
    arguments = ["evaluate", str(category.parent), "--category", "widget", "--json", str(report), *FAST]
    assert main([*arguments, "--report", str(html)]) == 0
    table = capsys.readouterr().out
    assert "widget" in table and "AUPRO" in table and "FAR" in table
    assert 'id="gallery"' in html.read_text()
    document = json.loads(report.read_text())
    assert set(document) == {"config", "categories", "mean"}
    row = document["categories"][0]
    assert set(row) == {
        "category", "image_auroc", "pixel_auroc", "aupro", "n_train", "n_test",
        "fit_seconds", "test_seconds", "test_images_per_second",
        "image_threshold", "false_alarm_rate", "miss_rate",
    }  # fmt: skip
    assert 0.0 <= row["false_alarm_rate"] <= 1.0 and row["miss_rate"] == 0.0
    assert row["n_train"] == 16 and row["n_test"] == 8 and row["image_auroc"] == 1.0
    assert 0.8 < row["pixel_auroc"] <= 1.0 and 0.5 < row["aupro"] <= 1.0
    assert document["mean"]["aupro"] == row["aupro"] and document["config"]["map_levels"] == [2, 3]


def test_evaluate_reports_a_missing_mask(category: Path, tmp_path) -> None:
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(category), str(broken)], check=True)
    (broken / "ground_truth" / "scratch" / "001_mask.png").unlink()
    result = run_cli("evaluate", str(broken), *FAST)
    assert result.returncode == 2
    assert "001.png: defective test image without its mask" in result.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "gaussad.cli", *args], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "no/such/folder", "-o", "m"], "no/such/folder: no such file or folder"),
        (["predict", "no/such/model", "x.png", "-o", "out"], "no/such/model: no such model folder"),
        (["evaluate", "no/such/root"], "no/such/root: no such folder"),
        (["fit", ".", "-o", "m", "--levels", "42"], "levels [42] do not exist"),
        (["fit", ".", "-o", "m", "--backbone", "nonsense_net"], "unknown backbone 'nonsense_net'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    args: list[str], message: str, tmp_path, category
) -> None:
    if args[1] == ".":
        args = [args[0], str(category / "train" / "good"), *args[2:]]
    result = subprocess.run(
        [sys.executable, "-m", "gaussad.cli", *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreadable_image_is_named(model_dir: Path, tmp_path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "fake.png").write_bytes(b"\x89PNG but not really")
    result = run_cli("predict", str(model_dir), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 2 and "fake.png: cannot read image" in result.stderr
    assert not (tmp_path / "out").exists()


def test_calibrate_and_info(model_dir: Path, category: Path, tmp_path, capsys) -> None:
    model = tmp_path / "model"
    subprocess.run(["cp", "-r", str(model_dir), str(model)], check=True)
    assert main(["info", str(model)]) == 0
    assert (
        "image threshold:" in capsys.readouterr().out and "label-free" in (model / "model.json").read_text()
    )

    assert main(["calibrate", str(model), str(category), "--quiet", "--device", "cpu"]) == 0
    thresholds = json.loads((model / "model.json").read_text())["thresholds"]
    assert thresholds["image"]["method"] == "f1" and "labelled images" in thresholds["image"]["source"]

    assert main(["calibrate", str(model), "--image-threshold", "1e6", "--quiet"]) == 0
    thresholds = json.loads((model / "model.json").read_text())["thresholds"]
    assert thresholds["image"] == {**thresholds["image"], "value": 1e6, "method": "manual"}
    assert thresholds["pixel"]["method"] == "f1"  # untouched

    assert main(["calibrate", str(model), "--max-false-alarm-rate", "0.2", "--quiet"]) == 0
    thresholds = json.loads((model / "model.json").read_text())["thresholds"]
    assert thresholds["image"]["method"] == "label-free" and "0.8 quantile" in thresholds["image"]["source"]
    assert main(["info", str(model)]) == 0
    assert "0.8 quantile" in capsys.readouterr().out


def test_saved_results_make_a_report_later(category: Path, tmp_path) -> None:
    results = tmp_path / "results"
    arguments = ["evaluate", str(category), "--save-results", str(results), *FAST]
    assert main(arguments) == 0
    assert sorted(p.name for p in results.iterdir()) == ["results.json", "widget.npz"]
    html = tmp_path / "later.html"
    assert main(["report", str(results), "-o", str(html)]) == 0
    text = html.read_text()
    assert 'id="gallery"' in text and "widget" in text and "label-free" in text
    (results / "widget.npz").write_bytes(b"damaged")
    result = run_cli("report", str(results), "-o", str(tmp_path / "again.html"))
    assert result.returncode == 2 and "widget.npz: cannot read predictions" in result.stderr
