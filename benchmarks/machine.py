"""The CPU a benchmark ran on, in one line: timings and bf16's speed depend on it, so results name it."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_description() -> str:
    """Model name, the vector instruction set PyTorch dispatches to, and whether bf16 has hardware support."""
    model, flags = "", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if model and flags:  # the first processor's entry is enough
                break
    model = model or platform.processor() or platform.machine()
    if not flags:
        bf16 = "bf16 instructions unknown"
    else:
        bf16 = ("with" if flags & {"avx512_bf16", "amx_bf16"} else "without") + " bf16 instructions"
    return f"{model}, PyTorch's CPU capability {torch.backends.cpu.get_cpu_capability()}, {bf16}"
