"""After the fit's pass, every training image's features are read again: once for what finishes the
Gaussians (fourth moments, and fold statistics), once for the held-out maps of label-free calibration.

`Stored` reads them back from the feature store. Without a store they come from the backbone run again, in
the same batches: `Replayed` runs it in this process; `gaussad.cluster.fit.ClusterReplayed` on a Ray
cluster's workers, which send back only sums and a few numbers per image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import numpy as np
import torch

from gaussad.accumulate import Finishing, LevelAccumulator, positional_values
from gaussad.features import BatchRunner
from gaussad.fitpass import FitPlan, replayed
from gaussad.gaussian import Gaussian, Reduction
from gaussad.heldout import FoldBatches, FoldHeads, HeldOutMaps, held_out_maps, level_inputs
from gaussad.images import ImageInput

# The map levels' accumulators by level, and the stacked position levels' under None.
Levels = dict[int | None, LevelAccumulator]
Finisher = Callable[[], list[Gaussian]]


class Stored:
    """The features read back from each level's store."""

    def __init__(self, accumulators: Levels, batch_size: int) -> None:
        self.accumulators = accumulators
        self.batch_size = batch_size

    def finishers(
        self, reductions: dict[int | None, tuple[Reduction, float]], folds: Sequence[int | None], **finish
    ) -> dict[int | None, Finisher]:
        """Per level, a job giving its Gaussians for `folds` (None: all images; f: all outside fold f);
        each reads its own store, so the jobs run in parallel."""
        return {
            key: partial(accumulator.finish_many, *reductions[key], folds, **finish)
            for key, accumulator in self.accumulators.items()
        }

    def held_out(self, heads: FoldHeads, localization: str, fold_of: np.ndarray) -> HeldOutMaps:
        return held_out_maps(heads, localization, fold_of, self._fold_batches(np.unique(fold_of).tolist()))

    def _fold_batches(self, folds: Sequence[int]) -> FoldBatches:
        position = self.accumulators.get(None)
        maps = [accumulator for key, accumulator in self.accumulators.items() if key is not None]
        for fold in folds:
            sources = [accumulator.fold_batches(fold, self.batch_size) for accumulator in maps]
            if position is not None:
                sources.append(position.fold_batches(fold, self.batch_size))
            for batch in zip(*sources, strict=True):
                yield fold, list(batch[: len(maps)]), batch[-1] if position is not None else None


class Replayed:
    """The features from the backbone run again in this process, over the same inputs in the same
    batches (`gaussad.fitpass.replayed`): once for every level's `Finishing` at once, once for the held-out
    maps."""

    def __init__(
        self,
        accumulators: Levels,
        plan: FitPlan,
        runner: BatchRunner | None,
        items: Sequence[ImageInput],
        kept: Sequence[int],
        progress: str | None,
    ) -> None:
        self.accumulators = accumulators
        self.plan = plan
        self.runner = runner
        self.items = items
        self.kept = np.asarray(kept, dtype=np.int64)
        self.progress = progress

    def finishers(
        self, reductions: dict[int | None, tuple[Reduction, float]], folds: Sequence[int | None], **finish
    ) -> dict[int | None, Finisher]:
        """Per level, a job giving its Gaussians for `folds`, once one more pass has fed them all."""
        finishings = {
            key: accumulator.finishing(*reductions[key], folds)
            for key, accumulator in self.accumulators.items()
        }
        self.feed(finishings)
        return {
            key: partial(self.accumulators[key].finished, finishing, **finish)
            for key, finishing in finishings.items()
        }

    def feed(self, finishings: dict[int | None, Finishing]) -> None:
        """Add every kept image's features to each level's finishing."""
        feed_finishings(
            self.plan, replayed(self.plan, self.runner, self.items, self.kept, self.progress), finishings
        )

    def held_out(self, heads: FoldHeads, localization: str, fold_of: np.ndarray) -> HeldOutMaps:
        batches = replayed(self.plan, self.runner, self.items, self.kept, self.progress)
        return held_out_maps(heads, localization, fold_of, fold_parts(self.plan, batches, fold_of))


def feed_finishings(
    plan: FitPlan,
    batches: Iterator[tuple[int, dict[int, torch.Tensor]]],
    finishings: dict[int | None, Finishing],
) -> None:
    """Add each replayed batch (row of its first image, features by level) to every level's finishing."""
    for start, by_level in batches:
        for key, finishing in finishings.items():
            finishing.add(start, positional_values(plan.level_values(by_level, key)).numpy())


def fold_parts(
    plan: FitPlan, batches: Iterator[tuple[int, dict[int, torch.Tensor]]], fold_of: np.ndarray
) -> FoldBatches:
    """Replayed batches (row of the first image, features by level) split where their images' folds
    change (folds are contiguous runs of the images), as a map head takes them."""
    for start, by_level in batches:
        folds = fold_of[start : start + len(next(iter(by_level.values())))]
        bounds = np.flatnonzero(np.diff(folds)) + 1
        for low, high in zip([0, *bounds.tolist()], [*bounds.tolist(), len(folds)], strict=True):
            part = {level: values[low:high] for level, values in by_level.items()}
            yield int(folds[low]), *level_inputs(part, plan.map_levels, plan.position_levels)
