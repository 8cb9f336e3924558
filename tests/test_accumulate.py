"""Streaming fit of positional Gaussians equals the fit on all features held at once."""

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from gaussad import accumulate
from gaussad.accumulate import LevelAccumulator, positional_values
from gaussad.gaussian import fit_gaussian, fit_projection
from gaussad.store import DiskStore, MemoryStore


def feature_maps(seed: int, n: int = 24, channels: int = 6, height: int = 3, width: int = 4) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(channels, channels))
    values = (
        rng.normal(size=(n, height, width, channels)) @ mixing + 10.0 + rng.normal(size=(height, width, 1))
    )
    return torch.from_numpy(values).permute(0, 3, 1, 2).float()


def stream(tmp_path, maps: torch.Tensor, per_position: bool, batch: int = 5):
    accumulator = LevelAccumulator(DiskStore(tmp_path / "spill.f32"), per_position=per_position)
    for start in range(0, len(maps), batch):
        accumulator.add(maps[start : start + batch])
    return accumulator


def test_shared_gaussian_equals_in_memory_fit(tmp_path) -> None:
    maps = feature_maps(0)
    gaussian = stream(tmp_path, maps, per_position=False).finish("opca", 0.3)
    flat = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).double().numpy()
    expected = fit_gaussian(flat, "opca", 0.3)
    np.testing.assert_allclose(gaussian.mean, expected.mean, rtol=1e-12)
    np.testing.assert_allclose(gaussian.shrinkage, expected.shrinkage, rtol=1e-9, atol=1e-15)
    # Whitening is defined up to the sign of each eigenvector: compare the precision it implies.
    np.testing.assert_allclose(
        gaussian.whitening @ gaussian.whitening.T,
        expected.whitening @ expected.whitening.T,
        rtol=1e-8,
        atol=1e-10,
    )


def test_per_position_gaussians_equal_ledoit_wolf_at_each_position(tmp_path) -> None:
    maps = feature_maps(1)
    n, channels, height, width = maps.shape
    gaussian = stream(tmp_path, maps, per_position=True).finish("none", 1.0)
    assert gaussian.mean.shape == (height * width, channels)
    positional = maps.permute(2, 3, 0, 1).reshape(height * width, n, channels).double().numpy()
    projection = fit_projection(np.cov(positional.reshape(-1, channels).T, bias=True), "none", 1.0)
    for p in range(height * width):
        reduced = (positional[p] - positional[p].mean(axis=0)) @ projection
        covariance = projection @ LedoitWolf().fit(reduced).covariance_ @ projection.T
        np.testing.assert_allclose(gaussian.mean[p], positional[p].mean(axis=0), rtol=1e-10)
        precision = gaussian.whitening[p] @ gaussian.whitening[p].T
        np.testing.assert_allclose(precision, np.linalg.inv(covariance), rtol=1e-6, atol=1e-9)


