"""Model inputs (decoded, squashed to a square) and image descriptors (feature maps pooled globally or per
cell of a grid)."""

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gaussad
from gaussad.backbones import load_backbone
from gaussad.features import BatchRunner, pool_features, pooling_matrix, prepare, stack_levels
from gaussad.scorer import LevelFeatures
from gaussad.tuning import ForwardThreads


@pytest.fixture
def small_extractor() -> BatchRunner:
    """Level 3 of the default backbone at 64 px, two images a batch, on the CPU."""
    backbone = load_backbone("efficientnet_lite0")
    features = LevelFeatures(backbone, [3])
    return BatchRunner(features, backbone.preprocessing, 64, torch.device("cpu"), batch_size=2)


@pytest.fixture
def tuned():
    """The test runs under gaussad.cpu_tuning()."""
    with gaussad.cpu_tuning():
        yield


@pytest.mark.parametrize("shape", [(300, 200, 3), (50, 70, 3), (64, 64, 3)], ids=["down", "up", "same"])
def test_inputs_are_squashed_as_pillow_bilinear_does(shape: tuple[int, int, int]) -> None:
    original = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    original.setflags(write=False)  # as PIL's arrays are: no warning, no write
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels, size, _ = prepare(original, 64)
    expected = np.asarray(Image.fromarray(original).resize((64, 64), Image.Resampling.BILINEAR))
    assert size == shape[:2] and pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - expected).max() <= 1  # rounding only


def test_grid_pooling_averages_each_cell_and_keeps_channels_together() -> None:
    features = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    torch.testing.assert_close(pool_features(features, 1), features.mean(dim=(2, 3)))
    pooled = pool_features(features, 2)
    assert pooled.shape == (2, 3 * 2 * 2)
    # Channel-major: channel c's four cells (top-left, top-right, bottom-left, bottom-right) are adjacent.
    top_left = features[:, :, :2, :2].mean(dim=(2, 3))
    bottom_right = features[:, :, 2:, 2:].mean(dim=(2, 3))
    torch.testing.assert_close(pooled.view(2, 3, 4)[:, :, 0], top_left)
    torch.testing.assert_close(pooled.view(2, 3, 4)[:, :, 3], bottom_right)


def test_grid_pooling_covers_maps_that_do_not_divide_evenly() -> None:
    features = torch.rand(1, 2, 7, 7, dtype=torch.float64)
    pooled = pool_features(features, 4).view(1, 2, 4, 4)
    # Cells overlap where 7 does not divide by 4, yet the corners stay corners.
    torch.testing.assert_close(pooled[0, :, 0, 0], features[0, :, :2, :2].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled[0, :, 3, 3], features[0, :, 5:, 5:].mean(dim=(1, 2)))


@pytest.mark.parametrize(("cells", "grid"), [(7, 4), (28, 14), (33, 17), (5, 1), (9, 9)])
def test_pooling_matrices_average_as_adaptive_pooling_does(cells: int, grid: int) -> None:
    features = torch.rand(2, 3, cells, cells + 2, dtype=torch.float64)
    rows, columns = pooling_matrix(cells, grid), pooling_matrix(cells + 2, grid)
    expected = F.adaptive_avg_pool2d(features, grid)
    torch.testing.assert_close(rows @ features @ columns.T, expected)


def test_stacked_levels_sit_on_the_coarsest_grid() -> None:
    fine = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    coarse = torch.rand(2, 5, 4, 4, dtype=torch.float64)
    stacked = stack_levels([fine, coarse])
    assert stacked.shape == (2, 8, 4, 4)
    torch.testing.assert_close(stacked[:, :3, 1, 2], fine[:, :, 2:4, 4:6].mean(dim=(2, 3)))
    torch.testing.assert_close(stacked[:, 3:], coarse)


@pytest.mark.parametrize(
    ("decode_seconds", "threads_after"), [(0.25, 1), (0.02, 2)], ids=["decoding-bound", "forward-bound"]
)
def test_forward_pass_keeps_one_thread_only_while_decoding_costs_more(
    torch_threads, decode_seconds: float, threads_after: int
) -> None:
    torch_threads(2)  # as on the 2-core machines the defaults were measured on
    with gaussad.cpu_tuning(), ForwardThreads(torch.device("cpu"), decoders=2, batches=4) as forward_threads:
        assert torch.get_num_threads() == 1
        forward_threads.observe(0.5, decode_seconds, 16)  # the first batch warms the model up: not used
        assert torch.get_num_threads() == 1
        forward_threads.observe(0.16, decode_seconds, 16)
        assert torch.get_num_threads() == threads_after
        forward_threads.observe(0.16, 0.02 if threads_after == 1 else 0.25, 16)  # decided once
        assert torch.get_num_threads() == threads_after
    assert torch.get_num_threads() == 2


def test_feature_batches_restore_the_thread_count_when_the_reader_stops_early(
    torch_threads, tuned, small_extractor: BatchRunner, category
) -> None:
    torch_threads(2)
    batches = small_extractor.batches(sorted((category / "train" / "good").iterdir()))
    first = next(batches)
    assert torch.get_num_threads() == 1 and first.outputs[0].shape == (2, 40, 8, 8)
    batches.close()
    assert torch.get_num_threads() == 2


def test_a_single_batch_keeps_every_thread(
    torch_threads, tuned, small_extractor: BatchRunner, category
) -> None:
    torch_threads(2)
    batches = small_extractor.batches(sorted((category / "train" / "good").iterdir())[:2])
    next(batches)
    assert torch.get_num_threads() == 2
    batches.close()


def test_the_progress_bar_ends_when_the_reader_stops(
    small_extractor: BatchRunner, category, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A progress bar left open would print its line over the next message (an error, say)."""
    from gaussad import features

    bars = []
    make_bar = features._progress_bar
    monkeypatch.setattr(features, "_progress_bar", lambda *args: bars.append(make_bar(*args)) or bars[-1])
    batches = small_extractor.batches(sorted((category / "train" / "good").iterdir()), progress="fit")
    next(batches)
    batches.close()
    assert len(bars) == 1 and bars[0].disable is True  # tqdm marks a closed bar disabled


def test_a_single_image_decodes_in_the_callers_thread(
    small_extractor: BatchRunner, category, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing overlaps one image's decoding, so starting a thread for it would only add its start-up; the
    features and errors are those of the threaded path."""
    from gaussad import features

    callers = []
    timed_prepare = features._timed_prepare

    def recorded(*args, **options):
        callers.append(threading.get_ident())
        return timed_prepare(*args, **options)

    monkeypatch.setattr(features, "_timed_prepare", recorded)
    image = sorted((category / "train" / "good").iterdir())[0]
    broken = category / "broken.png"
    broken.write_bytes(b"not a png")
    alone = next(small_extractor.batches([image]))
    assert callers == [threading.get_ident()]
    with pytest.raises(gaussad.errors.GaussADError, match="broken.png") as inline_error:
        next(small_extractor.batches([broken]))
    monkeypatch.setattr(features, "decoding_pool", lambda _, workers: ThreadPoolExecutor(workers))
    threaded = next(small_extractor.batches([image]))
    assert threading.get_ident() not in callers[2:]
    torch.testing.assert_close(alone.outputs[0], threaded.outputs[0], rtol=0, atol=0)
    with pytest.raises(gaussad.errors.GaussADError) as threaded_error:
        next(small_extractor.batches([broken]))
    assert str(inline_error.value) == str(threaded_error.value)
