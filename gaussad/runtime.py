"""Scoring with an exported gaussad ONNX file without PyTorch: numpy, Pillow/imagecodecs and onnxruntime.

`OnnxModel` reads the file's metadata (input size, crop, thresholds), decodes, crops and resizes images
as `GaussAD.predict` does, runs the graph (normalization, backbone, scores, maps and image decisions are
all inside it) and resizes each map to its image's own size (to its window's place, with a crop). The two
resamplings around the graph are PyTorch's, ported to numpy so that an edge PC scores what the trained
model scores:

- the input resize is `F.interpolate(bilinear, antialias=True)` on 8-bit pixels: PyTorch's fixed-point
  filter, ported from Pillow's but with 16-bit weights, reproduced bit for bit. Pillow's own BILINEAR
  filter keeps 22-bit weights and differs by 1 in about a tenth of the pixels, hence the port;
- the map resize is `F.interpolate(bilinear, align_corners=False)` on float32 maps, equal up to float32
  rounding (about 2e-7 of the map's range).

The graph runs in onnxruntime, or in OpenVINO's CPU runtime (`engine="openvino"`, float32) where that is
installed. Importing this module imports neither torch nor any gaussad module that does; the engine is
imported when a model is loaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from gaussad.calibration import Threshold
from gaussad.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_WORKERS,
    ImageSize,
    checked_image_size,
    size_pair,
)
from gaussad.decoding import ImageError, decoded_batches, decoding_pool
from gaussad.errors import GaussADError
from gaussad.framing import Crop, Window, frame, map_in_image
from gaussad.images import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    check_max_pixels,
    collect_images,
    describe,
    load_pixels,
)

FORMAT = "gaussad-onnx"
FORMAT_VERSION = 2  # 2: the window around the part (META_CROP); files of version 1 have none
READABLE_VERSIONS = ("1", "2")
INPUT = "images"
OUTPUTS = ("scores", "maps")
DECISION_OUTPUTS = ("normalized_scores", "is_anomalous")
RESIZE = "bilinear, antialiased, from 8-bit RGB, EXIF orientation applied"
ON_ERRORS = ("stop", "skip")

# metadata_props keys of an exported file; values are text, JSON where marked.
META_FORMAT = "gaussad.format"  # FORMAT
META_FORMAT_VERSION = "gaussad.format_version"  # FORMAT_VERSION
META_VERSION = "gaussad.version"  # the gaussad version that exported the file
META_INPUT_SIZE = "gaussad.input_size"  # JSON: a square input's side ("224"), else [height, width] in pixels
META_RESIZE = "gaussad.resize"  # RESIZE: how images become the input
META_NORMALIZATION = "gaussad.normalization"  # JSON {"mean", "std", "formula"}, applied inside the graph
META_IMAGE_THRESHOLD = "gaussad.image_threshold"  # JSON Threshold.as_dict() or null
META_PIXEL_THRESHOLD = "gaussad.pixel_threshold"  # JSON Threshold.as_dict() or null
META_BACKBONE = "gaussad.backbone"  # backbone name
META_BACKBONE_SHA256 = "gaussad.backbone_weights_sha256"  # SHA-256 of its weights ("" if unknown)
META_MODEL_SHA256 = "gaussad.model_sha256"  # the model folder's identity: gaussad.persistence.model_sha256
META_LEVELS = "gaussad.levels"  # JSON {"image": [...], "map": [...], "position": [...]}
META_BLUR_SIGMA = "gaussad.blur_sigma"  # map blur in input pixels
META_PARAMS = "gaussad.params"  # JSON: the model's parameters (ModelConfig) but the weights file's path
META_OUTPUTS = "gaussad.outputs"  # comma-separated output names: OUTPUTS, and DECISION_OUTPUTS if any
META_BATCH = "gaussad.batch"  # "dynamic" or the fixed batch size
META_MAP_RESIZE = "gaussad.map_resize"  # MAP_RESIZE: how a map becomes its image's size (outside the graph)
# JSON: null, or the window around the part, `gaussad.framing.Crop.as_json()`, cut before the resize; the
# map goes back to the window's place, its lowest value elsewhere. Files without it have no window.
META_CROP = "gaussad.crop"
# JSON: the held-out image scores the label-free image threshold is a quantile of
# (`GaussAD.threshold_scores_`), the service's drift reference. Files without it have none.
META_THRESHOLD_SCORES = "gaussad.threshold_scores"
MAP_RESIZE = "bilinear, align_corners=False, float32"
METADATA_KEYS = (
    META_FORMAT,
    META_FORMAT_VERSION,
    META_VERSION,
    META_INPUT_SIZE,
    META_RESIZE,
    META_MAP_RESIZE,
    META_CROP,
    META_THRESHOLD_SCORES,
    META_NORMALIZATION,
    META_IMAGE_THRESHOLD,
    META_PIXEL_THRESHOLD,
    META_BACKBONE,
    META_BACKBONE_SHA256,
    META_MODEL_SHA256,
    META_LEVELS,
    META_BLUR_SIGMA,
    META_PARAMS,
    META_OUTPUTS,
    META_BATCH,
)


# --------------------------------------------------------------------------------------- resampling
@lru_cache(maxsize=1024)
def _antialias_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """PyTorch's fixed-point weights of the antialiased bilinear filter along one axis (uint8 path of
    `F.interpolate`, ported from Pillow): per output, its input indices and int16 weights (output, tap),
    and the weights' precision in bits. Written as PyTorch computes them, in float64 and in this order."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    index = np.zeros((n_out, taps), dtype=np.intp)
    weight = np.zeros((n_out, taps))
    for i in range(n_out):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)
        count = min(max(min(int(center + support + 0.5), n_in) - start, 0), taps)
        row = [max(1.0 - abs((j + start - center + 0.5) * invscale), 0.0) for j in range(count)]
        total = 0.0
        for value in row:  # summed in order, as PyTorch does
            total += value
        if total != 0.0:
            row = [value / total for value in row]
        weight[i, :count] = row
        index[i, :count] = np.arange(start, start + count)
        index[i, count:] = start
    precision = 0
    while precision < 22 and int(0.5 + weight.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    fixed = np.floor(weight * (1 << precision) + 0.5).astype(np.int32)  # weights >= 0: (int)(0.5 + v)
    used = int(np.flatnonzero(fixed.any(axis=0)).max()) + 1  # trailing taps of zero weight everywhere
    return index[:, :used], fixed[:, :used], precision


def _resample_middle_axis(planes: np.ndarray, n_out: int) -> np.ndarray:
    """(C, N, M) uint8 -> (C, n_out, M): PyTorch's antialiased bilinear filter along the middle axis, in its
    fixed point: int32 sums of pixel x weight, rounded half up, shifted, clipped to 8 bits. The taps gather
    whole rows, which numpy copies fast."""
    index, weight, precision = _antialias_taps(planes.shape[1], n_out)
    total = np.full((planes.shape[0], n_out, planes.shape[2]), 1 << (precision - 1), dtype=np.int32)
    term = np.empty_like(total)
    for tap in range(index.shape[1]):
        np.multiply(np.take(planes, index[:, tap], axis=1), weight[None, :, tap, None], out=term)
        total += term
    np.right_shift(total, precision, out=total)
    return np.clip(total, 0, 255).astype(np.uint8)


def resize_pixels(pixels: np.ndarray, size: ImageSize) -> np.ndarray:
    """(H, W, C) uint8 resized to `size`, a square side or (height, width), exactly as
    `gaussad.features.prepare` does it (PyTorch's `F.interpolate(bilinear, antialias=True,
    align_corners=False)` on uint8): width first, then height, each pass rounded to 8 bits, as PyTorch
    does."""
    height, width = pixels.shape[:2]
    out_height, out_width = size_pair(size)
    if (height, width) == (out_height, out_width):
        return pixels
    planes = np.ascontiguousarray(pixels.transpose(2, 1, 0))  # (C, W, H)
    if width != out_width:
        planes = _resample_middle_axis(planes, out_width)
    planes = np.ascontiguousarray(planes.transpose(0, 2, 1))  # (C, H, out_width)
    if height != out_height:
        planes = _resample_middle_axis(planes, out_height)
    return np.ascontiguousarray(planes.transpose(1, 2, 0))


@lru_cache(maxsize=1024)
def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear (align_corners=False) source indices and float32 weights along one axis: the
    ratio in float32, the source position scale * (i + 0.5) - 0.5 rounded once (as the fused multiply-add
    PyTorch's kernel compiles to; a float32 product is exact in float64), clamped at 0."""
    scale = np.float32(n_in) / np.float32(n_out)
    positions = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    source = (np.float64(scale) * positions.astype(np.float64) - 0.5).astype(np.float32)
    source = np.maximum(source, np.float32(0.0))
    first = np.minimum(np.floor(source).astype(np.intp), n_in - 1)
    second = np.minimum(first + 1, n_in - 1)
    far = np.clip(source - first.astype(np.float32), np.float32(0.0), np.float32(1.0))
    return first, second, np.float32(1.0) - far, far


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one float32 (h, w) map to size (height, width), as `gaussad.maps.resize_map`
    (PyTorch's `F.interpolate(bilinear, align_corners=False)`): along the width, then the height."""
    if tuple(anomaly_map.shape) == tuple(size):
        return anomaly_map
    first, second, near, far = _linear_taps(anomaly_map.shape[1], size[1])
    rows = anomaly_map[:, first] * near + anomaly_map[:, second] * far
    first, second, near, far = _linear_taps(anomaly_map.shape[0], size[0])
    return rows[first] * near[:, None] + rows[second] * far[:, None]


# ---------------------------------------------------------------------------------------- results
@dataclass
class PredictionBatch:
    """Predictions for consecutive images, as `GaussAD.iter_predict` yields them, with the graph's image
    decisions (None for a model without an image threshold)."""

    indices: list[int]  # the images' positions among the inputs
    names: list[str]
    sizes: list[tuple[int, int]]  # each image's own (height, width), as decoded
    scores: np.ndarray  # float64 (the graph's float32 scores)
    maps: list[np.ndarray]  # float32, at the requested size or the image's own
    errors: list[ImageError]  # images of the batch that were skipped (on_error="skip")
    normalized_scores: np.ndarray | None = None  # float32 in [0, 1]: typical normal 0, threshold 0.5
    is_anomalous: np.ndarray | None = None  # bool: score >= the image threshold

    @property
    def start(self) -> int:
        """Position of the batch's first image among the inputs (-1 for a batch of errors only)."""
        return self.indices[0] if self.indices else -1


@dataclass
class Prediction:
    """Scores, anomaly maps (each at its image's size, float32) and decisions of all images, in order."""

    names: list[str]
    scores: np.ndarray
    maps: list[np.ndarray]
    normalized_scores: np.ndarray | None
    is_anomalous: np.ndarray | None


# ------------------------------------------------------------------------------------------ model
def _threshold(metadata: dict[str, str], key: str) -> Threshold | None:
    document = json.loads(metadata[key])
    return None if document is None else Threshold(**document)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _input_size(text: str | None, path: Path) -> ImageSize:
    """The file's input size: a square side ("224", as in every file before other inputs) or
    "[height, width]"."""
    try:
        size = checked_image_size(json.loads(text or ""))
    except json.JSONDecodeError:
        size = None
    if size is None:
        raise GaussADError(f"{path}: malformed {META_INPUT_SIZE} metadata {text!r}")
    return size


def _crop(text: str | None, path: Path) -> Crop | None:
    """The file's window around the part: none where it has no such metadata (files before it)."""
    try:
        return Crop.from_json(json.loads(text or "null"))
    except ValueError:  # JSON's decoding errors too
        raise GaussADError(f"{path}: malformed {META_CROP} metadata {text!r}") from None


def _scores(text: str | None, path: Path) -> np.ndarray:
    """The file's threshold scores: none where it has no such metadata (files before them)."""
    try:
        values = json.loads(text or "[]")
        scores = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):  # JSON's decoding errors too
        scores = None
    if scores is None or scores.ndim != 1 or not np.isfinite(scores).all():
        raise GaussADError(f"{path}: malformed {META_THRESHOLD_SCORES} metadata {(text or '')[:80]!r}")
    return scores


def prepare_pixels(pixels: np.ndarray, size: tuple[int, int], crop: Crop | None) -> tuple[np.ndarray, Window]:
    """(H, W, 3) uint8 pixels cut to their part's window (`crop`) and resized to the model input (height,
    width), as `gaussad.features.prepare` does it; and the window."""
    pixels, window = frame(pixels, crop)
    return resize_pixels(pixels, size), window


def _prepare(
    item: ImageInput, size: tuple[int, int], max_pixels: int, crop: Crop | None
) -> tuple[np.ndarray, tuple[int, int], Window]:
    """Decode one image to 8-bit RGB (gaussad.images; refused over max_pixels) and make it the model input
    (`prepare_pixels`): the input, the image's (height, width) and its window."""
    pixels = load_pixels(item, max_pixels)
    inputs, window = prepare_pixels(pixels, size, crop)
    return inputs, (int(pixels.shape[0]), int(pixels.shape[1])), window


class OnnxRuntimeEngine:
    """An exported file in onnxruntime: its metadata, output names, and a run on a batch of pixels."""

    def __init__(self, path: Path, device: str = "auto", threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise GaussADError("scoring an ONNX file needs onnxruntime: pip install onnxruntime") from None
        options = onnxruntime.SessionOptions()
        # Decoding threads share the cores with the graph: idle graph threads that spin for work take
        # their time (without spinning, 1.13x the images per second on bottle, 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = _providers(device, onnxruntime.get_available_providers())
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own untyped errors for a bad file
            raise GaussADError(f"{path}: cannot load as an ONNX model ({_first_line(error)})") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.outputs = [output.name for output in self.session.get_outputs()]

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {INPUT: pixels})


class OpenVinoEngine:
    """An exported file in OpenVINO's CPU runtime, in float32: OpenVINO's default on CPUs with bfloat16
    instructions runs it in bfloat16, which moved maps by up to 3 times their range and cost up to 1.7
    points of AUPRO (benchmarks/results/export.md)."""

    def __init__(self, path: Path, device: str = "auto", threads: int | None = None) -> None:
        try:
            import openvino
        except ImportError:
            raise GaussADError("the OpenVINO runtime needs openvino: pip install openvino") from None
        if device not in ("auto", "cpu"):
            raise GaussADError(f"--device {device!r}: the OpenVINO runtime here runs on the cpu")
        core = openvino.Core()
        try:
            model = core.read_model(str(path))
        except Exception as error:  # OpenVINO raises its own untyped errors for a bad file
            raise GaussADError(f"{path}: cannot load as an ONNX model ({_first_line(error)})") from None
        framework = dict(model.get_rt_info().items()).get("framework", {})  # where metadata_props go
        self.metadata = {key: value.astype(str) for key, value in framework.items()}
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        self.outputs = [output.get_any_name() for output in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        results = self.request.infer({INPUT: pixels})
        return [np.array(results[output]) for output in self.compiled.outputs]  # copied: the next run reuses


ENGINES = {"onnxruntime": OnnxRuntimeEngine, "openvino": OpenVinoEngine}


class OnnxModel:
    """A gaussad model exported by `gaussad.export.export_onnx`, scored by onnxruntime (or OpenVINO).

    Predictions equal `GaussAD.predict`'s to float32 rounding; `image_threshold_` and `pixel_threshold_`
    are the model's, so `gaussad.decisions` decides and writes from them as for a model folder. Like
    `GaussAD`, it changes no process-wide state; large images decode and resize faster inside
    `gaussad.allocator.keep_freed_memory()` (process-wide, torch-free), as the CLI runs it.
    """

    def __init__(
        self,
        engine: OnnxRuntimeEngine | OpenVinoEngine,
        path: Path,
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int = DEFAULT_WORKERS,
        on_error: str = "stop",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if batch_size < 1:
            raise GaussADError(f"batch size {batch_size}: expected at least 1")
        if on_error not in ON_ERRORS:
            raise GaussADError(f"--on-error {on_error!r}: expected one of {', '.join(ON_ERRORS)}")
        self.path = path
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.on_error = on_error
        self.max_pixels = check_max_pixels(max_pixels)
        self.engine = engine
        metadata = engine.metadata
        if metadata.get(META_FORMAT) != FORMAT:
            raise GaussADError(f"{path}: not a gaussad ONNX file (no {META_FORMAT} metadata)")
        if metadata.get(META_FORMAT_VERSION) not in READABLE_VERSIONS:
            raise GaussADError(
                f"{path}: gaussad ONNX format version {metadata.get(META_FORMAT_VERSION)} is not supported "
                f"(this gaussad reads versions {' and '.join(READABLE_VERSIONS)}); export the model again"
            )
        self.metadata = metadata
        self.image_size_ = _input_size(metadata.get(META_INPUT_SIZE), path)  # as `GaussAD.image_size_`
        self.input_size_ = size_pair(self.image_size_)  # (height, width)
        self.crop_ = _crop(metadata.get(META_CROP), path)  # as `GaussAD.crop_`
        self.threshold_scores_ = _scores(metadata.get(META_THRESHOLD_SCORES), path)  # as `GaussAD`'s
        self.image_threshold_ = _threshold(metadata, META_IMAGE_THRESHOLD)
        self.pixel_threshold_ = _threshold(metadata, META_PIXEL_THRESHOLD)
        self.graph_batch_ = None if metadata[META_BATCH] == "dynamic" else int(metadata[META_BATCH])

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int = DEFAULT_WORKERS,
        on_error: str = "stop",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: str = "auto",
        threads: int | None = None,
        engine: str = "onnxruntime",
    ) -> OnnxModel:
        """Open an exported file. batch_size, workers, on_error and max_pixels as for `GaussAD`; device:
        "cpu", "cuda" (onnxruntime's CUDA provider) or "auto" (CUDA where onnxruntime has it); threads: the
        engine's threads for one run (default: its own choice); engine: "onnxruntime" or "openvino"
        (float32, CPU)."""
        if engine not in ENGINES:
            raise GaussADError(f"--runtime {engine!r}: expected one of {', '.join(ENGINES)}")
        path = Path(path)
        if not path.is_file():
            raise GaussADError(f"{path}: no such file")
        return cls(ENGINES[engine](path, device, threads), path, batch_size, workers, on_error, max_pixels)

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs by name for (B, H, W, 3) uint8 pixels already resized (`resize_pixels`), for
        callers that decode and batch images themselves; a fixed-batch graph runs in slices, the last one
        padded."""
        step = self.graph_batch_ or len(pixels)
        parts = []
        for start in range(0, len(pixels), step):
            chunk = pixels[start : start + step]
            real = len(chunk)
            if real < step:
                chunk = np.concatenate([chunk, np.zeros((step - real, *chunk.shape[1:]), np.uint8)])
            parts.append([output[:real] for output in self.engine.run(chunk)])
        return {
            name: np.concatenate(values)
            for name, values in zip(self.engine.outputs, zip(*parts, strict=True), strict=True)
        }

    def _decoded(self, items: Sequence[ImageInput]) -> Iterator[tuple[list[int], list, list[ImageError]]]:
        """Decoded, resized images in chunks of batch_size, decoded in threads ahead of the graph; an
        unreadable image stops the run or, with on_error="skip", is reported in the next chunk."""
        decode = partial(_prepare, size=self.input_size_, max_pixels=self.max_pixels, crop=self.crop_)
        with decoding_pool(len(items), self.workers) as pool:
            yield from decoded_batches(items, decode, self.batch_size, pool, self.on_error == "skip")

    def iter_predict(
        self, images: ImageInput | Iterable[ImageInput], map_sizes: Sequence[tuple[int, int]] | None = None
    ) -> Iterator[PredictionBatch]:
        """Predictions batch by batch, as `GaussAD.iter_predict`. Streams, so any number of images fits in
        memory. map_sizes gives each image's output map size (default: the image's own size)."""
        items = collect_images(images)
        for indices, chunk, errors in self._decoded(items):
            if not chunk:
                yield PredictionBatch([], [], [], np.empty(0), [], errors)
                continue
            outputs = self.run(np.stack([pixels for pixels, _, _ in chunk]))
            sizes = [size for _, size, _ in chunk]
            targets = sizes if map_sizes is None else [tuple(map_sizes[index]) for index in indices]
            maps = [
                map_in_image(m, window, size, target, resize_map)
                for m, (_, size, window), target in zip(outputs["maps"], chunk, targets, strict=True)
            ]
            yield PredictionBatch(
                indices,
                [describe(items[index], index) for index in indices],
                sizes,
                outputs["scores"].astype(np.float64),
                maps,
                errors,
                outputs.get("normalized_scores"),
                outputs.get("is_anomalous"),
            )

    def predict(self, images: ImageInput | Iterable[ImageInput]) -> Prediction:
        """Scores, maps and decisions of all images."""
        batches = [batch for batch in self.iter_predict(images) if batch.indices]
        decided = self.image_threshold_ is not None and bool(batches)
        return Prediction(
            [name for batch in batches for name in batch.names],
            np.concatenate([batch.scores for batch in batches]) if batches else np.empty(0),
            [m for batch in batches for m in batch.maps],
            np.concatenate([batch.normalized_scores for batch in batches]) if decided else None,
            np.concatenate([batch.is_anomalous for batch in batches]) if decided else None,
        )


def _providers(device: str, available: Sequence[str]) -> list:
    """onnxruntime's execution providers for a device name (cpu, cuda, cuda:N or auto)."""
    cuda = "CUDAExecutionProvider" in available
    if device == "cpu" or (device == "auto" and not cuda):
        return ["CPUExecutionProvider"]
    if device not in ("auto", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise GaussADError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto")
    if not cuda:
        raise GaussADError(f"--device {device}: this onnxruntime has no CUDA provider (onnxruntime-gpu has)")
    index = int(device[5:]) if device.startswith("cuda:") else 0
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
