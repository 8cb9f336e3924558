r"""The combined image score: how the pooled score, the map's top share and a global score are weighed and
joined, compared on every development set.

    python benchmarks/tune_fusion.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        ~/.cache/gaussad/stress/*-rotate ~/.cache/gaussad/stress/*-crop ~/.cache/gaussad/stress/*-small \
        ~/.cache/gaussad/stress/*-scene ~/.cache/gaussad/stress/*-strip ~/.cache/gaussad/stress/*-posed \
        --out benchmarks/results/tune_fusion.md
    python benchmarks/tune_fusion.py ~/.cache/gaussad/stress/bottle-{small,scene,posed,tiny,fixture} \
        ~/.cache/gaussad/stress/magnetic_tile-{tiny,small,scene,posed,fixture} --crop part \
        --out benchmarks/results/tune_fusion_moving.md
    python benchmarks/tune_fusion.py ~/.cache/gaussad/stress/*-count --crop part --apart extra missing \
        --out benchmarks/results/tune_fusion_count.md

Per data set, five fits with the default folds give each part's held-out scores on the training images and
its scores on the test images: the default model with image score `pooled` (the grid-pooled levels 4-5), then
`map` with the anomaly map's levels 3-5 as its score map (the map part before the score map had levels of its
own; the same Gaussians, folds and chosen localization), the paper's image score (levels 3-7 pooled over the
whole image), levels 3-5 pooled over the whole image (the paper's pooling from the stages the default model
already runs), and `map 3-7`, the default score map's top share (the paper's levels 3-7 with the maps chosen
on levels 3-5). Each way of joining them is then scored as the model would: image AUROC; the share of
defective test images scored above all but 5% of the good ones (detected at 5% false alarms, a point of the
ROC curve that no threshold rule moves); and the share of good test images flagged (false alarms) and of
defective ones not flagged (misses) at the 99% quantile of the joined held-out scores (the label-free
threshold at a 1% target from every held-out score; the model's leaves far-out ones out, `docs/design.md`).
A z-score is a part's value less its held-out mean, over its held-out standard
deviation; summing z-scores ranks and thresholds exactly as the default's sum over standard deviations does.
The parts are fitted on whole images (`--crop none`, as the first table was measured) or, with `--crop part`,
cut to the window around the part where the fit learns one (the second table: the sets whose parts move
about, or turn in place; the third: the `count` sets, whose logical anomalies, two good parts where one
belongs and none, `--apart extra missing` scores apart from the structural defects).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy.special import log_ndtr, logsumexp

from gaussad.config import CROPS
from gaussad.layout import list_test_images, training_images
from gaussad.metrics import image_auroc
from gaussad.model import GaussAD
from gaussad.scorer import combined_scores
from gaussad.tuning import cpu_tuning

DEFAULT = "sum of z-scores, the map's share from levels 3-7"  # the default combined score
PARTS = {
    "pooled": {"image_score": "pooled"},
    # The anomaly map's top share (levels 3-5): the map part before the score map had levels of its own.
    "map": {"image_score": "map", "score_map_levels": (3, 4, 5)},
    "paper": {"image_score": "pooled", "levels": (3, 4, 5, 6, 7), "image_grid": 1},
    "global 3-5": {"image_score": "pooled", "levels": (3, 4, 5), "image_grid": 1},
    # The score map's top share: the paper's levels 3-7, with the maps the anomaly map's levels chose.
    "map 3-7": {"image_score": "map"},
}
Scores = tuple[np.ndarray, np.ndarray]  # (held-out scores, test scores)


def _mad(values: np.ndarray) -> float:
    return float(np.median(np.abs(values - np.median(values))))


# Each way: (held-out pooled, held-out tops) -> the two scales that divide the parts before they are summed.
SCALES: dict[str, Callable[[np.ndarray, np.ndarray], tuple[float, float]]] = {
    "medians": lambda pooled, tops: (float(np.median(pooled)), float(np.median(tops))),
    "median absolute deviations": lambda pooled, tops: (_mad(pooled), _mad(tops)),
    "standard deviations": lambda pooled, tops: (float(np.std(pooled)), float(np.std(tops))),
}


def _z_scores(part: Scores) -> Scores:
    held, test = part
    mean, spread = held.mean(), held.std()
    return (held - mean) / spread, (test - mean) / spread


def _tail_scaled(part: Scores) -> Scores:
    """A part less its held-out median, over the spread of its held-out upper tail (95% quantile less
    median): a part whose normal scores run to high values weighs less than its standard deviation says."""
    held, test = part
    median = np.median(held)
    spread = np.quantile(held, 0.95) - median
    return (held - median) / spread, (test - median) / spread


def _joined(
    parts: list[Scores], join: Callable[..., np.ndarray], scaled: Callable[[Scores], Scores] = _z_scores
) -> Scores:
    """The parts, each scaled (by default to z-scores), joined image by image, on the held-out and on the
    test images."""
    z = [scaled(part) for part in parts]
    return join([held for held, _ in z], axis=0), join([test for _, test in z], axis=0)


def _root_sum_of_squares(z: list[np.ndarray], axis: int) -> np.ndarray:
    """The length of the positive z-scores: between their sum and their maximum."""
    return np.sqrt((np.clip(z, 0.0, None) ** 2).sum(axis=axis))


def _soft_maximum(z: list[np.ndarray], axis: int) -> np.ndarray:
    """log(sum(exp(z))): the maximum where one z-score stands out, near the sum's order where all rise."""
    return logsumexp(z, axis=axis)


