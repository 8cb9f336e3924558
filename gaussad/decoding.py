"""Images decoded ahead of a model, in threads, a batch at a time; an unreadable image stops the run or is
skipped and reported. Shared by the PyTorch path (`gaussad.features`) and the torch-free runtime
(`gaussad.runtime`): no torch here."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

from gaussad.errors import GaussADError
from gaussad.images import ImageInput, describe

Decoded = TypeVar("Decoded")


@dataclass(frozen=True)
class ImageError:
    """An input image that could not be read, skipped where a run is told to go on."""

    index: int  # its position among the inputs
    name: str  # its path, or "<image N>"
    message: str  # the one-line reason, naming the file


def decoding_pool(n_items: int, workers: int) -> AbstractContextManager[ThreadPoolExecutor | None]:
    """The threads that decode a run's images; none for a single image (see `decoded_batches`)."""
    return ThreadPoolExecutor(max_workers=workers) if n_items > 1 else nullcontext()


def decoded_batches(
    items: Sequence[ImageInput],
    decode: Callable[[ImageInput], Decoded],
    batch_size: int,
    pool: ThreadPoolExecutor | None,
    skip_errors: bool,
) -> Iterator[tuple[list[int], list[Decoded], list[ImageError]]]:
    """(positions, decoded images, images skipped in it) in input order, one batch per `batch_size`
    consecutive inputs: a batch holds inputs k * batch_size up to (k + 1) * batch_size - 1 whatever else is
    read, so that runs over shards of the inputs see the same batches (PyTorch's results can depend on a
    batch's size). `decode` runs in `pool` at most two batches ahead, so decoded images never pile up in
    memory; without a pool (a single image, which nothing could overlap), in the caller's thread, which
    spares starting one. A batch may hold only errors. Without `skip_errors` an unreadable image's
    `GaussADError` ends the run."""
    lookahead = 2 * batch_size
    submit = _decoded_now if pool is None else pool.submit
    pending: deque[Future] = deque()
    queued = taken = 0
    try:
        while taken < len(items):
            chunk, indices, errors = [], [], []
            end = min(taken + batch_size, len(items))
            while taken < end:
                while queued < len(items) and queued < taken + lookahead:
                    pending.append(submit(decode, items[queued]))
                    queued += 1
                try:
                    chunk.append(pending.popleft().result())
                    indices.append(taken)
                except GaussADError as error:
                    if not skip_errors:
                        raise
                    errors.append(ImageError(taken, describe(items[taken], taken), str(error)))
                taken += 1
            yield indices, chunk, errors
    finally:
        for future in pending:  # a reader that stops early leaves no decoding behind
            future.cancel()


def _decoded_now(decode: Callable[[ImageInput], Decoded], item: ImageInput) -> Future:
    """`decode(item)` run here, as a finished future: its error is raised where the pool's would be."""
    future: Future = Future()
    try:
        future.set_result(decode(item))
    except Exception as error:
        future.set_exception(error)
    return future
