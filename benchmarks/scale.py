"""Scale: fit and predict with the local engine and on Ray (one worker, two), the fit's peak memory against
the number of training images, and projections to 100,000 training images and 10 million scored ones.

Speed (`speed`): fits the default model on a category's training images in this process, with the local
engine and with `engine="ray"` on a local cluster of 1 and 2 workers (the fit starts and stops the cluster,
as `gaussad fit --engine ray` does), and with 2 workers and no feature store, alternating over `--rounds`;
then scores the test images with `gaussad predict` and `gaussad predict --engine ray --actors 1|2`. Ray's
overhead on one machine is the difference from the local engine. The projection takes, from the measured
runs, the backbone pass's cost per image on one worker, the driver's cost per image (storing and merging
each shard, then the statistics) and the fixed start-up, and the bytes a shard sends to the driver; it assumes
workers add up linearly, as the shards are independent, and says so.

Memory (`memory`): writes N training images made from the category's own (random 90-100% crops and
flips, seeded) under --cache, then runs `gaussad fit --feature-store S` on the first 500, N / 2 and all N
for each store S, reading each run's peak resident memory (the fitting process; Ray workers are other
processes) and the disk store's size.

    python benchmarks/scale.py speed ../shared/datasets/magnetic_tile --out benchmarks/results/scale.md
    python benchmarks/scale.py memory ../shared/datasets/magnetic_tile --images 5000 \
        --feature-stores disk memory none --out benchmarks/results/scale-memory.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_description
from PIL import Image

from gaussad import GaussAD, __version__
from gaussad.layout import list_test_images, training_images
from gaussad.mixture import PatchSample
from gaussad.selection import synthetic_sample

GAUSSAD = [sys.executable, "-m", "gaussad.cli"]
FIT_TARGET, SCORE_TARGET = 100_000, 10_000_000
NODES = (1, 4, 16, 64)
WORKERS_PER_NODE = 8  # CPU workers per node in the projection (one per core of an 8-core node)
NETWORK_BYTES_PER_S = 1.0e9  # driver's network intake in the projection (10 GbE, about 1 GB/s)


def run(command: list[str]) -> tuple[float, int]:
    """Run a command; its wall seconds and its own peak resident memory in bytes (Linux: os.wait4)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def level_shapes(model: GaussAD) -> list[tuple[int, int, bool]]:
    """(positions, channels, per position) of what the fit accumulates: each level of the anomaly and the
    score map, then the stacked position levels of hybrid maps."""
    state = model.state_
    grids = model.scorer_.features.grids(state.input_size)
    per_position = state.localization == "per-position"
    shapes = []
    for level, gaussian in zip(state.map_gaussian_levels, state.map_gaussians, strict=True):
        height, width = grids[level]
        shapes.append((height * width, gaussian.mean.shape[-1], per_position))
    if state.position_gaussian is not None:
        positions, channels = state.position_gaussian.mean.shape
        shapes.append((positions, channels, True))
    return shapes


def shard_bytes(model: GaussAD, shard_images: int, stored: bool = True) -> int:
    """Bytes one shard sends to the driver: per accumulated level its float64 moments (per fold: sums and
    outer sums; per position: outer sums) and its images' float32 feature vectors; the pooled features
    (grid and global), the mixture levels' patch samples and the images sampled for synthetic defects.
    Without a store (`stored` False), no vectors but, in the later passes, each level's fourth-moment sums
    per case, per position the outer sums of the (at most two) folds in the shard, and three float64
    numbers per image (its held-out maps')."""
    state = model.state_
    folds = max(model.folds, 1)
    pooled = [*state.image_gaussians, *state.global_gaussians]
    total = 4 * shard_images * sum(g.mean.shape[-1] for g in pooled)
    sample = PatchSample.for_images(state.n_train)
    if state.selection:  # the images sampled for synthetic defects, as model inputs (uint8)
        height, width = state.input_size
        sampled = round(shard_images * len(synthetic_sample(state.n_train)) / state.n_train)
        total += sampled * 3 * height * width
    for level in state.mixture_levels:
        channels = state.map_gaussians[state.map_gaussian_levels.index(level)].mean.shape[-1]
        total += 4 * shard_images * sample.per_image * channels
    for positions, channels, per_position in level_shapes(model):
        sums = folds * (positions if per_position else 1) * channels
        outer = folds * channels**2 + (positions * channels**2 if per_position else 0)
        total += 8 * (sums + outer)
        if stored:
            total += 4 * shard_images * positions * channels
        else:
            quartics = (folds + 1) * (positions if per_position else 1)
            total += 8 * (quartics + (2 * positions * channels**2 if per_position else 0))
    return total + (0 if stored else 8 * 3 * shard_images)


