"""Defaults against fixed settings over all development data: the shared sets and their stress variants.

    python benchmarks/stress_variants.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile
    python benchmarks/tune_defaults.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        ~/.cache/gaussad/stress/*-rotate ~/.cache/gaussad/stress/*-crop ~/.cache/gaussad/stress/*-small \
        ~/.cache/gaussad/stress/*-scene ~/.cache/gaussad/stress/*-strip ~/.cache/gaussad/stress/*-posed \
        --out benchmarks/results/tune_defaults

One `gaussad evaluate` per data set and setting (Lite0 at 224 px otherwise): image AUROC, pixel AUROC and
AUPRO at full resolution; the share of good test images flagged (false alarms) and of defective ones not
flagged (misses) at the label-free threshold; the fit time; for `auto`, what it chose. Each finished row is
written to `<out>.json` at once, and a rerun skips the rows already there, so a long run can be resumed.
The rule the defaults answer to: no loss of more than 0.005 in any metric on any set to the best fixed
setting for that set, unless it gains more elsewhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench_rows import Rows

from gaussad.evaluation import evaluate_category
from gaussad.model import GaussAD
from gaussad.tuning import cpu_tuning

# The defaults before the score map had levels of its own: the map part is the anomaly map's top share.
MAP_PART_3_5 = {"score_map_levels": (3, 4, 5)}
TWO_PARTS = {"image_score": "combined", "global_levels": (), **MAP_PART_3_5}  # before the global part
# The rows measured with the window around the part (`--crop part`, the default); every other row was
# measured before it, on whole images, and reruns so.
CROPPED = ("defaults", "defaults, shared maps", "defaults, hybrid maps")
_SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "defaults, shared maps": {"localization": "shared"},
    "defaults, hybrid maps": {"localization": "hybrid"},
    "defaults, whole image": {},  # the defaults before the window around the part
    # Hybrid maps' shared half: one Gaussian per level (the paper's), or a mixture of 16 rather than 8.
    "defaults, one Gaussian in hybrid maps": {"mixture_clusters": 1},
    "defaults, mixture of 16": {"mixture_clusters": 16},
    "auto": {"image_score": "auto", "localization": "auto"},
    "map part 3-5": MAP_PART_3_5,
    "combined (two parts)": TWO_PARTS,
    "combined (two parts), hybrid": {**TWO_PARTS, "localization": "hybrid"},
    "combined (two parts), shared": {**TWO_PARTS, "localization": "shared"},
    "combined, hybrid": {"image_score": "combined", "localization": "hybrid"},
    "pooled, hybrid": {"image_score": "pooled", "localization": "hybrid"},
    "pooled, shared": {"image_score": "pooled", "localization": "shared"},
    "map, hybrid": {"image_score": "map", "localization": "hybrid"},
    "map, shared": {"image_score": "map", "localization": "shared"},
    "combined, shared": {"image_score": "combined", "localization": "shared"},
    "defaults, map levels 3-7": {"map_levels": (3, 4, 5, 6, 7)},  # the paper's map levels, both maps'
    # One setting of `map part 3-5` changed at a time: measured before the score map had levels of its own.
    "map levels 2-5, map part 2-5": {"map_levels": (2, 3, 4, 5), "score_map_levels": (2, 3, 4, 5)},
    "map part 3-5, grid 2": {**MAP_PART_3_5, "image_grid": 2},  # the grid-pooled part's grid
    "map part 3-5, grid levels 4-6": {**MAP_PART_3_5, "levels": (4, 5, 6)},  # and its levels
    "map part 3-5, grid levels 3-5": {**MAP_PART_3_5, "levels": (3, 4, 5)},
    "map part 3-5, OPCA 0.1": {**MAP_PART_3_5, "variance": 0.1},
    # The hybrid map's per-position half.
    "map part 3-5, position levels 3-5": {**MAP_PART_3_5, "position_levels": (3, 4, 5)},
    "map part 3-5, position levels 4-5": {**MAP_PART_3_5, "position_levels": (4, 5)},
    "map part 3-5, 10 folds": {**MAP_PART_3_5, "folds": 10},  # fold models on 90% of the images, not 80%
    # One setting of the defaults changed, where the score map may move the image score's verdict.
    "defaults, grid 2": {"image_grid": 2},
    "defaults, grid levels 4-6": {"levels": (4, 5, 6)},
    "defaults, 10 folds": {"folds": 10},
    "defaults, OPCA 0.1": {"variance": 0.1},
    "defaults, grid levels 3-5": {"levels": (3, 4, 5)},
    "defaults, map levels 2-5": {"map_levels": (2, 3, 4, 5)},  # the anomaly map's; the score map's stay 3-7
    "defaults, position levels 3-5": {"position_levels": (3, 4, 5)},
    "defaults, position levels 4-5": {"position_levels": (4, 5)},
    "defaults, 320 px": {"image_size": 320},
    "map part 3-5, 320 px": {**MAP_PART_3_5, "image_size": 320},
    # The `strip` variants' shape at 224 px's pixels.
    "map part 3-5, 352 x 144 px": {**MAP_PART_3_5, "image_size": (352, 144)},
    "defaults, 352 x 144 px": {"image_size": (352, 144)},
    "defaults, 560 x 224 px": {"image_size": (560, 224)},
    "paper: levels 3-7, grid 1, shared": {
        "image_score": "pooled",
        "levels": (3, 4, 5, 6, 7),
        "image_grid": 1,
        "localization": "shared",
    },
}
SETTINGS = {
    name: options if name in CROPPED else {"crop": "none", **options} for name, options in _SETTINGS.items()
}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "false_alarm_rate", "miss_rate")


def evaluate(category: Path, options: dict[str, Any]) -> dict[str, Any]:
    """One evaluation's metrics, fit time and, for auto options, the choice."""
    fitted: list[GaussAD] = []

    def make() -> GaussAD:
        fitted.append(GaussAD(**options))
        return fitted[-1]

    result = evaluate_category(make, category).result
    state = fitted[-1].state_
    chosen = ", ".join(  # what the setting's auto options chose, image score first
        state.selection[option]["chosen"]
        for option in ("image_score", "localization")
        if state.selection and option in state.selection
    )
    return {name: getattr(result, name) for name in METRICS} | {
        "fit_seconds": result.fit_seconds,
        "chosen": chosen,
        "selection": state.selection,
    }


def table(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One Markdown table per data set: each setting's metrics, fit time and choice."""
    lines = []
    for dataset, by_setting in rows.items():
        lines += [f"### {dataset}", ""]
        lines += ["| setting | image AUROC | pixel AUROC | AUPRO | false alarms | misses | fit s | chose |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for setting, row in by_setting.items():
            cells = [f"{row[m]:.4f}" if row[m] is not None else "n/a" for m in METRICS]
            lines.append(
                f"| {setting} | " + " | ".join(cells) + f" | {row['fit_seconds']:.1f} | {row['chosen']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    rows = Rows(args.out)
    with cpu_tuning():
        for setting in args.settings:
            for category in args.categories:
                rows.ensure(
                    (category.name, setting),
                    evaluate,
                    category,
                    SETTINGS[setting],
                    shown=lambda row: {metric: row[metric] for metric in METRICS},
                )
    rows.write_table(table(rows.rows))


if __name__ == "__main__":
    main()
