"""Measure the hybrid map's choices: which levels the per-position Gaussian stacks, and how its map is mixed.

For each category and set of position levels the hybrid model is fitted once (default map levels and blur);
the shared map S and the position map P of every test image then give every mix S^(1 - a) * P^a without
another feature pass: a = 0 is the shared map alone, a = 1 the position map alone, a = 0.5 the geometric
mean that `localization="hybrid"` uses. Writes a Markdown table.

    python benchmarks/tune_position.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        --out benchmarks/results/tune_position.md
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from gaussad.analysis import level_results
from gaussad.evaluation import read_mask
from gaussad.layout import list_test_images, training_images
from gaussad.maps import combine_maps, resize_map
from gaussad.metrics import pixel_metrics
from gaussad.model import GaussAD
from gaussad.tuning import cpu_tuning

POSITION_LEVEL_SETS = ((2, 3, 5), (3, 5), (3, 4, 5), (5,))
WEIGHTS = (0.0, 0.35, 0.5, 0.65, 1.0)


def run(category: Path, backbone: str, position_levels: tuple[int, ...], eval_size: int) -> list[dict]:
    """Pixel AUROC and AUPRO of every mix weight for one set of position levels."""
    tests = list_test_images(category)
    model = GaussAD(
        backbone=backbone, localization="hybrid", position_levels=position_levels, folds=0, crop="none"
    )
    model.fit(training_images(category))
    results = level_results(model, [t.path for t in tests])
    shared = combine_maps(results.level_maps, None, model.input_size_, model.blur_sigma)
    positional = combine_maps([results.position_maps], None, model.input_size_, model.blur_sigma)
    size = (eval_size, eval_size)
    masks = [read_mask(t, size) for t in tests]
    rows = []
    for weight in WEIGHTS:
        mixed = shared ** (1 - weight) * positional**weight
        pixel_auroc, aupro = pixel_metrics(masks, [resize_map(m, size).numpy() for m in mixed])
        rows.append({"weight": weight, "pixel_auroc": pixel_auroc, "aupro": aupro})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    lines = [
        "# Hybrid maps: position levels and mix weight",
        "",
        f"Command: `python benchmarks/tune_position.py {' '.join(map(str, args.categories))} "
        f"--backbone {args.backbone} --eval-size {args.eval_size}`",
        "",
        f"Pixel metrics at {args.eval_size}x{args.eval_size}. Map: S^(1 - a) * P^a, S the shared map",
        "(default map levels and blur), P the map of one Gaussian per position over the listed levels",
        "stacked on the coarsest one's grid (all features, Ledoit-Wolf). a = 0: shared alone; 0.5: the",
        "hybrid default (geometric mean); 1: position alone.",
        "",
        "| category | position levels | a | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|",
    ]
    for category, position_levels in itertools.product(args.categories, POSITION_LEVEL_SETS):
        with cpu_tuning():  # as the CLI runs gaussad: faster, the same results
            rows = run(category, args.backbone, position_levels, args.eval_size)
        for row in rows:
            lines.append(
                f"| {category.name} | {'-'.join(map(str, position_levels))} | {row['weight']:g} | "
                f"{row['pixel_auroc']:.4f} | {row['aupro']:.4f} |"
            )
        print("\n".join(lines[-len(WEIGHTS) :]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
