"""The exported ONNX file against gaussad's PyTorch path: accuracy, test throughput, latency and file size.

Per category: fits the default model on train/good (PyTorch, under `gaussad.cpu_tuning()`), exports it, and
scores the test set end to end (decode, resize, model, maps resized to each image's size) with each runner:
gaussad's own `predict` under `cpu_tuning()`, `gaussad.runtime.OnnxModel` on onnxruntime, and, where
OpenVINO is installed (`pip install openvino`), `OnnxModel` on OpenVINO (float32, as the runtime runs it)
and at OpenVINO's default precision on this CPU; the runtime's runs hold the allocator policy
(`gaussad.allocator.keep_freed_memory()`) as PyTorch's do under `cpu_tuning()`. Timed runs alternate
between the runners (A B C A B C ...), and each round's ratios to PyTorch are taken within the round: the
machine is noisy. Speed is timed under each `--threads` setting: the engines' default threads, and one
compute thread beside one decoding thread (less sensitive to other jobs on the cores). Accuracy (image
AUROC, pixel AUROC, AUPRO at full resolution, gaussad.metrics) and the largest differences from PyTorch's
scores and maps come from the first round.

    python benchmarks/export.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        --out benchmarks/results/export.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from machine import cpu_description

from gaussad import GaussAD, __version__, cpu_tuning
from gaussad.allocator import keep_freed_memory
from gaussad.config import DEFAULT_WORKERS
from gaussad.evaluation import read_mask
from gaussad.export import export_onnx
from gaussad.layout import LabeledImage, list_test_images, training_images
from gaussad.metrics import image_auroc, pixel_metrics
from gaussad.runtime import OnnxModel

Predict = Callable[[Sequence[Path]], tuple[np.ndarray, list[np.ndarray]]]


def openvino_at_its_default_precision(path: Path, workers: int, threads: int | None) -> OnnxModel:
    """The runtime on OpenVINO at OpenVINO's own precision for this CPU (the runtime forces float32)."""
    import openvino

    model = OnnxModel.load(path, workers=workers, threads=threads, engine="openvino")
    engine = model.engine
    config = {} if threads is None else {"INFERENCE_NUM_THREADS": threads}
    engine.compiled = openvino.Core().compile_model(str(path), "CPU", config)
    engine.outputs = [output.get_any_name() for output in engine.compiled.outputs]
    engine.request = engine.compiled.create_infer_request()
    return model


