"""The image score on aligned and unaligned data: pooled features (on a grid or globally) against the
mean of the anomaly map's top values, and their sum after each is scaled by its median on the training
images.

    python benchmarks/tune_score.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        ~/.cache/gaussad/stress/*-rotate ~/.cache/gaussad/stress/*-crop --out benchmarks/results/tune_score.md

One fit per data set and image grid (defaults otherwise, hybrid maps); image AUROC of every score.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gaussad.analysis import level_results
from gaussad.layout import list_test_images, training_images
from gaussad.maps import combine_maps
from gaussad.metrics import image_auroc
from gaussad.model import GaussAD
from gaussad.tuning import cpu_tuning

TOP_SHARES = (0.001, 0.01, 0.05)
GRIDS = (4, 1)


def map_tops(model: GaussAD, paths: list[Path], shares: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Pooled score and, per share, the mean of the top values of the hybrid and the shared map."""
    results = level_results(model, paths)
    size = model.input_size_
    shared = combine_maps(results.level_maps, None, size, model.blur_sigma).flatten(1)
    hybrid = combine_maps(results.level_maps, results.position_maps, size, model.blur_sigma).flatten(1)
    scores = {"pooled": results.distances.sum(axis=1)}
    for share in shares:
        k = max(1, int(share * shared.shape[1]))
        scores[f"hybrid top {share:g}"] = hybrid.topk(k, dim=1).values.mean(dim=1).numpy()
        scores[f"shared top {share:g}"] = shared.topk(k, dim=1).values.mean(dim=1).numpy()
    return scores


def run(category: Path) -> dict[str, float]:
    tests = list_test_images(category)
    labels = np.array([t.label for t in tests])
    train = training_images(category)
    row: dict[str, float] = {}
    for grid in GRIDS:
        model = GaussAD(image_grid=grid, folds=0, crop="none").fit(train)
        test = map_tops(model, [t.path for t in tests], TOP_SHARES)
        reference = map_tops(model, train[::4], TOP_SHARES)  # a scale for each score, no labels
        scaled = {name: values / np.median(reference[name]) for name, values in test.items()}
        for name, values in test.items():
            if name == "pooled" or grid == GRIDS[0]:
                row[f"grid {grid} {name}" if name == "pooled" else name] = image_auroc(labels, values)
        for share in TOP_SHARES:
            summed = scaled["pooled"] + scaled[f"hybrid top {share:g}"]
            row[f"grid {grid} pooled + hybrid top {share:g}"] = image_auroc(labels, summed)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = {}
    with cpu_tuning():
        for category in args.categories:
            started = time.perf_counter()
            rows[category.name] = run(category)
            print(f"{category.name}: {time.perf_counter() - started:.0f} s", flush=True)
    names = list(next(iter(rows.values())))
    lines = [
        "Image AUROC of image scores (defaults otherwise: Lite0, 224 px, hybrid maps).",
        "",
        "| score | " + " | ".join(rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{row[name]:.4f}" for row in rows.values()) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
