"""The fit's backbone pass on a Ray cluster: shards of the training images, one result per shard.

Ray Data feeds shards (consecutive images, whole batches) to a pool of actors, each holding the backbone;
an actor runs `gaussad.fitpass.run_pass` over its shard and returns each level's mergeable moments and
feature vectors, the pooled features and the synthetic-defect samples. The driver takes the shards in input
order: it stores their vectors, merges their moments into the fit's accumulators, and the fit goes on as on
one machine. A worker that dies is replaced and its shard run again (Ray's retries).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np

from gaussad.accumulate import LevelAccumulator
from gaussad.cluster.session import import_ray, ray_cluster, ray_data_settings
from gaussad.cluster.sharing import BATCHES_PER_SHARD, share_cluster, worker_failure
from gaussad.errors import GaussADError
from gaussad.fitpass import Extractor, FitPlan, HeldLevel, HeldPooled, PassResult, run_pass
from gaussad.images import ImageInput
from gaussad.pooled import PooledFeatures


class ShardWorker:
    """An actor of the pool: the backbone, loaded once, and the plan; called with one shard at a time."""

    def __init__(self, plan: FitPlan, extractor: Extractor, threads: int, skip: bool) -> None:
        import torch

        torch.set_num_threads(threads)  # explicit: results depend on it in the last bits
        self.plan = plan
        self.runner = extractor.runner()
        self.skip = skip

    def __call__(self, shards: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bounds = zip(shards["start"], shards["items"], strict=True)
        results = [self._shard(int(start), pickle.loads(items)) for start, items in bounds]
        return {"start": shards["start"], "result": np.array(results, dtype=object)}

    def _shard(self, start: int, items: Sequence[ImageInput]) -> bytes:
        plan = self.plan
        levels = {level: HeldLevel(plan.per_position_maps, plan.n_folds) for level in plan.map_levels}
        position = HeldLevel(True, plan.n_folds) if plan.position_levels else None
        pooled = {name: {level: HeldPooled() for level in lvs} for name, (lvs, _) in plan.pooled_sets.items()}
        try:
            passed = run_pass(
                plan,
                self.runner,
                items,
                levels,
                position,
                pooled,
                start,
                skip_errors=self.skip,
            )
        except GaussADError as error:  # the user's error (an unreadable image), for the driver to raise
            return pickle.dumps(error)
        return pickle.dumps((passed, levels, position, pooled), protocol=pickle.HIGHEST_PROTOCOL)


def ray_pass(
    plan: FitPlan,
    extractor: Extractor,
    items: Sequence[ImageInput],
    accumulators: dict[int, LevelAccumulator],
    position: LevelAccumulator | None,
    pooled: dict[str, dict[int, PooledFeatures]],
    address: str | None = None,
    actors: int | None = None,
    progress: str | None = None,
    skip_errors: bool = False,
) -> PassResult:
    """`run_pass` over `items` on a Ray cluster (the one at `address`, or a local one for this call) with
    `actors` actors (default: one per CPU of the cluster, per GPU on a CUDA device): the accumulators and
    pooled features end as the local pass leaves them, up to the order of float64 sums."""
    ray = import_ray()
    shard_size = BATCHES_PER_SHARD * extractor.batch_size
    starts = list(range(0, len(items), shard_size))
    with ray_cluster(address), ray_data_settings(progress is not None):  # shards back in input order
        sharing = share_cluster(ray, extractor.device, actors, len(starts))
        shards = ray.data.from_items(
            # Each shard carries its own images (any input gaussad reads), the actors only the plan.
            [{"start": start, "items": pickle.dumps(items[start : start + shard_size])} for start in starts],
            override_num_blocks=len(starts),
        ).map_batches(
            ShardWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=sharing.count),
            **sharing.options,
            fn_constructor_kwargs={
                "plan": plan,
                "extractor": extractor,
                "threads": sharing.threads,
                "skip": skip_errors,
            },
        )
        result = PassResult()
        try:
            for row in shards.iter_rows():
                shard = pickle.loads(row["result"])
                if isinstance(shard, GaussADError):
                    raise shard
                passed, levels, held_position, held_pooled = shard
                result.extend(passed)
                for name, by_level in held_pooled.items():
                    for level, held in by_level.items():
                        held.hand_over(pooled[name][level])
                for level, held in levels.items():
                    held.hand_over(accumulators[level])
                if held_position is not None:
                    held_position.hand_over(position)
        except (ray.exceptions.RayError, ray.data.exceptions.UserCodeException) as error:
            raise worker_failure(error) from None
    return result
