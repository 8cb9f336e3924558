"""Where gaussad's time goes: the backbone's forward-pass floor against fit and predict end to end.

Prints, for one category: the forward pass alone on a synthetic batch in each memory format and precision
(the floor), decoding and resizing alone, and gaussad's fit and test stages (scores and full-resolution
maps) with the share of the test time that is not the forward pass. Writes a Markdown table.

    python benchmarks/speed.py ../shared/datasets/mvtec_ad/bottle --out benchmarks/results/speed_bottle.md
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from gaussad import GaussAD
from gaussad.backbones import load_backbone
from gaussad.evaluation import list_test_images, training_images
from gaussad.features import prepare


def forward_floor(
    backbone_name: str, size: int, levels: list[int], images: int, batch: int
) -> dict[str, float]:
    """Images per second of the bare forward pass up to the deepest level, per format and precision."""
    backbone = load_backbone(backbone_name)
    results = {}
    for name, memory_format, dtype in (
        ("fp32 contiguous", torch.contiguous_format, None),
        ("fp32 channels_last", torch.channels_last, None),
        ("bf16 channels_last", torch.channels_last, torch.bfloat16),
    ):
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
    started = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - started
    levels = model.extracted_levels

    started = time.perf_counter()
    for _ in model.iter_predict(tests):
        pass
    test_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in model.iter_predict(tests, with_maps=False):
        pass
    score_seconds = time.perf_counter() - started

    floors = forward_floor(args.backbone, model.image_size_, levels, images=max(len(tests), 64), batch=32)
    floor = floors[f"{args.precision} channels_last"]
    forward_seconds = len(tests) / floor
    decode = decode_rate(tests[:40], model.image_size_)

    lines = [
        f"# Speed: {args.category.name}, {args.backbone}, {args.precision}",
        "",
        f"Command: `python benchmarks/speed.py {args.category} --backbone {args.backbone} "
        f"--precision {args.precision}`",
        "",
        f"CPU threads: {torch.get_num_threads()}; {len(train)} training and {len(tests)} test images; "
        f"input {model.image_size_} px; levels {levels}.",
        "",
        "| what | images per second |",
        "|---|---|",
        *(f"| forward pass alone, {name}, batch 32 | {rate:.1f} |" for name, rate in floors.items()),
        f"| decode + resize alone, one thread | {decode:.1f} |",
        f"| gaussad fit (incl. 5-fold calibration), {fit_seconds:.1f} s | {len(train) / fit_seconds:.1f} |",
        f"| gaussad test: scores + full-size maps, {test_seconds:.1f} s | {len(tests) / test_seconds:.1f} |",
        f"| gaussad test: scores only, {score_seconds:.1f} s | {len(tests) / score_seconds:.1f} |",
        "",
        f"Forward pass at the floor ({args.precision} channels_last) for the test images: "
        f"{forward_seconds:.2f} s, so {100 * (1 - forward_seconds / test_seconds):.0f}% of the test stage "
        "(scores + maps) is not the forward pass.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
