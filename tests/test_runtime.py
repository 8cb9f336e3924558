"""The torch-free runtime: an exported file scores, maps and decides as GaussAD.predict does."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BOTTLE, MAGNETIC_TILE, needs
from PIL import Image

from gaussad import GaussAD
from gaussad.decisions import decide_all
from gaussad.errors import GaussADError
from gaussad.export import export_onnx
from gaussad.features import prepare
from gaussad.layout import list_test_images, training_images
from gaussad.maps import resize_map as torch_resize_map
from gaussad.runtime import OnnxModel, resize_map, resize_pixels

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny: GaussAD, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(tiny, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def assert_same_predictions(runtime, expected, score_rtol: float = 1e-4, map_share: float = 1e-3) -> None:
    """Scores to score_rtol relative, each map to map_share of its range."""
    assert runtime.names == expected.names
    np.testing.assert_allclose(runtime.scores, expected.scores, rtol=score_rtol)
    for got, want in zip(runtime.maps, expected.maps, strict=True):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=map_share * np.ptp(want))


# --------------------------------------------------------------------------------------- resampling
def test_the_input_resize_is_pytorchs_bit_for_bit_on_images_and_inputs_of_many_sizes() -> None:
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 300), (300, 1), (224, 224), (900, 900), (1200, 37), (63, 65), (196, 246)]
    shapes += [tuple(rng.integers(1, 1000, 2)) for _ in range(60)]
    for height, width in shapes:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        sizes = (224, int(rng.integers(2, 400)), (320, 800), tuple(int(n) for n in rng.integers(2, 400, 2)))
        for size in sizes:
            np.testing.assert_array_equal(
                resize_pixels(pixels, size), prepare(pixels, size)[0], err_msg=f"{height}x{width} -> {size}"
            )


def test_the_map_resize_is_pytorchs_to_float32_rounding() -> None:
    rng = np.random.default_rng(1)
    for _ in range(60):
        source = tuple(int(n) for n in rng.integers(1, 300, 2)) if rng.random() < 0.5 else (224, 224)
        target = tuple(int(n) for n in rng.integers(1, 1200, 2))
        anomaly_map = (rng.random(source, dtype=np.float32) * rng.choice([1.0, 40.0, 1e4])).astype(np.float32)
        expected = torch_resize_map(torch.from_numpy(anomaly_map), target).numpy()
        resized = resize_map(anomaly_map, target)
        assert resized.shape == target and resized.dtype == np.float32
        np.testing.assert_allclose(resized, expected, rtol=0, atol=1e-6 * np.ptp(anomaly_map))
    same = np.ones((5, 7), np.float32)
    assert resize_map(same, (5, 7)) is same


# ------------------------------------------------------------------------------------------ model
def test_the_runtime_predicts_as_gaussad(exported: Path, tiny: GaussAD, category: Path) -> None:
    paths = [t.path for t in list_test_images(category)]
    model = OnnxModel.load(exported, batch_size=3)
    assert model.image_size_ == 64
    assert model.image_threshold_ == tiny.image_threshold_ and model.pixel_threshold_ == tiny.pixel_threshold_
    runtime, expected = model.predict(paths), tiny.predict(paths)
    assert_same_predictions(runtime, expected)
    decisions = decide_all(runtime.scores, model.image_threshold_)
    np.testing.assert_array_equal(runtime.is_anomalous, [d.is_anomalous for d in decisions])
    np.testing.assert_allclose(runtime.normalized_scores, [d.normalized_score for d in decisions], atol=1e-6)
    expected_flags = [d.is_anomalous for d in decide_all(expected.scores, tiny.image_threshold_)]
    np.testing.assert_array_equal(runtime.is_anomalous, expected_flags)
    # Batches as GaussAD.iter_predict's: positions, sizes and maps at the sizes asked for.
    batches = list(model.iter_predict(paths, map_sizes=[(32, 48)] * len(paths)))
    assert [batch.start for batch in batches] == [0, 3, 6] and batches[0].sizes == [(96, 96)] * 3
    assert all(m.shape == (32, 48) for batch in batches for m in batch.maps)


def test_openvino_runs_the_same_file_in_float32(exported: Path, tiny: GaussAD, category: Path) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is optional: pip install openvino")
    paths = [t.path for t in list_test_images(category)]
    model = OnnxModel.load(exported, engine="openvino")
    assert model.image_threshold_ == tiny.image_threshold_
    runtime = model.predict(paths)
    assert_same_predictions(runtime, tiny.predict(paths))
    decisions = decide_all(runtime.scores, model.image_threshold_)
    np.testing.assert_array_equal(runtime.is_anomalous, [d.is_anomalous for d in decisions])


def test_pictures_and_arrays_are_inputs_too(exported: Path, tiny: GaussAD, category: Path) -> None:
    path = list_test_images(category)[-1].path
    pixels = np.asarray(Image.open(path).convert("RGB"))
    inputs = [Image.fromarray(pixels), pixels, path.parent]
    assert_same_predictions(OnnxModel.load(exported).predict(inputs), tiny.predict(inputs))


def test_unreadable_images_stop_the_run_or_are_skipped(
    exported: Path, category: Path, tmp_path: Path
) -> None:
    good = [t.path for t in list_test_images(category)[:3]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    inputs = [good[0], broken, *good[1:]]
    with pytest.raises(GaussADError, match="broken.png"):
        OnnxModel.load(exported).predict(inputs)
    batches = list(OnnxModel.load(exported, batch_size=2, on_error="skip").iter_predict(inputs))
    assert [batch.indices for batch in batches] == [[0], [2, 3]]  # batches cover fixed input positions
    assert [error.index for error in batches[0].errors] == [1] and "broken.png" in batches[0].errors[0].name
    with pytest.raises(GaussADError, match="over the limit of 9,000 pixels"):  # 96 x 96 images
        OnnxModel.load(exported, max_pixels=9000).predict(good)


def test_files_that_are_not_gaussad_models_are_refused(exported: Path, tmp_path: Path) -> None:
    import onnx

    with pytest.raises(GaussADError, match="no such file"):
        OnnxModel.load(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf")
    with pytest.raises(GaussADError, match="cannot load as an ONNX model"):
        OnnxModel.load(garbage)
    foreign = onnx.load(exported)
    del foreign.metadata_props[:]
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(GaussADError, match="not a gaussad ONNX file"):
        OnnxModel.load(tmp_path / "foreign.onnx")
    with pytest.raises(GaussADError, match="--device 'tpu'"):
        OnnxModel.load(exported, device="tpu")
    with pytest.raises(GaussADError, match="on-error"):
        OnnxModel.load(exported, on_error="ignore")
    with pytest.raises(GaussADError, match="--runtime 'tensorrt'"):
        OnnxModel.load(exported, engine="tensorrt")


def test_a_file_without_threshold_scores_has_none_and_a_malformed_value_is_refused(
    exported: Path, tmp_path: Path
) -> None:
    """Files exported before they kept the threshold scores load without them (the service's drift then
    reports the flagged share alone); a damaged value names the key."""
    import onnx

    older = onnx.load(exported)
    kept = [prop for prop in older.metadata_props if prop.key != "gaussad.threshold_scores"]
    del older.metadata_props[:]
    older.metadata_props.extend(kept)
    onnx.save(older, tmp_path / "older.onnx")
    assert OnnxModel.load(tmp_path / "older.onnx").threshold_scores_.shape == (0,)
    for value in ('[1.0, "x"]', "{}", "[1.0, NaN]", "not json"):
        damaged = onnx.load(exported)
        for prop in damaged.metadata_props:
            if prop.key == "gaussad.threshold_scores":
                prop.value = value
        onnx.save(damaged, tmp_path / "damaged.onnx")
        with pytest.raises(GaussADError, match="malformed gaussad.threshold_scores metadata"):
            OnnxModel.load(tmp_path / "damaged.onnx")


def test_the_runtime_imports_no_torch(exported: Path, category: Path) -> None:
    paths = [str(t.path) for t in list_test_images(category)]
    code = f"""
