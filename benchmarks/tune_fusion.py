"""The combined image score's scales: how the pooled score and the map's top share are weighed before they
are summed, compared on every development set.

    python benchmarks/tune_fusion.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        ~/.cache/gaussad/stress/*-rotate ~/.cache/gaussad/stress/*-crop \
        --out benchmarks/results/tune_fusion.md

Per data set, two fits of the default model (image score `pooled`, then `map`: the same Gaussians and
folds) give each part's held-out scores on the training images and its scores on the test images. Each
way of combining them is then scored as the model would: image AUROC, and the share of good test images
flagged (false alarms) and of defective ones not flagged (misses) at the 99% quantile of the combined
held-out scores (the label-free threshold at a 1% target).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gaussad.evaluation import list_test_images, training_images
from gaussad.metrics import image_auroc
from gaussad.model import GaussAD
from gaussad.scorer import combined_scores
from gaussad.tuning import cpu_tuning


def _mad(values: np.ndarray) -> float:
    return float(np.median(np.abs(values - np.median(values))))


# Each way: (held-out pooled, held-out tops) -> the two scales that divide the parts before they are summed.
SCALES: dict[str, Callable[[np.ndarray, np.ndarray], tuple[float, float]]] = {
    "medians": lambda pooled, tops: (float(np.median(pooled)), float(np.median(tops))),
    "median absolute deviations": lambda pooled, tops: (_mad(pooled), _mad(tops)),
    "standard deviations": lambda pooled, tops: (float(np.std(pooled)), float(np.std(tops))),
}


def run(category: Path) -> dict[str, tuple[float, float, float]]:
    """Per way of scoring: image AUROC, false alarms and misses at the label-free threshold."""
    tests = list_test_images(category)
    paths = [item.path for item in tests]
    labels = np.array([item.path.parent.name != "good" for item in tests])
    parts = {}
    for kind in ("pooled", "map"):
        model = GaussAD(image_score=kind).fit(training_images(category))
        parts[kind] = (model.held_out_scores_, model.score_samples(paths))
    (held_pooled, test_pooled), (held_tops, test_tops) = parts["pooled"], parts["map"]
    ways = {"pooled alone": (held_pooled, test_pooled), "map alone": (held_tops, test_tops)}
    for name, scales in SCALES.items():
        scaled = scales(held_pooled, held_tops)
        ways[f"sum over {name}"] = (
            combined_scores(held_pooled, held_tops, scaled),
            combined_scores(test_pooled, test_tops, scaled),
        )
    results = {}
    for name, (held, test) in ways.items():
        threshold = np.quantile(held, 0.99)
        false_alarms = float(np.mean(test[~labels] > threshold))
        misses = float(np.mean(test[labels] <= threshold))
        results[name] = (image_auroc(labels, test), false_alarms, misses)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args()
    _, command, description = __doc__.split("\n\n", 2)
    lines = ["# The combined image score's scales", "", command, "", description.strip(), ""]
    with cpu_tuning():
        for category in args.categories:
            lines += [f"### {category.name}", "", "| score | image AUROC | false alarms | misses |"]
            lines += ["|---|---:|---:|---:|"]
            for name, (auroc, false_alarms, misses) in run(category).items():
                lines.append(f"| {name} | {auroc:.4f} | {false_alarms:.3f} | {misses:.3f} |")
            lines.append("")
            print("\n".join(lines[-8:]), flush=True)
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
