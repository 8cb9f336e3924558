"""Model inputs other than the native square: (height, width) sizes fit, predict, save, export and serve."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaussad import GaussAD
from gaussad.cli import build_parser, main
from gaussad.config import ModelConfig, describe_size
from gaussad.errors import GaussADError
from gaussad.features import prepare
from gaussad.layout import list_test_images, training_images

SIZE = (48, 80)  # (height, width)


@pytest.fixture(scope="module")
def wide(category: Path) -> GaussAD:
    """A default (hybrid, grid-pooled, calibrated) model at a 48 x 80 input, fitted on 8 synthetic images."""
    return GaussAD(image_size=SIZE, batch_size=4, device="cpu").fit(training_images(category)[:8])


@pytest.fixture(scope="module")
def images(category: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Test images of their own sizes, square and not: the synthetic ones and crops of them."""
    paths = [test.path for test in list_test_images(category)]
    folder = tmp_path_factory.mktemp("crops")
    for index, (height, width) in enumerate([(96, 40), (50, 96), (77, 91)]):
        crop = np.asarray(Image.open(paths[-1 - index]))[:height, :width]
        Image.fromarray(crop).save(folder / f"crop{index}.png")
        paths.append(folder / f"crop{index}.png")
    return paths


@pytest.fixture(scope="module")
def folder(wide: GaussAD, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wide.save(tmp_path_factory.mktemp("model") / "wide")


# ---------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, None), (448, 448), ((320, 800), (320, 800)), ([320, 800], (320, 800)), ((64, 64), 64)],
)
def test_the_input_size_is_a_side_or_height_and_width(given, expected) -> None:
    assert ModelConfig(image_size=given).image_size == expected


@pytest.mark.parametrize("given", [0, 31, 4097, (0, 5), (48,), (48, 80, 3), (48.0, 80), "abc", True])
def test_bad_input_sizes_are_refused_naming_the_option(given) -> None:
    with pytest.raises(GaussADError, match="^--image-size .*: expected a side such as 448"):
        ModelConfig(image_size=given)


def test_the_cli_takes_a_side_or_height_x_width() -> None:
    parse = build_parser().parse_args
    assert parse(["fit", "d", "-o", "m", "--image-size", "48x80"]).image_size == (48, 80)
    assert parse(["fit", "d", "-o", "m", "--image-size", "448"]).image_size == 448


@pytest.mark.parametrize("text", ["0x5", "48x", "abc", "x80", "48x80x3", "20"])
def test_bad_input_sizes_on_the_command_line_are_one_line(text: str, tmp_path: Path, capsys) -> None:
    status = main(["fit", str(tmp_path / "no_images"), "-o", str(tmp_path / "m"), "--image-size", text])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("gaussad: error: --image-size ") and text in err
    assert len(err.strip().splitlines()) == 1 and "from 32 to 4096" in err  # before the folder is read


def test_sizes_are_described_by_height_and_width() -> None:
    assert describe_size(224) == "224 px" and describe_size((224, 224)) == "224 px"
    assert describe_size((320, 800)) == "320 x 800 px (height x width)"


# ------------------------------------------------------------------------------------------ model
def test_a_non_square_model_maps_each_image_at_its_own_size(wide: GaussAD, images: list[Path]) -> None:
    assert wide.image_size_ == SIZE and wide.input_size_ == SIZE
    pixels, _, _ = prepare(images[0], SIZE)
    assert pixels.shape == (*SIZE, 3)
    prediction = wide.predict(images)
    for path, anomaly_map in zip(images, prediction.maps, strict=True):
        width, height = Image.open(path).size
        assert anomaly_map.shape == (height, width)
    batch = next(wide.iter_predict(images[:2], map_sizes=[SIZE, SIZE]))
    assert [m.shape for m in batch.maps] == [SIZE, SIZE]
    scores = prediction.scores[:8]  # the synthetic test images: 4 good, then 4 with a scratch
    assert scores[4:].min() > scores[:4].max()


def test_a_non_square_model_saves_and_loads(wide: GaussAD, folder: Path, images: list[Path], capsys) -> None:
    document = json.loads((folder / "model.json").read_text())
    assert document["image_size"] == [48, 80] and document["params"]["image_size"] == [48, 80]
    loaded = GaussAD.load(folder, device="cpu")
    assert loaded.image_size_ == SIZE and loaded.image_size == SIZE
    np.testing.assert_array_equal(loaded.score_samples(images), wide.score_samples(images))
    assert main(["info", str(folder)]) == 0
    assert "input: 48 x 80 px (height x width)" in capsys.readouterr().out


def test_a_square_model_keeps_writing_its_side(tiny: GaussAD, tmp_path: Path) -> None:
    document = json.loads((tiny.save(tmp_path / "square") / "model.json").read_text())
    assert document["image_size"] == 64 and document["params"]["image_size"] == 64
    assert tiny.image_size_ == 64 and tiny.input_size_ == (64, 64)


# ----------------------------------------------------------------------------------------- export
def test_a_non_square_export_scores_as_the_library(
    folder: Path, wide: GaussAD, images: list[Path], tmp_path: Path
) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from gaussad.export import export_onnx
    from gaussad.runtime import OnnxModel
    from gaussad.serve.runtime import ExportedModel
    from gaussad.serve.torch_model import TorchModel

    path = export_onnx(folder, tmp_path / "wide.onnx")
    proto = onnx.load(path)
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert json.loads(metadata["gaussad.input_size"]) == [48, 80]
    assert json.loads(metadata["gaussad.params"])["image_size"] == [48, 80]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["n", 48, 80, 3]
    runtime = OnnxModel.load(path, batch_size=3)
    assert runtime.image_size_ == SIZE and runtime.input_size_ == SIZE
    got, expected = runtime.predict(images), wide.predict(images)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-4)
    for got_map, want in zip(got.maps, expected.maps, strict=True):
        assert got_map.shape == want.shape
        np.testing.assert_allclose(got_map, want, rtol=0, atol=1e-3 * np.ptp(want))
    for served in (ExportedModel("wide", path, "cpu"), TorchModel("wide", folder, "cpu")):
        described = served.describe()
        assert described["input_size"] == [48, 80] and "height, width" in described["preprocessing"]["resize"]
        assert served.prepare(np.zeros((30, 200, 3), np.uint8))[0].shape == (48, 80, 3)
