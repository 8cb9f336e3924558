"""Measure the choices behind the defaults: backbone, input size, localization variant, map levels, blur.

For each (backbone, input size, localization) the model is fitted once with every candidate level, the
per-level results on the test set are kept, and every contiguous range of map levels (or those given by
`--ranges`), every blur and every way of weighing the levels (`--weightings`) is scored from them, so the
whole grid costs one feature pass per configuration.
Writes a Markdown table of the best settings per data set and, over several data sets, a summary of every
setting: its mean metrics and its largest loss on any data set to that set's best setting.

    python benchmarks/tune_maps.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        --out benchmarks/results/tune_maps.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
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
# How a map's levels are weighed: "mean", as the model does, averages their distances as they are, so a
# level with more components weighs more (a distance grows as the root of the component count);
# "per component" divides each level's distance by the root of its component count first.
WEIGHTINGS = ("mean", "per component")


def contiguous_ranges(levels: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [levels[i:j] for i, j in itertools.combinations(range(len(levels) + 1), 2)]


def level_range(text: str) -> tuple[int, ...]:
    """Levels "3-5" as (3, 4, 5)."""
    first, _, last = text.partition("-")
    levels = tuple(range(int(first), int(last or first) + 1))
    if not set(levels) <= set(CANDIDATE_LEVELS):
        raise argparse.ArgumentTypeError(f"levels {text}: outside {CANDIDATE_LEVELS}")
    return levels


def run(
    category: Path,
    backbone: str,
    image_size: int | None,
    localization: str,
    eval_size: int,
    ranges: list[tuple[int, ...]],
    blurs: list[float],
    weightings: list[str],
) -> list[dict]:
    train, tests = training_images(category), list_test_images(category)
    # The grid-pooled image score and no folds: what is measured here are the maps, which neither changes.
    model = GaussAD(
        backbone=backbone,
        image_size=image_size,
        localization=localization,
        map_levels=CANDIDATE_LEVELS,
        image_score="pooled",
        folds=0,
        crop="none",
    )
    started = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - started
    results = level_results(model, [t.path for t in tests])
    distances, level_maps, position_maps = results.distances, results.level_maps, results.position_maps
    labels = np.array([t.label for t in tests])
    masks = [read_mask(t, (eval_size, eval_size)) for t in tests]
    image_score_auroc = image_auroc(labels, distances.sum(axis=1))

    components = [gaussian.n_components for gaussian in model.state_.map_gaussians]
    rows = []
    for levels, blur, weighting in itertools.product(ranges, blurs, weightings):
        indices = [CANDIDATE_LEVELS.index(level) for level in levels]
        divisors = [components[i] ** 0.5 if weighting == "per component" else 1.0 for i in indices]
        chosen = [level_maps[i] / divisor for i, divisor in zip(indices, divisors, strict=True)]
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
                "weighting": weighting,
                "image_auroc": image_score_auroc,
                "pixel_auroc": pixel_auroc,
                "aupro": aupro,
                "fit_s": fit_seconds,
            }
        )
    return rows


def _measured(
    rows: list[dict],
    category: str,
    backbone: str,
    size: int,
    localization: str,
    ranges: list[tuple[int, ...]],
    blurs: list[float],
    weightings: list[str],
) -> list[dict]:
    """A configuration's rows from an earlier run's JSON, if it holds every range, blur and weighting asked
    for (a rerun with more data sets measures only the new ones)."""
    found = [
        row
        for row in rows
        if (row["category"], row["backbone"], row["localization"]) == (category, backbone, localization)
        and (size == 0 or row["size"] == size)
        and any(row["map_levels"] == "-".join(map(str, levels)) for levels in ranges)
        and row["blur"] in blurs
        and row["weighting"] in weightings
    ]
    return found if len(found) == len(ranges) * len(blurs) * len(weightings) else []


def summary(rows: list[dict], tolerance: float) -> list[str]:
    """Per localization, every (map levels, blur, weighting) over all data sets: mean pixel AUROC and AUPRO,
    and the largest loss of each on any data set to that set's best setting (with the same localization)."""
    lines = [
        "",
        f"## Over all {len({row['category'] for row in rows})} data sets",
        "",
        "Per localization, each setting's mean pixel AUROC and AUPRO, its largest loss in each to the best "
        f"setting of that data set, and on how many sets it loses more than {tolerance:g} in either; "
        "best mean first.",
        "",
        "| backbone | size | localization | map levels | blur | weighting | mean pixel AUROC | mean AUPRO "
        "| worst pixel AUROC loss | worst AUPRO loss | sets lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def config(row: dict) -> tuple:
        return row["backbone"], row["size"], row["localization"]

    def setting(row: dict) -> tuple:
        return row["map_levels"], row["blur"], row["weighting"]

    for key in sorted({config(row) for row in rows}, key=str):
        chosen = [row for row in rows if config(row) == key]
        best = {
            (category, metric): max(row[metric] for row in chosen if row["category"] == category)
            for category in {row["category"] for row in chosen}
            for metric in ("pixel_auroc", "aupro")
        }
        settings = []
        for levels, blur, weighting in {setting(row) for row in chosen}:
            same = [row for row in chosen if setting(row) == (levels, blur, weighting)]
            losses = {
                metric: [best[row["category"], metric] - row[metric] for row in same]
                for metric in ("pixel_auroc", "aupro")
            }
            lost = sum(
                max(pixel, aupro) > tolerance
                for pixel, aupro in zip(losses["pixel_auroc"], losses["aupro"], strict=True)
            )
            means = {metric: float(np.mean([row[metric] for row in same])) for metric in losses}
            settings.append((levels, blur, weighting, means, losses, lost))
        settings.sort(key=lambda item: -(item[3]["pixel_auroc"] + item[3]["aupro"]))
        for levels, blur, weighting, means, losses, lost in settings:
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {levels} | {blur:g} | {weighting} | "
                f"{means['pixel_auroc']:.4f} | "
                f"{means['aupro']:.4f} | {max(losses['pixel_auroc']):.4f} | {max(losses['aupro']):.4f} | "
                f"{lost} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[0], help="input sizes; 0 = native")
    parser.add_argument("--localizations", nargs="+", default=["hybrid", "shared", "per-position"])
    parser.add_argument(
        "--ranges",
        nargs="+",
        type=level_range,
        default=contiguous_ranges(CANDIDATE_LEVELS),
        help="map levels to score, as 3-5 (default: every contiguous range of levels 2-7)",
    )
    parser.add_argument("--blurs", nargs="+", type=float, default=list(BLURS))
    parser.add_argument("--weightings", nargs="+", choices=WEIGHTINGS, default=["mean"])
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--top", type=int, default=8, help="best rows per category and configuration")
    parser.add_argument("--tolerance", type=float, default=0.005, help="a loss the summary counts")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT (Markdown) and OUT.json")
    args = parser.parse_args()

    ranges = " ".join("-".join(map(str, (levels[0], levels[-1]))) for levels in args.ranges)
    lines = [
        "# Map defaults: backbone, input size, localization, map levels, blur",
        "",
        f"Command: `python benchmarks/tune_maps.py {' '.join(map(str, args.categories))} "
        f"--backbones {' '.join(args.backbones)} --sizes {' '.join(map(str, args.sizes))} "
        f"--localizations {' '.join(args.localizations)} --ranges {ranges} "
        f"--blurs {' '.join(f'{blur:g}' for blur in args.blurs)} "
        f"--weightings {' '.join(shlex.quote(weighting) for weighting in args.weightings)} "
        f"--eval-size {args.eval_size} "
        f"--top {args.top} --out {args.out}`",
        "",
        f"Metrics at {args.eval_size}x{args.eval_size}; image AUROC is the grid-pooled image score (default "
        "image levels and grid, whatever the map levels).",
        f"Per configuration, the {args.top} best map settings by pixel AUROC + AUPRO.",
        "",
        "| category | backbone | size | localization | map levels | blur | weighting "
        "| image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    json_path = args.out.with_suffix(".json")
    # Rows written before there was a choice of weighting are the model's own, "mean".
    earlier: list[dict] = (
        [{"weighting": "mean", **row} for row in json.loads(json_path.read_text())]
        if json_path.exists()
        else []
    )
    all_rows: list[dict] = []
    for category, backbone, size, localization in itertools.product(
        args.categories, args.backbones, args.sizes, args.localizations
    ):
        asked = (args.ranges, args.blurs, args.weightings)
        rows = _measured(earlier, category.name, backbone, size, localization, *asked)
        if not rows:
            with cpu_tuning():  # as the CLI runs gaussad: faster, the same results
                rows = run(category, backbone, size or None, localization, args.eval_size, *asked)
        all_rows += rows
        rows.sort(key=lambda row: -(row["pixel_auroc"] + row["aupro"]))
        for row in rows[: args.top]:
            lines.append(
                f"| {row['category']} | {row['backbone']} | {row['size']} | {row['localization']} | "
                f"{row['map_levels']} | {row['blur']:g} | {row['weighting']} | "
                f"{row['image_auroc']:.4f} | "
                f"{row['pixel_auroc']:.4f} | {row['aupro']:.4f} |"
            )
        print("\n".join(lines[-args.top :]), flush=True)
        tail = summary(all_rows, args.tolerance) if len(args.categories) > 1 else []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines + tail) + "\n")
        json_path.write_text(json.dumps(all_rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
