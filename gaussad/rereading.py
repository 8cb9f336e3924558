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
from gaussad.fitpass import FitPlan, ReplayedFolds, replayed
from gaussad.gaussian import Gaussian, Reduction
from gaussad.heldout import FoldHeads, HeldOutMaps, held_out_maps
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

    def held_out(
        self, heads: FoldHeads, localizations: Sequence[str], fold_of: np.ndarray
    ) -> dict[str, HeldOutMaps]:
        return held_out_maps(heads, localizations, fold_of, self._fold_features)

    def _fold_features(self, fold: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None]]:
        position = self.accumulators.get(None)
        maps = [accumulator for key, accumulator in self.accumulators.items() if key is not None]
        sources = [accumulator.fold_batches(fold, self.batch_size) for accumulator in maps]
        if position is not None:
            sources.append(position.fold_batches(fold, self.batch_size))
        for batch in zip(*sources, strict=True):
            yield list(batch[: len(maps)]), batch[-1] if position is not None else None


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

    def held_out(
        self, heads: FoldHeads, localizations: Sequence[str], fold_of: np.ndarray
    ) -> dict[str, HeldOutMaps]:
        batches = replayed(self.plan, self.runner, self.items, self.kept, self.progress)
        fold_features = partial(replayed_fold_features, self.plan, ReplayedFolds(batches, fold_of))
        return held_out_maps(heads, localizations, fold_of, fold_features)


def feed_finishings(
    plan: FitPlan,
    batches: Iterator[tuple[int, dict[int, torch.Tensor]]],
    finishings: dict[int | None, Finishing],
) -> None:
    """Add each replayed batch (row of its first image, features by level) to every level's finishing."""
    for start, by_level in batches:
        for key, finishing in finishings.items():
            finishing.add(start, positional_values(plan.level_values(by_level, key)).numpy())


def replayed_fold_features(
    plan: FitPlan, replay: ReplayedFolds, fold: int
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None]]:
    """A fold's map-level and stacked position features, from the backbone run again."""
    for by_level in replay.batches(fold):
        stacked = plan.level_values(by_level, None) if plan.position_levels else None
        yield [by_level[level] for level in plan.map_levels], stacked
