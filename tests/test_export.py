"""ONNX export: one checked, self-describing file that scores, maps and decides as the PyTorch model does."""

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gaussad import GaussAD
from gaussad.backbones import Preprocessing
from gaussad.calibration import Threshold
from gaussad.decisions import decide_all
from gaussad.errors import GaussADError
from gaussad.export import ExportGraph, export_onnx, float32_at_or_above
from gaussad.features import BatchRunner, prepare
from gaussad.layout import list_test_images
from gaussad.persistence import model_sha256
from gaussad.runtime import METADATA_KEYS, OnnxModel

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def folder(tiny: GaussAD, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def exported(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(folder, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def session(path: Path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_file_passes_the_checker_and_describes_the_model(
    exported: Path, folder: Path, tiny: GaussAD
) -> None:
    proto = onnx.load(exported)
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert set(METADATA_KEYS) <= set(metadata)
    assert json.loads(metadata["gaussad.image_threshold"]) == tiny.image_threshold_.as_dict()
    assert json.loads(metadata["gaussad.pixel_threshold"]) == tiny.pixel_threshold_.as_dict()
    assert json.loads(metadata["gaussad.normalization"])["mean"] == [0.5, 0.5, 0.5]
    assert metadata["gaussad.input_size"] == "64" and metadata["gaussad.batch"] == "dynamic"
    assert metadata["gaussad.backbone_weights_sha256"] == tiny.backbone_.weights_sha256
    assert json.loads(metadata["gaussad.levels"]) == {
        "image": [4, 5],
        "map": [3, 4, 5],
        "score map": [3, 4, 5, 6, 7],
        "position": [3, 5],
    }
    assert "weights" not in json.loads(metadata["gaussad.params"])  # no path of the fitting machine
    assert metadata["gaussad.model_sha256"] == model_sha256(folder)  # the folder's identity
    # The held-out scores the threshold is a quantile of, to the bit: the service's drift reference.
    assert json.loads(metadata["gaussad.threshold_scores"]) == tiny.threshold_scores_.tolist()
    loaded = OnnxModel.load(exported, device="cpu").threshold_scores_
    np.testing.assert_array_equal(loaded, tiny.threshold_scores_)
    inputs, outputs = proto.graph.input, proto.graph.output
    assert [i.name for i in inputs] == ["images"] and inputs[
        0
    ].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inputs[0].type.tensor_type.shape.dim] == ["n", 64, 64, 3]
    assert [o.name for o in outputs] == ["scores", "maps", "normalized_scores", "is_anomalous"]
    assert metadata["gaussad.outputs"] == "scores,maps,normalized_scores,is_anomalous"


def test_the_graph_scores_maps_and_decides_as_pytorch_and_gaussad(
    exported: Path, tiny: GaussAD, category: Path
) -> None:
    paths = [t.path for t in list_test_images(category)]
    pixels = np.stack([prepare(path, 64)[0] for path in paths])
    scores, maps, normalized, flagged = session(exported).run(None, {"images": pixels})
    runner = BatchRunner(tiny.scorer_, tiny.backbone_.preprocessing, 64, torch.device("cpu"))
    expected_scores, expected_maps = (output.numpy() for output in runner._run(pixels))
    assert scores.dtype == maps.dtype == normalized.dtype == np.float32 and flagged.dtype == bool
    assert maps.shape == (8, 64, 64)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4)
    np.testing.assert_allclose(maps, expected_maps, rtol=0, atol=1e-3 * np.ptp(expected_maps))
    decisions = decide_all(scores, tiny.image_threshold_)
    np.testing.assert_allclose(normalized, [d.normalized_score for d in decisions], atol=1e-6)
    np.testing.assert_array_equal(flagged, [d.is_anomalous for d in decisions])
    np.testing.assert_array_equal(
        flagged, [d.is_anomalous for d in decide_all(expected_scores, tiny.image_threshold_)]
    )
    assert flagged.any() and not flagged.all()


class FixedScores(nn.Module):
    """A stand-in scorer that returns given float32 scores, to put them exactly at a threshold."""

    def __init__(self, scores: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("fixed", torch.from_numpy(scores))

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fixed + 0.0 * batch.sum(dim=(1, 2, 3)), batch[:, 0]


def test_the_decision_is_exact_at_the_threshold(tmp_path: Path) -> None:
    score = np.float32(0.3)
    scores = np.array([score, np.nextafter(score, np.float32(1)), np.nextafter(score, np.float32(0))])
    # Thresholds a float32 comparison against the nearest float32 would get wrong, and exact ties.
    for value in (float(score), float(score) + 1e-12, float(score) - 1e-12):
        threshold = Threshold(value, 0.1, "manual", "test")
        graph = ExportGraph(FixedScores(scores), Preprocessing((0.5,) * 3, (0.5,) * 3, 4), threshold)
        images = torch.zeros(3, 4, 4, 3, dtype=torch.uint8)
        path = tmp_path / "fixed.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notes
            torch.onnx.export(graph, (images,), path, dynamo=False, output_names=["s", "m", "n", "a"])
        _, _, normalized, flagged = session(path).run(
            None, {session(path).get_inputs()[0].name: images.numpy()}
        )
        decisions = decide_all(scores, threshold)
        np.testing.assert_array_equal(flagged, [d.is_anomalous for d in decisions])
        np.testing.assert_allclose(normalized, [d.normalized_score for d in decisions], atol=1e-6)
    assert float32_at_or_above(float(score) + 1e-12) == scores[1]


def test_a_model_without_thresholds_exports_scores_and_maps_only(
    folder: Path, tiny: GaussAD, tmp_path: Path
) -> None:
    plain = copy.copy(tiny)
    plain.image_threshold_ = plain.pixel_threshold_ = None
    path = export_onnx(plain, tmp_path / "plain.onnx", batch=3)
    proto = onnx.load(path)
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert [o.name for o in proto.graph.output] == ["scores", "maps"]
    assert metadata["gaussad.image_threshold"] == metadata["gaussad.pixel_threshold"] == "null"
    assert metadata["gaussad.outputs"] == "scores,maps" and metadata["gaussad.batch"] == "3"
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 64, 64, 3]
    # Exported from memory: hashed as the folder it saves to, the same bytes as the saved folder's
    # but for the thresholds.
    assert metadata["gaussad.model_sha256"] != model_sha256(folder)
    model = OnnxModel.load(path)
    assert model.graph_batch_ == 3 and model.image_threshold_ is None
    prediction = model.predict(np.full((40, 50, 3), 128, dtype=np.uint8))  # a batch of one, padded to 3
    assert prediction.scores.shape == (1,) and prediction.maps[0].shape == (40, 50)
    assert prediction.normalized_scores is None and prediction.is_anomalous is None


def test_a_bf16_model_is_refused_in_one_line(tiny: GaussAD, tmp_path: Path) -> None:
    bf16 = copy.copy(tiny)
    bf16.precision = "bf16"
    with pytest.raises(GaussADError, match="precision bf16") as error:
        export_onnx(bf16, tmp_path / "bf16.onnx")
    assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())


def test_bad_arguments_and_unfitted_models_are_refused(tiny: GaussAD, tmp_path: Path) -> None:
    for batch in (0, "static", True):
        with pytest.raises(GaussADError, match="batch"):
            export_onnx(tiny, tmp_path / "x.onnx", batch=batch)
    with pytest.raises(GaussADError, match="not fitted"):
        export_onnx(GaussAD(), tmp_path / "x.onnx")
    with pytest.raises(GaussADError, match="no such model folder"):
        export_onnx(tmp_path / "missing", tmp_path / "x.onnx")


def test_a_failed_export_says_why_and_leaves_the_previous_file(
    tiny: GaussAD, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")

    def unsupported(*args, **kwargs):
        raise RuntimeError(
            "Exporting the operator 'aten::foo' to ONNX opset version 17 is not supported.\nMore."
        )

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(GaussADError) as error:
        export_onnx(tiny, target)
    assert str(error.value) == (
        "backbone efficientnet_lite0 at opset 17 does not export to ONNX (RuntimeError: Exporting the "
        "operator 'aten::foo' to ONNX opset version 17 is not supported.)"
    )
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_weights_over_what_one_file_holds_are_refused(
    tiny: GaussAD, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gaussad.export.MAX_WEIGHT_BYTES", 1000)
    with pytest.raises(GaussADError, match="more than one ONNX file holds"):
        export_onnx(tiny, tmp_path / "big.onnx")


def test_an_export_replaces_the_file_atomically(exported: Path, folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    assert export_onnx(folder, target) == target
    assert target.read_bytes() == exported.read_bytes()  # the same model exports to the same bytes
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
