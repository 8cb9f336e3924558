"""Measure the choices behind the defaults: backbone, input size, localization variant, map levels, blur.

For each (backbone, input size, localization) the model is fitted once with every candidate level, the
per-level results on the test set are kept, and every contiguous range of map levels and every blur is
scored from them, so the whole grid costs one feature pass per configuration. Writes a Markdown table.

    python benchmarks/tune_maps.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        --out benchmarks/results/tune_maps.md
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from gaussad.analysis import level_results
from gaussad.evaluation import read_mask
from gaussad.layout import list_test_images, training_images
from gaussad.maps import combine_maps, resize_map
from gaussad.metrics import image_auroc, pixel_metrics
from gaussad.model import GaussAD
from gaussad.tuning import cpu_tuning

CANDIDATE_LEVELS = (2, 3, 4, 5, 6, 7)
BLURS = (0.0, 2.0, 4.0, 8.0)


def contiguous_ranges(levels: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [levels[i:j] for i, j in itertools.combinations(range(len(levels) + 1), 2)]


def run(
    category: Path, backbone: str, image_size: int | None, localization: str, eval_size: int
) -> list[dict]:
    train, tests = training_images(category), list_test_images(category)
    model = GaussAD(
        backbone=backbone, image_size=image_size, localization=localization, map_levels=CANDIDATE_LEVELS
    )
    started = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - started
    results = level_results(model, [t.path for t in tests])
    distances, level_maps, position_maps = results.distances, results.level_maps, results.position_maps
    labels = np.array([t.label for t in tests])
    masks = [read_mask(t, (eval_size, eval_size)) for t in tests]
    image_score_auroc = image_auroc(labels, distances.sum(axis=1))

    rows = []
    for levels in contiguous_ranges(CANDIDATE_LEVELS):
        chosen = [level_maps[CANDIDATE_LEVELS.index(level)] for level in levels]
        for blur in BLURS:
            combined = combine_maps(chosen, position_maps, model.input_size_, blur)
            maps = [resize_map(m, (eval_size, eval_size)).numpy() for m in combined]
            pixel_auroc, aupro = pixel_metrics(masks, maps)
            rows.append(
                {
                    "category": category.name,
                    "backbone": backbone,
                    "size": model.image_size_,
                    "localization": localization,
                    "map_levels": "-".join(map(str, levels)),
                    "blur": blur,
                    "image_auroc": image_score_auroc,
                    "pixel_auroc": pixel_auroc,
                    "aupro": aupro,
                    "fit_s": fit_seconds,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[0], help="input sizes; 0 = native")
    parser.add_argument("--localizations", nargs="+", default=["hybrid", "shared", "per-position"])
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--top", type=int, default=8, help="best rows per category and configuration")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    lines = [
        "# Map defaults: backbone, input size, localization, map levels, blur",
        "",
        f"Command: `python benchmarks/tune_maps.py {' '.join(map(str, args.categories))} "
        f"--backbones {' '.join(args.backbones)} --sizes {' '.join(map(str, args.sizes))} "
        f"--localizations {' '.join(args.localizations)} --eval-size {args.eval_size} --top {args.top}`",
        "",
        f"Metrics at {args.eval_size}x{args.eval_size}; "
        "image AUROC is the model's image score (default image levels and grid, whatever the map levels).",
        f"Per configuration, the {args.top} best map settings by pixel AUROC + AUPRO.",
        "",
        "| category | backbone | size | localization | map levels | blur "
        "| image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for category, backbone, size, localization in itertools.product(
        args.categories, args.backbones, args.sizes, args.localizations
    ):
        with cpu_tuning():  # as the CLI runs gaussad: faster, the same results
            rows = run(category, backbone, size or None, localization, args.eval_size)
        rows.sort(key=lambda row: -(row["pixel_auroc"] + row["aupro"]))
        for row in rows[: args.top]:
            lines.append(
                f"| {row['category']} | {row['backbone']} | {row['size']} | {row['localization']} | "
                f"{row['map_levels']} | {row['blur']:g} | {row['image_auroc']:.4f} | "
                f"{row['pixel_auroc']:.4f} | {row['aupro']:.4f} |"
            )
        print("\n".join(lines[-args.top :]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
