"""`gaussad predict --engine ray`: the images scored by a pool of actors, each holding the fitted model.

The unit of work is a shard of consecutive images (a few batches). An actor scores a shard with
`GaussAD.iter_predict` and writes its maps and pictures itself (`gaussad.outputs.PredictionWriter`, as the
local engine does), then the shard's rows as a part file (`gaussad.cluster.parts`): the image paths and the
output folder must be on storage every node sees, under the same paths. A worker that dies is restarted
and its shard run again (Ray's actor restarts and task retries); a run that stops is resumed by the next
one with the same model and inputs, which scores only the shards not yet written. Without a pixel
threshold, the pictures are drawn once all maps exist, on the range of all of them, by the same actors.
The driver then writes predictions.csv and predictions.parquet and swaps the run's folder in for OUT.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gaussad.calibration import Threshold
from gaussad.cluster.parts import (
    PARQUET_FILE,
    PARTS_FOLDER,
    StagedRun,
    predictions_parquet,
    run_identity,
    write_part,
)
from gaussad.cluster.session import import_ray, ray_cluster
from gaussad.cluster.sharing import BATCHES_PER_SHARD, Sharing, share_cluster, worker_failure
from gaussad.decisions import PREDICTIONS_FILE, PredictionRow, predictions_csv
from gaussad.decoding import ImageError
from gaussad.errors import GaussADError
from gaussad.fileio import check_destination, staging_prefix, swap_in, write_bytes_atomic, write_text_atomic
from gaussad.outputs import PredictionWriter, overall_range
from gaussad.persistence import load_model

# Restarts of an actor whose worker died, each running its shard again: enough for a node lost now and
# then, not endless for an image that crashes its decoder every time.
RESTARTS = 4


@dataclass
class PredictRun:
    """What a run wrote: predictions.csv's rows in input order, the images skipped, how many images'
    results came from an earlier, interrupted run rather than this one, and the model's image threshold."""

    rows: list[PredictionRow]
    errors: list[ImageError]
    resumed: int
    image_threshold: Threshold | None


# A shard: its images' positions among the run's inputs, with their (absolute) paths and output names.
Shard = dict[int, tuple[Path, Path]]


class ShardScorer:
    """An actor of the pool: the fitted model, loaded once; writes one shard's outputs per call."""

    def __init__(
        self, model_dir: str, runtime: dict[str, Any], folder: Path, overlays: bool, threads: int
    ) -> None:
        import torch

        from gaussad.model import GaussAD

        torch.set_num_threads(threads)  # explicit: a worker's environment sets one thread
        self.folder, self.overlays, self.max_pixels = folder, overlays, runtime["max_pixels"]
        self.error: GaussADError | None = None
        try:
            self.model = GaussAD.load(model_dir, **runtime)
        except GaussADError as error:  # for the driver to raise: Ray would report it with a traceback
            self.error = error

    def score(self, shard: Shard) -> GaussADError | None:
        """Score a shard, writing its outputs and then its part file; the user's error, if any."""
        from gaussad.tuning import cpu_tuning

        if self.error is not None:
            return self.error
        try:
            with cpu_tuning():
                scored = self._writer(shard).score(list(shard))
        except GaussADError as error:  # an unreadable image with on_error="stop"
            return error
        write_part(self.folder / PARTS_FOLDER, scored)
        return None

    def draw(self, shard: Shard, value_range: tuple[float, float]) -> None:
        """An uncalibrated model's pictures of a shard, on the run's colour scale."""
        self._writer(shard).draw_saved(shard, value_range)

    def _writer(self, shard: Shard) -> PredictionWriter:
        return PredictionWriter(self.folder, shard, self.model, self.overlays, self.max_pixels)


