r"""How many training images the image score's grid needs: the combined score with its grid and without it,
fitted on N training images drawn at random, measured on the whole test set.

    python benchmarks/tune_grid_images.py ../shared/datasets/mvtec_ad/bottle \
        ../shared/datasets/magnetic_tile --images 30 60 100 150 209 300 450 714 \
        --out benchmarks/results/tune_grid_images
    python benchmarks/tune_grid_images.py ../shared/datasets/magnetic_tile --images 80 120 \
        --out benchmarks/results/tune_grid_images
    python benchmarks/tune_grid_images.py ../shared/datasets/magnetic_tile --images 60 100 150 --seed 2000 \
        --out benchmarks/results/tune_grid_images
    python benchmarks/tune_grid_images.py ~/.cache/gaussad/stress/magnetic_tile-light \
        ~/.cache/gaussad/stress/magnetic_tile-focus --images 100 150 209 300 \
        --out benchmarks/results/tune_grid_images
    python benchmarks/tune_grid_images.py ../shared/datasets/magnetic_tile --images 100 300 150 209 \
        --backbone efficientnet_lite2 --out benchmarks/results/tune_grid_images

The grid's Gaussians learn from one pooled vector per image and cell. `with the grid` is the defaults with
`gaussad.model.MIN_IMAGES_FOR_GRID` set to 0 for the run (the grid at any number of images), `without the
grid` the combined score of the score map's top share and the whole frame's pooling of levels 3-7, which
the defaults take below that line; the maps are the same in both. Each subset is a folder of links under
~/.cache/gaussad/subsets (train/good: the images drawn, with numpy's generator seeded seed + N; test and
ground_truth: the set's own); N at or above the set's training images fits them all. `--backbone` fits
another backbone at its native input size (its rows named after the set and the backbone). Each finished
row goes to OUT.json at once, and a rerun skips the rows already there.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from bench_rows import Rows
from tune_defaults import evaluate

import gaussad.model
from gaussad.layout import training_images
from gaussad.tuning import cpu_tuning

WITHOUT_GRID = {"image_score": "combined", "levels": (3, 4, 5, 6, 7), "image_grid": 1, "global_levels": ()}
SETTINGS = ("with the grid", "without the grid")
METRICS = ("image_auroc", "false_alarm_rate", "miss_rate", "pixel_auroc", "aupro", "fit_seconds")
SUBSETS = Path.home() / ".cache" / "gaussad" / "subsets"
DEFAULT_BACKBONE = "efficientnet_lite0"
HEADER = f"""# The image score's grid and the number of training images

{__doc__.split(chr(10) * 2, 1)[1]}
The false alarms and misses are at the label-free threshold (1% target), each pair with / without the grid.
"""


@contextmanager
def grid_at_any_count() -> Iterator[None]:
    """The defaults as they were before the line: the grid kept whatever the number of images."""
    line = gaussad.model.MIN_IMAGES_FOR_GRID
    gaussad.model.MIN_IMAGES_FOR_GRID = 0
    try:
        yield
    finally:
        gaussad.model.MIN_IMAGES_FOR_GRID = line


def subset(category: Path, count: int, seed: int, root: Path = SUBSETS) -> Path:
    """A category of `count` of its training images drawn at random (all of them from their number up), as
    a folder of links under `root`, made once."""
    train = training_images(category)
    if count >= len(train):
        return category
    folder = root / f"{category.name}-{count}-{seed}"
    if not folder.exists():
        drawn = sorted(np.random.default_rng(seed + count).choice(len(train), count, replace=False))
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
        (partial / "train" / "good").mkdir(parents=True)
        for index in drawn:
            (partial / "train" / "good" / train[index].name).symlink_to(train[index].resolve())
        for part in ("test", "ground_truth"):
            if (category / part).exists():
                (partial / part).symlink_to((category / part).resolve())
        partial.rename(folder)
    return folder


def run(category: Path, setting: str, backbone: str = DEFAULT_BACKBONE) -> dict[str, Any]:
    """One `gaussad evaluate` of a setting (`tune_defaults.evaluate`): its metrics and fit time."""
    with_grid = setting == "with the grid"
    with grid_at_any_count() if with_grid else nullcontext():
        row = evaluate(category, {"backbone": backbone} | ({} if with_grid else WITHOUT_GRID))
    return {metric: row[metric] for metric in METRICS}


def table(rows: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> str:
    """Per data set, one line per number of images and draw: each setting's image AUROC, false alarms and
    misses at the label-free threshold, and the difference in image AUROC."""
    lines = []
    for dataset, by_draw in rows.items():
        lines += [f"### {dataset}", ""]
        lines += [
            "| training images | image AUROC with / without the grid | difference | false alarms | misses |",
            "|---|---|---|---|---|",
        ]
        for draw, by_setting in by_draw.items():
            if not all(setting in by_setting for setting in SETTINGS):
                continue
            grid, other = (by_setting[setting] for setting in SETTINGS)
            lines.append(
                f"| {draw} | {grid['image_auroc']:.4f} / {other['image_auroc']:.4f} | "
                f"{other['image_auroc'] - grid['image_auroc']:+.4f} | "
                f"{grid['false_alarm_rate']:.1%} / {other['false_alarm_rate']:.1%} | "
                f"{grid['miss_rate']:.1%} / {other['miss_rate']:.1%} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--images", nargs="+", type=int, required=True, help="training images per fit")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="at its native input size")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    rows = Rows(args.out)
    with cpu_tuning():
        for count in args.images:
            for category in args.categories:
                n_train = len(training_images(category))
                if count > n_train:
                    continue
                draw = f"{count} (all)" if count == n_train else f"{count}, seed {args.seed}"
                name = category.name + ("" if args.backbone == DEFAULT_BACKBONE else f", {args.backbone}")
                for setting in SETTINGS:
                    drawn = subset(category, count, args.seed)
                    rows.ensure((name, draw, setting), run, drawn, setting, args.backbone)
    rows.write_table(f"{HEADER}\n{table(rows.rows)}")


if __name__ == "__main__":
    main()
