"""`gaussad evaluate --engine ray`: each category fitted and measured by a Ray task of its own, in parallel.

A task calls `evaluation.evaluate_category` with a model built from the run's parameters, as the local
engine does one category after the other; the evaluations come back in the order of the categories, with
their images named as given, so the table, JSON, report and saved results are the local ones. The data
must be on storage every node sees, under the same paths. A task whose worker dies is run again (Ray's
task retries, 3 by default).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from gaussad.cluster.session import import_ray, ray_cluster
from gaussad.cluster.sharing import share_cluster, worker_failure
from gaussad.errors import GaussADError
from gaussad.evaluation import CategoryEvaluation, evaluate_category


def evaluate_task(
    params: dict[str, Any],
    category: Path,
    eval_size: int | None,
    keep_maps: bool,
    threads: int,
    tmp_dir: str | None,
) -> CategoryEvaluation | GaussADError:
    """One category's evaluation on a worker, or the user's error for the driver to raise."""
    import torch

    from gaussad.model import GaussAD
    from gaussad.tuning import cpu_tuning

    torch.set_num_threads(threads)  # explicit: a worker's environment sets one thread
    if tmp_dir:
        tempfile.tempdir = tmp_dir  # where the fit spills, as --tmp-dir says on the driver
    try:
        with cpu_tuning():
            return evaluate_category(lambda: GaussAD(**params), category, eval_size, keep_maps=keep_maps)
    except GaussADError as error:  # raised by the driver in one line; Ray would add a traceback
        return error


def ray_evaluate(
    params: dict[str, Any],
    categories: list[Path],
    eval_size: int | None = None,
    keep_maps: bool = False,
    address: str | None = None,
    actors: int | None = None,
    tmp_dir: str | None = None,
) -> list[CategoryEvaluation]:
    """`evaluate_category` of each category with `GaussAD(**params)`, as parallel tasks on a Ray cluster
    (the one at `address`, or a local one for this call), `actors` at once (`share_cluster`). The first
    error, in category order, is raised once all tasks are done."""
    ray = import_ray()
    with ray_cluster(address):
        sharing = share_cluster(ray, str(params.get("device", "auto")), actors, len(categories))
        task = ray.remote(evaluate_task).options(**sharing.options)
        settings = params | {"progress": False}
        futures = [
            task.remote(settings, category.absolute(), eval_size, keep_maps, sharing.threads, tmp_dir)
            for category in categories
        ]
        try:
            evaluations = ray.get(futures)
        except ray.exceptions.RayError as error:
            raise worker_failure(error) from None
    for category, evaluation in zip(categories, evaluations, strict=True):
        if isinstance(evaluation, GaussADError):
            raise evaluation
        _name_as_given(evaluation, category)
    return evaluations


def _name_as_given(evaluation: CategoryEvaluation, category: Path) -> None:
    """Name the evaluation's images under `category` as the caller gave it (the task was given its
    absolute path, which a worker needs)."""
    absolute = category.absolute()
    for image in evaluation.predictions.images:
        image.path = category / image.path.relative_to(absolute)
        if image.mask_path is not None:
            image.mask_path = category / image.mask_path.relative_to(absolute)
