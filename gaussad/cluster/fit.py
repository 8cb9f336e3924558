"""The fit's backbone passes on a Ray cluster: shards of the training images, one result per shard.

Ray Data feeds shards (consecutive images, whole batches) to a pool of actors, each holding the backbone
and a task; the driver takes the shards' results in input order. The first pass (`ray_pass`) runs
`gaussad.fitpass.run_pass` over each shard and returns each level's mergeable moments and feature vectors,
the pooled features and the synthetic-defect samples: the driver stores the vectors, merges the moments
into the fit's accumulators, and the fit goes on as on one machine. Without a feature store
(`ClusterReplayed`), the vectors stay on the workers: two more passes run the backbone again there and
return only each shard's fourth-moment and fold sums, then its images' held-out map numbers. A worker that
dies is replaced and its shard run again (Ray's retries).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from gaussad.accumulate import Finishing, LevelAccumulator
from gaussad.cluster.session import import_ray, ray_cluster, ray_data_settings
from gaussad.cluster.sharing import BATCHES_PER_SHARD, share_cluster, worker_failure
from gaussad.errors import GaussADError
from gaussad.features import BatchRunner
from gaussad.fitpass import (
    Extractor,
    FitPlan,
    HeldLevel,
    HeldPooled,
    PassResult,
    replayed,
    run_pass,
)
from gaussad.heldout import FoldHeads, HeldOutMaps, held_out_maps
from gaussad.images import ImageInput
from gaussad.mixture import PatchSample
from gaussad.pooled import PooledFeatures
from gaussad.rereading import Levels, Replayed, feed_finishings, fold_parts

# A shard's work on an actor: (the actor's runner, the shard's first input, its inputs) -> its result.
ShardTask = Callable[[BatchRunner, int, Sequence[ImageInput]], Any]


class ShardWorker:
    """An actor of the pool: the backbone, loaded once, and the task; called with one shard at a time."""

    def __init__(self, task: ShardTask, extractor: Extractor, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # explicit: results depend on it in the last bits
        self.task = task
        self.runner = extractor.runner()

    def __call__(self, shards: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bounds = zip(shards["start"], shards["items"], strict=True)
        results = [self._shard(int(start), pickle.loads(items)) for start, items in bounds]
        return {"start": shards["start"], "result": np.array(results, dtype=object)}

    def _shard(self, start: int, items: Sequence[ImageInput]) -> bytes:
        try:
            result = self.task(self.runner, start, items)
        except GaussADError as error:  # the user's error (an unreadable image), for the driver to raise
            return pickle.dumps(error)
        return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)


def shard_results(
    task: ShardTask,
    extractor: Extractor,
    items: Sequence[ImageInput],
    address: str | None,
    actors: int | None,
    progress: str | None,
) -> Iterator[Any]:
    """Each shard's result of `task` over `items` on a Ray cluster (the one at `address`, or a local one
    for this call) with `actors` actors (default: one per CPU of the cluster, per GPU on a CUDA device),
    in input order. A user's error on a worker is raised here as it was raised there."""
    ray = import_ray()
    shard_size = BATCHES_PER_SHARD * extractor.batch_size
    starts = list(range(0, len(items), shard_size))
    with ray_cluster(address), ray_data_settings(progress is not None):  # shards back in input order
        sharing = share_cluster(ray, extractor.device, actors, len(starts))
        shards = ray.data.from_items(
            # Each shard carries its own images (any input gaussad reads), the actors only the task.
            [{"start": start, "items": pickle.dumps(items[start : start + shard_size])} for start in starts],
            override_num_blocks=len(starts),
        ).map_batches(
            ShardWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=sharing.count),
            **sharing.options,
            fn_constructor_kwargs={"task": task, "extractor": extractor, "threads": sharing.threads},
        )
        try:
            for row in shards.iter_rows():
                result = pickle.loads(row["result"])
                if isinstance(result, GaussADError):
                    raise result
                yield result
        except (ray.exceptions.RayError, ray.data.exceptions.UserCodeException) as error:
            raise worker_failure(error) from None