def _fisher(z: list[np.ndarray], axis: int) -> np.ndarray:
    """Fisher's combination: the sum of -log of each z-score's upper-tail probability read as normal."""
    return -log_ndtr(-np.asarray(z)).sum(axis=axis)


def _sum_or_grid(parts: list[Scores]) -> Scores:
    """The larger of the parts' sum and the first part (the grid-pooled score), each as a z-score: the grid
    decides alone where it stands further from normal than the sum does."""
    return _joined([_joined(parts, np.sum), parts[0]], np.max)


def _correlation_weighted(parts: list[Scores]) -> Scores:
    """The parts' z-scores summed with the weights that best detect a shift of one spread in every part
    when normal z-scores are correlated as on the held-out images (C^-1 1, negative weights set to 0)."""
    z = [_z_scores(part) for part in parts]
    held, test = np.stack([h for h, _ in z], axis=1), np.stack([t for _, t in z], axis=1)
    weights = np.clip(np.linalg.solve(np.corrcoef(held.T), np.ones(len(parts))), 0.0, None)
    return held @ weights, test @ weights


def ways(parts: dict[str, Scores]) -> dict[str, Scores]:
    """Every way of scoring compared: each part alone, the two-part sums over each scale, z-scores joined
    by their maximum or with a global score (the paper's, or levels 3-5) as a third part, and the three
    parts' z-scores joined between a sum and a maximum (root sum of squares, soft maximum, Fisher's
    combination), summed over their upper tails' spreads or weighted for their correlation, and the larger of
    their sum's z-score and the grid part's; and the sum with the map's share from the paper's map levels
    3-7 in place of, or beside, that from levels 3-5, and the same without the grid part."""
    (held_pooled, test_pooled), (held_tops, test_tops) = parts["pooled"], parts["map"]
    result = {f"{name} alone": part for name, part in parts.items()}
    for name, scales in SCALES.items():
        scaled = scales(held_pooled, held_tops)
        result[f"sum over {name}"] = (
            combined_scores(held_pooled, held_tops, scaled),
            combined_scores(test_pooled, test_tops, scaled),
        )
    two = [parts["pooled"], parts["map"]]
    result["maximum of z-scores"] = _joined(two, np.max)
    for third in ("paper", "global 3-5"):
        result[f"sum of z-scores, {third}'s added"] = _joined([*two, parts[third]], np.sum)
        result[f"maximum of z-scores, {third}'s added"] = _joined([*two, parts[third]], np.max)
    three = [*two, parts["paper"]]
    result["three parts' positive z-scores, root sum of squares"] = _joined(three, _root_sum_of_squares)
    result["three parts' z-scores, soft maximum"] = _joined(three, _soft_maximum)
    result["three parts' z-scores, Fisher's combination"] = _joined(three, _fisher)
    result["three parts over their upper tails' spreads"] = _joined(three, np.sum, _tail_scaled)
    result["three parts weighted for their correlation"] = _correlation_weighted(three)
    result["three parts' sum or the grid part, the larger z-score"] = _sum_or_grid(three)
    deeper = [parts["pooled"], parts["map 3-7"], parts["paper"]]
    result["sum of z-scores, the map's share from levels 3-7"] = _joined(deeper, np.sum)
    result["sum of z-scores, the map's share from levels 3-7 and the paper's"] = _joined(deeper[1:], np.sum)
    result["sum of z-scores, the map's share from levels 3-5 and 3-7"] = _joined(
        [*three, parts["map 3-7"]], np.sum
    )
    return result


