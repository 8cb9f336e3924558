"""predict and evaluate with --engine ray: the local results, a killed worker retried, an interrupted run
resumed (and refused with another model), and the engine's one-line errors."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import BOTTLE, make_category, needs
from PIL import Image

from gaussad.cli import main
from gaussad.cluster.parts import StagedRun
from gaussad.decisions import manual_threshold
from gaussad.errors import GaussADError

RUN = ["--device", "cpu", "--quiet", "--batch-size", "2"]  # shards of 8 images
RAY = ["--engine", "ray"]


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory) -> dict[str, Path]:
    """The shared tiny model saved as it is, with another image threshold, and without thresholds."""
    from gaussad import GaussAD

    folder = tmp_path_factory.mktemp("models")
    tiny.save(folder / "calibrated")
    model = GaussAD.load(folder / "calibrated", device="cpu")  # a copy to change
    model.image_threshold_ = manual_threshold(2 * tiny.image_threshold_.value, tiny.image_threshold_, "image")
    model.save(folder / "other")
    model.image_threshold_ = model.pixel_threshold_ = None
    model.save(folder / "uncalibrated")
    return {name: folder / name for name in ("calibrated", "other", "uncalibrated")}


@pytest.fixture
def images(category: Path, tmp_path) -> Path:
    """24 images (test/ then train/good/): three shards."""
    for part in ("test", "train"):
        shutil.copytree(category / part, tmp_path / "images" / part)
    return tmp_path / "images"


def predict(model: Path, images: Path, out: Path, *options: str) -> int:
    return main(["predict", str(model), str(images), "-o", str(out), *RUN, *options])


@pytest.fixture
def one_thread(torch_threads) -> None:
    """Local runs on one thread, as the Ray actors here run (two actors on two CPUs): float32 results
    depend on the thread count in their last bits (about 2e-6 of a score)."""
    torch_threads(1)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def assert_same_outputs(ray_out: Path, local_out: Path) -> None:
    """Same rows and decisions, scores to 1e-6 relative, maps to 5e-5, the same pictures (within one
    colour level), and predictions.parquet holding the CSV's values. The maps' tolerance is the hybrid
    map's mixtures': their clusters' Gaussians are tighter than one per level, and the backbone's float32
    differences between batchings (about 1e-6) show in their distances at about 1e-5."""
    ours, theirs = read_csv(ray_out / "predictions.csv"), read_csv(local_out / "predictions.csv")
    assert [row["path"] for row in ours] == [row["path"] for row in theirs]
    for mine, local in zip(ours, theirs, strict=True):
        assert float(mine["score"]) == pytest.approx(float(local["score"]), rel=1e-6)
        for column in ("is_anomalous", "defect_area", "defect_regions", "defect_box", "error"):
            assert mine[column] == local[column], (mine["path"], column)
    files = sorted(p.relative_to(local_out) for p in local_out.rglob("*") if p.is_file())
    assert sorted(p.relative_to(ray_out) for p in ray_out.rglob("*") if p.is_file()) == sorted(
        [*files, Path("predictions.parquet")]
    )
    for name in files:
        if name.suffix == ".npy":
            np.testing.assert_allclose(
                np.load(ray_out / name), np.load(local_out / name), rtol=5e-5, atol=1e-5
            )
        elif name.suffix == ".png":  # maps a hair apart may fall on two sides of a colour or the threshold
            mine, local = (np.asarray(Image.open(out / name)) for out in (ray_out, local_out))
            assert (mine != local).reshape(*mine.shape[:2], -1).any(axis=-1).mean() < 0.01, name
    table = pq.read_table(ray_out / "predictions.parquet")
    assert table.column_names == ["path", "score", "normalized_score", "is_anomalous"]
    assert table.column("path").to_pylist() == [row["path"] for row in theirs]
    np.testing.assert_allclose(
        table.column("score").to_numpy(), [float(row["score"]) for row in theirs], 1e-6
    )
    flags = [None if row["is_anomalous"] == "" else row["is_anomalous"] == "1" for row in theirs]
    assert table.column("is_anomalous").to_pylist() == flags


def test_ray_predict_equals_local(ray_local, one_thread, models, images: Path, tmp_path, capsys) -> None:
    assert predict(models["calibrated"], images, tmp_path / "local", "--overlays") == 0
    assert predict(models["calibrated"], images, tmp_path / "ray", "--overlays", *RAY, "--actors", "2") == 0
    assert "scored 24 images, " in capsys.readouterr().out
    assert_same_outputs(tmp_path / "ray", tmp_path / "local")
    assert not (tmp_path / "ray" / ".parts").exists() and not (tmp_path / ".ray.ray").exists()


def _busy_scorers() -> list[int]:
    """The process ids of the actors scoring a shard now (their title names the method)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(
                b"ray::ShardScorer.score"
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@contextmanager
def killing_a_busy_scorer() -> Iterator[list[int]]:
    """While inside, kill (SIGKILL) the first actor seen scoring a shard; the list names its process."""
    killed: list[int] = []
    stop = threading.Event()

    def kill() -> None:
        while not stop.is_set() and not killed:
            for pid in _busy_scorers()[:1]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended between the look and the kill
                    continue
                killed.append(pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker to kill in /proc")
def test_an_interrupted_run_resumes_through_a_killed_worker_and_another_model_is_refused(
    ray_local, one_thread, models, images: Path, tmp_path, capsys
) -> None:
    # train/good/003.png is in the second of three shards: with one actor, the first is written, then the
    # run stops there.
    broken = images / "train" / "good" / "003.png"
    good = broken.read_bytes()
    broken.write_bytes(b"not an image")
    out = tmp_path / "ray"
    options = [*RAY, "--actors", "1"]
    assert predict(models["uncalibrated"], images, out, *options, "--on-error", "stop") == 2
    assert "003.png" in capsys.readouterr().err
    staged = tmp_path / ".ray.ray" / ".parts"
    # The first shard, and perhaps the third, given to the actor as the second failed.
    parts = sorted(part.name for part in staged.glob("part-*"))
    assert parts[0] == "part-000000000.parquet" and "part-000000008.parquet" not in parts
    assert not out.exists()
    broken.write_bytes(good)

    assert predict(models["calibrated"], images, out, *options) == 2
    error = capsys.readouterr().err.strip()
    assert "holds an unfinished run with another model or other inputs" in error and "\n" not in error
    assert staged.is_dir()

    with killing_a_busy_scorer() as killed:  # Ray restarts the actor and scores its shard again
        assert predict(models["uncalibrated"], images, out, *RAY, "--actors", "2") == 0
    assert killed, "no worker was killed: the run ended first"
    resumed = 8 * len(parts)  # only the missing shards were scored again
    assert f"scored 24 images ({resumed} resumed from the interrupted run)" in capsys.readouterr().out
    assert predict(models["uncalibrated"], images, tmp_path / "local") == 0
    assert_same_outputs(out, tmp_path / "local")


def test_restart_discards_an_unfinished_run_of_another_model(tmp_path) -> None:
    folder = tmp_path / ".out.ray"
    StagedRun.open(folder, {"model_sha256": "a"}, restart=False).begin()
    (folder / "maps").mkdir()
    with pytest.raises(GaussADError, match="pass --restart"):
        StagedRun.open(folder, {"model_sha256": "b"}, restart=False)
    StagedRun.open(folder, {"model_sha256": "a"}, restart=False)  # the same run: kept
    assert (folder / "maps").is_dir()
    StagedRun.open(folder, {"model_sha256": "b"}, restart=True).begin()
    assert not (folder / "maps").exists() and (folder / ".parts" / "manifest.json").is_file()


def test_ray_evaluate_equals_local(ray_local, tmp_path, min_images_for_grid: int, monkeypatch) -> None:
    # The workers fit each category with the library's own line for the grid (this process's fixture does
    # not reach them): so does the local run here.
    monkeypatch.setattr("gaussad.model.MIN_IMAGES_FOR_GRID", min_images_for_grid)
    for seed, name in enumerate(("alpha", "beta")):
        make_category(tmp_path / "root" / name, n_train=8, n_good=3, n_bad=3, seed=seed)
    fast = ["--image-size", "64", "--batch-size", "4", "--device", "cpu", "--quiet", "--folds", "2"]
    root = str(tmp_path / "root")
    assert main(["evaluate", root, *fast, "--json", str(tmp_path / "local.json")]) == 0
    assert main(["evaluate", root, *fast, *RAY, "--json", str(tmp_path / "ray.json")]) == 0
    local, ray = (json.loads((tmp_path / f"{kind}.json").read_text()) for kind in ("local", "ray"))
    assert [c["category"] for c in ray["categories"]] == ["alpha", "beta"]
    for mine, theirs in zip(ray["categories"], local["categories"], strict=True):
        for key in (
            "image_auroc",
            "pixel_auroc",
            "aupro",
            "image_threshold",
            "false_alarm_rate",
            "miss_rate",
        ):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
        assert (mine["n_train"], mine["n_test"]) == (theirs["n_train"], theirs["n_test"])


def test_engine_errors_are_one_line(models, tmp_path, capsys) -> None:
    assert main(["predict", str(tmp_path / "m.onnx"), str(tmp_path), "-o", str(tmp_path / "o"), *RAY]) == 2
    assert "--engine ray scores model folders" in capsys.readouterr().err
    assert (
        main(
            ["predict", str(models["calibrated"]), str(tmp_path), "-o", str(tmp_path / "o"), "--actors", "2"]
        )
        == 2
    )
    assert "--actors applies to --engine ray only" in capsys.readouterr().err
    # A subprocess: this one may be connected to the tests' cluster, which any address would reuse.
    command = [sys.executable, "-m", "gaussad.cli", "evaluate", str(tmp_path), *RAY, "--address", "nowhere"]
    make_category(tmp_path / "widget", n_train=4, n_good=1, n_bad=1)
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "gaussad: error: cannot connect to the Ray cluster at nowhere: Invalid address format: nowhere"
    )


@pytest.mark.slow
@needs(BOTTLE)
def test_ray_predict_equals_local_on_bottle(ray_local, torch_threads, tmp_path) -> None:
    from gaussad import GaussAD

    train = sorted((BOTTLE / "train" / "good").glob("*.png"))[:16]
    GaussAD(device="cpu", batch_size=8).fit(train).save(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for kind in ("good", "broken_large"):
        for path in sorted((BOTTLE / "test" / kind).glob("*.png"))[:6]:
            shutil.copy(path, images / f"{kind}_{path.name}")
    common = ["predict", str(tmp_path / "model"), str(images), *RUN]
    torch_threads(1)  # as each of the two actors (two shards: two actors on one CPU each)
    assert main([*common, "-o", str(tmp_path / "local")]) == 0
    assert main([*common, "-o", str(tmp_path / "ray"), *RAY, "--actors", "2"]) == 0
    assert_same_outputs(tmp_path / "ray", tmp_path / "local")