import json, sys
for name in ("torch", "torchvision", "timm"):
    sys.modules[name] = None  # any import of them now fails
from gaussad.runtime import OnnxModel
prediction = OnnxModel.load({str(exported)!r}).predict({paths!r})
modules = sorted(name for name in sys.modules if name.startswith("gaussad"))
print(json.dumps({{"scores": prediction.scores.tolist(), "modules": modules}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    np.testing.assert_array_equal(result["scores"], OnnxModel.load(exported).predict(paths).scores)
    assert set(result["modules"]) <= {
        "gaussad",
        "gaussad.calibration",
        "gaussad.config",
        "gaussad.decoding",
        "gaussad.errors",
        "gaussad.framing",
        "gaussad.images",
        "gaussad.runtime",
    }


# -------------------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.parametrize(
    "category_path",
    [
        pytest.param(BOTTLE, marks=needs(BOTTLE), id="bottle"),
        pytest.param(MAGNETIC_TILE, marks=needs(MAGNETIC_TILE), id="magnetic_tile"),
    ],
)
def test_real_test_sets_score_as_gaussad(category_path: Path, tmp_path: Path) -> None:
    """The default model (fitted on 40 training images, to keep the test short) on a whole test set."""
    model = GaussAD(device="cpu").fit(training_images(category_path)[:40])
    runtime = OnnxModel.load(export_onnx(model, tmp_path / "model.onnx"))
    paths = [t.path for t in list_test_images(category_path)]
    predicted = runtime.predict(paths)
    assert_same_predictions(predicted, model.predict(paths))
    decisions = decide_all(predicted.scores, model.image_threshold_)
    np.testing.assert_array_equal(predicted.is_anomalous, [d.is_anomalous for d in decisions])


def test_the_runtime_option_runs_exported_files_only(
    exported: Path, tiny: GaussAD, category: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from gaussad.cli import main

    image = str(list_test_images(category)[0].path)
    folder = str(tiny.save(tmp_path / "model"))
    assert main(["predict", folder, image, "-o", str(tmp_path / "a"), "--runtime", "openvino"]) == 2
    assert "--runtime openvino: runs exported .onnx files" in capsys.readouterr().err
    status = main(["predict", str(exported), image, "-o", str(tmp_path / "b"), "--runtime", "openvino"])
    if importlib.util.find_spec("openvino") is None:
        assert status == 2 and "pip install openvino" in capsys.readouterr().err
    else:
        assert status == 0 and (tmp_path / "b" / "predictions.csv").is_file()
