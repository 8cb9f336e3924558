"""The C allocator's policy for large blocks, tuned for the CPU forward pass and held only while it runs.

Every batch, the backbone allocates and frees activations of tens of MiB. glibc's malloc serves blocks that
large by `mmap` and returns them to the system when freed, so the next batch faults every page in again and
the kernel zeroes it: 3,700 minor page faults per image for EfficientNet-Lite0 at 224 px, about 40% of the
forward pass on 2 cores. Served from the heap and kept there once freed, the pass runs much faster
(docs/design.md). Used only under `gaussad.cpu_tuning()`.

Outside the forward passes the kept memory only adds to the peak: blocks of other sizes (fitting's
statistics) fit badly into the holes it leaves, and the heap grows. So the policy is held while features
are extracted and glibc's defaults come back afterwards, with the kept memory returned to the system.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
KEEP_FREE_BYTES = 1 << 30
GLIBC_TRIM_THRESHOLD = 128 << 10  # glibc's defaults, restored on leaving
GLIBC_MMAP_MAX = 65536

_lock = threading.Lock()
_holders = 0  # nested or concurrent users of the policy: the last to leave restores the defaults


@contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """While inside: glibc's malloc serves large blocks from its heap and keeps up to 1 GiB of freed memory
    there for reuse. On leaving (the last holder, where several threads or levels hold it), glibc's
    defaults come back and the freed memory goes back to the system (`malloc_trim`). Process-wide while
    held. Yields True where it takes effect, False where the C library is not glibc (other allocators
    keep their own policy)."""
    global _holders
    if _libc() is None:
        yield False
        return
    with _lock:
        _holders += 1
        if _holders == 1:
            _mallopt(M_MMAP_MAX, 0)
            _mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES)
    try:
        yield True
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
                _mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
                _libc().malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, with the functions the policy uses; None under another C library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(parameter: int, value: int) -> None:
    _libc().mallopt(parameter, value)
