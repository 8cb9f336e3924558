"""`gaussad serve model.onnx`: a file written by `gaussad export`, served by onnxruntime, answers as
`gaussad predict model.onnx` does, describes itself as its model folder does, is swapped in when exported
again, and serves where PyTorch cannot be imported."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_serve_support import fitted_model, inspection_images, serve_app, start_server

from gaussad import GaussADError
from gaussad.cli import main as cli_main
from gaussad.decisions import output_names, output_path
from gaussad.fileio import file_sha256
from gaussad.persistence import model_sha256
from gaussad.runtime import META_IMAGE_THRESHOLD
from gaussad.serve.app import create_app
from gaussad.serve.settings import ServeSettings
from gaussad.serve.torch_model import TorchModel

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

# Served answers equal predict's of the same batch composition to RTOL (see test_serve_api); predict
# writes scores with 6 decimals, normalized scores with 4.
RTOL = 1e-5
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def folder(category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fitted_model(category, tmp_path_factory)


@pytest.fixture(scope="module")
def exported(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served folder exported as widget.onnx: served as 'widget'."""
    return export(folder, tmp_path_factory.mktemp("exported") / "widget.onnx")


@pytest.fixture(scope="module")
def client(exported: Path, tmp_path_factory: pytest.TempPathFactory):
    with serve_app(exported, tmp_path_factory.mktemp("onnx-api")) as client:
        yield client


@pytest.fixture(scope="module")
def predicted(exported: Path, category: Path, tmp_path_factory: pytest.TempPathFactory):
    """`gaussad predict widget.onnx --batch-size 1` on the test images: each image's predictions.csv row
    and saved map, by path."""
    output = tmp_path_factory.mktemp("predict") / "out"
    test = category / "test"
    argv = ["predict", str(exported), str(test), "-o", str(output), "--batch-size", "1", "--device", "cpu"]
    assert cli_main([*argv, "--quiet"]) == 0
    rows = {row["path"]: row for row in csv.DictReader((output / "predictions.csv").open())}
    maps = {
        str(path): np.load(output_path(output, "maps", name, ".npy")) for path, name in output_names([test])
    }
    return rows, maps


def export(folder: Path, path: Path) -> Path:
    """`gaussad export FOLDER -o PATH`."""
    assert cli_main(["export", str(folder), "-o", str(path)]) == 0
    return path


def inspect(client, data: bytes, name: str = "widget", **params):
    return client.post(f"/v1/models/{name}/inspect", content=data, headers=PNG, params=params)


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def infer_map(client, data: bytes) -> np.ndarray:
    """The v2 route's anomaly map of one image."""
    request = {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(data).decode()]}
        ],
        "outputs": [{"name": "anomaly_map"}],
    }
    output = client.post("/v2/models/widget/infer", json=request).json()["outputs"][0]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])[0]


def test_answers_equal_gaussad_predict_of_the_file(client, predicted, exported: Path, category: Path) -> None:
    rows, maps = predicted
    sha256 = file_sha256(exported)
    paths = inspection_images(category)
    assert sorted(map(str, paths)) == sorted(rows)
    for path in paths:
        row, answer = rows[str(path)], inspect(client, path.read_bytes(), map="true").json()
        assert answer["score"] == pytest.approx(float(row["score"]), rel=RTOL, abs=5e-7)
        assert answer["normalized_score"] == pytest.approx(float(row["normalized_score"]), abs=5e-5)
        assert answer["is_anomalous"] == (row["is_anomalous"] == "1")
        assert answer["model"] == "widget" and answer["model_sha256"] == sha256
        assert np.count_nonzero(decode_png(answer["defect_mask"])) == int(row["defect_area"])
        anomaly_map, expected = infer_map(client, path.read_bytes()), maps[str(path)]
        assert anomaly_map.shape == expected.shape == (96, 96)
        np.testing.assert_allclose(anomaly_map, expected, rtol=RTOL, atol=1e-6 * np.ptp(expected))
    assert [inspect(client, p.read_bytes()).json()["is_anomalous"] for p in paths] == [False] * 4 + [True] * 4
    decided = client.get("/v1/decisions", params={"limit": 1}).json()[0]
    assert decided["model_sha256"] == sha256  # the audit trail names the file that decided


