"""Shared by the serving tests (no tests here): a tiny model fitted once, PNG bytes, an in-process app
and a real `gaussad serve` process on loopback."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from gaussad import GaussAD
from gaussad.serve.app import create_app
from gaussad.serve.settings import ServeSettings

# Pooled image scores: the tests pick manual thresholds by the scores of particular images on that scale.
TINY = {"image_size": 64, "batch_size": 8, "device": "cpu", "map_levels": (2, 3), "image_score": "pooled"}
_fitted: dict[str, Path] = {}

# `gaussad serve` as the CLI runs it (argparse, cpu_tuning), without depending on the CLI's wiring.
LAUNCHER = """
import argparse, sys
from gaussad.serve.commands import add_commands
from gaussad.tuning import cpu_tuning
parser = argparse.ArgumentParser()
add_commands(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
with cpu_tuning():
    args.handler(args)
"""


def fitted_model(category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder named 'widget' fitted at 64 px on the synthetic category, once per session (for the
    modules' own fixtures: a fixture imported into several modules would run once in each)."""
    if "widget" not in _fitted:
        folder = tmp_path_factory.mktemp("served") / "widget"
        GaussAD(**TINY).fit(category / "train" / "good").save(folder)
        _fitted["widget"] = folder
    return _fitted["widget"]


def inspection_images(category: Path) -> list[Path]:
    """The synthetic category's test images: 4 good, then 4 with a scratch."""
    return sorted((category / "test" / "good").iterdir()) + sorted((category / "test" / "scratch").iterdir())


def png(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", **options)
    return buffer.getvalue()


@contextmanager
def serve_app(model: Path, tmp_path: Path, **settings) -> Iterator[TestClient]:
    """The app in process (TestClient runs its lifespan), auditing to a SQLite file under tmp_path."""
    settings.setdefault("audit", str(tmp_path / "audit.sqlite3"))
    settings.setdefault("device", "cpu")
    with TestClient(create_app(ServeSettings((model,), **settings))) as client:
        yield client


@dataclass
class ServerProcess:
    """A `gaussad serve` subprocess on loopback; what it prints is kept in `output`."""

    process: subprocess.Popen
    port: int
    output: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_server(*args: str, cwd: Path, timeout: float = 60.0) -> ServerProcess:
    """Start `gaussad serve ARGS --port 0` and wait (at most `timeout` seconds) until it is ready; its port
    is in the line it prints when listening."""
    command = [sys.executable, "-c", LAUNCHER, "serve", *args, "--host", "127.0.0.1", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--device", "cpu"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    listening = threading.Event()

    def read() -> None:  # all it prints, so that its pipe never fills
        for line in process.stdout:
            output.append(line)
            if line.startswith("gaussad: serving"):
                listening.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    if not listening.wait(timeout):
        process.kill()
        raise RuntimeError(f"server did not start: {''.join(output)}")
    server = ServerProcess(
        process, int(next(o for o in output if o.startswith("gaussad: serving")).rsplit(":", 1)[1]), output
    )
    while time.monotonic() < deadline:
        try:
            if server.get("/v2/health/ready", timeout=1.0)[0] == 200:
                return server
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {''.join(output)}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("server not ready in time")
