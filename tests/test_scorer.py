"""The scorer module: the one place scores and maps are computed, exportable to ONNX as it is."""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gaussad import GaussAD
from gaussad.features import prepare
from gaussad.layout import list_test_images, training_images

SMALL = {"image_size": 64, "batch_size": 4, "device": "cpu"}


@pytest.fixture(scope="module")
def tiny(category: Path) -> GaussAD:
    """A hybrid model at 64 px with an image grid that does not divide the level grids (4 x 4 into 3)."""
    return GaussAD(**SMALL, image_grid=3, localization="hybrid").fit(training_images(category)[:8])


def normalized(model: GaussAD, paths: list[Path]) -> torch.Tensor:
    """The scorer's input for images, as prediction prepares it."""
    from gaussad.features import BatchRunner

    pixels = np.stack([prepare(path, model.image_size_)[0] for path in paths])
    runner = BatchRunner(model.scorer_, model.backbone_.preprocessing, model.image_size_, model.device_)
    return runner.normalize(pixels)


def test_the_scorer_holds_every_fitted_array_as_a_float32_buffer(tiny: GaussAD) -> None:
    buffers = dict(tiny.scorer_.named_buffers())
    means = [name for name in buffers if name.endswith("_mean")]
    # Two image levels, five map levels (the anomaly map's 3-5 and the score map's 6 and 7), the position
    # Gaussian and the global part's five levels, each with its whitening.
    assert len(means) == 13 and all(name.replace("_mean", "_whitening") in buffers for name in means)
    assert sum(name.startswith("global_head.") for name in means) == 5
    assert all(buffer.dtype == torch.float32 for buffer in buffers.values())
    torch.testing.assert_close(
        buffers["map_head.position_whitening"].double(), torch.from_numpy(tiny.position_gaussian_.whitening)
    )


def test_scores_and_maps_at_the_input_size_are_the_scorer_output(tiny: GaussAD, category: Path) -> None:
    paths = [t.path for t in list_test_images(category)]
    with torch.inference_mode():
        scores, maps = tiny.scorer_(normalized(tiny, paths))
    assert scores.shape == (8,) and maps.shape == (8, 64, 64)
    predicted = tiny.predict(paths)  # maps at each image's own size: 96 x 96
    np.testing.assert_allclose(predicted.scores, scores.numpy(), rtol=1e-6)
    at_input = [b.maps for b in tiny.iter_predict(paths, map_sizes=[(64, 64)] * 8)]
    np.testing.assert_allclose(np.concatenate(at_input), maps.numpy(), rtol=1e-6)


def test_the_scorer_exports_to_onnx_and_scores_the_same(
    tiny: GaussAD, category: Path, tmp_path: Path
) -> None:
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    paths = [t.path for t in list_test_images(category)]
    batch = normalized(tiny, paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes it fixes as constants
        torch.onnx.export(
            tiny.scorer_,
            (batch[:2],),
            tmp_path / "scorer.onnx",
            dynamo=False,
            input_names=["images"],
            output_names=["scores", "maps"],
            dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}, "maps": {0: "n"}},
        )
    onnx.checker.check_model(onnx.load(tmp_path / "scorer.onnx"))
    session = onnxruntime.InferenceSession(tmp_path / "scorer.onnx", providers=["CPUExecutionProvider"])
    scores, maps = session.run(None, {"images": batch.numpy()})  # another batch size than exported
    with torch.inference_mode():
        expected_scores, expected_maps = tiny.scorer_(batch)
    np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=1e-5)
    np.testing.assert_allclose(maps, expected_maps.numpy(), rtol=1e-4, atol=1e-4 * float(expected_maps.max()))


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("gaussad.persistence", "gaussad.model"),
        ("gaussad.metrics", "torch"),
        ("gaussad.calibration", "torch"),
        # The command line reads these to name a wrong folder before it loads the library.
        ("gaussad.modelfolder", "numpy"),
        ("gaussad.layout", "torch"),
        ("gaussad.layout", "sklearn"),
    ],
)
def test_modules_import_only_what_they_need(module: str, absent: str) -> None:
    code = f"import sys, {module}; assert {absent!r} not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
