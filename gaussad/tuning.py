"""Opt-in, process-wide CPU settings for speed: the CLI and the benchmarks use them, the library does not.

Inside `cpu_tuning()`, feature extraction on the CPU holds the allocator policy (`gaussad.allocator`)
and chooses the forward pass's thread count from measured costs (`ForwardThreads`), and fitting runs its
small linear algebra on one BLAS thread per job. Each of these changes state that the whole process shares,
which a library user, or a server scoring two requests at once, does not expect; outside the context
gaussad changes none of it, and the results are the same either way (within the last bits of float32).

Entries may nest or overlap across threads: PyTorch's thread count is recorded the first time a holder
needs it and restored when the last one leaves, so overlapping runs cannot leave it changed. Entering
imports nothing: the command line enters before it checks its arguments, and PyTorch takes seconds to load.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from threadpoolctl import threadpool_limits

if TYPE_CHECKING:
    import torch

_lock = threading.Lock()
_holders = 0
_threads: int | None = None  # PyTorch's thread count before any holder changed it, once one needed it


@contextmanager
def cpu_tuning() -> Iterator[None]:
    """Enable gaussad's process-wide CPU settings while inside (see the module's docstring)."""
    global _holders, _threads
    with _lock:
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _threads is not None:
                _set_threads(_threads)
                _threads = None


def _set_threads(count: int) -> None:
    import torch  # here, not at the top: entering `cpu_tuning` must not load PyTorch

    torch.set_num_threads(count)


def tuning_enabled() -> bool:
    """Whether some `cpu_tuning()` context is active in this process."""
    return _holders > 0


def full_thread_count() -> int:
    """PyTorch's thread count as the tuning found it: what a forward pass on all threads goes back to."""
    global _threads
    import torch

    with _lock:
        if _holders == 0:
            return torch.get_num_threads()
        if _threads is None:
            _threads = torch.get_num_threads()
        return _threads


def one_blas_thread() -> Any:
    """Small dense linear algebra on one BLAS thread per job, under tuning only: faster, and several times
    faster when another process shares the cores (benchmarks/README.md); process-wide, hence opt-in."""
    return threadpool_limits(limits=1, user_api="blas") if tuning_enabled() else nullcontext()


class ForwardThreads:
    """How many threads the CPU forward pass gets beside the decoding threads, chosen from measured costs.

    Both share the same cores. When decoding costs more CPU than a one-thread forward pass, a multi-threaded
    forward pass mostly waits at its barriers for the thread a decoder displaced; when the forward pass costs
    more, it needs every core. So, under tuning, the model starts on one thread, where the main thread's CPU
    time is the whole cost of a batch, and after the second batch (the first warms the model up) goes back
    to all threads unless one thread keeps up. A single batch keeps all threads: nothing decodes beside it.
    """

    def __init__(self, device: torch.device, decoders: int, batches: int) -> None:
        self.threads = full_thread_count()
        self.decoders = decoders
        self.deciding = tuning_enabled() and device.type == "cpu" and self.threads > 1 and batches > 1
        self.batches_seen = 0

    def __enter__(self) -> ForwardThreads:
        if self.deciding:
            _set_threads(1)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if tuning_enabled():
            _set_threads(self.threads)

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
            _set_threads(self.threads)
