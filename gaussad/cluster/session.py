"""Where the Ray engine runs: an existing cluster at an address, or a local one started for one run."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from gaussad.errors import GaussADError

INSTALL_HINT = "pip install 'gaussad[cluster]'"


def import_ray():
    """Ray, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise GaussADError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Connected to Ray while inside: to the cluster at `address` ("auto": the one this machine belongs
    to), or else to a local one with `num_cpus` CPUs (default: all) that is stopped on the way out. Where
    the caller is already connected, that connection is used and left open."""
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    # Nothing is sent anywhere: a production line's machines are often offline. Ray's own notices stay in
    # its session logs (its C++ core's too, which would warn that Ray Data's actors may fail to restart
    # once their driver is gone): the command's output is gaussad's lines, and a failure reaches the user
    # as one line all the same.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    options = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        _check_answers(address)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=num_cpus, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GaussADError(f"cannot connect to {where}: {reason}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_answers(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT address must answer within `timeout` seconds: Ray itself retries for over a minute."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:  # "auto", or a ray:// client address
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or str(error)
        message = f"cannot connect to the Ray cluster at {address}: nothing answers ({reason})"
        raise GaussADError(message) from None


@contextmanager
def ray_data_settings(progress: bool) -> Iterator[None]:
    """Ray Data's settings for a run in input order while inside: results in the order of their inputs,
    progress bars only when asked, and its progress notices (which dataset starts, where its logs are)
    off. They are process-wide, so the ones found are put back on the way out."""
    import ray.data  # importing it sets up its loggers, which would undo the level set here

    context = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    found = (context.execution_options.preserve_order, context.enable_progress_bars, logger.level)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = progress
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars, level = found
        logger.setLevel(level)