def ray_predict(
    model_dir: str,
    pairs: Sequence[tuple[Path, Path]],
    output: str,
    runtime: dict[str, Any],
    overlays: bool = False,
    address: str | None = None,
    actors: int | None = None,
    restart: bool = False,
) -> PredictRun:
    """Score `pairs` (image, output name) with the model folder `model_dir` on a Ray cluster (the one at
    `address`, or a local one for this call) into the folder `output`, as local predict does, plus
    predictions.parquet. `runtime` holds GaussAD's run-time settings; `actors` is the pool's size (default:
    one per CPU, or per GPU on a CUDA device); `restart` discards an unfinished run of another model or
    other inputs instead of refusing it."""
    destination = check_destination(output, PREDICTIONS_FILE)
    _, state = load_model(Path(model_dir))  # a wrong model folder fails here, before the cluster starts
    folder = destination.parent / f"{staging_prefix(destination)}ray"
    run = StagedRun.open(folder, run_identity(model_dir, pairs, overlays), restart)
    paths = [str(image) for image, _ in pairs]
    earlier = run.finished(paths)
    shard_size = BATCHES_PER_SHARD * runtime["batch_size"]
    shards = _shards([index for index in range(len(pairs)) if index not in earlier.rows], shard_size)
    calibrated = state.pixel_threshold is not None
    if shards or not calibrated:
        ray = import_ray()
        with ray_cluster(address):
            run.begin()
            pieces = len(shards) if calibrated else -(-len(pairs) // shard_size)
            sharing = share_cluster(ray, str(runtime["device"]), actors, pieces)
            inputs = [(Path(image).absolute(), name) for image, name in pairs]  # as workers need them
            settings = runtime | {"progress": False}
            model = str(Path(model_dir).absolute())
            with _actor_pool(ray, sharing, model, settings, run.folder, overlays) as pool:
                _run_all(ray, pool, "score", _with(shards, inputs))
                if not calibrated:  # pictures on the range of all maps, this run's and earlier ones'
                    ranges = run.finished(paths).map_ranges
                    value_range = overall_range(ranges.values())
                    drawn = _with(_shards(sorted(ranges), shard_size), inputs) if value_range else []
                    _run_all(ray, pool, "draw", drawn, value_range)
    finished = run.finished(paths)
    rows = finished.in_order()
    write_text_atomic(run.folder / PREDICTIONS_FILE, predictions_csv(rows))
    write_bytes_atomic(run.folder / PARQUET_FILE, predictions_parquet(rows))
    swap_in(run.folder, destination)
    shutil.rmtree(destination / PARTS_FOLDER)
    errors = sorted(finished.errors, key=lambda error: error.index)
    return PredictRun(rows, errors, len(earlier.rows), state.image_threshold)


def _run_all(ray: Any, pool: Any, method: str, shards: list[Shard], *arguments: Any) -> None:
    """Call `method` of the pool's actors on every shard; the first user's error that comes back is
    raised, as is an actor lost more than RESTARTS times, in one line."""
    calls = pool.map_unordered(lambda actor, shard: getattr(actor, method).remote(shard, *arguments), shards)
    try:
        for error in calls:
            if error is not None:
                raise error
    except ray.exceptions.RayError as error:
        raise worker_failure(error) from None


def _shards(indices: list[int], size: int) -> list[list[int]]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def _with(shards: list[list[int]], inputs: list[tuple[Path, Path]]) -> list[Shard]:
    """Shards of positions, each with its images and names (a task carries its own, not all inputs)."""
    return [{index: inputs[index] for index in shard} for shard in shards]


@contextmanager
def _actor_pool(ray: Any, sharing: Sharing, *arguments: Any) -> Iterator[Any]:
    """A pool of `sharing.count` actors `ShardScorer(*arguments, threads)`, each restarted when its worker
    dies and the shard it held run again (RESTARTS times); all stopped on the way out, so none goes on
    after an error."""
    worker = ray.remote(ShardScorer).options(
        max_restarts=RESTARTS, max_task_retries=RESTARTS, **sharing.options
    )
    actors = [worker.remote(*arguments, sharing.threads) for _ in range(sharing.count)]
    try:
        yield ray.util.ActorPool(actors)
    finally:
        for actor in actors:
            ray.kill(actor)