def test_batch_size_does_not_change_the_result(tmp_path) -> None:
    maps = feature_maps(2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = stream(tmp_path / "a", maps, per_position=False, batch=1).finish("opca", 0.2)
    second = stream(tmp_path / "b", maps, per_position=False, batch=24).finish("opca", 0.2)
    np.testing.assert_allclose(
        first.whitening @ first.whitening.T, second.whitening @ second.whitening.T, rtol=1e-8
    )


def test_constant_position_keeps_a_finite_precision(tmp_path) -> None:
    maps = feature_maps(3)
    maps[:, :, 0, 0] = 0.25  # like a black image corner: every training image identical there
    gaussian = stream(tmp_path, maps, per_position=True).finish("opca", 0.5)
    assert np.isfinite(gaussian.whitening).all()
    assert np.abs(gaussian.whitening[0]).max() < 1e6


def test_excluding_a_fold_equals_fitting_without_it(tmp_path) -> None:
    maps = feature_maps(4, n=20)
    folds = [i % 4 for i in range(20)]
    accumulator = LevelAccumulator(DiskStore(tmp_path / "all.f32"), per_position=True, n_folds=4)
    for start in range(0, 20, 6):
        accumulator.add(maps[start : start + 6], folds[start : start + 6])
    without = accumulator.finish("opca", 0.4, exclude_fold=1)
    kept = torch.stack([maps[i] for i in range(20) if folds[i] != 1])
    expected = stream(tmp_path, kept, per_position=True).finish("opca", 0.4)
    np.testing.assert_allclose(without.mean, expected.mean, rtol=1e-12)
    np.testing.assert_allclose(
        without.whitening @ without.whitening.transpose(0, 2, 1),
        expected.whitening @ expected.whitening.transpose(0, 2, 1),
        rtol=1e-7,
        atol=1e-9,
    )
    held_out = list(accumulator.fold_batches(1, batch_size=2))
    assert max(len(batch) for batch in held_out) <= 2
    torch.testing.assert_close(
        torch.cat(held_out), torch.stack([maps[i] for i in range(20) if folds[i] == 1])
    )


@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize(("reduction", "variance"), [("opca", 0.3), ("none", 1.0)])
def test_one_pass_for_many_folds_equals_one_pass_each(
    tmp_path, per_position: bool, reduction: str, variance: float
) -> None:
    maps = feature_maps(5, n=15)
    folds = [i % 3 for i in range(15)]
    accumulator = LevelAccumulator(DiskStore(tmp_path / "all.f32"), per_position=per_position, n_folds=3)
    for start in range(0, 15, 4):
        accumulator.add(maps[start : start + 4], folds[start : start + 4])
    cases = [None, 0, 1, 2]
    together = accumulator.finish_many(reduction, variance, cases)
    for case, gaussian in zip(cases, together, strict=True):
        alone = accumulator.finish(reduction, variance, exclude_fold=case)
        np.testing.assert_allclose(gaussian.mean, alone.mean, rtol=1e-12)
        np.testing.assert_allclose(gaussian.shrinkage, alone.shrinkage, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(gaussian.whitening, alone.whitening, rtol=1e-9, atol=1e-12)
    assert not np.allclose(together[0].mean, together[1].mean)  # each case its own images


@pytest.mark.parametrize("per_position", [False, True])
def test_reading_the_spill_in_small_chunks_changes_nothing(tmp_path, monkeypatch, per_position: bool) -> None:
    maps = feature_maps(6, n=16)
    folds = [i * 4 // 16 for i in range(16)]

    def fit(name: str, release: bool) -> list:
        accumulator = LevelAccumulator(DiskStore(tmp_path / name), per_position=per_position, n_folds=4)
        for start in range(0, 16, 5):
            accumulator.add(maps[start : start + 5], folds[start : start + 5])
        return accumulator.finish_many("opca", 0.3, [None, 0, 1, 2, 3], release=release)

    whole = fit("whole.f32", release=False)
    monkeypatch.setattr(accumulate, "_READ_CHUNK_VALUES", 1)  # one image per read
    monkeypatch.setattr(accumulate, "_QUARTIC_BLOCK_BYTES", 1)
    chunked = fit("chunked.f32", release=True)
    for expected, gaussian in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(gaussian.mean, expected.mean, rtol=1e-12)
        np.testing.assert_allclose(gaussian.shrinkage, expected.shrinkage, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(gaussian.whitening, expected.whitening, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("per_position", [False, True])
def test_every_feature_store_gives_the_same_gaussians(tmp_path, per_position: bool) -> None:
    """Memory and disk stores hold the same values (the same Gaussians to the bit); without a store, the
    features fed again to a `Finishing` (in other batches, on two shards) give them to rounding."""
    maps = feature_maps(6, n=16)
    folds = [i * 4 // 16 for i in range(16)]
    cases = [None, 0, 1, 2, 3]

    def accumulated(store) -> LevelAccumulator:
        accumulator = LevelAccumulator(store, per_position=per_position, n_folds=4)
        for start in range(0, 16, 5):
            accumulator.add(maps[start : start + 5], folds[start : start + 5])
        return accumulator

    on_disk = accumulated(DiskStore(tmp_path / "level.f32")).finish_many("opca", 0.3, cases, release=True)
    in_memory = accumulated(MemoryStore()).finish_many("opca", 0.3, cases, release=True)
    unstored = accumulated(None)
    finishing = unstored.finishing("opca", 0.3, cases)
    shards = [finishing.empty(), finishing.empty()]  # as on two workers, their sums added
    for start in range(0, 16, 3):
        shards[start >= 8].add(start, positional_values(maps[start : start + 3]).numpy())
    for shard in shards:
        finishing.add_sums(shard.quartics, shard.fold_outer)
    without = unstored.finished(finishing, release=True)
    with pytest.raises(ValueError, match="not kept"):
        next(unstored.fold_batches(0, 4))
    for disk, memory, replayed in zip(on_disk, in_memory, without, strict=True):
        np.testing.assert_array_equal(memory.whitening, disk.whitening)
        np.testing.assert_array_equal(memory.mean, disk.mean)
        np.testing.assert_allclose(replayed.mean, disk.mean, rtol=1e-12)
        np.testing.assert_allclose(replayed.shrinkage, disk.shrinkage, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(replayed.whitening, disk.whitening, rtol=1e-9, atol=1e-12)
