"""The command-line tool: fit, predict and evaluate on a synthetic category; user errors as one line."""

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pytest
from conftest import make_category, texture
from PIL import Image

from gaussad.calibration import SHIFT_SIGNIFICANCE, Threshold
from gaussad.cli import build_parser, format_table, main
from gaussad.config import DEFAULTS, MODEL_OPTIONS
from gaussad.decisions import PREDICTIONS_HEADER, map_scale
from gaussad.errors import GaussADError
from gaussad.evaluation import CategoryResult, mean_metrics
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
    assert len(rows) == 8 and list(rows[0]) == list(PREDICTIONS_HEADER)
    for row in rows:
        assert 0.0 <= float(row["normalized_score"]) <= 1.0
        assert (row["is_anomalous"] == "1") == (float(row["normalized_score"]) >= 0.5)
        if "scratch" in row["path"]:
            assert row["is_anomalous"] == "1"
        # The CSV says where the mask lies: its area, regions and the largest region's box.
        name = Path(row["path"]).relative_to(category / "test").with_suffix("")
        written = np.asarray(Image.open(out / "masks" / f"{name}.png")) > 0
        assert int(row["defect_area"]) == written.sum() and row["error"] == ""
        if row["is_anomalous"] == "1":
            assert written.any() and int(row["defect_regions"]) >= 1
            x0, y0, x1, y1 = map(int, row["defect_box"].split())
            assert written[y0:y1, x0:x1].any() and 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
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
        "image_threshold", "false_alarm_rate", "miss_rate", "good_shift", "good_shift_p_value",
    }  # fmt: skip
    assert 0.0 <= row["false_alarm_rate"] <= 1.0 and row["miss_rate"] == 0.0
    assert 0.0 <= row["good_shift"] <= 1.0
    assert ("score above the training images" in table) == (row["good_shift_p_value"] < SHIFT_SIGNIFICANCE)
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
    ("args", "message", "before_torch"),
    [
        (["fit", "no/such/folder", "-o", "m"], "no/such/folder: no such file or folder", True),
        (["predict", "no/such/model", "x.png", "-o", "out"], "no/such/model: no such model folder", True),
        (["info", "no/such/model"], "no/such/model: no such model folder", True),
        (["calibrate", "no/such/model"], "no/such/model: no such model folder", True),
        (["export", "no/such/model", "-o", "m.onnx"], "no/such/model: no such model folder", True),
        (["evaluate", "no/such/root"], "no/such/root: no such folder", True),
        (["serve", "no/such/model"], "no/such/model: no such model folder", True),
        (["serve", "no/such/model.onnx"], "no/such/model.onnx: no such exported model file", True),
        (["fit", ".", "-o", "m", "--levels", "42"], "levels [42] do not exist", False),
        (["fit", ".", "-o", "m", "--backbone", "nonsense_net"], "unknown backbone 'nonsense_net'", False),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    args: list[str], message: str, before_torch: bool, tmp_path, category
) -> None:
    """A wrong path is said before PyTorch loads (seconds); options checked against the backbone need it."""
    if args[1] == ".":
        args = [args[0], str(category / "train" / "good"), *args[2:]]
    code = (
        "import sys; from gaussad.cli import main; status = main(sys.argv[1:]); "
        "print('torch' in sys.modules); sys.exit(status)"
    )
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if before_torch:
        assert result.stdout == "False\n"


