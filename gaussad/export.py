"""Export a fitted model to one self-contained ONNX file that scores, maps and decides.

The graph takes 8-bit RGB images already resized to the model input, `images` (N, H, W, 3) uint8 (as
`gaussad.runtime.resize_pixels` and `gaussad.features.prepare` make them), normalizes them as
`BatchRunner.normalize` does, runs `gaussad.scorer.Scorer` and returns `scores` (N,) and `maps` (N, H, W)
float32 at the input size. A model with an image threshold also returns `normalized_scores` (N,) float32
and `is_anomalous` (N,) bool, so a consumer without gaussad acts on the threshold that belongs to the
weights; a model without one (fitted with folds=0, not calibrated) has the first two outputs only. The
thresholds, the preprocessing and where the model came from are in the file's `metadata_props` (keys in
`gaussad.runtime`). Resizing each map to its image's own size and the pixel threshold's masks stay outside
the graph: they depend on each image's size.

Before the file is written, onnx's checker and onnxruntime check the graph: it must score synthetic images
as PyTorch does, so an export never scores differently from the trained model unnoticed.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from gaussad import __version__
from gaussad.backbones import Preprocessing
from gaussad.calibration import Threshold
from gaussad.config import describe_size
from gaussad.errors import GaussADError
from gaussad.fileio import write_bytes_atomic
from gaussad.model import GaussAD
from gaussad.persistence import model_sha256
from gaussad.runtime import (
    DECISION_OUTPUTS,
    FORMAT,
    FORMAT_VERSION,
    INPUT,
    MAP_RESIZE,
    META_BACKBONE,
    META_BACKBONE_SHA256,
    META_BATCH,
    META_BLUR_SIGMA,
    META_CROP,
    META_FORMAT,
    META_FORMAT_VERSION,
    META_IMAGE_THRESHOLD,
    META_INPUT_SIZE,
    META_LEVELS,
    META_MAP_RESIZE,
    META_MODEL_SHA256,
    META_NORMALIZATION,
    META_OUTPUTS,
    META_PARAMS,
    META_PIXEL_THRESHOLD,
    META_RESIZE,
    META_THRESHOLD_SCORES,
    META_VERSION,
    OUTPUTS,
    RESIZE,
)
from gaussad.scorer import Scorer

DEFAULT_OPSET = 17
# One protobuf holds at most 2 GiB; the graph and the metadata need a little beside the weights.
MAX_WEIGHT_BYTES = 2**31 - 64 * 2**20
# The self-check: onnxruntime against PyTorch on synthetic images, at the runtime's promised tolerances.
CHECK_SCORE_RTOL = 1e-4
CHECK_MAP_TOLERANCE = 1e-3  # of the maps' range


class ExportGraph(nn.Module):
    """uint8 RGB images (N, H, W, 3) -> scores, maps and, with an image threshold, the decisions.

    The normalization is `BatchRunner.normalize`'s: the same float32 constants, pixel * scale + offset.
    The decision compares the float32 score with the threshold rounded up to float32, which for a float32
    score is exactly `score >= threshold` (`gaussad.decisions.is_anomalous`) in any runtime; the normalized
    score is `Threshold.normalize` in float32.
    """

    def __init__(
        self, scorer: Scorer, preprocessing: Preprocessing, image_threshold: Threshold | None
    ) -> None:
        super().__init__()
        self.scorer = scorer
        std, mean = torch.tensor(preprocessing.std), torch.tensor(preprocessing.mean)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("offset", -mean / std)
        self.decides = image_threshold is not None
        if image_threshold is not None:
            value = image_threshold.value
            span = max(value - image_threshold.normal_level, np.finfo(np.float64).eps * max(abs(value), 1.0))
            self.register_buffer("threshold", torch.tensor(value, dtype=torch.float32))
            self.register_buffer("span", torch.tensor(span, dtype=torch.float32))
            self.register_buffer("threshold_up", torch.from_numpy(np.array(float32_at_or_above(value))))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = (images.float() * self.scale + self.offset).permute(0, 3, 1, 2)
        scores, maps = self.scorer(batch)
        if not self.decides:
            return scores, maps
        normalized = torch.clamp(0.5 + 0.5 * (scores - self.threshold) / self.span, 0.0, 1.0)
        return scores, maps, normalized, scores >= self.threshold_up


def float32_at_or_above(value: float) -> np.float32:
    """The smallest float32 at or above `value`: for a float32 score s, s >= it exactly when s >= value."""
    rounded = np.float32(value)
    return rounded if float(rounded) >= value else np.nextafter(rounded, np.float32(np.inf))


def _saved_sha256(model: GaussAD) -> str:
    """The SHA-256 of the folder a model in memory saves to (`model_sha256`)."""
    with tempfile.TemporaryDirectory(prefix="gaussad-export-") as scratch:
        return model_sha256(model.save(Path(scratch) / "model"))


def _metadata(model: GaussAD, sha256: str, batch: int | str) -> dict[str, str]:
    state, preprocessing = model.state_, model.backbone_.preprocessing

    def threshold(value: Threshold | None) -> str:
        return json.dumps(None if value is None else value.as_dict())

    params = model.config.as_dict() | state.resolved_options
    params.pop("weights", None)  # a path on the machine that fitted it; the SHA-256 names the weights
    normalization = {
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "formula": "float32 RGB pixel * (1 / (255 * std)) + (-mean / std), inside the graph",
    }
    levels = {
        "image": list(state.levels),
        "map": list(state.map_levels),
        "score map": list(state.score_map_levels),
        "position": list(state.position_levels),
    }
    outputs = OUTPUTS + (DECISION_OUTPUTS if state.image_threshold is not None else ())
    return {
        META_FORMAT: FORMAT,
        META_FORMAT_VERSION: str(FORMAT_VERSION),
        META_VERSION: __version__,
        META_INPUT_SIZE: json.dumps(state.image_size),  # "224" for a square input, else "[height, width]"
        META_RESIZE: RESIZE,
        META_MAP_RESIZE: MAP_RESIZE,
        META_CROP: json.dumps(None if state.crop is None else state.crop.as_json()),
        META_THRESHOLD_SCORES: json.dumps(model.threshold_scores_.tolist()),
        META_NORMALIZATION: json.dumps(normalization),
        META_IMAGE_THRESHOLD: threshold(state.image_threshold),
        META_PIXEL_THRESHOLD: threshold(state.pixel_threshold),
        META_BACKBONE: state.backbone.name,
        META_BACKBONE_SHA256: state.backbone.weights_sha256 or "",
        META_MODEL_SHA256: sha256,
        META_LEVELS: json.dumps(levels),
        META_BLUR_SIGMA: repr(float(model.config.blur_sigma)),
        META_PARAMS: json.dumps(params),
        META_OUTPUTS: ",".join(outputs),
        META_BATCH: str(batch),
    }


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _trace(graph: ExportGraph, example: torch.Tensor, opset: int, dynamic: bool, backbone: str) -> bytes:
    """The graph traced to ONNX (the TorchScript exporter, whose output onnxruntime runs as is)."""
    names = list(OUTPUTS + (DECISION_OUTPUTS if graph.decides else ()))
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes it fixes as constants
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT],
                output_names=names,
                dynamic_axes={name: {0: "n"} for name in [INPUT, *names]} if dynamic else None,
            )
    except Exception as error:  # the exporter raises many kinds, all meaning "this model does not export"
        raise GaussADError(
            f"backbone {backbone} at opset {opset} does not export to ONNX ({_first_line(error)})"
        ) from None
    return buffer.getvalue()


def _self_check(graph: ExportGraph, data: bytes, example: torch.Tensor) -> None:
    """onnxruntime must score the example as PyTorch does, else the file is not written."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    exported = session.run(None, {INPUT: example.numpy()})
    with torch.no_grad():
        expected = [output.numpy() for output in graph(example)]
    scores, maps = exported[0], exported[1]
    score_error = float(np.max(np.abs(scores - expected[0]) / np.maximum(np.abs(expected[0]), 1e-12)))
    span = float(np.ptp(expected[1])) or 1.0
    map_error = float(np.max(np.abs(maps - expected[1]))) / span
    if score_error > CHECK_SCORE_RTOL or map_error > CHECK_MAP_TOLERANCE:
        raise GaussADError(
            f"the exported graph scores differently from PyTorch (scores {score_error:.2g} relative, "
            f"maps {map_error:.2g} of their range); not written"
        )