@dataclass(frozen=True)
class CollectShard:
    """The first pass over a shard: what `run_pass` keeps, held until the driver takes it."""

    plan: FitPlan
    skip: bool

    def __call__(self, runner: BatchRunner, start: int, items: Sequence[ImageInput]) -> tuple:
        plan = self.plan
        levels = {
            level: HeldLevel(plan.per_position_maps, plan.n_folds, plan.stored) for level in plan.map_levels
        }
        position = HeldLevel(True, plan.n_folds, plan.stored) if plan.position_levels else None
        pooled = {name: {level: HeldPooled() for level in lvs} for name, (lvs, _) in plan.pooled_sets.items()}
        samples = plan.patch_samples()
        passed = run_pass(
            plan, runner, items, levels, position, pooled, samples, start, skip_errors=self.skip
        )
        return passed, levels, position, pooled, samples


def ray_pass(
    plan: FitPlan,
    extractor: Extractor,
    items: Sequence[ImageInput],
    accumulators: dict[int, LevelAccumulator],
    position: LevelAccumulator | None,
    pooled: dict[str, dict[int, PooledFeatures]],
    samples: dict[int, PatchSample],
    address: str | None = None,
    actors: int | None = None,
    progress: str | None = None,
    skip_errors: bool = False,
) -> PassResult:
    """`run_pass` over `items` on a Ray cluster (`shard_results`): the accumulators and pooled features end
    as the local pass leaves them, up to the order of float64 sums, and the patch samples the same."""
    result = PassResult()
    task = CollectShard(plan, skip_errors)
    for passed, levels, held_position, held_pooled, held_samples in shard_results(
        task, extractor, items, address, actors, progress
    ):
        result.extend(passed)
        for level, sample in held_samples.items():
            samples[level].extend(sample)
        for name, by_level in held_pooled.items():
            for level, held in by_level.items():
                held.hand_over(pooled[name][level])
        for level, held in levels.items():
            held.hand_over(accumulators[level])
        if held_position is not None:
            held_position.hand_over(position)
    return result


@dataclass(frozen=True)
class FinishShard:
    """A shard's part of every level's `Finishing`, from the backbone run again over it."""

    plan: FitPlan
    kept: np.ndarray
    finishings: dict[int | None, Finishing]  # without sums

    def __call__(self, runner: BatchRunner, start: int, items: Sequence[ImageInput]) -> dict:
        finishings = {key: finishing.empty() for key, finishing in self.finishings.items()}
        feed_finishings(self.plan, replayed(self.plan, runner, items, self.kept, first=start), finishings)
        return {key: (finishing.quartics, finishing.fold_outer) for key, finishing in finishings.items()}


@dataclass(frozen=True)
class HeldOutShard:
    """A shard's held-out map numbers, from the backbone run again over it and the fold models' heads."""

    plan: FitPlan
    kept: np.ndarray
    fold_of: np.ndarray
    heads: FoldHeads
    localization: str

    def __call__(
        self, runner: BatchRunner, start: int, items: Sequence[ImageInput]
    ) -> tuple[int, HeldOutMaps]:
        low, high = np.searchsorted(self.kept, [start, start + len(items)])
        heads = replace(self.heads, device=runner.device, _held=None)
        batches = replayed(self.plan, runner, items, self.kept, first=start)
        parts = fold_parts(self.plan, batches, self.fold_of)
        return int(low), held_out_maps(heads, self.localization, self.fold_of[low:high], parts)


class ClusterReplayed(Replayed):
    """`Replayed` on a Ray cluster: each pass runs the backbone again over shards on the workers, which
    send back only sums (fourth moments, per-position fold outer products) and per-image numbers."""

    def __init__(
        self,
        accumulators: Levels,
        plan: FitPlan,
        extractor: Extractor,
        items: Sequence[ImageInput],
        kept: Sequence[int],
        address: str | None,
        actors: int | None,
        progress: str | None,
    ) -> None:
        super().__init__(accumulators, plan, None, items, kept, progress)
        self.extractor = extractor
        self.address = address
        self.actors = actors

    def feed(self, finishings: dict[int | None, Finishing]) -> None:
        task = FinishShard(
            self.plan, self.kept, {key: finishing.empty() for key, finishing in finishings.items()}
        )
        for sums in self._shards(task):
            for key, (quartics, fold_outer) in sums.items():
                finishings[key].add_sums(quartics, fold_outer)

    def held_out(self, heads: FoldHeads, localization: str, fold_of: np.ndarray) -> HeldOutMaps:
        results = HeldOutMaps.empty(len(fold_of))
        task = HeldOutShard(self.plan, self.kept, fold_of, heads, localization)
        for start, maps in self._shards(task):
            results.place(start, maps)
        return results

    def _shards(self, task: ShardTask) -> Iterator[Any]:
        return shard_results(task, self.extractor, self.items, self.address, self.actors, self.progress)