def speed(args: argparse.Namespace) -> str:
    from gaussad.cluster.sharing import BATCHES_PER_SHARD

    category = Path(args.category)
    train = training_images(category)
    tests = [item.path for item in list_test_images(category)]
    engines = {"local": {}, "ray, 1 worker": {"engine": "ray", "actors": 1}}
    engines["ray, 2 workers"] = {"engine": "ray", "actors": 2}
    # Fitted only: without a feature store the workers run the backbone three times; prediction is alike.
    unstored = {"ray, 2 workers, no feature store": {"engine": "ray", "actors": 2, "feature_store": "none"}}
    fits: dict[str, list[tuple[float, float]]] = {name: [] for name in {**engines, **unstored}}
    model = None
    for _ in range(args.rounds):
        for name, options in {**engines, **unstored}.items():
            fitted = GaussAD(device="cpu", **options).fit(train)
            fits[name].append((fitted.fit_seconds_, fitted.pass_seconds_))
            model = model if options.get("feature_store") else fitted
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        model.save(folder)
        predicts: dict[str, list[float]] = {name: [] for name in engines}
        for round_ in range(args.rounds):
            for name, options in engines.items():
                extra = ["--engine", "ray", "--actors", str(options["actors"])] if options else []
                output = Path(scratch) / f"out-{round_}-{len(extra)}-{options.get('actors', 0)}"
                command = [*GAUSSAD, "predict", str(folder), *map(str, tests), "-o", str(output)]
                predicts[name].append(run([*command, "--quiet", *extra])[0])
    median = {
        name: tuple(statistics.median(v[i] for v in runs) for i in (0, 1)) for name, runs in fits.items()
    }
    n_train, n_test = len(train), len(tests)
    local_fit, local_pass = median["local"]
    one_fit, one_pass = median["ray, 1 worker"]
    two_fit, two_pass = median["ray, 2 workers"]
    statistics_per_image = (local_fit - local_pass) / n_train
    worker_pass_per_image = local_pass / n_train  # one process's backbone pass
    ray_fixed = one_pass - local_pass  # start-up, actors loading the backbone, the driver's intake
    predict_local = statistics.median(predicts["local"])
    predict_one = statistics.median(predicts["ray, 1 worker"])
    predict_per_image = predict_local / n_test
    predict_fixed = predict_one - predict_local
    shard_images = BATCHES_PER_SHARD * model.batch_size
    per_shard = shard_bytes(model, shard_images)
    per_shard_unstored = shard_bytes(model, shard_images, stored=False)
    lines = [
        "# Scale: the local engine and Ray on one machine, and projections",
        "",
        f"gaussad {__version__}, {cpu_description()}; category `{category.name}`: fit on {n_train} training "
        f"images, predict on {n_test} test images; default model, CPU; medians of {args.rounds} "
        "alternating rounds.",
        "",
        "    " + " ".join(["python benchmarks/scale.py speed", str(category), "--rounds", str(args.rounds)]),
        "",
        "| engine | fit (s) | of which the images' pass (s) | fit images/s | predict (s, CLI) | "
        "predict images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in {**engines, **unstored}:
        fit_seconds, pass_seconds = median[name]
        predicted = "- | -"  # not run: prediction does not depend on the feature store
        if name in predicts:
            seconds = statistics.median(predicts[name])
            predicted = f"{seconds:.1f} | {n_test / seconds:.1f}"
        lines.append(
            f"| {name} | {fit_seconds:.1f} | {pass_seconds:.1f} | {n_train / fit_seconds:.1f} | {predicted} |"
        )
    lines += [
        "",
        f"Ray's overhead on one machine: fit {one_fit - local_fit:+.1f} s with one worker and "
        f"{two_fit - local_fit:+.1f} s with two; predict {predict_one - predict_local:+.1f} s and "
        f"{statistics.median(predicts['ray, 2 workers']) - predict_local:+.1f} s (start-up of the local "
        "cluster, actors loading the backbone, shards' round trips). This machine has "
        f"{os.cpu_count()} cores: two workers share them with the driver, so they cannot be twice as fast.",
        "",
        "## Projection",
        "",
        f"From the runs above: the backbone pass costs {1000 * worker_pass_per_image:.1f} ms per training "
        f"image on one process, the statistics after it {1000 * statistics_per_image:.2f} ms per image on "
        f"the driver (reading the feature store back; the synthetic defects and the mixtures, whose cost "
        f"is bounded, counted per image too), Ray adds {ray_fixed:.1f} s once; predict costs "
        f"{1000 * predict_per_image:.1f} ms per image (decode, model, map, outputs), Ray adds "
        f"{predict_fixed:.1f} s once. A shard of {shard_images} images sends the driver "
        f"{per_shard / 1e6:.1f} MB (moments, feature vectors, pooled features, patch samples), "
        f"{per_shard / shard_images / 1e3:.0f} kB per image. Assumed: {WORKERS_PER_NODE} CPU workers per "
        "node, each as fast as one process here; workers add up linearly (shards are independent); the "
        f"driver takes in shards at {NETWORK_BYTES_PER_S / 1e9:.0f} GB/s and spends the measured driver "
        "cost per image; scoring needs no driver (each worker writes its own outputs).",
        "",
        "Without a feature store (`--feature-store none`) the workers run three backbone passes and the "
        "statistics the driver ran (fourth moments, held-out maps), and a shard sends "
        f"{per_shard_unstored / 1e6:.1f} MB over the three passes (moments, pooled features, the fourth-"
        "moment and fold sums, three numbers per image): assumed the same per-image statistics cost, "
        "spread over the workers, and three actor start-ups.",
        "",
        f"| nodes | workers | fit {FIT_TARGET:,} images | of which the driver "
        f"| fit {FIT_TARGET:,}, no feature store | score {SCORE_TARGET:,} images |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for nodes in NODES:
        workers = nodes * WORKERS_PER_NODE
        intake = FIT_TARGET * per_shard / shard_images / NETWORK_BYTES_PER_S
        driver = FIT_TARGET * statistics_per_image + intake
        fit_time = ray_fixed + max(FIT_TARGET * worker_pass_per_image / workers, intake) + driver - intake
        work_unstored = FIT_TARGET * (3 * worker_pass_per_image + statistics_per_image) / workers
        intake_unstored = FIT_TARGET * per_shard_unstored / shard_images / NETWORK_BYTES_PER_S
        unstored_time = 3 * ray_fixed + max(work_unstored, intake_unstored)
        score_time = predict_fixed + SCORE_TARGET * predict_per_image / workers
        cells = [fit_time, driver, unstored_time, score_time]
        lines.append(f"| {nodes} | {workers} | " + " | ".join(_duration(cell) for cell in cells) + " |")
    lines += [
        "",
        "With a feature store, the fit's driver work grows with the images and does not shrink with nodes: "
        "past a few dozen workers it is the bound. Without one, the workers do that work too, at three "
        "backbone passes, and the bound is the driver's intake of sums. Scoring has no such bound.",
    ]
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def write_training_set(category: Path, count: int, folder: Path) -> list[Path]:
    """`count` training images made from the category's own by a random 90-100% crop and a flip (seeded);
    kept across runs."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = training_images(category)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        shrink, left, top, flip = rng.uniform(0.9, 1.0), rng.random(), rng.random(), rng.random() < 0.5
        path = folder / f"{index:06d}.png"
        paths.append(path)
        if path.exists():
            continue
        image = Image.open(sources[index % len(sources)]).convert("RGB")
        width, height = image.size
        crop_width, crop_height = int(width * shrink), int(height * shrink)
        x, y = int(left * (width - crop_width)), int(top * (height - crop_height))
        image = image.crop((x, y, x + crop_width, y + crop_height))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(path)
    return paths


def memory(args: argparse.Namespace) -> str:
    category = Path(args.category)
    paths = write_training_set(category, args.images, Path(args.cache) / f"{category.name}-{args.images}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for count in (500, args.images // 2, args.images):
            inputs = Path(scratch) / f"train-{count}"
            inputs.mkdir()
            for path in paths[:count]:
                (inputs / path.name).symlink_to(path)
        for store in args.feature_stores:
            for count in (500, args.images // 2, args.images):
                output = str(Path(scratch) / f"m-{store}-{count}")
                command = ["fit", str(Path(scratch) / f"train-{count}"), "-o", output, "--quiet"]
                seconds, peak = run([*GAUSSAD, *command, "--feature-store", store])
                rows.append((store, count, seconds, peak))
    per_image = _feature_store_bytes_per_image(category)
    stores = " ".join(args.feature_stores)
    lines = [
        "# Scale: the fit's peak memory against the number of training images",
        "",
        f"gaussad {__version__}, {cpu_description()}; `gaussad fit` (default model, CPU) on images made from "
        f"`{category.name}`'s training images (random 90-100% crops and flips, seeded).",
        "",
        "    "
        + " ".join(
            ["python benchmarks/scale.py memory", str(category), "--images", str(args.images)]
            + ["--feature-stores", stores]
        ),
        "",
        "| feature store | training images | fit (s) | peak resident memory (MB) | against 500 "
        "| on disk (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for store, count, seconds, peak in rows:
        base = next(peak for name, _, _, peak in rows if name == store)
        on_disk = count * per_image / 1e6 if store == "disk" else 0
        growth = peak / base - 1
        cells = [store, str(count), f"{seconds:.0f}", f"{peak / 1e6:.0f}", f"{growth:+.1%}", f"{on_disk:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"The disk store (the map levels' feature vectors, float32) takes {per_image / 1e3:.0f} kB per "
        "training image in the temporary folder (`--tmp-dir`) while the fit runs, and is removed after. "
        "`memory` holds the same bytes in the fitting process; `none` keeps no features and runs the "
        "backbone over the training images twice more (the fourth moments, the held-out maps).",
    ]
    return "\n".join(lines) + "\n"


def _feature_store_bytes_per_image(category: Path) -> int:
    """Float32 bytes spilled per training image: each map level's vectors, the stacked position levels'."""
    model = GaussAD(device="cpu", folds=0).fit(training_images(category)[:4])
    return 4 * sum(positions * channels for positions, channels, _ in level_shapes(model))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("speed", "memory"))
    parser.add_argument("category", help="a category folder in MVTec AD layout")
    parser.add_argument("--rounds", type=int, default=2, help="speed: alternating rounds (default: 2)")
    parser.add_argument("--images", type=int, default=5000, help="memory: training images (default: 5000)")
    parser.add_argument(
        "--feature-stores",
        nargs="+",
        choices=("disk", "memory", "none"),
        default=["disk", "memory", "none"],
        help="memory: the fit's feature stores to measure (default: all three)",
    )
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "gaussad" / "scale"))
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()
    text = speed(args) if args.mode == "speed" else memory(args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