def test_the_file_describes_itself_as_its_folder_does(client, folder: Path, exported: Path) -> None:
    meta = client.get("/v2/models/widget").json()
    described = TorchModel("widget", folder, "cpu").describe()
    assert set(meta) >= set(described) and meta["platform"] == "gaussad_onnxruntime"
    assert meta["versions"] == [file_sha256(exported)] == [meta["model_sha256"]]
    for key in ("input_size", "preprocessing", "thresholds", "backbone"):
        assert meta[key] == described[key], key
    assert set(described["config"]) - {"weights"} <= set(meta["config"])  # the weights' path is not kept
    assert meta["config"]["image_size"] == 64 and meta["config"]["map_levels"] == [2, 3]
    assert meta["n_train"] is None  # the file does not keep it
    assert meta["exported_from"]["model_sha256"] == model_sha256(folder)
    drift = meta["drift"]  # the file's threshold scores are its reference, as the folder's are
    reference, threshold = TorchModel("widget", folder, "cpu").held_out_scores, meta["thresholds"]["image"]
    assert len(reference) and drift["expected_flagged_share"] == np.mean(reference >= threshold["value"])
    assert client.get("/v1/models").json()[0]["model_sha256"] == file_sha256(exported)


def test_export_again_then_load_swaps_the_file_in(folder: Path, category: Path, tmp_path: Path) -> None:
    copy = tmp_path / "widget"
    shutil.copytree(folder, copy)
    path = export(copy, tmp_path / "widget.onnx")
    data = inspection_images(category)[3].read_bytes()  # a good part scoring 0.57: normal level 0.44
    with serve_app(path, tmp_path) as client:
        before = inspect(client, data).json()
        assert cli_main(["calibrate", str(copy), "--image-threshold", "0.5", "--quiet"]) == 0
        export(copy, path)
        assert inspect(client, data).json()["model_sha256"] == before["model_sha256"]  # not until told
        loaded = client.post("/v2/repository/models/widget/load").json()
        assert loaded["swapped"] and loaded["previous_sha256"] == before["model_sha256"]
        after = inspect(client, data, map="true").json()
        assert after["model_sha256"] == loaded["model_sha256"] == file_sha256(path)
        assert after["image_threshold"] == 0.5 and after["is_anomalous"] and not before["is_anomalous"]
        # Its map stays below the pixel threshold: flagged, its mask is its hottest region, as predict's.
        assert np.count_nonzero(decode_png(after["defect_mask"])) > 0
        assert after["score"] == pytest.approx(before["score"], rel=RTOL)
        path.write_bytes(b"\x00not a protobuf")
        failed = client.post("/v2/repository/models/widget/load")
        assert failed.status_code == 422 and "cannot load as an ONNX model" in failed.json()["error"]
        assert inspect(client, data).json()["model_sha256"] == after["model_sha256"]  # the old one serves on


