"""Where gaussad's time goes: the backbone's forward-pass floor against fit and predict end to end.

Prints, for one category: the forward pass alone on a synthetic batch in each memory format and precision
(the floor; first with glibc's default allocator policy, then with gaussad's), decoding and resizing alone,
gaussad's fit and test stages (scores and full-resolution maps) with the share of the test time that is not
the forward pass, a profile of the test stage's main thread, and where a call with one image spends its
time. Writes a Markdown report.

    python benchmarks/speed.py ../shared/datasets/mvtec_ad/bottle --out benchmarks/results/speed_bottle.md
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_description

from gaussad import GaussAD
from gaussad.allocator import keep_freed_memory
from gaussad.backbones import TappedBackbone, load_backbone
from gaussad.config import DEFAULT_BATCH_SIZE, level_union
from gaussad.features import BatchRunner, prepare
from gaussad.gaussian import component_distance
from gaussad.layout import list_test_images, training_images
from gaussad.maps import level_distance_map, resize_map
from gaussad.mixture import mixture_distance_map
from gaussad.scorer import MapHead
from gaussad.tuning import cpu_tuning

# The test stage's main thread, by what it spends its time in: label -> functions whose cumulative time
# (their callees included) counts for it; none of them calls another.
PROFILE_PARTS: dict[str, list[Callable]] = {
    "backbone forward pass": [TappedBackbone.forward],
    "input batch: to float, normalized": [BatchRunner.normalize],
    "waiting for decoded images": [Future.result],
    "Mahalanobis distances": [component_distance, level_distance_map, mixture_distance_map],
    "maps: combined, blurred, resized": [MapHead.maps, resize_map],
}


FORMATS = {
    "fp32 contiguous": (torch.contiguous_format, None),
    "fp32 channels_last": (torch.channels_last, None),
    "bf16 channels_last": (torch.channels_last, torch.bfloat16),
}


def forward_floor(
    backbone_name: str, size: int, levels: list[int], images: int, batch: int, formats: list[str]
) -> dict[str, float]:
    """Images per second of the bare forward pass up to the deepest level, per format and precision."""
    backbone = load_backbone(backbone_name)
    results = {}
    for name in formats:
        memory_format, dtype = FORMATS[name]
        model = backbone.to(memory_format=memory_format)
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
        autocast = torch.autocast("cpu", dtype=dtype) if dtype else nullcontext()
        with torch.inference_mode(), autocast:
            model(x, levels)  # warm-up
            started = time.perf_counter()
            for _ in range(images // batch):
                model(x, levels)
            elapsed = time.perf_counter() - started
        results[name] = (images // batch) * batch / elapsed
    return results


def profile_test(model: GaussAD, tests: list[Path]) -> tuple[float, dict[str, float]]:
    """The test stage under cProfile: its wall time and the main thread's seconds in each PROFILE_PARTS
    part; the remainder is everything else."""
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in model.iter_predict(tests):
        pass
    profiler.disable()
    total = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, calls, own s, cumulative s, ...)

    def cumulative(function: Callable) -> float:
        code = function.__code__
        row = stats.get((code.co_filename, code.co_firstlineno, code.co_name))
        return row[3] if row else 0.0

    parts = {label: sum(cumulative(f) for f in functions) for label, functions in PROFILE_PARTS.items()}
    parts["everything else"] = total - sum(parts.values())
    return total, parts


def one_at_a_time(model: GaussAD, tests: list[Path], rounds: int = 2) -> dict[str, float]:
    """Median milliseconds of a `predict([path])` call over the test images (a caller that has one image
    at a time), then of its parts run apart on the same images: decoding and resizing, the forward pass,
    the scores and maps from the features, the map's resizing to the image's size."""
    scorer = model.scorer_
    runner = BatchRunner(scorer, model.backbone_.preprocessing, model.state_.input_size, model.device_)
    times: dict[str, list[float]] = defaultdict(list)

    def timed(part: str, work: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        result = work(*args)
        times[part].append(1000 * (time.perf_counter() - started))
        return result

    def forward(pixels: np.ndarray) -> list[torch.Tensor]:
        return scorer.features(runner.normalize(pixels[None]))

    model.predict(tests[:1])  # warm-up
    for _ in range(rounds):
        for path in tests:
            timed("a `predict([path])` call", model.predict, [path])
            with torch.inference_mode():
                pixels, size = timed("decode + resize", prepare, path, model.state_.input_size)
                features = timed("forward pass", forward, pixels)
                _, maps = timed("scores and maps from the features", scorer.score, features)
                timed("the map resized to the image", lambda m, s: resize_map(m, s).numpy(), maps[0], size)
    return {part: statistics.median(values) for part, values in times.items()}


def decode_rate(paths: list[Path], size: int) -> float:
    """Images per second of decoding and resizing alone, on one thread."""
    started = time.perf_counter()
    for path in paths:
        prepare(path, size)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", type=Path)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    train, tests = training_images(args.category), [t.path for t in list_test_images(args.category)]
    model = GaussAD(backbone=args.backbone, precision=args.precision, device="cpu")
    backbone = load_backbone(args.backbone)
    levels = list(
        level_union(*model.config.resolve_levels(backbone), model.config.resolve_global_levels(backbone))
    )
    floor_args = (
        args.backbone,
        backbone.preprocessing.image_size,
        levels,
        max(len(tests), 64),
        DEFAULT_BATCH_SIZE,
    )
    # The floor with glibc's default allocator policy, then (below) with gaussad's.
    default_policy = forward_floor(*floor_args, [f"{args.precision} channels_last"])
    # gaussad as its CLI runs it: with its process-wide CPU settings (thread choice, allocator, BLAS).
    with cpu_tuning():
        started = time.perf_counter()
        model.fit(train)
        fit_seconds = time.perf_counter() - started

        started = time.perf_counter()
        for _ in model.iter_predict(tests):
            pass
        test_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for _ in model.iter_predict(tests, with_maps=False):
            pass
        score_seconds = time.perf_counter() - started
        profiled_seconds, parts = profile_test(model, tests)
    single = one_at_a_time(model, tests)  # as a library caller runs it: gaussad's CPU settings not taken

    with keep_freed_memory():  # as gaussad holds it while it extracts features
        floors = forward_floor(*floor_args, list(FORMATS))
    floor = floors[f"{args.precision} channels_last"]
    forward_seconds = len(tests) / floor
    decode = decode_rate(tests[:40], model.image_size_)

    lines = [
        f"# Speed: {args.category.name}, {args.backbone}, {args.precision}",
        "",
        f"Command: `python benchmarks/speed.py {args.category} --backbone {args.backbone} "
        f"--precision {args.precision}`",
        "",
        f"CPU: {cpu_description()}; threads: {torch.get_num_threads()}; "
        f"{len(train)} training and {len(tests)} test images; "
        f"input {model.image_size_} px; levels {levels}; batch {DEFAULT_BATCH_SIZE}.",
        "",
        "| what | images per second |",
        "|---|---|",
        *(
            f"| forward pass alone, {name}, glibc's default allocator policy | {rate:.1f} |"
            for name, rate in default_policy.items()
        ),
        *(f"| forward pass alone, {name} | {rate:.1f} |" for name, rate in floors.items()),
        f"| decode + resize alone, one thread | {decode:.1f} |",
        f"| gaussad fit (incl. 5-fold calibration), {fit_seconds:.1f} s | {len(train) / fit_seconds:.1f} |",
        f"| gaussad test: scores + full-size maps, {test_seconds:.1f} s | {len(tests) / test_seconds:.1f} |",
        f"| gaussad test: scores only, {score_seconds:.1f} s | {len(tests) / score_seconds:.1f} |",
        "",
        f"Forward pass at the floor ({args.precision} channels_last) for the test images: "
        f"{forward_seconds:.2f} s, so {100 * (1 - forward_seconds / test_seconds):.0f}% of the test stage "
        "(scores + maps) is not the forward pass.",
        "",
        f"Profile of the test stage's main thread (cProfile, one more run: {profiled_seconds:.2f} s; "
        "decoding runs in threads beside it, so it shows as waiting and as a slower forward pass):",
        "",
        "| part | seconds | share |",
        "|---|---|---|",
        *(
            f"| {label} | {seconds:.2f} | {100 * seconds / profiled_seconds:.0f}% |"
            for label, seconds in parts.items()
        ),
        "",
        "One image at a time, as a library caller without `gaussad.cpu_tuning()` runs it (the median over "
        "two rounds of the test images; the parts run apart on the same images):",
        "",
        "| part | ms |",
        "|---|---|",
        *(f"| {label} | {ms:.2f} |" for label, ms in single.items()),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
