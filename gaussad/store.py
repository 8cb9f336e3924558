"""The fit's feature store: the float32 features of every training image, kept between the moments and the
readings that finish the Gaussians (fourth moments, fold statistics, held-out maps).

`DiskStore` appends them to a file in the temporary folder (constant memory, 0.4 MB per image with the
defaults); `MemoryStore` holds them in memory (no disk, memory grows with the images). Where neither is
wanted (`feature_store="none"`), the fit keeps no level features and runs the backbone again instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gaussad.config import FEATURE_STORES


class FeatureStore(ABC):
    """Float32 rows of one shape ((P, C) feature vectors, or (D,) pooled features), one per image, in the
    order the images were added."""

    def __init__(self) -> None:
        self.count = 0
        self.row_shape: tuple[int, ...] = ()

    @property
    def row_values(self) -> int:
        """Values per image."""
        return int(np.prod(self.row_shape, dtype=np.int64))

    def append(self, values: np.ndarray) -> None:
        """Add the rows (b, *row shape) of the next images."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        if self.count and values.shape[1:] != self.row_shape:
            raise ValueError(f"feature shape changed from {self.row_shape} to {values.shape[1:]}")
        self.row_shape = values.shape[1:]
        self._append(values)
        self.count += len(values)

    @abstractmethod
    def _append(self, values: np.ndarray) -> None: ...

    @abstractmethod
    def read(
        self, start: int = 0, stop: int | None = None, per_chunk: int = 1
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the first image, rows) of images start..stop-1 (default: to the last) in order,
        `per_chunk` images at a time."""


class DiskStore(FeatureStore):
    """Rows appended to a float32 file; a read seeks to its first image."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _append(self, values: np.ndarray) -> None:
        with self.path.open("ab") as file:
            values.tofile(file)

    def read(
        self, start: int = 0, stop: int | None = None, per_chunk: int = 1
    ) -> Iterator[tuple[int, np.ndarray]]:
        stop = self.count if stop is None else stop
        with self.path.open("rb") as file:
            file.seek(start * self.row_values * np.dtype(np.float32).itemsize)
            for first in range(start, stop, per_chunk):
                count = min(per_chunk, stop - first)
                chunk = np.fromfile(file, dtype=np.float32, count=count * self.row_values)
                yield first, chunk.reshape(count, *self.row_shape)


class MemoryStore(FeatureStore):
    """Rows held in memory as they were appended (a read copies only where a chunk spans two appends)."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[np.ndarray] = []
        self._starts: list[int] = []

    def _append(self, values: np.ndarray) -> None:
        self._starts.append(self.count)
        self._parts.append(values)

    def read(
        self, start: int = 0, stop: int | None = None, per_chunk: int = 1
    ) -> Iterator[tuple[int, np.ndarray]]:
        stop = self.count if stop is None else stop
        for first in range(start, stop, per_chunk):
            last = min(first + per_chunk, stop)
            part = int(np.searchsorted(self._starts, first, side="right")) - 1
            pieces, at = [], first
            while at < last:
                offset = at - self._starts[part]
                pieces.append(self._parts[part][offset : offset + last - at])
                at += len(pieces[-1])
                part += 1
            yield first, pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def open_store(kind: str, folder: Path | None, name: str) -> FeatureStore | None:
    """The store of one kind: "disk" (the file `name`.f32 in `folder`), "memory", or "none" (None)."""
    if kind not in FEATURE_STORES:
        raise ValueError(f"feature store must be one of {', '.join(FEATURE_STORES)}, got {kind!r}")
    if kind == "disk":
        return DiskStore(folder / f"{name}.f32")
    return MemoryStore() if kind == "memory" else None