def test_start_up_refuses_files_it_cannot_serve(folder: Path, exported: Path, tmp_path: Path) -> None:
    import onnx

    def start(path: Path) -> None:
        create_app(ServeSettings((path,), audit=str(tmp_path / "a.sqlite3"), device="cpu"))

    with pytest.raises(GaussADError, match="no such exported model file"):
        start(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf")
    with pytest.raises(GaussADError, match="cannot load as an ONNX model"):
        start(garbage)
    proto = onnx.load(exported)
    for prop in proto.metadata_props:
        if prop.key == META_IMAGE_THRESHOLD:
            prop.value = "null"
    onnx.save(proto, tmp_path / "uncalibrated.onnx")
    with pytest.raises(GaussADError, match="no image threshold; set one with `gaussad calibrate` and export"):
        start(tmp_path / "uncalibrated.onnx")
    assert ServeSettings((exported, tmp_path / "line.4.ONNX")).names == ("widget", "line.4")
    with pytest.raises(GaussADError, match="two models named widget"):
        ServeSettings((folder, exported))


def test_a_file_and_a_folder_are_served_side_by_side(
    folder: Path, exported: Path, tmp_path: Path, category: Path
) -> None:
    path = tmp_path / "widget-onnx.onnx"
    shutil.copyfile(exported, path)
    data = inspection_images(category)[6].read_bytes()
    settings = ServeSettings((folder, path), audit=str(tmp_path / "a.sqlite3"), device="cpu")
    with TestClient(create_app(settings)) as client:
        served, exported = inspect(client, data).json(), inspect(client, data, "widget-onnx").json()
    assert exported["score"] == pytest.approx(served["score"], rel=1e-4)  # export's promise: 1e-4
    assert exported["is_anomalous"] == served["is_anomalous"]
    assert (served["model_sha256"], exported["model_sha256"]) == (model_sha256(folder), file_sha256(path))


# PyTorch made unimportable, as in an environment without it: a finder that refuses it (sys.modules[name] =
# None would leave a None that scipy.stats trips over on import).
TORCH_FREE = """
import json, sys
from importlib.abc import MetaPathFinder

class NoTorch(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTorch())
from fastapi.testclient import TestClient
from gaussad.serve.app import create_app
from gaussad.serve.settings import ServeSettings

settings = ServeSettings((MODEL,), audit=AUDIT, device="cpu")
with TestClient(create_app(settings)) as client:
    answer = client.post("/v1/models/widget/inspect", content=open(IMAGE, "rb").read(),
                         headers={"Content-Type": "image/png"}, params={"map": "true"}).json()
# The command line too: an unreadable file is refused by the torch-free runtime, not by a failed import.
from gaussad.cli import main
status = main(["serve", AUDIT + ".onnx", "--audit", AUDIT])
modules = sorted(name for name in sys.modules if name.partition(".")[0] in ("torch", "gaussad"))
print(json.dumps({"answer": answer, "modules": modules, "status": status}))
"""


def test_serving_a_file_needs_no_torch(exported: Path, predicted, category: Path, tmp_path: Path) -> None:
    rows, _ = predicted
    image = inspection_images(category)[5]
    given = f"MODEL = {str(exported)!r}\nAUDIT = {str(tmp_path / 'a.sqlite3')!r}\nIMAGE = {str(image)!r}\n"
    done = subprocess.run(
        [sys.executable, "-c", given + TORCH_FREE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    answer = result["answer"]
    assert answer["score"] == pytest.approx(float(rows[str(image)]["score"]), rel=RTOL, abs=5e-7)
    assert answer["is_anomalous"] and answer["anomaly_map"] and answer["defect_mask"] is not None
    assert "gaussad.serve.torch_model" not in result["modules"]
    assert not [name for name in result["modules"] if name.partition(".")[0] == "torch"]
    assert result["status"] == 2 and "No module named" not in done.stderr
    assert ".onnx" in done.stderr.splitlines()[-1]


def test_gaussad_serve_takes_a_file_and_reloads_it_on_sighup(
    folder: Path, category: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "widget"
    shutil.copytree(folder, copy)
    path = export(copy, tmp_path / "widget.onnx")
    server = start_server(str(path), "--audit", str(tmp_path / "audit.sqlite3"), cwd=tmp_path)
    try:
        assert any(line.startswith("gaussad: serving widget on") for line in server.output)
        status, body = server.get("/v1/models")
        assert status == 200 and json.loads(body)[0]["model_sha256"] == file_sha256(path)
        assert cli_main(["calibrate", str(copy), "--image-threshold", "0.5", "--quiet"]) == 0
        export(copy, path)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while json.loads(server.get("/v1/models")[1])[0]["model_sha256"] != file_sha256(path):
            assert time.monotonic() < deadline, "".join(server.output)
            time.sleep(0.1)
        assert json.loads(server.get("/v1/models")[1])[0]["image_threshold"] == 0.5
    finally:
        server.stop(signal.SIGKILL)
