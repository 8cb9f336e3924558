"""From images to backbone feature maps, in batches: decoding and resizing run in threads beside the model."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from gaussad.allocator import keep_freed_memory
from gaussad.backbones import TappedBackbone
from gaussad.errors import GaussADError
from gaussad.images import ImageInput, load_pixels
from gaussad.options import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, PRECISIONS

Precision = Literal["fp32", "bf16"]


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' picks CUDA where there is a GPU; an unavailable CUDA is a user error, not a crash later."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise GaussADError("--device cuda: no CUDA GPU is available to PyTorch here")
    return resolved


@dataclass
class FeatureBatch:
    """Feature maps of consecutive images: one float32 (B, C, H, W) tensor per requested level."""

    start: int
    features: list[torch.Tensor]
    sizes: list[tuple[int, int]]  # each image's original (height, width)


def prepare(item: ImageInput, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one image and squash it to the square model input: (S, S, 3) uint8 and the original size.

    Resized by PyTorch's bilinear filter with antialiasing, on 8-bit pixels as they are laid out (HWC):
    the same filter as Pillow's BILINEAR (within 1 of 255), 5x faster (900 px to 224: 1.4 against 7.1 ms).
    """
    pixels = load_pixels(item)
    if not pixels.flags.writeable:  # as PIL's arrays are: torch warns of them, though nothing writes here
        pixels = pixels.copy()
    channels_last = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), no copy
    resized = F.interpolate(
        channels_last, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].permute(1, 2, 0).numpy(), pixels.shape[:2]


def _timed_prepare(item: ImageInput, image_size: int) -> tuple[np.ndarray, tuple[int, int], float]:
    """`prepare`, with the CPU seconds its thread spent on it."""
    start = time.thread_time()
    pixels, size = prepare(item, image_size)
    return pixels, size, time.thread_time() - start


class _ForwardThreads:
    """How many threads the CPU forward pass gets beside the decoding threads, chosen from measured costs.

    Both share the same cores. When decoding costs more CPU than a one-thread forward pass, a multi-threaded
    forward pass mostly waits at its barriers for the thread a decoder displaced (bottle's 900 px PNGs,
    2 cores: 52-54 img/s extracted with two threads, 65-68 with one); when the forward pass costs more (the
    tiles' small JPEGs), it needs every core (87-103 img/s with one thread, 117-133 with two). So the model
    starts on one thread, where the main thread's CPU time is the whole cost of a batch (forward pass and
    what the caller does with it), and after the second batch (the first warms the model up) goes back to
    all threads unless one thread keeps up: no slower than the decoders or the cores' shared budget.
    A single batch keeps all threads: nothing decodes beside its forward pass.
    """

    def __init__(self, device: torch.device, decoders: int, batches: int) -> None:
        self.threads = torch.get_num_threads()
        self.decoders = decoders
        self.deciding = device.type == "cpu" and self.threads > 1 and batches > 1
        self.batches_seen = 0

    def __enter__(self) -> _ForwardThreads:
        if self.deciding:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc_info: object) -> None:
        torch.set_num_threads(self.threads)

    def observe(self, main_seconds: float, decode_seconds: float, images: int) -> None:
        """CPU seconds of one batch: the main thread's (forward pass and caller) and its images' decoding."""
        if not self.deciding:
            return
        self.batches_seen += 1
        if self.batches_seen < 2:
            return
        self.deciding = False
        forward, decode = main_seconds / images, decode_seconds / images
        if forward > max(decode / self.decoders, (forward + decode) / self.threads):
            torch.set_num_threads(self.threads)


def pool_features(features: torch.Tensor, grid: int) -> torch.Tensor:
    """One level's image descriptor: feature maps (B, C, H, W) averaged over each cell of a grid x grid
    layout, cells concatenated (B, C * grid * grid). grid 1 is the paper's global average pooling; a finer
    grid also keeps where in the image a feature occurs, which aligned parts reward (README, "How the
    defaults were chosen")."""
    if grid == 1:
        return features.mean(dim=(2, 3))
    return F.adaptive_avg_pool2d(features, grid).flatten(1)