def run(category: Path, crop: str, apart: Sequence[str] = ()) -> dict[str, tuple[float, ...]]:
    """Per way of scoring: image AUROC, detected at 5% false alarms, false alarms and misses at the
    label-free threshold, each part fitted with `crop`; with `apart`, defect types, also the image AUROC
    and misses of each type's images alone and of the other defective ones (each against the good)."""
    tests = list_test_images(category)
    paths = [item.path for item in tests]
    defects = np.array([item.defect for item in tests])
    labels = defects != "good"
    for defect in apart:
        if defect not in defects:
            raise SystemExit(f"{category}: no test images of the defect type {defect!r}")
    groups = [defects == defect for defect in apart]
    if apart:
        groups.append(labels & ~np.isin(defects, apart))
    parts = {}
    for name, options in PARTS.items():
        model = GaussAD(crop=crop, **options).fit(training_images(category))
        parts[name] = (model.held_out_scores_, model.score_samples(paths))
    results = {}
    for name, (held, test) in ways(parts).items():
        threshold = np.quantile(held, 0.99)
        detected = float(np.mean(test[labels] > np.quantile(test[~labels], 0.95)))
        false_alarms = float(np.mean(test[~labels] > threshold))
        misses = float(np.mean(test[labels] <= threshold))
        results[name] = (image_auroc(labels, test), detected, false_alarms, misses)
        for group in groups:
            results[name] += _apart(group, labels, test, threshold)
    return results


def _apart(group: np.ndarray, labels: np.ndarray, test: np.ndarray, threshold: float) -> tuple[float, float]:
    """Image AUROC of one group of defective images against the good ones, and its misses at the
    threshold; not a number for an empty group."""
    if not group.any():
        return math.nan, math.nan
    shown = group | ~labels
    return image_auroc(group[shown], test[shown]), float(np.mean(test[group] <= threshold))


def summary(results: dict[str, dict[str, tuple[float, ...]]]) -> list[str]:
    """Per way: mean image AUROC, detection, false alarms and misses over the sets, and its largest loss
    and gain of image AUROC against the default on any one set."""
    lines = ["### All sets", ""]
    columns = ("mean image AUROC", "mean detected at 5%", "mean false alarms", "mean misses", "worst set")
    lines += ["| score | " + " | ".join(columns) + " | best set |", "|---|---:|---:|---:|---:|---:|---:|"]
    default = np.array([rows[DEFAULT][0] for rows in results.values()])
    for name in next(iter(results.values())):
        aurocs = np.array([rows[name][0] for rows in results.values()])
        detected, false_alarms, misses = (
            np.mean([rows[name][i] for rows in results.values()]) for i in (1, 2, 3)
        )
        diff = aurocs - default
        lines.append(
            f"| {name} | {aurocs.mean():.4f} | {detected:.3f} | {false_alarms:.3f} | {misses:.3f} "
            f"| {diff.min():+.4f} | {diff.max():+.4f} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--crop", choices=CROPS, default="none", help="the parts' --crop")
    parser.add_argument(
        "--apart",
        nargs="+",
        default=[],
        metavar="TYPE",
        help="also score each of these defect types' images apart from the other defects",
    )
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args()
    _, command, description = __doc__.split("\n\n", 2)
    lines = ["# The combined image score", "", command, "", description.strip(), ""]
    columns = ["image AUROC", "detected at 5%", "false alarms", "misses"]
    for group in [*args.apart, "others"] if args.apart else []:
        columns += [f"image AUROC, {group}", f"misses, {group}"]
    results = {}
    with cpu_tuning():
        for category in args.categories:
            results[category.name] = run(category, args.crop, args.apart)
            first = len(lines)
            lines += [f"### {category.name}", ""]
            lines += ["| score | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
            for name, values in results[category.name].items():
                cells = [f"{values[0]:.4f}"] + [f"{value:.3f}" for value in values[1:4]]
                cells += [
                    f"{value:.4f}" if index % 2 == 0 else f"{value:.3f}"
                    for index, value in enumerate(values[4:])
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
            print("\n".join(lines[first:]), flush=True)
    lines += summary(results)
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
