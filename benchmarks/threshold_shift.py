r"""Why the label-free threshold flags more good test images than its target on some sets: whether those
images score like the training images.

    python benchmarks/threshold_shift.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        $S/*-rotate $S/*-crop $S/*-small $S/*-scene $S/*-strip $S/*-posed $S/*-fixture $S/*-tiny \
        $S/*-count $S/*-few $S/*-light $S/*-dirty $S/*-focus --out benchmarks/results/threshold_shift
    python benchmarks/threshold_shift.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        --splits 3 --out benchmarks/results/threshold_shift

Per set, the defaults fitted on all its training images: the share of its good test images flagged at the
label-free threshold (1% target), and how their scores stand against the held-out scores the threshold is
a quantile of (`gaussad.calibration.score_shift`: the probability that a good test image outscores a
held-out training image, 0.5 where they are alike, and the one-sided Mann-Whitney p-value of no shift
upwards). With `--splits K`, also K fits on 80% of the training images drawn at random (numpy's generator
seeded with the split's number): the other 20%, good images like the training images by construction and
unseen by that fit, flagged and compared as the good test images are. Were the folds' held-out scores
lower than what a model gives images it has not seen (their models learn from a fifth fewer images), the
unseen training images would be flagged beyond the target and score above the held-out scores too. Each
finished row goes to OUT.json at once, and a rerun skips the rows already there.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bench_rows import Rows

from gaussad.calibration import score_shift
from gaussad.layout import list_test_images, training_images
from gaussad.model import GaussAD
from gaussad.tuning import cpu_tuning

HELD_OUT_SHARE = 0.2  # of the training images, left out of a split's fit
ALL = "all training images"


def flagged_and_shift(model: GaussAD, images: Sequence[Path]) -> dict[str, float]:
    """The share of `images` (good ones) flagged at the model's label-free threshold, and their scores'
    shift from the held-out scores that set it."""
    scores = model.score_samples(list(images))
    shift = score_shift(model.threshold_scores_, scores)
    return {
        "images": len(images),
        "flagged": float(np.mean(scores >= model.image_threshold_.value)),
        "shift": shift.auroc,
        "p_value": shift.p_value,
    }


def split(train: list[Path], seed: int) -> tuple[list[Path], list[Path]]:
    """The training images a split fits on, and those it leaves out, each in their order."""
    drawn = np.random.default_rng(seed).permutation(len(train))
    count = round(HELD_OUT_SHARE * len(train))
    left_out = set(drawn[:count].tolist())
    return (
        [path for index, path in enumerate(train) if index not in left_out],
        [path for index, path in enumerate(train) if index in left_out],
    )


def run(category: Path, seed: int | None) -> dict[str, Any]:
    """One fit with the defaults, on all training images (`seed` None) or on a split's: its good test
    images' row and, for a split, its unseen training images' row."""
    train = training_images(category)
    good = [test.path for test in list_test_images(category) if test.label == 0]
    fitted, unseen = (train, []) if seed is None else split(train, seed)
    model = GaussAD(progress=False).fit(fitted)
    row = {"training images": len(fitted), "good test images": flagged_and_shift(model, good)}
    if unseen:
        row["unseen training images"] = flagged_and_shift(model, unseen)
    return row


def table(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per set and fit: per group of good images, the share flagged and the shift (p-value)."""
    lines = [
        "| set | fitted on | good test images: flagged | shift (p) | unseen training images: flagged "
        "| shift (p) |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, by_fit in rows.items():
        for fit, row in by_fit.items():
            cells = [
                "– | –"
                if group is None
                else f"{group['flagged']:.1%} of {group['images']} | "
                f"{group['shift']:.3f} ({group['p_value']:.2g})"
                for group in (row["good test images"], row.get("unseen training images"))
            ]
            lines.append(f"| {dataset} | {fit} ({row['training images']}) | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--splits", type=int, default=0, help="fits on 80%% of the training images, each")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    rows = Rows(args.out)
    with cpu_tuning():
        for category in args.categories:
            for seed in [None, *range(args.splits)]:
                rows.ensure((category.name, ALL if seed is None else f"split {seed}"), run, category, seed)
    header = "# The label-free threshold and good images unlike the training images\n\n"
    rows.write_table(header + __doc__.split("\n\n", 1)[1] + "\n" + table(rows.rows))


if __name__ == "__main__":
    main()