def stack_levels(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature maps of several levels side by side on the coarsest level's grid: finer maps (B, C, H, W)
    are averaged over the cells of that grid, then concatenated along channels. The positional input of the
    hybrid map's per-position Gaussian."""
    grid = min((f.shape[-2:] for f in features), key=lambda shape: shape[0] * shape[1])
    return torch.cat([f if f.shape[-2:] == grid else F.adaptive_avg_pool2d(f, grid) for f in features], dim=1)


class FeatureExtractor:
    """Runs a frozen backbone over images and returns the feature maps of the requested levels."""

    def __init__(
        self,
        backbone: TappedBackbone,
        levels: Sequence[int],
        image_size: int,
        device: torch.device,
        precision: Precision = "fp32",
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        if precision not in PRECISIONS:
            raise GaussADError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        if batch_size < 1:
            raise GaussADError(f"batch size {batch_size}: expected at least 1")
        self.levels = list(levels)
        self.image_size = image_size
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.backbone = backbone.to(device=device, memory_format=torch.channels_last)
        mean, std = backbone.preprocessing.mean, backbone.preprocessing.std
        self._scale = (1.0 / (255.0 * torch.tensor(std))).to(device)
        self._offset = (-torch.tensor(mean) / torch.tensor(std)).to(device)

    def _forward(self, pixels: np.ndarray) -> list[torch.Tensor]:
        # Normalized as (B, H, W, 3) by one fused multiply-add in place, over the channels as the last axis;
        # seen as (B, 3, H, W), that is channels_last already (batch of 16: 8.4 -> 3.8 ms).
        batch = torch.from_numpy(pixels).to(self.device).float()
        batch = torch.addcmul(self._offset, batch, self._scale, out=batch).permute(0, 3, 1, 2)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else nullcontext()
        )
        with torch.inference_mode(), autocast:
            outputs = self.backbone(batch, self.levels)
        return [output.float() for output in outputs]

    def batches(self, items: Sequence[ImageInput], progress: str | None = None) -> Iterator[FeatureBatch]:
        """Feature batches in input order; the next batch's images decode in threads while the model runs.

        On CPU the forward pass runs on one thread or all of them, whichever the measured costs of the
        first batches favour (`_ForwardThreads`); PyTorch's thread count is restored afterwards.
        """
        bar = _progress_bar(len(items), progress)
        lookahead = 2 * self.batch_size  # bounded: decoded images never pile up in memory
        # On CPU the forward passes reuse their activations' pages (gaussad.allocator): 54 -> 90 img/s.
        allocator = keep_freed_memory() if self.device.type == "cpu" else nullcontext()
        with (
            allocator,
            ThreadPoolExecutor(max_workers=self.workers) as pool,
            _ForwardThreads(
                self.device, self.workers, math.ceil(len(items) / self.batch_size)
            ) as forward_threads,
        ):
            pending: deque[Future] = deque()
            queued = 0
            for start in range(0, len(items), self.batch_size):
                while queued < len(items) and queued < start + lookahead:
                    pending.append(pool.submit(_timed_prepare, items[queued], self.image_size))
                    queued += 1
                chunk = [pending.popleft().result() for _ in range(min(self.batch_size, len(items) - start))]
                main_start = time.thread_time()
                features = self._forward(np.stack([pixels for pixels, _, _ in chunk]))
                yield FeatureBatch(start, features, [size for _, size, _ in chunk])
                forward_threads.observe(
                    time.thread_time() - main_start, sum(seconds for _, _, seconds in chunk), len(chunk)
                )
                bar.update(len(chunk))
        bar.close()


def _progress_bar(total: int, description: str | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="img", disable=description is None, leave=False)