def openvino_default_precision() -> str | None:
    """OpenVINO's default inference precision on this CPU (None without OpenVINO)."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


@dataclass(frozen=True)
class Threads:
    """The threads of a timed run: decoding threads, and compute threads (None: each engine's default)."""

    workers: int
    compute: int | None

    def describe(self) -> str:
        compute = "each engine's default" if self.compute is None else str(self.compute)
        return f"{self.workers} decoding thread(s), compute threads: {compute}"


def runners(model: GaussAD, onnx_path: Path, threads: Threads) -> dict[str, Predict]:
    """Each way of scoring the test set end to end: paths in, scores and full-size maps out."""
    torch_threads = threads.compute or torch.get_num_threads()

    def pytorch(paths: Sequence[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
        before = torch.get_num_threads()
        torch.set_num_threads(torch_threads)
        model.workers = threads.workers
        try:
            with cpu_tuning():
                prediction = model.predict(paths)
        finally:
            torch.set_num_threads(before)
        return prediction.scores, prediction.maps

    def runtime(onnx_model: OnnxModel) -> Predict:
        def predict(paths: Sequence[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
            with keep_freed_memory():  # the allocator policy gaussad's CLI holds for the runtime too
                prediction = onnx_model.predict(paths)
            return prediction.scores, prediction.maps

        return predict

    settings = {"workers": threads.workers, "threads": threads.compute}
    found = {
        "PyTorch (gaussad predict)": pytorch,
        "onnxruntime": runtime(OnnxModel.load(onnx_path, **settings)),
    }
    default = openvino_default_precision()
    if default is not None:
        found["OpenVINO (f32)"] = runtime(OnnxModel.load(onnx_path, engine="openvino", **settings))
        if default != "f32":
            found[f"OpenVINO at its default ({default})"] = runtime(
                openvino_at_its_default_precision(onnx_path, **settings)
            )
    return found


@dataclass
class Accuracy:
    image_auroc: float
    pixel_auroc: float
    aupro: float
    score_difference: float  # largest relative difference from PyTorch's scores
    map_difference: float  # largest difference from PyTorch's map, as a share of that map's range
    decisions_differing: int  # images whose is_anomalous differs from PyTorch's


def accuracy(
    tests: list[LabeledImage],
    scores: np.ndarray,
    maps: list[np.ndarray],
    reference: tuple[np.ndarray, list[np.ndarray]],
    threshold: float,
) -> Accuracy:
    masks = [read_mask(image, anomaly_map.shape) for image, anomaly_map in zip(tests, maps, strict=True)]
    pixel_auroc, aupro = pixel_metrics(masks, maps)
    reference_scores, reference_maps = reference
    return Accuracy(
        image_auroc(np.array([image.label for image in tests]), scores),
        pixel_auroc,
        aupro,
        float(np.max(np.abs(scores - reference_scores) / np.abs(reference_scores))),
        max(float(np.abs(a - b).max() / np.ptp(b)) for a, b in zip(maps, reference_maps, strict=True)),
        int(np.sum((scores >= threshold) != (reference_scores >= threshold))),
    )


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def timings(
    predict: dict[str, Predict], paths: list[Path], rounds: int, latency_images: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], list[tuple[str, np.ndarray, list[np.ndarray]]]]:
    """Images per second per round and runner, one-image latencies (ms), and the first round's outputs."""
    for run in predict.values():  # warm-up: sessions, thread pools, allocator
        run(paths[:16])
    rates: dict[str, list[float]] = {name: [] for name in predict}
    first: list[tuple[str, np.ndarray, list[np.ndarray]]] = []
    for round_index in range(rounds):
        for name, run in predict.items():
            started = time.perf_counter()
            scores, maps = run(paths)
            rates[name].append(len(paths) / (time.perf_counter() - started))
            if round_index == 0:
                first.append((name, scores, maps))
    latencies: dict[str, list[float]] = {name: [] for name in predict}
    for path in paths[:: max(1, len(paths) // latency_images)][:latency_images]:
        for name, run in predict.items():
            started = time.perf_counter()
            run([path])
            latencies[name].append(1000 * (time.perf_counter() - started))
    return rates, latencies, first


def speed_table(rates: dict[str, list[float]], latencies: dict[str, list[float]]) -> list[str]:
    baseline = next(iter(rates))

    def ratios(name: str, base: str) -> str:
        within = [rate / other for rate, other in zip(rates[name], rates[base], strict=True)]
        return f"{statistics.median(within):.2f}x ({min(within):.2f}-{max(within):.2f})"

    lines = [
        "| runner | test img/s, per round | speed vs PyTorch, median of the rounds' ratios (range) "
        "| speed vs onnxruntime, likewise | one image: latency ms (median) "
        "| one image: speed vs PyTorch (median of PyTorch's ms / this ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name in rates:
        speedups = [base / ms for ms, base in zip(latencies[name], latencies[baseline], strict=True)]
        lines.append(
            f"| {name} | {', '.join(f'{rate:.1f}' for rate in rates[name])} | {ratios(name, baseline)} "
            f"| {ratios(name, 'onnxruntime')} | {statistics.median(latencies[name]):.1f} "
            f"| {statistics.median(speedups):.2f}x |"
        )
    return lines


def benchmark(
    category: Path, settings: list[Threads], rounds: int, latency_images: int, scratch: Path
) -> list[str]:
    """One category's section of the report: accuracy, then speed under each thread setting."""
    train, tests = training_images(category), list_test_images(category)
    paths = [test.path for test in tests]
    model = GaussAD(device="cpu")
    with cpu_tuning():
        model.fit(train)
    folder = model.save(scratch / f"{category.name}_model")
    started = time.perf_counter()
    onnx_path = export_onnx(folder, scratch / f"{category.name}.onnx")
    export_seconds = time.perf_counter() - started
    lines = [
        f"## {category.name}",
        "",
        f"{len(train)} training and {len(tests)} test images; input {model.image_size_} px. Model folder "
        f"{folder_bytes(folder) / 2**20:.1f} MiB (backbone weights referenced, not included); ONNX file "
        f"{onnx_path.stat().st_size / 2**20:.1f} MiB (backbone weights, Gaussians, thresholds and metadata "
        f"in one file), exported in {export_seconds:.1f} s.",
        "",
    ]
    for index, threads in enumerate(settings):
        load_before = os.getloadavg()[0]
        rates, latencies, first = timings(runners(model, onnx_path, threads), paths, rounds, latency_images)
        if index == 0:
            _, *reference = first[0]
            lines += [
                "| runner | image AUROC | pixel AUROC | AUPRO | largest score difference from PyTorch "
                "(relative) | largest map difference from PyTorch (share of the map's range) "
                "| decisions differing from PyTorch's |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, scores, maps in first:
                a = accuracy(tests, scores, maps, tuple(reference), model.image_threshold_.value)
                lines.append(
                    f"| {name} | {a.image_auroc:.4f} | {a.pixel_auroc:.4f} | {a.aupro:.4f} "
                    f"| {a.score_difference:.1e} | {a.map_difference:.1e} | {a.decisions_differing} |"
                )
            lines.append("")
        del first
        lines += [
            f"Speed with {threads.describe()}; load average (1 min) of the machine before the timed runs "
            f"{load_before:.1f}, after {os.getloadavg()[0]:.1f}:",
            "",
            *speed_table(rates, latencies),
            "",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of the test set per runner")
    parser.add_argument("--latency-images", type=int, default=20, help="images timed one at a time")
    parser.add_argument(
        "--threads",
        nargs="+",
        default=["default", "1"],
        help="thread settings to time: 'default' (2 decoding threads, each engine's compute threads) and/or "
        "N (one decoding thread and N compute threads per engine)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    settings = [
        Threads(DEFAULT_WORKERS, None) if value == "default" else Threads(1, int(value))
        for value in args.threads
    ]
    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    default = openvino_default_precision()
    if default is not None:
        import openvino

        versions += f", OpenVINO {openvino.__version__} (default CPU precision here: {default})"
    lines = [
        "# ONNX export: onnxruntime and OpenVINO against PyTorch",
        "",
        f"Command: `python benchmarks/export.py {' '.join(map(str, args.categories))} --rounds {args.rounds} "
        f"--latency-images {args.latency_images} --threads {' '.join(args.threads)} --out {args.out}`",
        "",
        f"CPU: {cpu_description()}; gaussad {__version__}; {versions}. Every runner scores end to end: "
        "decode, resize, model, maps resized to each image's size. PyTorch runs under "
        "`gaussad.cpu_tuning()`; the others through `gaussad.runtime.OnnxModel` (batch 16) under "
        "`gaussad.allocator.keep_freed_memory()`. Runs alternate between runners; ratios are within a round. "
        "Other jobs shared the 2 cores (the load averages below): PyTorch's multi-threaded forward pass "
        "suffers most from that, so the one-compute-thread tables say more about a dedicated machine.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="gaussad-export-bench-") as scratch:
        for category in args.categories:
            lines += benchmark(category, settings, args.rounds, args.latency_images, Path(scratch))
            print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
