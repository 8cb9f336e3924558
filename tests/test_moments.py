"""Moments of shards merge into the moments of all images: sums about one shift, per fold and position."""

import numpy as np
import pytest
import torch

from gaussad.accumulate import LevelAccumulator, positional_values
from gaussad.fitpass import HeldLevel
from gaussad.moments import Moments
from gaussad.store import DiskStore


def values(seed: int, n: int = 12, positions: int = 6, channels: int = 5) -> torch.Tensor:
    """Float32 feature vectors (n, P, C) with a large mean against their spread, as backbone features."""
    rng = np.random.default_rng(seed)
    spread = rng.normal(size=(n, positions, channels)) @ rng.normal(size=(channels, channels))
    return torch.from_numpy(spread + 50.0 + rng.normal(size=(positions, 1))).float()


def accumulated(parts: list[tuple[torch.Tensor, list[int]]], per_position: bool) -> Moments:
    moments = Moments(per_position, n_folds=3)
    for part, folds in parts:
        moments.add(part, (2, 3), folds)
    return moments


@pytest.mark.parametrize("per_position", [False, True])
def test_merged_shards_equal_one_pass(per_position: bool) -> None:
    first, second = values(0), values(1) * 1.5 + 3.0  # the second shard's shift lies elsewhere
    folds_first, folds_second = [0] * 5 + [1] * 7, [1] * 4 + [2] * 8
    whole = accumulated([(first, folds_first), (second, folds_second)], per_position)
    merged = accumulated([(first, folds_first)], per_position).merge(
        accumulated([(second, folds_second)], per_position)
    )
    assert merged.folds == whole.folds
    torch.testing.assert_close(merged.shift, whole.shift, rtol=0, atol=0)
    torch.testing.assert_close(merged.sums, whole.sums, rtol=1e-11, atol=1e-9)
    torch.testing.assert_close(merged.outer, whole.outer, rtol=1e-11, atol=1e-8)
    if per_position:
        torch.testing.assert_close(merged.position_outer, whole.position_outer, rtol=1e-11, atol=1e-8)
    # Against the definition: about the shift, each fold's sum of vectors and of outer products.
    wide = torch.cat([first, second]).double() - merged.shift
    fold_index = torch.tensor(folds_first + folds_second)
    for fold in range(3):
        members = wide[fold_index == fold]
        flat = members.reshape(-1, members.shape[-1])
        expected_sum = members.sum(dim=0) if per_position else flat.sum(dim=0)
        torch.testing.assert_close(merged.sums[fold], expected_sum, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(merged.outer[fold], flat.T @ flat, rtol=1e-10, atol=1e-7)


def test_merging_into_empty_moments_copies_them() -> None:
    part = values(2)
    single = accumulated([(part, [0] * 12)], per_position=True)
    merged = Moments(True, n_folds=3).merge(accumulated([(part, [0] * 12)], per_position=True))
    torch.testing.assert_close(merged.position_outer, single.position_outer, rtol=0, atol=0)
    assert Moments(True, 3).merge(Moments(True, 3)).shift is None


def test_moments_of_other_kinds_or_grids_do_not_merge() -> None:
    shared = accumulated([(values(3), [0] * 12)], per_position=False)
    with pytest.raises(ValueError, match="do not merge"):
        shared.merge(accumulated([(values(4), [0] * 12)], per_position=True))
    other_grid = Moments(False, 3)
    other_grid.add(values(5), (3, 2), [0] * 12)
    with pytest.raises(ValueError, match="grid changed"):
        shared.merge(other_grid)


@pytest.mark.parametrize("per_position", [False, True])
def test_held_shards_handed_over_give_the_same_gaussians(tmp_path, per_position: bool) -> None:
    """A level's Gaussians, full and per fold, from shards accumulated apart equal those of one pass."""
    maps = [part.permute(0, 2, 1).reshape(12, 5, 2, 3) for part in (values(6), values(7), values(8))]
    folds = [[0] * 12, [1] * 6 + [2] * 6, [2] * 12]
    local = LevelAccumulator(DiskStore(tmp_path / "local.f32"), per_position, n_folds=3)
    sharded = LevelAccumulator(DiskStore(tmp_path / "sharded.f32"), per_position, n_folds=3)
    for part, part_folds in zip(maps, folds, strict=True):
        local.add(part, part_folds)
        held = HeldLevel(per_position, n_folds=3)
        held.add(part, part_folds)
        held.hand_over(sharded)
    assert (tmp_path / "local.f32").read_bytes() == (tmp_path / "sharded.f32").read_bytes()
    torch.testing.assert_close(positional_values(maps[0]), values(6))
    for expected, found in zip(
        local.finish_many("opca", 0.5, [None, 0, 1, 2]),
        sharded.finish_many("opca", 0.5, [None, 0, 1, 2]),
        strict=True,
    ):
        np.testing.assert_allclose(found.mean, expected.mean, rtol=1e-12)
        precision = found.whitening @ np.swapaxes(found.whitening, -1, -2)
        expected_precision = expected.whitening @ np.swapaxes(expected.whitening, -1, -2)
        np.testing.assert_allclose(precision, expected_precision, rtol=1e-8, atol=1e-12)
