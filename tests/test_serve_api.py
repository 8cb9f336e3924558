"""The inspection service in process: both inference routes against `GaussAD.predict`, batching, the
catalogue of bad inputs, authentication, limits, metrics, drift and model updates without downtime."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_support import fitted_model, inspection_images, png, serve_app

from gaussad import GaussAD, GaussADError
from gaussad.cli import main as cli_main
from gaussad.decisions import decide, defect_mask, map_scale
from gaussad.heatmaps import colorize
from gaussad.persistence import model_sha256
from gaussad.serve.app import create_app
from gaussad.serve.drift import DriftMonitor
from gaussad.serve.settings import ServeSettings

# Answers equal `GaussAD.predict` of the same batch composition to RTOL. A forward pass of one image and
# one of several differ by about 1e-5 at this 64 px input (float32 convolution algorithms, amplified by the
# OPCA's smallest components), as the library's own batch-size test allows (1e-4); so single requests are
# compared with predict at batch size 1, batched ones with predict's batch of the same images.
RTOL = 1e-5


@pytest.fixture(scope="module")
def served_model(category: Path, tmp_path_factory) -> Path:
    return fitted_model(category, tmp_path_factory)


@pytest.fixture(scope="module")
def client(served_model: Path, tmp_path_factory):
    """One app for the tests that do not change it: batches of up to 8 that wait up to 200 ms to fill."""
    folder = tmp_path_factory.mktemp("api")
    with serve_app(
        served_model, folder, max_batch_size=8, max_queue_delay_ms=200, keep_images=folder / "kept"
    ) as client:
        yield client


@pytest.fixture(scope="module")
def predicted(served_model: Path, category: Path):
    """`GaussAD.predict` on the test images one at a time (`gaussad predict --batch-size 1`): what single
    requests must equal."""
    paths = inspection_images(category)
    return paths, GaussAD.load(served_model, device="cpu", batch_size=1).predict(paths)


def inspect(client, data: bytes, content_type: str = "image/png", **params):
    return client.post(
        "/v1/models/widget/inspect", content=data, headers={"Content-Type": content_type}, params=params
    )


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def test_inspect_equals_predict_one_image_at_a_time(client, predicted, served_model: Path) -> None:
    paths, prediction = predicted
    model = GaussAD.load(served_model, device="cpu")
    sha256 = model_sha256(served_model)
    for path, score, anomaly_map in zip(paths, prediction.scores, prediction.maps, strict=True):
        answer = inspect(client, path.read_bytes(), map="true").json()
        decision = decide(score, model.image_threshold_)
        assert answer["score"] == pytest.approx(score, rel=RTOL)
        assert answer["is_anomalous"] == decision.is_anomalous
        assert answer["normalized_score"] == pytest.approx(decision.normalized_score, rel=RTOL, abs=1e-6)
        assert answer["model"] == "widget" and answer["model_sha256"] == sha256
        assert answer["image_threshold"] == model.image_threshold_.value
        assert (answer["width"], answer["height"]) == (96, 96) and answer["latency_ms"] > 0
        # The pictures are predict's: the same colour scale and mask, at the image's size.
        heat, mask = decode_png(answer["anomaly_map"]), decode_png(answer["defect_mask"]) > 0
        expected_heat = colorize(anomaly_map, *map_scale(model.pixel_threshold_))
        assert heat.shape == (96, 96, 3) and np.mean(np.abs(heat.astype(int) - expected_heat) > 1) < 0.01
        expected_mask = defect_mask(anomaly_map, model.pixel_threshold_, decision.is_anomalous)
        np.testing.assert_array_equal(mask, expected_mask)
    assert [inspect(client, p.read_bytes()).json()["is_anomalous"] for p in paths] == [False] * 4 + [True] * 4


def test_requests_that_arrive_together_are_one_batch_equal_to_predict(
    client, predicted, served_model
) -> None:
    """While one forward pass runs (held here), eight requests arrive: they are scored in one batch."""
    paths, alone = predicted
    together = GaussAD.load(served_model, device="cpu", batch_size=8).predict(paths)
    model = client.app.state.service.models["widget"]
    release, scoring = threading.Event(), threading.Event()
    score = model.score

    def held(inputs, with_maps):
        if not scoring.is_set():
            scoring.set()
            release.wait(10)
        return score(inputs, with_maps)

    before = _batch_sizes(client)
    model.score = held
    try:
        with ThreadPoolExecutor(len(paths) + 1) as pool:
            first = pool.submit(inspect, client, paths[0].read_bytes())
            assert scoring.wait(10)
            answers = [pool.submit(inspect, client, path.read_bytes()) for path in paths]
            while _metric(client, 'gaussad_batch_queue{model="widget"}') < len(paths):
                threading.Event().wait(0.01)
            release.set()
            scores = [answer.result().json()["score"] for answer in answers]
        assert first.result().json()["score"] == pytest.approx(alone.scores[0], rel=RTOL)
    finally:
        del model.score
    np.testing.assert_allclose(scores, together.scores, rtol=RTOL)
    count, total = (after - was for after, was in zip(_batch_sizes(client), before, strict=True))
    assert (count, total) == (2, 1 + len(paths))  # the held one, then all eight together


def _metric(client, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith(prefix)
    )


def _batch_sizes(client) -> tuple[float, float]:
    """(forward passes, images scored) so far."""
    return tuple(
        _metric(client, f'gaussad_batch_size{suffix}{{model="widget"}}') for suffix in ("_count", "_sum")
    )


def test_multipart_and_v2_infer_give_the_same_answers(client, predicted) -> None:
    paths, prediction = predicted
    form = client.post(
        "/v1/models/widget/inspect", files={"file": ("x.png", paths[5].read_bytes(), "image/png")}
    )
    assert form.json()["score"] == pytest.approx(prediction.scores[5], rel=RTOL)
    request = {
        "id": "batch-7",
        "inputs": [
            {
                "name": "image",
                "shape": [2],
                "datatype": "BYTES",
                "data": [base64.b64encode(paths[i].read_bytes()).decode() for i in (0, 6)],
            }
        ],
        "outputs": [{"name": "score"}, {"name": "is_anomalous"}, {"name": "anomaly_map"}],
    }
    answer = client.post("/v2/models/widget/infer", json=request).json()
    outputs = {output["name"]: output for output in answer["outputs"]}
    assert answer["id"] == "batch-7" and answer["parameters"]["request_ids"] == ["batch-7/0", "batch-7/1"]
    # Two images of one request make one batch at most: within the batch-size tolerance of single ones.
    np.testing.assert_allclose(outputs["score"]["data"], prediction.scores[[0, 6]], rtol=1e-4)
    assert outputs["is_anomalous"]["data"] == [False, True] and set(outputs) == {
        "score",
        "is_anomalous",
        "anomaly_map",
    }
    maps = np.array(outputs["anomaly_map"]["data"], dtype=np.float32).reshape(outputs["anomaly_map"]["shape"])
    np.testing.assert_allclose(maps, np.stack([prediction.maps[0], prediction.maps[6]]), rtol=1e-4, atol=1e-4)
    default = client.post("/v2/models/widget/infer", json=request | {"outputs": None}).json()
    assert [o["name"] for o in default["outputs"]] == ["score", "normalized_score", "is_anomalous"]


def test_open_inference_protocol_routes(client, served_model: Path) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/widget/ready").json() == {"name": "widget", "ready": True}
    meta = client.get("/v2/models/widget").json()
    assert meta["name"] == "widget" and meta["versions"] == [model_sha256(served_model)]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"] for o in meta["outputs"]} == {
        "score",
        "normalized_score",
        "is_anomalous",
        "anomaly_map",
    }
    assert meta["input_size"] == [64, 64] and meta["n_train"] == 16
    assert (
        meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
        and meta["thresholds"]["image"]["method"] == "label-free"
    )
    assert meta["backbone"]["name"] == "efficientnet_lite0" and len(meta["backbone"]["weights_sha256"]) == 64
    assert set(meta["drift"]) >= {
        "flagged_share",
        "expected_flagged_share",
        "ks_statistic",
        "ks_alert_level",
        "look",
    }
    missing = client.get("/v2/models/nothing")
    assert missing.status_code == 404 and "nothing" in missing.json()["error"]
    assert client.get("/no/such/route").json() == {"error": "Not Found"}


def test_request_ids_are_echoed_or_made(client, category: Path) -> None:
    data = inspection_images(category)[0].read_bytes()
    headers = {"Content-Type": "image/png", "X-Request-ID": "line-4/part-17"}
    given = client.post("/v1/models/widget/inspect", content=data, headers=headers)
    assert given.json()["request_id"] == "line-4/part-17" == given.headers["X-Request-ID"]
    assert len(inspect(client, data).json()["request_id"]) == 32
    bad = client.post(
        "/v1/models/widget/inspect", content=data, headers=headers | {"X-Request-ID": "two words"}
    )
    assert bad.status_code == 400 and "request id" in bad.json()["error"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bad_inputs(good: bytes) -> dict[str, tuple[bytes, str, int]]:
    """(body, content type, expected status) for what a line must never crash the server with."""
    rng = np.random.default_rng(0)
    huge = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    huge += _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + _png_chunk(b"IEND", b"")
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(cmyk, "JPEG")
    return {
        "empty body": (b"", "image/png", 422),
        "random bytes": (rng.bytes(5000), "application/octet-stream", 422),
        "truncated PNG": (good[: len(good) // 2], "image/png", 422),
        "text file as an image": (b"serial,score\n17,0.3\n" * 20, "image/png", 422),
        "text file as text": (b"serial,score\n17,0.3\n", "text/plain", 415),
        "JSON as the body": (b'{"image": 1}', "application/json", 415),
        "no content type": (good, "", 415),
        "30000 x 30000 header": (huge, "image/png", 413),
        "multipart without the file field": (b"--b\r\n\r\n--b--\r\n", "multipart/form-data; boundary=b", 422),
        "multipart without a boundary": (b"x", "multipart/form-data", 422),
        "1 x 1 image": (png(np.full((1, 1, 3), 200, np.uint8)), "image/png", 200),
        "16-bit PNG": (png(np.full((20, 30), 40000, np.uint16)), "image/png", 200),
        "CMYK JPEG": (cmyk.getvalue(), "image/jpeg", 200),
    }


def test_bad_inputs_get_4xx_naming_the_problem_and_the_server_goes_on(client, category: Path) -> None:
    good = inspection_images(category)[0].read_bytes()
    for case, (body, content_type, status) in bad_inputs(good).items():
        answer = client.post(
            "/v1/models/widget/inspect", content=body, headers={"Content-Type": content_type}
        )
        assert answer.status_code == status, (case, answer.text)
        if status != 200:
            assert answer.json()["error"], case
    assert "pixels" in inspect(client, bad_inputs(good)["30000 x 30000 header"][0]).json()["error"]
    unknown_output = {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(good).decode()]}
        ],
        "outputs": [{"name": "heatmap"}],
    }
    for body in (
        b"not json",
        b'{"inputs": []}',
        b'{"inputs": [{"datatype": "BYTES", "data": ["%%%"]}]}',
        b'{"inputs": [{"datatype": "FP32", "data": [1.0]}]}',
        json.dumps(unknown_output).encode(),
    ):
        answer = client.post("/v2/models/widget/infer", content=body)
        assert answer.status_code == 422 and answer.json()["error"]
    assert client.get("/v2/health/live").status_code == 200 and inspect(client, good).status_code == 200


def test_limits_refuse_large_bodies_and_a_full_queue(
    served_model: Path, category: Path, tmp_path: Path
) -> None:
    data = inspection_images(category)[0].read_bytes()
    with serve_app(served_model, tmp_path, max_body_bytes=len(data) - 1, max_queue=1) as client:
        too_large = inspect(client, data)
        assert too_large.status_code == 413 and "limit" in too_large.json()["error"]
        service = client.app.state.service
        model = service.models["widget"]
        release, scoring = threading.Event(), threading.Event()
        score = model.score

        def held(inputs, with_maps):
            scoring.set()
            release.wait(10)
            return score(inputs, with_maps)

        model.score = held
        small = png(np.full((8, 8, 3), 100, np.uint8))
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(inspect, client, small)
            assert scoring.wait(10)
            full = inspect(client, small)
            release.set()
            assert first.result().status_code == 200
        assert (
            full.status_code == 503
            and full.headers["Retry-After"] == "1"
            and "queue full" in full.json()["error"]
        )


def test_api_keys_guard_every_route_but_health(served_model: Path, tmp_path: Path) -> None:
    key = "k" * 24
    with serve_app(served_model, tmp_path, api_keys=(b"another-key-0123456789", key.encode())) as client:
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert client.get(path).status_code == 200
        for path in (
            "/",
            "/v1/models",
            "/v1/decisions",
            "/metrics",
            "/v2/models/widget",
            "/v2/models/widget/ready",
        ):
            answer = client.get(path)
            assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer", path
        assert client.post("/v1/models/widget/inspect", content=b"x").status_code == 401
        assert client.post("/v2/repository/models/widget/load").status_code == 401
        for header in (f"Bearer {key}x", f"Basic {key}", key, "Bearer "):
            assert client.get("/v1/models", headers={"Authorization": header}).status_code == 401, header
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_security_headers_and_the_page_policy(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<title>gaussad review</title>" in page.text
    policy = page.headers["Content-Security-Policy"]
    assert (
        "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    )
    for answer in (page, client.get("/v1/models")):
        assert (
            answer.headers["X-Content-Type-Options"] == "nosniff"
            and answer.headers["Cache-Control"] == "no-store"
        )


def test_kept_images_are_named_by_hash_and_listed_with_thumbnails(client, category: Path) -> None:
    path = inspection_images(category)[7]
    answer = inspect(client, path.read_bytes()).json()
    folder = client.app.state.service.kept.folder
    assert (folder / answer["image_sha256"]).read_bytes() == path.read_bytes()
    assert all(len(kept.name) == 64 for kept in folder.iterdir())
    latest = client.get("/v1/decisions", params={"limit": 1}).json()[0]
    assert latest["request_id"] == answer["request_id"] and latest["image_kept"]
    thumbnail = client.get(latest["thumbnail"])
    assert thumbnail.headers["content-type"] == "image/png" and Image.open(
        io.BytesIO(thumbnail.content)
    ).size == (96, 96)
    for name in ("0" * 64, "../audit.sqlite3", "x" * 64):
        assert client.get(f"/v1/images/{name}").status_code == 404


def test_metrics_count_requests_batches_decisions_and_drift(client, category: Path) -> None:
    for path in inspection_images(category):
        inspect(client, path.read_bytes())
    text = client.get("/metrics").text
    for expected in (
        'gaussad_requests_total{method="POST",route="/v1/models/{name}/inspect",status="200"}',
        'gaussad_request_seconds_bucket{le="0.25",route="/v1/models/{name}/inspect"}',
        'gaussad_queue_seconds_count{model="widget"}',
        'gaussad_batch_size_bucket{le="8.0",model="widget"}',
        'gaussad_images_flagged_total{model="widget"}',
        'gaussad_normalized_score_bucket{le="0.5",model="widget"}',
        'gaussad_drift_ks_statistic{model="widget"}',
        'gaussad_drift_look{model="widget"}',
        'gaussad_model{model="widget",sha256="',
    ):
        assert expected in text, expected
    flagged = [
        line for line in text.splitlines() if line.startswith('gaussad_images_flagged_total{model="widget"}')
    ]
    assert float(flagged[0].split()[-1]) >= 4


def test_drift_levels() -> None:
    normal = np.random.default_rng(0).normal(1.0, 0.3, 80)
    threshold = float(np.quantile(normal, 0.95))
    same, shifted = DriftMonitor(normal, threshold, 500), DriftMonitor(normal, threshold, 500)
    for score in np.random.default_rng(1).normal(1.0, 0.3, 300):
        same.add(float(score))
        shifted.add(float(score) + 0.4)
    calm, drifted = same.report(), shifted.report()
    assert calm.expected_flagged_share == pytest.approx(0.05, abs=0.0125)
    assert (
        not calm.look
        and calm.ks_statistic < calm.ks_alert_level
        and calm.flagged_share < calm.flagged_alert_level
    )
    assert drifted.look and drifted.ks_statistic > drifted.ks_alert_level
    assert drifted.flagged_share > drifted.flagged_alert_level
    few = DriftMonitor(normal, threshold, 500)
    for _ in range(10):
        few.add(10.0)
    assert not few.report().look  # too few images to call for a look
    assert DriftMonitor(normal, threshold, 500).report().ks_statistic is None


def test_calibrate_then_load_swaps_the_model_in(served_model: Path, category: Path, tmp_path: Path) -> None:
    folder = tmp_path / "widget"
    shutil.copytree(served_model, folder)
    data = inspection_images(category)[3].read_bytes()  # a good part scoring 0.57: normal level 0.44
    with serve_app(folder, tmp_path) as client:
        before = inspect(client, data).json()
        assert cli_main(["calibrate", str(folder), "--image-threshold", "0.5", "--quiet"]) == 0
        assert inspect(client, data).json()["model_sha256"] == before["model_sha256"]  # not until told
        loaded = client.post("/v2/repository/models/widget/load").json()
        assert loaded["swapped"] and loaded["previous_sha256"] == before["model_sha256"]
        after = inspect(client, data).json()
        assert after["model_sha256"] == loaded["model_sha256"] == model_sha256(folder)
        assert after["image_threshold"] == 0.5 and after["is_anomalous"] and not before["is_anomalous"]
        assert after["score"] == pytest.approx(before["score"], rel=RTOL)
        (folder / "gaussians.safetensors").write_bytes(b"broken")
        failed = client.post("/v2/repository/models/widget/load")
        assert failed.status_code == 422 and "corrupt" in failed.json()["error"]
        assert inspect(client, data).json()["model_sha256"] == after["model_sha256"]  # the old one serves on
        rows = client.get("/v1/decisions", params={"limit": 10}).json()
        assert {row["model_sha256"] for row in rows} == {before["model_sha256"], after["model_sha256"]}


def test_start_up_refuses_models_it_cannot_trust(served_model: Path, tmp_path: Path) -> None:
    corrupt, uncalibrated = tmp_path / "corrupt", tmp_path / "uncalibrated"
    shutil.copytree(served_model, corrupt)
    with open(corrupt / "gaussians.safetensors", "r+b") as tensors:
        tensors.seek(-3, 2)
        tensors.write(b"\x00\x01\x02")
    with pytest.raises(GaussADError, match="corrupt"):
        create_app(ServeSettings((corrupt,), audit=str(tmp_path / "a.sqlite3"), device="cpu"))
    shutil.copytree(served_model, uncalibrated)
    document = json.loads((uncalibrated / "model.json").read_text())
    document["thresholds"]["image"] = None
    (uncalibrated / "model.json").write_text(json.dumps(document))
    with pytest.raises(GaussADError, match="no image threshold"):
        create_app(ServeSettings((uncalibrated,), audit=str(tmp_path / "a.sqlite3"), device="cpu"))
    with pytest.raises(GaussADError, match="two models named widget"):
        ServeSettings((served_model, tmp_path / "other" / "widget"))


def test_the_service_limits_pixels_as_the_library_does() -> None:
    from gaussad.images import DEFAULT_MAX_PIXELS
    from gaussad.serve import defaults

    assert defaults.MAX_PIXELS == DEFAULT_MAX_PIXELS
