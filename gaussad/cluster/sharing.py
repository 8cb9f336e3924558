"""How the Ray engine uses a cluster: the shards of work, how many workers, what each asks for, and a
worker's failure told in one line."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gaussad.errors import GaussADError

# Batches of consecutive images per shard, the unit of work of fit and predict: a shard's round trip and its
# retry after a lost worker cost a few batches, and the feature vectors a fit's actor holds stay small
# (tiles: about 30 MB per shard of 4 x 16 images).
BATCHES_PER_SHARD = 4


@dataclass(frozen=True)
class Sharing:
    """`count` workers at once, each asking Ray for `options` and running PyTorch on `threads` threads."""

    count: int
    options: dict[str, float]
    threads: int


def share_cluster(ray: Any, device: str, wanted: int | None, pieces: int) -> Sharing:
    """Workers for `pieces` pieces of work on the connected cluster: `wanted` of them (default: one per CPU,
    or per GPU where the device is CUDA, or "auto" on a cluster with GPUs), never more than the pieces,
    sharing the CPUs (and GPUs) evenly, so that exactly `count` run at once."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    count = max(1, min(wanted or int(gpus if gpu else cpus) or 1, pieces))
    options = {"num_cpus": _share(cpus, count, 1.0 if gpu else math.inf)}
    if gpu:
        options["num_gpus"] = _share(gpus, count, 1.0)
    return Sharing(count, options, max(1, int(cpus // count)))


def _share(total: float, count: int, most: float) -> float:
    """total / count, at most `most`, rounded down to Ray's resource precision (1e-4): `count` shares fit."""
    return min(most, math.floor(total / count * 1e4) / 1e4)


def worker_failure(error: Exception) -> GaussADError:
    """A Ray error (a worker lost beyond its retries, an unexpected error in a task) as one line."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return GaussADError(f"a Ray worker failed (the same command again resumes or retries): {reason}")
