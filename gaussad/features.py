"""From images to model outputs, in batches: decoding and resizing run in threads beside the model."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Generic, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from gaussad.allocator import keep_freed_memory
from gaussad.backbones import Preprocessing
from gaussad.config import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, ImageSize, size_pair
from gaussad.decoding import ImageError, decoded_batches, decoding_pool
from gaussad.errors import GaussADError
from gaussad.framing import Crop, Window, frame
from gaussad.images import DEFAULT_MAX_PIXELS, ImageInput, check_max_pixels, load_pixels
from gaussad.tuning import ForwardThreads, tuning_enabled

Precision = Literal["fp32", "bf16"]
Output = TypeVar("Output")


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' picks CUDA where there is a GPU; an unavailable CUDA is a user error, not a crash later."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise GaussADError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise GaussADError("--device cuda: no CUDA GPU is available to PyTorch here")
    return resolved


@dataclass
class Batch(Generic[Output]):
    """The model's output for images in input order, with each image's original size. `indices` are the
    images' positions among the inputs; `errors` the images of the batch that were skipped (a batch may
    hold only errors: then `outputs` is None)."""

    indices: list[int]
    outputs: Output | None
    sizes: list[tuple[int, int]]  # each image's original (height, width)
    windows: list[Window]  # the part of each image the model saw (the whole image without a crop)
    errors: list[ImageError]
    pixels: np.ndarray | None = None  # the model inputs (B, H, W, 3) uint8, when asked to keep them

    @property
    def start(self) -> int:
        """Position of the batch's first image among the inputs."""
        return self.indices[0] if self.indices else -1


