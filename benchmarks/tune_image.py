"""Measure the choices behind the image score: pooling grid, levels and the reduction's variance.

One backbone pass per category and backbone keeps every candidate level's features pooled on every
candidate grid; each combination is then scored from those (OPCA Gaussians, per-component distances summed
over levels) without another pass. Writes Markdown.

    python benchmarks/tune_image.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        --out benchmarks/results/tune_image.md
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from gaussad.backbones import EFFICIENTNET_IMAGE_LEVELS, load_backbone
from gaussad.config import DEFAULTS
from gaussad.features import BatchRunner, pool_features
from gaussad.gaussian import fit_gaussian
from gaussad.layout import list_test_images, training_images
from gaussad.metrics import image_auroc
from gaussad.scorer import LevelFeatures
from gaussad.tuning import cpu_tuning

CANDIDATE_LEVELS = (3, 4, 5, 6, 7)
GRIDS = (1, 2, 3, 4)
VARIANCES = (0.02, 0.05, 0.1, 0.15)


def pooled_features(backbone_name: str, items: list, grids=GRIDS) -> dict[tuple[int, int], np.ndarray]:
    """(level, grid) -> (N, C * grid * grid) float64 pooled features of the images."""
    backbone = load_backbone(backbone_name).to(memory_format=torch.channels_last)  # as gaussad's fit
    runner = BatchRunner(
        LevelFeatures(backbone, CANDIDATE_LEVELS),
        backbone.preprocessing,
        backbone.preprocessing.image_size,
        torch.device("cpu"),
    )
    parts: dict[tuple[int, int], list[np.ndarray]] = {}
    for batch in runner.batches(items):
        for level, features in zip(CANDIDATE_LEVELS, batch.outputs, strict=True):
            for grid in grids:
                pooled = pool_features(features, grid).to(torch.float64).numpy()
                parts.setdefault((level, grid), []).append(pooled)
    return {key: np.concatenate(value) for key, value in parts.items()}


def level_distances(train: np.ndarray, test: np.ndarray, variance: float) -> np.ndarray:
    return fit_gaussian(train, "opca", variance).component_distances(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    ranges = [
        CANDIDATE_LEVELS[i:j]
        for i, j in itertools.combinations(range(len(CANDIDATE_LEVELS) + 1), 2)
        if j - i >= 2
    ]
    command = (
        f"python benchmarks/tune_image.py {' '.join(map(str, args.categories))} "
        f"--backbones {' '.join(args.backbones)} --out {args.out}"
    )
    grid_lines = [
        "## Image AUROC by levels and grid (OPCA 0.05)",
        "",
        "| category | backbone | levels | " + " | ".join(f"grid {g} x {g}" for g in GRIDS) + " |",
        "|---|---|---|" + "---|" * len(GRIDS),
    ]
    variance_lines = [
        f"## Image AUROC by OPCA variance (default levels {EFFICIENTNET_IMAGE_LEVELS[0]}-"
        f"{EFFICIENTNET_IMAGE_LEVELS[-1]}, grid {DEFAULTS.image_grid} x {DEFAULTS.image_grid})",
        "",
        "| category | backbone | " + " | ".join(f"OPCA {v:g}" for v in VARIANCES) + " |",
        "|---|---|" + "---|" * len(VARIANCES),
    ]
    for category, backbone in itertools.product(args.categories, args.backbones):
        tests = list_test_images(category)
        labels = np.array([t.label for t in tests])
        with cpu_tuning():  # gaussad's feature extraction as the CLI runs it: faster, the same features
            train = pooled_features(backbone, training_images(category))
            test = pooled_features(backbone, [t.path for t in tests])
        with threadpool_limits(limits=1, user_api="blas"):
            distances = {
                key: level_distances(train[key], test[key], 0.05)
                for key in itertools.product(CANDIDATE_LEVELS, GRIDS)
            }
            for levels in ranges:
                aurocs = [image_auroc(labels, sum(distances[level, g] for level in levels)) for g in GRIDS]
                grid_lines.append(
                    f"| {category.name} | {backbone} | {levels[0]}-{levels[-1]} | "
                    + " | ".join(f"{a:.4f}" for a in aurocs)
                    + " |"
                )
            defaults = [(level, DEFAULTS.image_grid) for level in EFFICIENTNET_IMAGE_LEVELS]
            aurocs = [
                image_auroc(labels, sum(level_distances(train[key], test[key], v) for key in defaults))
                for v in VARIANCES
            ]
        variance_lines.append(
            f"| {category.name} | {backbone} | " + " | ".join(f"{a:.4f}" for a in aurocs) + " |"
        )
        text = ["# Image score: grid, levels, variance", "", f"Command: `{command}`", ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join([*text, *grid_lines, "", *variance_lines, ""]))
        print(f"{category.name} {backbone} done", flush=True)


if __name__ == "__main__":
    main()