def test_a_reader_that_goes_away_ends_the_command_quietly(model_dir: Path) -> None:
    """`gaussad info MODEL | head -1`: the closed pipe is no mistake of the user's, so no error line."""
    command = [sys.executable, "-m", "gaussad.cli", "info", str(model_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the command writes anything
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert stderr == ""


def tiny_png(width: int, height: int) -> bytes:
    """A 69-byte PNG: its header declares width x height grey pixels, and no pixel data follows."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\0\0\0\0IEND\xaeB`\x82" + b"\0" * 24


def line_folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
    """Images of three sizes and, among them, a broken one (b.png) and a header-only bomb (d.png), so a
    name shifted onto another image's map shows in the map's shape."""
    folder = tmp_path / "line"
    folder.mkdir()
    sizes = {"a": (40, 56), "c": (72, 48), "e": (64, 64)}  # (height, width)
    rng = np.random.default_rng(0)
    for name, (height, width) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "b.png").write_bytes(b"\x89PNG but not really")
    (folder / "d.png").write_bytes(tiny_png(30000, 30000))
    return folder, sizes


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit status, stdout, stderr)."""
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_unreadable_images_stop_predict_when_asked(model_dir: Path, tmp_path, capsys) -> None:
    folder, _ = line_folder(tmp_path)
    out = tmp_path / "out"
    status, _, err = cli(capsys, "predict", str(model_dir), str(folder), "-o", str(out), "--on-error", "stop")
    assert status == 2 and err.strip().splitlines()[-1].startswith(
        f"gaussad: error: {folder}/b.png: cannot read"
    )
    assert not out.exists()


def test_a_decompression_bomb_is_one_line_and_exit_2(model_dir: Path, tmp_path, capsys) -> None:
    """A 69-byte PNG declaring 30000 x 30000 pixels ended in PIL's DecompressionBombError traceback."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(tiny_png(30000, 30000))
    assert len(tiny_png(30000, 30000)) == 69
    out = tmp_path / "out"
    status, _, err = cli(
        capsys, "predict", str(model_dir), str(bomb), "-o", str(out), "--on-error", "stop", "--quiet"
    )
    assert status == 2 and err.splitlines() == [
        f"gaussad: error: {bomb}: declares 30000 x 30000 = 900,000,000 pixels, over the limit of 100,000,000 "
        "pixels"
    ]


def test_the_pixel_limit_is_an_option(model_dir: Path, tmp_path, capsys) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    arguments = [
        "predict",
        str(model_dir),
        str(tmp_path / "small.png"),
        "-o",
        str(tmp_path / "out"),
        "--quiet",
    ]
    status, _, err = cli(capsys, *arguments, "--on-error", "stop", "--max-pixels", "1000")
    assert status == 2 and "small.png: declares 40 x 30 = 1,200 pixels, over the limit of 1,000 pixels" in err
    assert cli(capsys, *arguments, "--max-pixels", "1200")[0] == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args([*arguments, "--max-pixels", "0"])


def test_predict_skips_bad_images_keeps_the_others_and_exits_3(model_dir: Path, tmp_path, capsys) -> None:
    """One unreadable image among those to predict aborted the run, and nothing was written."""
    folder, sizes = line_folder(tmp_path)
    out = tmp_path / "out"
    status, stdout, err = cli(
        capsys, "predict", str(model_dir), str(folder), "-o", str(out), "--quiet", "--batch-size", "2"
    )
    assert status == 3
    assert err.splitlines() == [
        f"gaussad: skipped {folder}/b.png: cannot read image (not a PNG, JPEG, BMP, TIFF, WebP or GIF image)",
        f"gaussad: skipped {folder}/d.png: declares 30000 x 30000 = 900,000,000 pixels, over the limit of "
        "100,000,000 pixels",
    ]
    assert "scored 3 images" in stdout and "skipped 2" in stdout
    with (out / "predictions.csv").open() as file:
        rows = {Path(row["path"]).stem: row for row in csv.DictReader(file)}
    assert sorted(rows) == ["a", "b", "c", "d", "e"]
    assert rows["b"]["score"] == "" and "cannot read image" in rows["b"]["error"]
    assert rows["d"]["score"] == "" and "declares 30000 x 30000" in rows["d"]["error"]
    for name, size in sizes.items():  # each map is its own image's: no name shifted past a skipped image
        assert rows[name]["error"] == "" and float(rows[name]["score"]) > 0
        assert np.load(out / "maps" / f"{name}.npy").shape == size
        assert Image.open(out / "masks" / f"{name}.png").size == size[::-1]
    assert not (out / "maps" / "b.npy").exists()


def test_fit_skips_bad_training_images_when_asked(category: Path, tmp_path, capsys) -> None:
    """One unreadable image among the training images aborted the fit after all its work."""
    train = tmp_path / "train"
    subprocess.run(["cp", "-r", str(category / "train" / "good"), str(train)], check=True)
    (train / "zz_broken.png").write_bytes(b"\x89PNG but not really")
    model = tmp_path / "model"
    status, _, err = cli(capsys, "fit", str(train), "-o", str(model), *FAST, "--folds", "0")
    assert status == 2 and "zz_broken.png: cannot read image" in err and not model.exists()
    status, stdout, err = cli(capsys, "fit", str(train), "-o", str(model), *FAST, "--on-error", "skip")
    assert status == 3
    assert err.splitlines() == [
        f"gaussad: skipped {train}/zz_broken.png: cannot read image (not a PNG, JPEG, BMP, TIFF, WebP or GIF "
        "image)"
    ]
    assert "fitted on 16 images, skipped 1" in stdout
    assert json.loads((model / "model.json").read_text())["n_train"] == 16


def test_fit_says_which_rule_decided_an_option(
    category: Path, tmp_path, capsys, min_images_for_grid: int, monkeypatch
) -> None:
    """A fit that leaves the grid out for too few images, or takes the pooled score without folds, says so
    and why, as `gaussad info` does; `evaluate` says it per category."""
    monkeypatch.setattr("gaussad.model.MIN_IMAGES_FOR_GRID", min_images_for_grid)
    train = str(category / "train" / "good")
    status, stdout, _ = cli(capsys, "fit", train, "-o", str(tmp_path / "few"), *FAST)
    lines = stdout.splitlines()
    assert status == 0 and lines[0].startswith("fitted on 16 images")
    assert lines[1].startswith("image score by rule: combined without the grid") and (
        f"16 training images are too few for the grid's Gaussians, which learn from one pooled vector per "
        f"image and cell (fewer than {min_images_for_grid})" in lines[1]
    )
    assert cli(capsys, "info", str(tmp_path / "few"))[1].count(lines[1]) == 1
    status, stdout, _ = cli(capsys, "evaluate", str(category), *FAST)
    assert status == 0 and f"widget: {lines[1]}" in stdout.splitlines()
    status, stdout, _ = cli(capsys, "fit", train, "-o", str(tmp_path / "nofolds"), *FAST, "--folds", "0")
    assert status == 0 and stdout.splitlines()[1].startswith("auto options: no held-out folds")


def test_fit_names_defective_training_images_and_leaves_them_out_of_the_thresholds(tmp_path, capsys) -> None:
    """Bad parts that slipped into the good images set the label-free threshold among the defects."""
    from gaussad import GaussAD

    root = make_category(tmp_path / "widget", n_train=40, n_good=2, n_bad=4)
    train = root / "train" / "good"
    moved = sorted((root / "test" / "scratch").iterdir())[:3]
    slipped = [f"zz_scratch_{path.name}" for path in moved]
    for path, name in zip(moved, slipped, strict=True):
        shutil.move(path, train / name)
        (root / "ground_truth" / "scratch" / f"{path.stem}_mask.png").unlink()
    named = (
        "3 training images scored far above the others, likely defective, and left out of the thresholds: "
        + ", ".join(slipped)
    )
    status, stdout, _ = cli(capsys, "evaluate", str(root), *FAST)
    assert status == 0 and f"widget: {named}" in stdout
    (train / "aa_broken.png").write_bytes(b"broken")  # skipped: the positions are among the images fitted
    model = tmp_path / "model"
    status, stdout, _ = cli(capsys, "fit", str(train), "-o", str(model), *FAST, "--on-error", "skip")
    assert status == 3 and named in stdout
    fitted = GaussAD.load(model, device="cpu")
    assert fitted.far_out_training_images_.tolist() == [40, 41, 42]
    assert fitted.image_threshold_.value == np.quantile(fitted.held_out_scores_[:40], 0.99)
    assert "40 good training images, 5-fold held out; 3 far above the others left out" in (
        fitted.image_threshold_.source
    )
    assert fitted.image_threshold_.value < fitted.held_out_scores_[40:].min()
    # The service's drift takes the same normal scores as its reference, the defective ones left out.
    from gaussad.serve.torch_model import TorchModel

    np.testing.assert_array_equal(
        TorchModel("widget", model, "cpu").held_out_scores, fitted.held_out_scores_[:40]
    )


def test_evaluate_says_where_good_test_images_score_above_the_training_images(tmp_path, capsys) -> None:
    """The label-free threshold's target holds for images like the training images: good test images
    from a noisier camera score above them and are flagged beyond it, and evaluate says why."""
    root = make_category(tmp_path / "widget", n_train=40, n_good=10, n_bad=4)
    rng = np.random.default_rng(1)
    for path in (root / "test" / "good").iterdir():
        noisy = texture(rng).astype(np.float64) + rng.normal(0.0, 12.0, (96, 96, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path)
    report, html = tmp_path / "results.json", tmp_path / "report.html"
    status, stdout, _ = cli(
        capsys, "evaluate", str(root), *FAST, "--json", str(report), "--report", str(html)
    )
    row = json.loads(report.read_text())["categories"][0]
    assert status == 0 and row["good_shift"] > 0.9 and row["good_shift_p_value"] < SHIFT_SIGNIFICANCE
    said = [line for line in stdout.splitlines() if "score above the training images" in line]
    shift, p_value = row["good_shift"], row["good_shift_p_value"]
    assert len(said) == 1 and said[0].startswith(
        "widget: the good test images score above the training images' held-out scores (a good test image "
        f"outscores a held-out one with probability {shift:.2f}; one-sided Mann-Whitney p = {p_value:.2g})"
    )
    assert f"it flags {row['false_alarm_rate']:.1%} of these" in said[0] and row["false_alarm_rate"] > 0.1
    sentence = said[0].removeprefix("widget: ").split("; `gaussad calibrate")[0]
    assert (
        f'<p class="note">widget: {html_escape(sentence)}.</p>' in html.read_text()
    )  # the report says it too


def test_evaluate_skips_bad_images_when_asked(tmp_path, capsys) -> None:
    root = make_category(tmp_path / "widget", n_train=4, n_good=2, n_bad=2)
    (root / "test" / "good" / "zz_broken.png").write_bytes(b"broken")
    report = tmp_path / "results.json"
    arguments = ["evaluate", str(root), *FAST, "--folds", "2", "--json", str(report)]
    status, _, err = cli(capsys, *arguments, "--on-error", "skip")
    assert status == 3 and err.startswith(f"gaussad: skipped {root}/test/good/zz_broken.png: cannot read")
    assert json.loads(report.read_text())["categories"][0]["n_test"] == 4


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


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    "arguments",
    [
        ["fit", "{train}", "-o", "{foreign}"],
        ["evaluate", "{root}", "--json", "{folder}"],
        ["evaluate", "{root}", "--report", "{folder}"],
        ["evaluate", "{root}", "--save-results", "{foreign}"],
        ["report", "{root}", "-o", "{folder}"],
    ],
)
def test_destinations_are_checked_before_any_work(
    arguments: list[str], category: Path, tmp_path, capsys, monkeypatch
) -> None:
    """`fit DIR -o FOLDER` into a folder gaussad did not write fitted for the whole run, then refused."""
    from gaussad.model import GaussAD

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before checking the destination")

    monkeypatch.setattr(GaussAD, "fit", no_fit)
    foreign, folder = tmp_path / "mine", tmp_path / "folder"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    folder.mkdir()
    places = {"train": category / "train" / "good", "root": category, "foreign": foreign, "folder": folder}
    status, _, err = cli(capsys, *(argument.format(**places) for argument in arguments), *FAST)
    assert status == 2 and len(err.splitlines()) == 1
    assert (
        "was not written by gaussad; refusing to replace it" in err or "is a folder; give a file name" in err
    )
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_predict_into_its_own_input_folder_never_scores_its_outputs(
    model_dir: Path, category: Path, tmp_path, capsys
) -> None:
    """`predict MODEL nest -o nest/out` run twice scored its own pictures the second time."""
    nest = tmp_path / "nest"
    subprocess.run(["cp", "-r", str(category / "test" / "good"), str(nest)], check=True)
    stale = nest / f".out.{dead_pid()}-x1"  # the staging folder of a killed run
    (stale / "maps").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(stale / "maps" / "000.png")
    for out in ("out", "out", "again"):  # the second run finds out/ under nest; the third finds it by marker
        assert main(["predict", str(model_dir), str(nest), "-o", str(nest / out), "--quiet"]) == 0
        with (nest / out / "predictions.csv").open() as file:
            paths = [Path(row["path"]).relative_to(nest).as_posix() for row in csv.DictReader(file)]
        assert paths == ["000.png", "001.png", "002.png", "003.png"]
    assert not stale.exists()  # removed as stale, not only left out
    assert sorted(p.name for p in nest.iterdir() if p.is_dir()) == ["again", "out"]


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield
    os.umask(before)


def test_outputs_respect_the_umask(model_dir: Path, category: Path, tmp_path, umask_027, capsys) -> None:
    """Outputs had the private modes of temporary files (0700, 0600): no other account could read them."""
    out = tmp_path / "out"
    assert main(["predict", str(model_dir), str(category / "test" / "good"), "-o", str(out), "--quiet"]) == 0
    modes = {path.relative_to(tmp_path).as_posix(): path.stat().st_mode & 0o777 for path in out.rglob("*")}
    modes["out"] = out.stat().st_mode & 0o777
    assert modes["out"] == modes["out/maps"] == 0o750 and modes["out/predictions.csv"] == 0o640
    assert {mode for name, mode in modes.items() if "." in Path(name).name} == {0o640}
    assert {mode for name, mode in modes.items() if "." not in Path(name).name} == {0o750}


def test_an_error_starts_its_own_line_after_a_progress_bar(
    model_dir: Path, category: Path, tmp_path, capsys, monkeypatch
) -> None:
    """An error after a progress bar was printed on the bar's line; "scored 1 images"."""
    import gaussad.heatmaps

    image = category / "test" / "good" / "000.png"
    assert main(["predict", str(model_dir), str(image), "-o", str(tmp_path / "one"), "--quiet"]) == 0
    assert "scored 1 image, " in capsys.readouterr().out

    def failing(*args, **kwargs):
        raise GaussADError("maps/000.png: cannot write")

    monkeypatch.setattr(gaussad.heatmaps, "write_pictures", failing)
    assert main(["predict", str(model_dir), str(image), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "predict" in err  # a bar was drawn
    before, error = err.rsplit("gaussad: error: ", 1)
    assert error == "maps/000.png: cannot write\n"
    shown = ""  # what a terminal shows on the error's line before it: carriage returns overwrite
    for part in before.rsplit("\n", 1)[-1].split("\r"):
        shown = part + shown[len(part) :]
    assert shown.strip() == ""


def test_a_file_the_system_refuses_is_one_line(
    model_dir: Path, category: Path, tmp_path, monkeypatch, capsys
):
    import gaussad.heatmaps

    def full_disk(folder: Path, name: Path, *args, **kwargs) -> None:
        raise OSError(28, "No space left on device", str(folder / "maps" / f"{name}.png"))

    monkeypatch.setattr(gaussad.heatmaps, "write_pictures", full_disk)
    image = category / "test" / "good" / "000.png"
    status, _, err = cli(
        capsys, "predict", str(model_dir), str(image), "-o", str(tmp_path / "out"), "--quiet"
    )
    assert status == 2 and err.startswith("gaussad: error: ") and len(err.splitlines()) == 1
    assert err.endswith("/maps/000.png: No space left on device\n") and not (tmp_path / "out").exists()


def test_tmp_dir_sets_where_the_fit_spills(category: Path, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # the CLI sets it for its process
    spill = tmp_path / "spill"
    (spill / f"gaussad-fit-{dead_pid()}-x").mkdir(parents=True)  # left by a killed fit
    train = sorted((category / "train" / "good").iterdir())[:4]
    folder = tmp_path / "train"
    folder.mkdir()
    for image in train:
        (folder / image.name).write_bytes(image.read_bytes())
    arguments = ["fit", str(folder), "-o", str(tmp_path / "model"), *FAST, "--folds", "0"]
    assert cli(capsys, *arguments, "--tmp-dir", str(spill))[0] == 0
    # The fit spilled there: it removed the leftover, then its own spill.
    assert [path for path in spill.iterdir() if path.name.startswith("gaussad-fit-")] == []
    status, _, err = cli(capsys, *arguments, "--tmp-dir", str(tmp_path / "nowhere"))
    assert status == 2 and err == f"gaussad: error: --tmp-dir {tmp_path / 'nowhere'}: no such folder\n"


def test_the_cli_limit_is_the_library_default() -> None:
    import gaussad.cli
    import gaussad.images

    assert gaussad.cli.DEFAULT_MAX_PIXELS == gaussad.images.DEFAULT_MAX_PIXELS
    arguments = build_parser().parse_args(["predict", "model", "x.png", "-o", "out"])
    assert (arguments.max_pixels, arguments.on_error) == (gaussad.images.DEFAULT_MAX_PIXELS, "skip")
    for command in (["fit", "d", "-o", "m"], ["evaluate", "d"]):
        assert build_parser().parse_args(command).on_error == "stop"


def test_export_then_predict_with_the_file_writes_what_the_folder_writes(
    model_dir: Path, category: Path, tmp_path, capsys
) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["export", str(model_dir), "-o", str(tmp_path / "model.onnx")]) == 0
    images = category / "test"
    assert main(["predict", str(model_dir), str(images), "-o", str(tmp_path / "torch"), "--quiet"]) == 0
    assert main(["predict", str(tmp_path / "model.onnx"), str(images), "-o", str(tmp_path / "onnx")]) == 0
    rows = [list(csv.DictReader((tmp_path / run / "predictions.csv").open())) for run in ("torch", "onnx")]
    assert [r["path"] for r in rows[0]] == [r["path"] for r in rows[1]] and len(rows[0]) == 8
    np.testing.assert_allclose(
        [float(r["score"]) for r in rows[1]], [float(r["score"]) for r in rows[0]], rtol=1e-4
    )
    assert [r["is_anomalous"] for r in rows[1]] == [r["is_anomalous"] for r in rows[0]]
    for name in ("good/000", "scratch/001"):
        expected = np.load(tmp_path / "torch" / "maps" / f"{name}.npy")
        got = np.load(tmp_path / "onnx" / "maps" / f"{name}.npy")
        np.testing.assert_allclose(got, expected, atol=1e-3 * float(np.ptp(expected)))
    with pytest.raises(SystemExit):  # argparse: not 'dynamic' nor a number
        main(["export", str(model_dir), "-o", str(tmp_path / "b.onnx"), "--batch", "none"])


def test_predict_with_an_exported_file_needs_no_torch(model_dir: Path, category: Path, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["export", str(model_dir), "-o", str(tmp_path / "model.onnx")]) == 0
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'timm'):\n"
        "    sys.modules[name] = None\n"
        "from gaussad.cli import main\n"
        f"sys.exit(main(['predict', {str(tmp_path / 'model.onnx')!r}, {str(category / 'test')!r},"
        f" '-o', {str(tmp_path / 'out')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert len(list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))) == 8


def image_only_copy(category: Path, target: Path) -> Path:
    """A copy of a category without its ground_truth folder."""
    return Path(shutil.copytree(category, target, ignore=shutil.ignore_patterns("ground_truth")))


def test_evaluate_without_ground_truth_reports_image_metrics_only(category: Path, tmp_path, capsys) -> None:
    root = tmp_path / "root"
    shutil.copytree(category, root / "widget")
    image_only_copy(category, root / "plain")
    report, results, html = tmp_path / "results.json", tmp_path / "saved", tmp_path / "report.html"
    arguments = ["evaluate", str(root), "--json", str(report), "--save-results", str(results), *FAST]
    status, table, _ = cli(capsys, *arguments, "--report", str(html))
    assert status == 0
    document = json.loads(report.read_text())
    plain, widget = document["categories"]
    assert plain["pixel_auroc"] is None and plain["aupro"] is None and widget["aupro"] is not None
    # The same images: the same image AUROC, threshold and rates as with the masks.
    for key in ("image_auroc", "image_threshold", "false_alarm_rate", "miss_rate"):
        assert plain[key] == pytest.approx(widget[key]), key
    assert (document["mean"]["pixel_auroc"], document["mean"]["aupro"]) == (
        widget["pixel_auroc"],
        widget["aupro"],
    )
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.split()}
    assert rows["plain"][2:4] == ["n/a", "n/a"] and rows["widget"][2] == f"{widget['pixel_auroc']:.4f}"
    assert rows["mean"][2:4] == [f"{widget['pixel_auroc']:.4f}", f"{widget['aupro']:.4f}"]
    assert "pixel metrics: mean of the 1 of 2 categories with masks" in table
    assert 'alt="ROC curve of plain"' in html.read_text()
    saved = json.loads((results / "results.json").read_text())["categories"][0]["result"]
    assert saved["category"] == "plain" and saved["pixel_auroc"] is None
    later = tmp_path / "later.html"
    assert main(["report", str(results), "-o", str(later)]) == 0
    text = later.read_text()
    assert 'alt="ROC curve of plain"' in text and "PRO curves of plain" not in text


def test_the_table_says_n_a_where_no_category_has_pixel_metrics() -> None:
    results = [CategoryResult(name, 0.75, None, None, 16, 8, 1.0, 0.5, 16.0) for name in ("a", "b")]
    lines = format_table(results, mean_metrics(results)).splitlines()
    assert [line.split()[:4] for line in lines[2:]] == [
        ["a", "0.7500", "n/a", "n/a"],
        ["b", "0.7500", "n/a", "n/a"],
        ["-" * len(lines[0])],
        ["mean", "0.7500", "n/a", "n/a"],
    ]


def test_calibrate_on_a_folder_of_good_images_flags_the_rate_of_them(
    model_dir: Path, category: Path, tmp_path, capsys
) -> None:
    """Good parts that no longer score like the training images (`evaluate` says where): their own
    quantiles, from a plain folder of them, no labels needed."""
    from gaussad import GaussAD

    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    good = tmp_path / "recent" / "good parts"
    good.mkdir(parents=True)
    for path in [*(category / "train" / "good").iterdir(), *(category / "test" / "good").iterdir()]:
        shutil.copy(path, good / f"{path.parent.parent.name}_{path.name}")
    status, stdout, _ = cli(
        capsys,
        "calibrate",
        str(model),
        str(tmp_path / "recent"),
        "--max-false-alarm-rate",
        "0.25",
        "--quiet",
        "--device",
        "cpu",
    )
    assert status == 0
    fitted = GaussAD.load(model, device="cpu")
    images = sorted(good.iterdir())
    image, pixel = fitted.image_threshold_, fitted.pixel_threshold_
    assert image.method == pixel.method == "false-alarm-rate"
    assert image.value == pytest.approx(np.quantile(fitted.score_samples(images), 0.75), rel=1e-5)
    assert f"0.75 quantile of 20 good images in {good}" in image.source and image.source in stdout
    batches = fitted.iter_predict(images, map_sizes=[(256, 256)] * len(images))
    maxima = [anomaly_map.max() for batch in batches for anomaly_map in batch.maps]
    assert pixel.value == pytest.approx(np.quantile(maxima, 0.75), rel=1e-5)
    # Without a rate there is nothing to set on good images alone; --category is for MVTec layout.
    for extra in ([], ["--max-false-alarm-rate", "0.25", "--category", "widget"]):
        status, _, stderr = cli(capsys, "calibrate", str(model), str(good), *extra, "--quiet")
        assert status == 2 and "a folder of images, not labelled data in MVTec layout" in stderr
        assert stderr.count("\n") == 1 and "Traceback" not in stderr
    status, _, stderr = cli(
        capsys, "calibrate", str(model), str(tmp_path / "missing"), "--max-false-alarm-rate", "0.1"
    )
    assert status == 2 and "missing: no such file or folder" in stderr
    assert GaussAD.load(model, device="cpu").image_threshold_ == image  # a refused run changes nothing


def test_calibrate_without_ground_truth_keeps_the_pixel_threshold(
    model_dir: Path, category: Path, tmp_path
) -> None:
    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    plain = image_only_copy(category, tmp_path / "plain")
    before = json.loads((model / "model.json").read_text())["thresholds"]["pixel"]
    assert main(["calibrate", str(model), str(plain), "--quiet", "--device", "cpu"]) == 0
    thresholds = json.loads((model / "model.json").read_text())["thresholds"]
    assert thresholds["image"]["method"] == "f1" and thresholds["pixel"] == before