def prepare(
    item: ImageInput, image_size: ImageSize, max_pixels: int = DEFAULT_MAX_PIXELS, crop: Crop | None = None
) -> tuple[np.ndarray, tuple[int, int], Window]:
    """Decode one image, cut it to its part's window where the model has a `crop` (`gaussad.framing`), and
    resize it to the model input, a square side or (height, width), whatever its aspect ratio: (H, W, 3)
    uint8, the original size and the window.

    An image declaring more than `max_pixels` is refused before it is decoded (`ImageTooLargeError`).
    Resized by PyTorch's bilinear filter with antialiasing on the 8-bit pixels as they lie (HWC): Pillow's
    BILINEAR filter within 1 of 255, several times faster.
    """
    pixels = load_pixels(item, max_pixels)
    size = pixels.shape[:2]
    pixels, window = frame(pixels, crop)
    if not pixels.flags.writeable:  # as PIL's arrays are: torch warns of them, though nothing writes here
        pixels = pixels.copy()
    channels_last = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), no copy
    resized = F.interpolate(
        channels_last, size=size_pair(image_size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].permute(1, 2, 0).numpy(), size, window


def _timed_prepare(
    item: ImageInput, image_size: ImageSize, max_pixels: int, crop: Crop | None
) -> tuple[np.ndarray, tuple[int, int], Window, float]:
    """`prepare`, with the CPU seconds its thread spent on it."""
    start = time.thread_time()
    pixels, size, window = prepare(item, image_size, max_pixels, crop)
    return pixels, size, window, time.thread_time() - start


@lru_cache(maxsize=64)
def pooling_matrix(cells: int, size: int) -> torch.Tensor:
    """(size, cells) float64: row i averages the cells of output i under adaptive average pooling, whose
    windows [floor(i * cells / size), ceil((i + 1) * cells / size)) overlap where size does not divide cells.
    As a matrix product it exports to ONNX for any sizes, unlike `adaptive_avg_pool2d`."""
    matrix = torch.zeros(size, cells, dtype=torch.float64)
    for i in range(size):
        start, stop = (i * cells) // size, -((-(i + 1) * cells) // size)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def grid_pool(features: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Feature maps (B, C, H, W) averaged over a grid of cells by pooling matrices rows (h, H) and columns
    (w, W): (B, C, h, w)."""
    return rows @ features @ columns.T


def pool_features(features: torch.Tensor, grid: int) -> torch.Tensor:
    """One level's image descriptor: feature maps (B, C, H, W) averaged over each cell of a grid x grid
    layout, cells concatenated channel by channel (B, C * grid * grid). grid 1 is the paper's global
    average pooling; a finer grid also keeps where in the image a feature occurs (docs/design.md)."""
    if grid == 1:
        return features.mean(dim=(2, 3))
    rows, columns = (pooling_matrix(n, grid).to(features) for n in features.shape[-2:])
    return grid_pool(features, rows, columns).flatten(1)


def stack_levels(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature maps of several levels side by side on the coarsest level's grid: finer maps (B, C, H, W)
    are averaged over the cells of that grid, then concatenated along channels. The positional input of the
    hybrid map's per-position Gaussian."""
    grid = min((f.shape[-2:] for f in features), key=lambda shape: shape[0] * shape[1])
    pooled = [
        f
        if f.shape[-2:] == grid
        else grid_pool(
            f, pooling_matrix(f.shape[-2], grid[0]).to(f), pooling_matrix(f.shape[-1], grid[1]).to(f)
        )
        for f in features
    ]
    return torch.cat(pooled, dim=1)


class BatchRunner:
    """Runs a model over images in batches: decodes each image, cuts it to its part's window (`crop`) and
    resizes it to the model input in threads beside the model, normalizes the batch and calls `model(batch)`
    under inference mode."""

    def __init__(
        self,
        model: Callable[[torch.Tensor], Output],
        preprocessing: Preprocessing,
        image_size: ImageSize,
        device: torch.device,
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int = DEFAULT_WORKERS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        crop: Crop | None = None,
    ) -> None:
        if batch_size < 1:
            raise GaussADError(f"batch size {batch_size}: expected at least 1")
        self.max_pixels = check_max_pixels(max_pixels)
        self.model = model
        self.image_size = image_size
        self.device = device
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.crop = crop
        mean, std = preprocessing.mean, preprocessing.std
        self._scale = (1.0 / (255.0 * torch.tensor(std))).to(device)
        self._offset = (-torch.tensor(mean) / torch.tensor(std)).to(device)

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 pixels -> the normalized float32 (B, 3, H, W) model input, channels last in
        memory: one fused multiply-add in place over the channels as the last axis."""
        batch = torch.from_numpy(pixels).to(self.device).float()
        return torch.addcmul(self._offset, batch, self._scale, out=batch).permute(0, 3, 1, 2)

    def _run(self, pixels: np.ndarray) -> Output:
        with torch.inference_mode():
            return self.model(self.normalize(pixels))

    def batches(
        self,
        items: Sequence[ImageInput],
        progress: str | None = None,
        skip_errors: bool = False,
        keep_pixels: bool = False,
    ) -> Iterator[Batch[Output]]:
        """Model outputs batch by batch in input order; the next batch's images decode while the model runs.
        A batch whose images were all skipped has no outputs (None).

        An unreadable image stops the run with its `GaussADError`, or with `skip_errors` is left out and
        reported in the next batch's `errors`. Under `gaussad.cpu_tuning()` the CPU forward pass holds the
        allocator policy and runs on one thread or all, whichever the measured costs of the first batches
        favour (`ForwardThreads`). `keep_pixels` returns each batch's model inputs too.
        """
        tuned_cpu = tuning_enabled() and self.device.type == "cpu"
        decode = partial(
            _timed_prepare, image_size=self.image_size, max_pixels=self.max_pixels, crop=self.crop
        )
        with (
            _progress_bar(len(items), progress) as bar,
            keep_freed_memory() if tuned_cpu else nullcontext(),
            decoding_pool(len(items), self.workers) as pool,
            ForwardThreads(self.device, self.workers, math.ceil(len(items) / self.batch_size)) as threads,
        ):
            for indices, chunk, errors in decoded_batches(items, decode, self.batch_size, pool, skip_errors):
                if not chunk:
                    yield Batch(indices, None, [], [], errors)
                    bar.update(len(errors))
                    continue
                main_start = time.thread_time()
                inputs = np.stack([pixels for pixels, _, _, _ in chunk])
                outputs = self._run(inputs)
                sizes = [size for _, size, _, _ in chunk]
                windows = [window for _, _, window, _ in chunk]
                yield Batch(indices, outputs, sizes, windows, errors, inputs if keep_pixels else None)
                threads.observe(
                    time.thread_time() - main_start, sum(seconds for *_, seconds in chunk), len(chunk)
                )
                bar.update(len(chunk) + len(errors))


def _progress_bar(total: int, description: str | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="img", disable=description is None, leave=False)
