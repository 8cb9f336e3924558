"""The paper's ablations on our data: the reduction (Table 4 / Fig. 5) and single levels (Table 5).

For each category, backbone and reduction (all features, OPCA 0.05, OPCA 0.15, PCA 0.95, each with the
default 4 x 4 image grid, and OPCA 0.05 with the paper's global pooling) the model is fitted once with every
level 3..7 for both the image score and the map; per-level results on the test set then give the default
combination and each single level, without another feature pass. Writes Markdown.

    python benchmarks/ablations.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        --out benchmarks/results/ablations.md
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from gaussad.analysis import level_results
from gaussad.backbones import EFFICIENTNET_IMAGE_LEVELS
from gaussad.config import DEFAULTS
from gaussad.evaluation import read_mask
from gaussad.layout import list_test_images, training_images
from gaussad.maps import combine_maps, resize_map
from gaussad.metrics import image_auroc, pixel_metrics
from gaussad.model import GaussAD
from gaussad.tuning import cpu_tuning

LEVELS = (3, 4, 5, 6, 7)
TABLE_4 = (("none", 1.0), ("opca", 0.05), ("opca", 0.15), ("pca", 0.95))
# (reduction, variance, image grid): Table 4's reductions with the default grid, then the paper's pooling.
VARIANTS = (
    *((reduction, variance, DEFAULTS.image_grid) for reduction, variance in TABLE_4),
    ("opca", 0.05, 1),
)


def per_level_results(
    category: Path, backbone: str, reduction: str, variance: float, grid: int, eval_size: int
) -> dict[str, tuple[float, float, float]]:
    """Image AUROC and (pixel AUROC, AUPRO) for the default levels and for each single level."""
    tests = list_test_images(category)
    model = GaussAD(
        backbone=backbone,
        reduction=reduction,
        variance=variance,
        image_grid=grid,
        levels=LEVELS,
        map_levels=LEVELS,
        folds=0,
        crop="none",
    ).fit(training_images(category))
    results = level_results(model, [t.path for t in tests])
    distances, level_maps, position_maps = results.distances, results.level_maps, results.position_maps
    labels = np.array([t.label for t in tests])
    size = (eval_size, eval_size)
    masks = [read_mask(t, size) for t in tests]

    def localization(levels, hybrid: bool = False) -> tuple[float, float]:
        chosen = [level_maps[LEVELS.index(level)] for level in levels]
        positional = position_maps if hybrid else None
        combined = combine_maps(chosen, positional, model.input_size_, DEFAULTS.blur_sigma)
        return pixel_metrics(masks, [resize_map(m, size).numpy() for m in combined])

    image_columns = [LEVELS.index(level) for level in model.backbone_.default_levels]
    rows = {
        "default": (
            image_auroc(labels, distances[:, image_columns].sum(axis=1)),
            *localization(model.backbone_.default_map_levels, hybrid=position_maps is not None),
        )
    }
    for index, level in enumerate(LEVELS):
        rows[f"level {level}"] = (image_auroc(labels, distances[:, index]), *localization((level,)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    command = (
        f"python benchmarks/ablations.py {' '.join(map(str, args.categories))} "
        f"--backbones {' '.join(args.backbones)} --eval-size {args.eval_size}"
    )
    reduction_lines = [
        "## Reduction (paper Table 4 / Fig. 5): default levels",
        "",
        "| category | backbone | reduction | image grid | image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|",
    ]
    level_lines = [
        "## Single levels (paper Table 5), OPCA 0.05",
        "",
        "| category | backbone | image grid | level | image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|",
    ]
    for category, backbone in itertools.product(args.categories, args.backbones):
        for reduction, variance, grid in VARIANTS:
            with cpu_tuning():  # as the CLI runs gaussad: faster, the same results
                rows = per_level_results(category, backbone, reduction, variance, grid, args.eval_size)
            name = "all features" if reduction == "none" else f"{reduction.upper()} {variance:g}"
            reduction_lines.append(
                f"| {category.name} | {backbone} | {name} | {grid} x {grid} | "
                + " | ".join(f"{v:.4f}" for v in rows["default"])
                + " |"
            )
            if (reduction, variance) == ("opca", 0.05):
                for label, values in rows.items():
                    level_lines.append(
                        f"| {category.name} | {backbone} | {grid} x {grid} | {label} | "
                        + " | ".join(f"{v:.4f}" for v in values)
                        + " |"
                    )
            image_levels = f"{EFFICIENTNET_IMAGE_LEVELS[0]}-{EFFICIENTNET_IMAGE_LEVELS[-1]}"
            text = [
                "# Ablations",
                "",
                f"Command: `{command}`",
                "",
                f"Pixel metrics at {args.eval_size}x{args.eval_size}; 'default' is the backbone's default",
                f"image levels (EfficientNets: {image_levels}) for the image score and its default map",
                "levels and blur for the map, mixed with its position map where the default localization",
                "is hybrid (that per-position Gaussian keeps all features in every row). The image grid",
                "pools each level's features per cell (1 x 1: the paper's global pooling).",
                "",
                *reduction_lines,
                "",
                *level_lines,
                "",
            ]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(text))
            print(reduction_lines[-1], flush=True)


if __name__ == "__main__":
    main()
