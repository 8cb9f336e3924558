"""Loopback load for the serving benchmark and tests: N POST requests over C keep-alive connections.

A small HTTP/1.1 client on asyncio streams, much lighter than a general client library, so that on a
2-core machine the load generator takes little of the CPU the server is measured with. It speaks only
what `gaussad serve` answers (Content-Length bodies) and sends only to the address it is given.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Answer:
    """One request's outcome: status 0 when the connection failed before an answer."""

    request_id: str
    status: int
    seconds: float
    finished: float  # perf_counter() at the answer
    body: bytes = field(repr=False)


@dataclass
class LoadResult:
    answers: list[Answer]
    seconds: float

    @property
    def throughput(self) -> float:
        return len(self.answers) / self.seconds

    def latency_ms(self, quantile: float) -> float:
        return float(np.quantile([a.seconds for a in self.answers], quantile) * 1000.0)

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for answer in self.answers:
            counts[answer.status] = counts.get(answer.status, 0) + 1
        return counts


def _request(host: str, path: str, body: bytes, request_id: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        f"Content-Length: {len(body)}",
        f"X-Request-ID: {request_id}",
    ]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, whether the server keeps the connection open)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    fields = {
        name.lower(): value.strip() for name, _, value in (line.partition(":") for line in head[1:] if line)
    }
    body = await reader.readexactly(int(fields.get("content-length", "0")))
    return status, body, fields.get("connection", "").lower() != "close"


async def run_load(
    host: str,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    requests: int,
    concurrency: int,
    headers: dict[str, str] | None = None,
    on_answer: Callable[[Answer], None] | None = None,
    prefix: str = "load",
) -> LoadResult:
    """Send `requests` POSTs of `bodies` (in turn) to http://host:port/path from `concurrency` connections;
    request ids are `prefix-N`. A refused or dropped connection counts as status 0 and is opened again."""
    headers = {"Content-Type": "application/octet-stream"} | (headers or {})
    numbers = itertools.count()
    answers: list[Answer] = []

    async def connection() -> None:
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while (number := next(numbers)) < requests:
            request_id = f"{prefix}-{number}"
            payload = _request(host, path, bodies[number % len(bodies)], request_id, headers)
            started = time.perf_counter()
            try:
                if streams is None:
                    streams = await asyncio.open_connection(host, port)
                reader, writer = streams
                writer.write(payload)
                await writer.drain()
                status, body, keep = await _read_answer(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                status, body, keep = 0, b"", False
            answer = Answer(request_id, status, time.perf_counter() - started, time.perf_counter(), body)
            answers.append(answer)
            if on_answer is not None:
                on_answer(answer)
            if not keep and streams is not None:
                streams[1].close()
                streams = None
        if streams is not None:
            streams[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return LoadResult(answers, time.perf_counter() - started)
