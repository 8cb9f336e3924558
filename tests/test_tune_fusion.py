"""The ways of joining the combined score's parts compared by `benchmarks/tune_fusion.py`: the default's
row ranks as the model's own combined score, the joins between a sum and a maximum lie between them, the
sum-or-grid join takes the larger z-score, and one defect type is scored apart from the others."""

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import benchmark_script
from scipy.stats import rankdata

from gaussad.model import GaussAD
from gaussad.scorer import combined_scores

tune_fusion = benchmark_script("tune_fusion")


def _parts() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each part's (held-out, test) scores on different scales, as the fits give them."""
    rng = np.random.default_rng(0)
    parts = {}
    for name, (centre, spread) in {
        "pooled": (40.0, 3.0),
        "map": (2.0, 0.2),
        "paper": (9.0, 1.5),
        "global 3-5": (7.0, 1.0),
        "map 3-7": (2.5, 0.3),
    }.items():
        parts[name] = (rng.normal(centre, spread, 60), rng.normal(centre + spread, 2 * spread, 30))
    return parts


def test_the_default_row_ranks_as_the_models_combined_score() -> None:
    parts = _parts()
    held, test = tune_fusion.ways(parts)[tune_fusion.DEFAULT]
    names = ("pooled", "map 3-7", "paper")
    scales = [float(np.std(parts[name][0])) for name in names]
    pooled, tops, whole = (parts[name][1] for name in names)
    model = combined_scores(pooled, tops, scales, whole)
    np.testing.assert_array_equal(rankdata(test), rankdata(model))
    pooled, tops, whole = (parts[name][0] for name in names)
    model_held = combined_scores(pooled, tops, scales, whole)
    threshold = np.quantile(model_held, 0.99)
    np.testing.assert_array_equal(test > np.quantile(held, 0.99), model > threshold)


def test_joins_between_a_sum_and_a_maximum_lie_between_them() -> None:
    z = [np.array([3.0, -1.0, 0.5, 8.0]), np.array([0.0, -2.0, 0.5, 1.0]), np.array([1.0, -0.5, 0.5, -4.0])]
    largest = np.max(z, axis=0)
    soft = tune_fusion._soft_maximum(z, axis=0)
    assert np.all(soft > largest) and np.all(soft <= largest + np.log(3))
    positive = np.clip(z, 0.0, None)
    length = tune_fusion._root_sum_of_squares(z, axis=0)
    assert np.all(length >= positive.max(axis=0)) and np.all(length <= positive.sum(axis=0))
    fisher = tune_fusion._fisher(z, axis=0)
    raised = tune_fusion._fisher([z[0] + 0.1, z[1], z[2]], axis=0)
    assert np.all(raised > fisher)  # a part further from normal always raises the joined score


def test_the_sum_or_the_grid_takes_the_larger_of_their_z_scores() -> None:
    parts = _parts()
    three = [parts[name] for name in ("pooled", "map", "paper")]
    held, test = tune_fusion._sum_or_grid(three)
    sum_held, sum_test = tune_fusion._z_scores(tune_fusion._joined(three, np.sum))
    grid_held, grid_test = tune_fusion._z_scores(three[0])
    np.testing.assert_allclose(held, np.maximum(sum_held, grid_held))
    np.testing.assert_allclose(test, np.maximum(sum_test, grid_test))
    assert np.any(test == grid_test) and np.any(test == sum_test)  # each decides somewhere


def test_a_defect_type_apart_is_scored_against_the_good_images_alone(
    category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second defect type, "same", whose images are the good test images themselves: scored apart, it
    # cannot be told from the good ones (AUROC 0.5, every image missed), while the scratches can.
    data = tmp_path / category.name
    shutil.copytree(category, data)
    shutil.copytree(data / "test" / "good", data / "test" / "same")
    masks = sorted((data / "ground_truth" / "scratch").iterdir())
    (data / "ground_truth" / "same").mkdir()
    for path, mask in zip(sorted((data / "test" / "same").iterdir()), masks, strict=False):
        shutil.copy(mask, data / "ground_truth" / "same" / f"{path.stem}_mask.png")
    monkeypatch.setattr(tune_fusion, "GaussAD", functools.partial(GaussAD, image_size=64, batch_size=4))
    with pytest.raises(SystemExit, match="no test images of the defect type 'dent'"):
        tune_fusion.run(data, "none", apart=["same", "dent"])
    auroc, _, false_alarms, misses, same, same_misses, others, others_misses = tune_fusion.run(
        data, "none", apart=["same"]
    )["pooled alone"]
    assert (same, others) == (0.5, 1.0) and 0.5 < auroc < 1.0
    assert same_misses == 1.0 - false_alarms and others_misses < misses