def export_onnx(
    model: str | os.PathLike | GaussAD,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    batch: int | Literal["dynamic"] = "dynamic",
) -> Path:
    """Export a model folder or a fitted `GaussAD` to one ONNX file at `path` (written atomically).

    batch: "dynamic" (any number of images per run) or a fixed count, for runtimes that want static
    shapes. A model that cannot be exported (bf16 precision, a backbone the exporter does not take, weights
    over the 2 GiB a single file holds, a graph that scores differently) is a `GaussADError` saying why.
    """
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the self-check runs the graph)
    except ImportError as error:
        raise GaussADError(f"ONNX export needs onnx and onnxruntime ({error.name} is missing)") from None
    if batch != "dynamic" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise GaussADError(f"batch {batch!r}: expected 'dynamic' or a positive number of images")
    if isinstance(model, GaussAD):
        model._check_fitted()
    fitted = model if isinstance(model, GaussAD) else GaussAD.load(model, device="cpu")
    config, state = fitted.config, fitted.state_
    if config.precision != "fp32":
        raise GaussADError(
            f"model precision {config.precision}: ONNX export takes fp32 models (bfloat16 autocast does not "
            "export); fit with --precision fp32"
        )
    sha256 = _saved_sha256(fitted) if isinstance(model, GaussAD) else model_sha256(model)
    scorer = fitted.scorer_ if fitted.device_.type == "cpu" else copy.deepcopy(fitted.scorer_).to("cpu")
    graph = ExportGraph(scorer, fitted.backbone_.preprocessing, state.image_threshold).eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in [*graph.parameters(), *graph.buffers()])
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise GaussADError(
            f"the model's weights and Gaussians take {weight_bytes / 2**30:.2f} GiB: more than one ONNX file "
            "holds (2 GiB)"
        )
    height, width = state.input_size
    example = torch.from_numpy(
        np.random.default_rng(0).integers(
            0, 256, (2 if batch == "dynamic" else batch, height, width, 3), np.uint8
        )
    )
    data = _trace(graph, example, opset, batch == "dynamic", state.backbone.name)
    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, _metadata(fitted, sha256, batch))
    outputs = ", ".join(OUTPUTS + (DECISION_OUTPUTS if graph.decides else ()))
    proto.doc_string = (
        f"gaussad {__version__} anomaly detector ({state.backbone.name}, {describe_size(state.image_size)}): "
        f"images (N, {height}, {width}, 3) uint8 RGB resized {RESIZE} -> {outputs}"
    )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise GaussADError(f"the exported graph fails onnx's checker ({_first_line(error)})") from None
    data = proto.SerializeToString()
    _self_check(graph, data, example)
    path = Path(path)
    write_bytes_atomic(path, data)
    return path
