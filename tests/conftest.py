"""Shared fixtures: a small synthetic data set in MVTec AD layout, the real data when present, PyTorch's
thread count for one test, a local Ray cluster, the check that two fits gave the same model, and the image
score's grid kept at any number of training images."""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
BOTTLE = REAL_DATA / "mvtec_ad" / "bottle"
MAGNETIC_TILE = REAL_DATA / "magnetic_tile"


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str) -> ModuleType:
    """A script of `benchmarks/` imported as a module (that folder is not a package), with the folder on
    the import path, as when the script runs, for the module the scripts share (`bench_rows`)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fit_small(images: list, **options):
    """A `GaussAD` fitted on small inputs (64 px, batches of 4, CPU): the engines' and stores' tests."""
    from gaussad import GaussAD

    return GaussAD(image_size=64, batch_size=4, device="cpu", **options).fit(images)


def relative(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(found - expected)) / np.max(np.abs(expected)))


def assert_same_model(found, expected, tests: list[Path]) -> None:
    """Two fitted `GaussAD`s are the same model (the engines' and feature stores' promise): means to 1e-9
    relative and whitenings to 1e-7 (the smallest components of a nearly singular covariance, as the
    deepest level's on a 2 x 2 grid of a few images, amplify the rounding of another summation order),
    held-out results and thresholds, test scores to 1e-6."""
    pairs = [
        *zip(found.state_.image_gaussians, expected.state_.image_gaussians, strict=True),
        *zip(found.state_.map_gaussians, expected.state_.map_gaussians, strict=True),
    ]
    if expected.state_.position_gaussian is not None:
        pairs.append((found.state_.position_gaussian, expected.state_.position_gaussian))
    for got, want in pairs:
        assert relative(got.mean, want.mean) <= 1e-9
        assert relative(got.whitening, want.whitening) <= 1e-7
    assert found.n_train_ == expected.n_train_
    np.testing.assert_allclose(found.held_out_scores_, expected.held_out_scores_, rtol=1e-6)
    assert found.image_threshold_.value == pytest.approx(expected.image_threshold_.value, rel=1e-6)
    assert (found.state_.image_score, found.state_.localization) == (
        expected.state_.image_score,
        expected.state_.localization,
    )
    np.testing.assert_allclose(found.score_samples(tests), expected.score_samples(tests), rtol=1e-6)


def texture(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A regular woven pattern with mild noise: what 'normal' looks like in the synthetic category."""
    y, x = np.mgrid[0:size, 0:size]
    pattern = 0.5 + 0.25 * np.sin(x / 3.0) * np.cos(y / 3.0)
    image = np.stack([pattern, pattern * 0.9, pattern * 0.8], axis=-1) + rng.normal(0, 0.02, (size, size, 3))
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def marked_texture(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A textured part with a dark disc and a bright bar, each always at the same place."""
    image = texture(rng, size).astype(np.float64)
    y, x = np.mgrid[0:size, 0:size]
    image[(y - 30) ** 2 + (x - 34) ** 2 < 14**2] *= 0.25
    image[(np.abs(y - 70) < 5) & (x > 20) & (x < 80)] = 240
    return image.astype(np.uint8)


def with_defect(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A textured image with a bright scratch, and its mask."""
    image = texture(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    top, left = rng.integers(10, size - 40, size=2)
    mask[top : top + 24, left : left + 10] = 255
    image[mask > 0] = (250, 40, 40)
    return image, mask


def make_category(root: Path, n_train: int = 16, n_good: int = 4, n_bad: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for folder in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(texture(rng)).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(texture(rng)).save(root / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        image, mask = with_defect(rng)
        Image.fromarray(image).save(root / "test" / "scratch" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def min_images_for_grid():
    """Test fits learn from a few dozen images, fewer than the line below which the combined image score
    drops its grid (`gaussad.model.MIN_IMAGES_FOR_GRID`): they keep it, so that the three-part score stays
    under test. The line's own tests take it back from this fixture's value; fits in other processes (the
    command line run as a program, Ray's workers) keep the line."""
    from gaussad import model

    with pytest.MonkeyPatch.context() as patch:
        line = model.MIN_IMAGES_FOR_GRID
        patch.setattr(model, "MIN_IMAGES_FOR_GRID", 0)
        yield line


@pytest.fixture(scope="session")
def category(tmp_path_factory) -> Path:
    """A small category ('widget') in MVTec layout; read-only by convention."""
    return make_category(tmp_path_factory.mktemp("data") / "widget")


@pytest.fixture(scope="session")
def tiny(category: Path):
    """A model at 64 px fitted on 8 synthetic images, shared by the export and runtime tests (which only read
    it): the defaults with hybrid maps, the fullest scorer (every Gaussian it can hold), fixed rather than
    left to the auto localization's choice on images that few."""
    from gaussad import GaussAD
    from gaussad.layout import training_images

    model = GaussAD(image_size=64, batch_size=4, device="cpu", localization="hybrid")
    return model.fit(training_images(category)[:8])


def needs(path: Path):
    """Skip a test, with the reason, where the real data set is not next to the repository."""
    return pytest.mark.skipif(not path.is_dir(), reason=f"real data not found at {path}")


@pytest.fixture
def torch_threads():
    """Call it with a count to run the test's PyTorch on that many threads; the count before comes back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """A local two-CPU Ray cluster, started once for the engine's tests and stopped after the last of them;
    they skip, with the reason, only where Ray cannot start here."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        pytest.skip(f"a local Ray cluster did not start: {error}")
    try:
        yield ray
    finally:
        ray.shutdown()
