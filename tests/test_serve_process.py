"""`gaussad serve` as a real process on loopback: a bounded load test, model reload on SIGHUP, a kill -9
under load that loses no answered decision, and SIGTERM draining the requests in flight."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_serve_support import ServerProcess, fitted_model, inspection_images, start_server

from gaussad.cli import main as cli_main
from gaussad.persistence import model_sha256
from gaussad.serve.audit import AuditStore
from gaussad.serve.loadgen import run_load

INSPECT = "/v1/models/widget/inspect"
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def workspace(category: Path, tmp_path_factory) -> Path:
    """A folder with its own copy of the model (SIGHUP's test recalibrates it) and the audit trail."""
    folder = tmp_path_factory.mktemp("process")
    shutil.copytree(fitted_model(category, tmp_path_factory), folder / "widget")
    return folder


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[Callable[[], ServerProcess]]:
    """The module's server, started again where a test killed it."""
    current: list[ServerProcess] = []

    def running() -> ServerProcess:
        if not current or current[-1].process.poll() is not None:
            current.append(
                start_server(
                    str(workspace / "widget"), "--audit", str(workspace / "audit.sqlite3"), cwd=workspace
                )
            )
        return current[-1]

    yield running
    for process in current:
        process.stop(signal.SIGKILL)


def _bodies(category: Path) -> list[bytes]:
    return [path.read_bytes() for path in inspection_images(category)]


def _recorded(workspace: Path, prefix: str) -> set[str]:
    store = AuditStore(str(workspace / "audit.sqlite3"))
    try:
        return {row["request_id"] for row in store.query() if row["request_id"].startswith(prefix)}
    finally:
        store.close()


def test_2000_requests_at_concurrency_32_without_errors_or_growth(
    server, workspace: Path, category: Path
) -> None:
    process = server()
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            samples.append((time.perf_counter(), process.rss_bytes()))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = asyncio.run(
            run_load("127.0.0.1", process.port, INSPECT, _bodies(category), 2000, 32, PNG, prefix="load")
        )
    finally:
        done.set()
        sampler.join()
    assert result.statuses() == {200: 2000}
    finished = sorted(answer.finished for answer in result.answers)
    first = max(rss for at, rss in samples if at <= finished[499])
    last = max(rss for at, rss in samples if at > finished[1499])
    assert last <= 1.1 * first, (first >> 20, last >> 20)
    assert len(_recorded(workspace, "load-")) == 2000


def test_sighup_swaps_a_recalibrated_model_in(server, workspace: Path, category: Path) -> None:
    process = server()
    folder = workspace / "widget"
    before = model_sha256(folder)
    assert cli_main(["calibrate", str(folder), "--max-false-alarm-rate", "0.2", "--quiet"]) == 0
    after = model_sha256(folder)
    assert after != before
    process.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, body = process.get("/v1/models")
        if status == 200 and after.encode() in body:
            break
        time.sleep(0.1)
    result = asyncio.run(
        run_load("127.0.0.1", process.port, INSPECT, _bodies(category)[:1], 1, 1, PNG, prefix="hup")
    )
    assert result.statuses() == {200: 1} and after.encode() in result.answers[0].body


def test_kill_9_under_load_loses_no_answered_decision(server, workspace: Path, category: Path) -> None:
    process = server()
    answered: list[str] = []

    def kill_after_100(answer) -> None:
        if answer.status == 200:
            answered.append(answer.request_id)
            if len(answered) == 100:
                os.kill(process.pid, signal.SIGKILL)

    result = asyncio.run(
        run_load(
            "127.0.0.1", process.port, INSPECT, _bodies(category), 400, 8, PNG, kill_after_100, prefix="crash"
        )
    )
    process.process.wait(10)
    assert result.statuses().get(0, 0) > 0  # requests were in flight when it died
    restarted = server()  # on the same audit trail
    assert restarted.pid != process.pid
    recorded = _recorded(workspace, "crash-")
    assert set(answered) <= recorded, sorted(set(answered) - recorded)[:5]


def test_sigterm_drains_requests_in_flight(server, workspace: Path, category: Path) -> None:
    process = server()
    body = _bodies(category)[4]
    connections = []
    for number in range(4):  # each request sends its headers and half its body, then waits
        connection = socket.create_connection(("127.0.0.1", process.port), timeout=30)
        head = (
            f"POST {INSPECT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nX-Request-ID: drain-{number}"
        )
        connection.sendall(f"{head}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
        connections.append(connection)
    time.sleep(0.5)
    process.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # no new connection once draining
        socket.create_connection(("127.0.0.1", process.port), timeout=2).close()
    statuses = []
    for connection in connections:
        connection.sendall(body[len(body) // 2 :])
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        statuses.append(answer.split(b" ", 2)[1])
        connection.close()
    assert statuses == [b"200"] * 4
    assert process.process.wait(30) in (0, -signal.SIGTERM)
    assert _recorded(workspace, "drain-") == {f"drain-{number}" for number in range(4)}
